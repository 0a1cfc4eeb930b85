//! The integration test binary: the daemon driven over real sockets by a real milter client,
//! services against a real DNS server on loopback, and end to end through a private Postfix.

mod support;

mod cases;
mod cbv;
mod chain;
mod cli;
mod content;
mod dns;
mod dns_lists;
mod dns_server;
mod doc_examples;
mod docs;
mod dsn;
mod faults;
mod loadgen;
mod negotiation;
mod offline;
mod pack_bench;
mod postfix_e2e;
mod redis_server;
mod reload;
mod replay;
mod services;
mod session;
mod site;
mod smtp;
mod smtp_server;
mod spf;
mod spf_conformance;
mod store;
mod stubs;
mod systemd;
mod trace;
