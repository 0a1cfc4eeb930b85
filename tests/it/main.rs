//! The integration test binary: one binary, one module per area.

mod dns;
mod dns_server;
mod spf;
