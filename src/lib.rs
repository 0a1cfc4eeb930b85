//! luamilter: a milter for Postfix and Sendmail whose policies are Lua scripts.
//!
//! Layout:
//! - [`duration`]: parsing of "5m"-style durations.
//! - [`store`]: persistent state (SQLite or Redis) and its Lua module.
//! - [`db_cli`]: the `luamilter db` admin commands over the store.

pub mod db_cli;
pub mod duration;
pub mod store;
