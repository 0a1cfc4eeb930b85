//! luamilter: a milter for Postfix and Sendmail whose policies are Lua scripts.

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod db_cli;
pub mod duration;
pub mod engine;
pub mod listen;
pub mod loadgen;
pub mod logging;
pub mod lua_api;
pub mod reload;
pub mod server;
pub mod services;
pub mod stage;
pub mod stock;
