//! The load generator against real milters on real sockets: the native
//! baseline (over UNIX and TCP), and a milter that uses every stage the
//! generator must handle like Postfix (per-recipient reject, NOREPLY headers,
//! SKIP in the body, discard at MAIL).

#[allow(dead_code)] // its `main` is not used here
#[path = "../../examples/native_baseline.rs"]
mod native_baseline;

use indymilter::{Actions, Callbacks, Config, ContextActions, ProtoOpts, Status};
use luamilter::listen::{BoundSocket, ListenAddr};
use luamilter_loadgen::{self as loadgen, BenchArgs, Report, SPAM_SENDER, VerdictKind};
use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};
use tokio::{sync::watch, task::JoinHandle};

fn args(socket: ListenAddr, messages: u64, body_size: usize, spam_fraction: f64) -> BenchArgs {
    BenchArgs {
        socket,
        concurrency: 8,
        messages,
        per_connection: 3,
        body_size,
        message: None,
        spam_fraction,
        timeout: 10.0,
        server_pid: Some(std::process::id()),
        hold: None,
        hold_secs: 0.0,
        json: false,
    }
}

/// A milter task and the switch that stops it.
struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Running {
    fn spawn<F>(serve: impl FnOnce(watch::Receiver<bool>) -> F) -> Self
    where
        F: Future<Output = std::io::Result<()>> + Send + 'static,
    {
        let (stop, rx) = watch::channel(false);
        Self {
            stop,
            task: tokio::spawn(serve(rx)),
        }
    }

    async fn shutdown(self) {
        self.stop.send(true).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|&stop| stop).await;
}

fn start_baseline(listener: luamilter::listen::MilterListener) -> Running {
    Running::spawn(|rx| native_baseline::serve(listener, stopped(rx)))
}

