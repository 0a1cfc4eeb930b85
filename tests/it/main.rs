//! The integration test binary: the daemon driven over real sockets by a real milter client.

mod support;

mod chain;
mod cli;
mod faults;
mod negotiation;
mod session;
