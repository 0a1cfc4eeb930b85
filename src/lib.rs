//! luamilter: a milter for Postfix and Sendmail whose policies are Lua scripts.

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod db_cli;
pub mod duration;
pub mod engine;
pub mod listen;
pub mod logging;
pub mod lua_api;
pub mod reload;
pub mod server;
pub mod services;
pub mod session;
pub mod stock;

// The vocabulary shared with the load generator (crates/vocab), at its old paths.
pub use luamilter_vocab::stage;
