//! The small milter vocabulary both sides of luamilter speak: the daemon (config, engine, Lua
//! API, logs) and the load generator behind `luamilter bench`.
//!
//! - [`stage`]: the milter stages and their negotiation flags.
//! - [`listen`]: milter socket addresses as Postfix and Sendmail write them.
//! - [`verdict`]: the kinds of answer a milter gives (accept, continue, reject, tempfail, discard).

pub mod listen;
pub mod stage;
pub mod verdict;

pub use listen::ListenAddr;
pub use stage::Stage;
pub use verdict::VerdictKind;
