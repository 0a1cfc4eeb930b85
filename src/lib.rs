//! luamilter: a milter for Postfix and Sendmail whose policies are Lua scripts.

pub mod loadgen;
