//! The integration test binary: the daemon driven over real sockets by a real milter client,
//! services against a real DNS server on loopback, and end to end through a private Postfix.

mod support;

mod cases;
mod cbv;
mod chain;
mod cli;
mod dkim;
mod dns;
mod dns_lists;
mod dns_server;
mod doc_examples;
mod docs;
mod dsn;
mod faults;
mod loadgen;
mod logs;
mod manuals;
mod metrics;
mod negotiation;
mod offline;
mod pack_bench;
mod package;
mod postfix_e2e;
mod privileges;
mod redis_ha;
mod redis_server;
mod reload;
mod replay;
mod reputation;
mod services;
mod session;
mod site;
mod smtp;
mod smtp_server;
mod spf;
mod spf_conformance;
mod stock_sessions;
mod store;
mod stubs;
mod systemd;
mod trace;
