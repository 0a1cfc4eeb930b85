//! luamilter: a milter for Postfix and Sendmail whose policies are Lua scripts.

pub mod dns;
pub mod duration;
pub mod net;
pub mod spf;
