//! Micro-benchmark of the per-stage cost inside the engine: one Rust→Lua handler call with a
//! `ctx`, through the same path the server uses (`VmLease::run_stage`), for the trivial policy
//! of examples/bench.lua and the header stage of the every-stage one (examples/bench_full.lua).
//! Run with `cargo bench --bench handler_call`.

use criterion::{Criterion, criterion_group, criterion_main};
use luamilter::{
    config::Config,
    engine::{Generation, StageArgs},
    services::Services,
    session::{ClientInfo, SharedSession},
    stage::Stage,
};
use std::{hint::black_box, sync::Arc};

fn handler_call(c: &mut Criterion) {
    // Logging as the daemon does by default (info, text), into a sink: spans and events cost.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::sink)
        .try_init();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::TempDir::new().unwrap();
    let _in_runtime = runtime.enter();
    let generation = build_generation(&dir, "bench");
    let lease = generation.lease(0);
    let session = client_session();
    c.bench_function("mail handler call (continue)", |b| {
        b.iter(|| {
            let args = StageArgs::Envelope("good@example.org".into(), vec!["SIZE=2048".into()]);
            let outcome = runtime.block_on(lease.run_stage(&session, Stage::Mail, args));
            black_box(outcome.verdict);
        })
    });
    c.bench_function("mail handler call (reject)", |b| {
        b.iter(|| {
            let args = StageArgs::Envelope("spam@bad.example".into(), vec![]);
            let outcome = runtime.block_on(lease.run_stage(&session, Stage::Mail, args));
            black_box(outcome.verdict);
        })
    });
    c.bench_function("eom handler call (add_header, accept)", |b| {
        b.iter(|| {
            let outcome = runtime.block_on(lease.run_stage(&session, Stage::Eom, StageArgs::None));
            black_box(outcome.verdict);
            session.lock().reset_message();
        })
    });
    c.bench_function("first call of a connection (session and ctx made)", |b| {
        b.iter(|| {
            let lease = generation.lease(0);
            let session = SharedSession::default();
            let args = StageArgs::Envelope("good@example.org".into(), vec![]);
            let outcome = runtime.block_on(lease.run_stage(&session, Stage::Mail, args));
            black_box(outcome.verdict);
        })
    });
    let dir = tempfile::TempDir::new().unwrap();
    let full = build_generation(&dir, "bench_full");
    let lease = full.lease(0);
    let session = client_session();
    let args = StageArgs::Envelope("good@example.org".into(), vec![]);
    runtime.block_on(lease.run_stage(&session, Stage::Mail, args));
    c.bench_function("header handler call (every-stage policy)", |b| {
        b.iter(|| {
            let args = StageArgs::Header("Subject".into(), "A test message".into());
            let outcome = runtime.block_on(lease.run_stage(&session, Stage::Header, args));
            black_box(outcome.verdict);
        })
    });
}

/// A generation of `chain`, from examples/, with its store in `dir`.
fn build_generation(dir: &tempfile::TempDir, chain: &str) -> Arc<Generation> {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let text = format!(
        "[policies]\ndirs = [{examples:?}]\nchain = [{chain:?}]\n[store]\npath = {:?}\n",
        dir.path().join("store.db")
    );
    let config = Arc::new(Config::parse(&text, Some(dir.path().join("c.toml"))).unwrap());
    let services = Arc::new(Services::start(&config).unwrap());
    Arc::new(Generation::build(config, services, 1).unwrap())
}

/// A session of a client at 192.0.2.1.
fn client_session() -> SharedSession {
    let session = SharedSession::default();
    {
        let client: &mut ClientInfo = &mut session.lock().client;
        client.ip = Some("192.0.2.1".parse().unwrap());
        client.family = "inet";
    }
    session
}

criterion_group!(benches, handler_call);
criterion_main!(benches);
