//! Load and soak on the real binary, bounded in count and time, with figures printed: a
//! thousand idle MTA connections (the daemon's memory), two hundred busy sessions through a
//! storm of reloads (no message fails; how long a reload takes), and SIGTERM with sessions open
//! (each finishes the command it is in, then the daemon exits and removes its socket).

use crate::support::DaemonProcess;
use indymilter_test::Status;
use luamilter::control;
use std::{
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

const PASS: &str = "return { connect = function(ctx) end, mail = function(ctx) end }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_connections() {
    let d = DaemonProcess::start(&[("pass", PASS)], "", "").unwrap();
    let rss_before = d.rss_kib();
    let started = Instant::now();
    let mut idle = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let mut c = d.client().await;
        assert_eq!(
            c.connect("h", Ipv4Addr::new(192, 0, 2, 1)).await.unwrap(),
            Status::Continue
        );
        idle.push(c);
    }
    let opened = started.elapsed();
    let rss_idle = d.rss_kib();
    // The thousand-and-first still gets served at once.
    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::new(192, 0, 2, 2)).await.unwrap();
    assert_eq!(c.mail(["<a@example.org>"]).await.unwrap(), Status::Continue);
    let stats = control::request(&d.control_socket(), "stats")
        .await
        .unwrap();
    assert!(stats.contains("connections 1001\n"), "{stats}");
    println!(
        "1,000 idle connections opened in {opened:?}: RSS {rss_before} KiB before, {rss_idle} KiB \
         with them open ({} KiB per connection)",
        (rss_idle.saturating_sub(rss_before)) / 1000
    );
    assert!(
        rss_idle < 100 * 1024,
        "RSS with 1,000 idle connections: {rss_idle} KiB"
    );
}

/// Version `n` of the policy: it stamps its version on every message.
fn stamping(n: u32) -> String {
    format!(
        "return {{ mail = function(ctx) end, eom = function(ctx) ctx:add_header(\"X-Version\", \"{n}\") end }}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_sessions_through_fifty_reloads() {
    let d = DaemonProcess::start(&[("stamp", &stamping(0))], "", "").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let messages = Arc::new(AtomicU64::new(0));
    let sessions: Vec<_> = (0..200)
        .map(|i| {
            let socket = d.socket.clone();
            let (stop, messages) = (stop.clone(), messages.clone());
            tokio::spawn(async move {
                // Each session keeps its connection and sends message after message.
                let mut c = crate::support::Mta(
                    indymilter_test::TestConnection::configure()
                        .read_timeout(Duration::from_secs(10))
                        .open_unix(&socket)
                        .await
                        .unwrap(),
                );
                c.connect("h", Ipv4Addr::new(192, 0, 2, (i % 250) as u8))
                    .await
                    .unwrap();
                while !stop.load(Ordering::Relaxed) {
                    assert_eq!(c.mail(["<a@example.org>"]).await.unwrap(), Status::Continue);
                    c.rcpt(["<r@example.org>"]).await.unwrap();
                    let (actions, status) = c.eom().await.unwrap();
                    assert!(
                        matches!(status, Status::Continue | Status::Accept),
                        "{status:?}"
                    );
                    assert!(
                        actions.has_add_header("X-Version", indymilter_test::any()),
                        "{actions:?}"
                    );
                    messages.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    // 50 rewrites in 10 s, each followed by `ctl reload`.
    let policy = d.path("stamp.lua");
    let mut latencies = Vec::new();
    let storm = Instant::now();
    for n in 1..=50 {
        let tick = Instant::now();
        std::fs::write(&policy, stamping(n)).unwrap();
        let answer = control::request(&d.control_socket(), "reload")
            .await
            .unwrap();
        latencies.push(tick.elapsed());
        assert!(answer.starts_with("ok: generation"), "{answer}");
        tokio::time::sleep(Duration::from_millis(200).saturating_sub(tick.elapsed())).await;
    }
    let storm = storm.elapsed();
    stop.store(true, Ordering::Relaxed);
    for s in sessions {
        s.await.expect("a session failed during the reload storm");
    }
    // New connections see the last version.
    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap();
    c.mail(["<a@example.org>"]).await.unwrap();
    c.rcpt(["<r@example.org>"]).await.unwrap();
    let (actions, _) = c.eom().await.unwrap();
    assert!(actions.has_add_header("X-Version", "50"), "{actions:?}");
    // The watcher also reloads on the writes; one that read the file half-written failed
    // and kept the running generation (the count is printed, not asserted).
    let stats = control::request(&d.control_socket(), "stats")
        .await
        .unwrap();
    let failed = stats
        .lines()
        .find(|l| l.starts_with("reloads_failed"))
        .unwrap_or("");
    latencies.sort();
    println!(
        "reload storm: 50 rewrites and `ctl reload`s in {storm:?} under 200 busy sessions, {} \
         messages, 0 failed; ctl reload latency median {:?}, max {:?}; watcher {failed}",
        messages.load(Ordering::Relaxed),
        latencies[25],
        latencies[49]
    );
    assert!(messages.load(Ordering::Relaxed) >= 200);
}

const SLOW_MAIL: &str = r#"
local milter = require "milter"
return { mail = function(ctx, sender) if sender == "slow@example.org" then milter.sleep(3) end end }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_open_sessions_finish_their_command_then_exits() {
    let mut d = DaemonProcess::start(&[("slow", SLOW_MAIL)], "", "").unwrap();
    let mut idle = d.client().await;
    idle.connect("h", Ipv4Addr::LOCALHOST).await.unwrap();
    let mut busy = d.client().await;
    busy.connect("h", Ipv4Addr::LOCALHOST).await.unwrap();
    let in_flight = tokio::spawn(async move {
        let status = busy.mail(["<slow@example.org>"]).await;
        (busy, status)
    });
    // SIGTERM while the 3 s command runs (the margin is for a loaded machine).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let term = Instant::now();
    d.signal(libc::SIGTERM);
    // The command in progress is answered.
    let (mut busy, status) = in_flight.await.unwrap();
    assert_eq!(status.unwrap(), Status::Continue);
    // Then the sessions are closed (a command that needs an answer gets none), and the daemon
    // exits.
    assert!(busy.mail(["<next@example.org>"]).await.is_err());
    assert!(idle.mail(["<a@example.org>"]).await.is_err());
    let status = d.exits_within(Duration::from_secs(10)).await;
    assert!(status.success(), "{status}");
    println!(
        "SIGTERM to exit with a 3 s command in flight (2.7 s of it left): {:?}",
        term.elapsed()
    );
    assert!(!d.socket.exists(), "the socket is removed");
    assert!(tokio::net::UnixStream::connect(&d.socket).await.is_err());
}
