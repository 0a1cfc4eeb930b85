//! A clock the test moves by hand, for what the store times (greylist delays, TTLs, bans): the
//! library's manual clock, which case files move too.

pub use luamilter::services::store::ManualClock as TestClock;
