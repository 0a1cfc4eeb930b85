//! luamilter: a milter for Postfix and Sendmail whose policies are Lua scripts.

pub mod access;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod db_cli;
pub mod dns;
pub mod dns_lists;
pub mod duration;
pub mod engine;
pub mod listen;
pub mod logging;
pub mod lua_api;
pub mod mime;
pub mod net;
pub mod reload;
pub mod server;
pub mod services;
pub mod session;
pub mod site;
pub mod spf;
pub mod stock;
pub mod store;

// The vocabulary shared with the load generator (crates/vocab), at its old paths.
pub use luamilter_vocab::stage;
