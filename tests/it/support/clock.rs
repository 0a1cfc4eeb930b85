//! A clock the test moves by hand, for what the store times (greylist delays, TTLs, bans).

use luamilter::services::store::{self, Clock};
use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

/// Starts at the real time (so Redis' native expiry, which follows real time, is never earlier
/// than the store's logical expiry) and moves only when told.
#[derive(Clone)]
pub struct TestClock(Arc<AtomicI64>);

impl TestClock {
    pub fn new() -> TestClock {
        TestClock(Arc::new(AtomicI64::new((store::system_clock())())))
    }

    /// The store clock reading this one.
    pub fn clock(&self) -> Clock {
        let t = self.0.clone();
        Arc::new(move || t.load(Ordering::SeqCst))
    }

    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_millis() as i64, Ordering::SeqCst);
    }
}
