//! The integration test binary: the daemon driven over real sockets by a real milter client,
//! and end to end through a private Postfix.

mod support;

mod chain;
mod cli;
mod docs;
mod faults;
mod negotiation;
mod postfix_e2e;
mod session;