/// The counts a run against the trivial policy must show.
fn check_trivial_policy(report: &Report, messages: u64, spam: u64) {
    assert_eq!(report.errors, 0, "{:?}", report.error_samples);
    assert_eq!(report.messages, messages);
    assert_eq!(report.verdict(VerdictKind::Reject), spam);
    assert_eq!(
        report.by_stage.get("reject@mail").copied().unwrap_or(0),
        spam
    );
    assert_eq!(report.verdict(VerdictKind::Accept), messages - spam);
    assert_eq!(
        report.edits,
        messages - spam,
        "one X-Policy header per accepted message"
    );
    // Three messages per connection, except a worker's last one when the messages run out.
    let min_connections = messages.div_ceil(3);
    assert!((min_connections..=min_connections + 8).contains(&report.connections));
    let opts = report.negotiated.as_deref().unwrap();
    assert!(
        opts.contains("NO_BODY") && opts.contains("NO_HEADER"),
        "{opts}"
    );
    assert!(!opts.contains("NO_MAIL"), "{opts}");
    let latency = report.latency_ms.unwrap();
    assert!(0.0 < latency.p50 && latency.p50 <= latency.p99 && latency.p99 <= latency.max);
    assert!(report.messages_per_sec > 0.0);
    let server = report.server.unwrap();
    assert!(server.cpu_secs >= 0.0 && server.rss_kib > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_over_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = ListenAddr::Unix(dir.path().join("native.sock"));
    let (listener, _socket_file) = BoundSocket::bind(&socket, 0o600)
        .await
        .unwrap()
        .into_parts()
        .unwrap();
    let milter = start_baseline(listener);

    let report = loadgen::run(args(socket.clone(), 300, 2048, 0.1))
        .await
        .unwrap();
    check_trivial_policy(&report, 300, 30);

    let mut hold = args(socket, 0, 0, 0.0);
    hold.hold = Some(20);
    let report = loadgen::run(hold).await.unwrap();
    assert_eq!(
        (report.held, report.errors, report.messages),
        (Some(20), 0, 0)
    );
    assert_eq!(report.connections, 20);

    milter.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_over_tcp() {
    let bound = BoundSocket::bind(&"inet:0@127.0.0.1".parse().unwrap(), 0o600)
        .await
        .unwrap();
    let socket = bound.local.clone();
    let (listener, _) = bound.into_parts().unwrap();
    let milter = start_baseline(listener);

    let report = loadgen::run(args(socket, 200, 100 * 1024, 0.25))
        .await
        .unwrap();
    check_trivial_policy(&report, 200, 50);

    milter.shutdown().await;
}

/// What the stage-rich milter saw.
#[derive(Default)]
struct Seen {
    headers: AtomicU64,
    body_chunks: AtomicU64,
}

/// Discards the spam sender at MAIL, rejects recipient 2, takes headers without
/// replying, skips the body after its first chunk, adds a header and accepts.
fn staged_callbacks(seen: Arc<Seen>) -> Callbacks<()> {
    let (on_header, on_body) = (seen.clone(), seen);
    Callbacks::new()
        .on_negotiate(|cx, actions, opts| {
            Box::pin(async move {
                cx.requested_actions = actions & Actions::ADD_HEADER;
                cx.requested_opts |= opts & ProtoOpts::NOREPLY_HEADER;
                Status::Continue
            })
        })
        .on_mail(|_, args| {
            Box::pin(async move {
                let spam = format!("<{SPAM_SENDER}>");
                if args[0].to_bytes() == spam.as_bytes() {
                    Status::Discard
                } else {
                    Status::Continue
                }
            })
        })
        .on_rcpt(|_, args| {
            Box::pin(async move {
                if args[0].to_bytes() == b"<rcpt2@example.net>" {
                    Status::Reject
                } else {
                    Status::Continue
                }
            })
        })
        .on_header(move |_, _, _| {
            on_header.headers.fetch_add(1, Ordering::Relaxed);
            Box::pin(async { Status::Noreply })
        })
        .on_body(move |_, _| {
            on_body.body_chunks.fetch_add(1, Ordering::Relaxed);
            Box::pin(async { Status::Skip })
        })
        .on_eom(|cx| {
            Box::pin(async move {
                cx.actions.add_header("X-Staged", "yes").await.unwrap();
                Status::Accept
            })
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_reactions_to_every_stage() {
    let bound = BoundSocket::bind(&"inet:127.0.0.1:0".parse().unwrap(), 0o600)
        .await
        .unwrap();
    let socket = bound.local.clone();
    let (listener, _) = bound.into_parts().unwrap();
    let seen = Arc::new(Seen::default());
    let callbacks = staged_callbacks(seen.clone());
    let milter =
        Running::spawn(|rx| indymilter::run(listener, callbacks, Config::default(), stopped(rx)));

    // 120 messages, 10 % spam (indexes 9, 19, ...), body of two chunks.
    let report = loadgen::run(args(socket, 120, 100 * 1024, 0.1))
        .await
        .unwrap();
    milter.shutdown().await;

    assert_eq!(report.errors, 0, "{:?}", report.error_samples);
    let spam = 12;
    let accepted = 120 - spam;
    assert_eq!(report.by_stage.get("discard@mail"), Some(&spam));
    assert_eq!(report.by_stage.get("accept@eom"), Some(&accepted));
    assert_eq!(report.edits, accepted);
    // Messages with 2 or 3 recipients (index % 3 != 0) lose recipient 2 and go on.
    let expected_rejects = (0..120u64)
        .filter(|i| (i + 1) % 10 != 0 && i % 3 != 0)
        .count() as u64;
    assert_eq!(report.rcpt_rejects, expected_rejects);
    assert_eq!(seen.headers.load(Ordering::Relaxed), 10 * accepted);
    assert_eq!(
        seen.body_chunks.load(Ordering::Relaxed),
        accepted,
        "SKIP stops the body"
    );
    let opts = report.negotiated.unwrap();
    assert!(
        opts.contains("NOREPLY_HEADER") && !opts.contains("NO_BODY"),
        "{opts}"
    );
}

/// The smoke run CI does: the generator against luamilter running `examples/bench.lua`, over
/// both transports, with the same checks as against the native baseline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn luamilter_runs_the_bench_policy_like_the_baseline() {
    let bench = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/bench.lua"))
        .unwrap();
    for d in [
        crate::support::TestDaemon::start(&[("bench", &bench)], "").await,
        crate::support::TestDaemon::start_unix(&[("bench", &bench)], "").await,
    ] {
        let report = loadgen::run(args(d.local().clone(), 300, 2048, 0.1))
            .await
            .unwrap();
        check_trivial_policy(&report, 300, 30);
        d.stop().await;
    }
}
