//! luamilter: a milter for Postfix and Sendmail whose policies are Lua scripts.
//!
//! # How the tree is laid out
//!
//! | module | owns |
//! |---|---|
//! | [`daemon`] | start-up: services, first generation, the socket, one worker thread per core |
//! | [`server`] | the milter side: one indymilter callback function per stage ([`server`]), negotiation (`server/negotiate.rs`), verdict → reply and edit → action (`server/reply.rs`) |
//! | [`session`] | everything known about one SMTP connection and its current message; the one place message state is reset |
//! | [`engine`] | generations of loaded policies (`generation.rs`), one stage through the chain of Lua handlers (`chain.rs`), negotiation from the policies (`plan.rs`), policy files (`policy.rs`, `options.rs`), the Lua sandbox (`sandbox.rs`) |
//! | [`lua_api`] | what scripts see: `ctx` (a view of the session), verdicts, and one file per `require`-able module (`milter`, `milter.log`, `milter.dns`, `milter.spf`, `milter.net`, `milter.mime`, `milter.store`, `milter.site`, `milter.access`) |
//! | [`services`] | plain Rust services, usable without Lua: DNS and DNS lists, SPF, the store (SQLite, Redis), networks and addresses, MIME, the site facts and access map |
//! | [`reload`] | file watching, rebuilding a generation, swapping it in |
//! | [`pid_file`], [`privileges`] | `[milter] pid_file`, `user` and `group`, for supervisors other than systemd |
//! | [`metrics`] | the Prometheus registry and endpoint (`[metrics] listen`), the series the other modules record |
//! | [`config`], [`duration`], [`listen`], [`logging`], [`log_fields`], [`stock`] | the config file, durations, listening sockets, log output and the session fields of its lines, the embedded stock pack |
//! | [`lent`] | values lent to a future for each of its polls (the stage's macros and log fields, read by the Lua handlers it runs) |
//! | [`cli`], [`control`], [`db_cli`] | subcommands, the control socket (`ctl`), store administration (`db`) |
//! | [`offline`] | `luamilter test`: a message or case files through the policies in-process, over the server's own callbacks |
//!
//! The vocabulary shared with the load generator ([`stage`], listen addresses, verdict kinds)
//! lives in the `luamilter-vocab` crate; the load generator behind `luamilter bench` in
//! `luamilter-loadgen` (both under `crates/`).
//!
//! # How data flows
//!
//! ```text
//! MTA ─milter─▶ server ─────────────▶ session        (facts of the stage recorded)
//!                 │                      ▲
//!                 ├─ engine::chain ──────┤ ctx reads facts, queues edits
//!                 │   (Lua handlers, in chain order, until a final verdict)
//!                 │         └──▶ lua_api modules ──▶ services (dns, spf, store, …)
//!                 ▼
//!        server::reply: verdict → status + SMTP reply; at eom, edits → actions ─▶ MTA
//! ```
//!
//! A connection pins the generation current at negotiation ([`engine::Engine`]); a reload builds
//! the next generation beside it ([`reload`]), so a connection sees one set of policies from
//! connect to close.

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod db_cli;
pub mod duration;
pub mod engine;
pub mod lent;
pub mod listen;
pub mod log_fields;
pub mod log_output;
pub mod logging;
pub mod lua_api;
pub mod manuals;
pub mod metrics;
pub mod offline;
pub mod pid_file;
pub mod privileges;
pub mod reload;
pub mod server;
pub mod services;
pub mod session;
pub mod stock;
pub mod systemd;
pub mod throttle;

// The vocabulary shared with the load generator (crates/vocab), at its old paths.
pub use luamilter_vocab::stage;
