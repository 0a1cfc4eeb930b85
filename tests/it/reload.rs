//! Hot reload through real files, a real watcher and real milter connections.

use crate::support::{Mta, TestDaemon};
use indymilter_test::Status;
use luamilter::{control, engine::Generation};
use std::{
    net::Ipv4Addr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

fn refusing(sender: &str) -> String {
    format!(
        r#"local milter = require "milter"
return {{
  mail = function(ctx, s)
    if s == "{sender}" then return milter.reject{{ text = "refused {sender}" }} end
  end,
}}
"#
    )
}

/// Saves a file the way editors and deploy tools do: write a temp file, rename it over.
fn save_by_rename(path: &Path, text: &str) {
    let tmp = path.with_extension("lua.tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn mail(c: &mut Mta, sender: &str) -> Status {
    let status = c.mail([format!("<{sender}>")]).await.unwrap();
    if status == Status::Continue {
        c.abort().await.unwrap();
    }
    status
}

async fn fresh(d: &TestDaemon) -> Mta {
    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap();
    c
}

/// Polls new connections until `sender` is refused; returns how long it took.
async fn wait_until_refused(d: &TestDaemon, sender: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let mut c = fresh(d).await;
        if matches!(mail(&mut c, sender).await, Status::Reject { .. }) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{sender} still accepted after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_applies_to_new_connections_while_old_ones_keep_their_generation() {
    let d = TestDaemon::start(&[("gate", &refusing("a@example.org"))], "").await;
    let policy = d.dir.path().join("gate.lua");
    let mut before = fresh(&d).await;
    assert!(matches!(
        mail(&mut before, "a@example.org").await,
        Status::Reject { .. }
    ));

    save_by_rename(&policy, &refusing("b@example.org"));
    wait_until_refused(&d, "b@example.org", Duration::from_secs(5)).await;
    let mut after = fresh(&d).await;
    assert_eq!(mail(&mut after, "a@example.org").await, Status::Continue);

    // The connection opened before the edit still runs the old policy until it closes.
    assert!(matches!(
        mail(&mut before, "a@example.org").await,
        Status::Reject { .. }
    ));
    assert_eq!(mail(&mut before, "b@example.org").await, Status::Continue);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_saves_each_serve_new_connections_promptly() {
    let d = TestDaemon::start(&[("gate", &refusing("s0@example.org"))], "").await;
    let policy = d.dir.path().join("gate.lua");
    let mut latencies = Vec::new();
    for i in 1..=20 {
        let sender = format!("s{i}@example.org");
        save_by_rename(&policy, &refusing(&sender));
        latencies.push(wait_until_refused(&d, &sender, Duration::from_secs(5)).await);
    }
    latencies.sort();
    println!(
        "save to first new connection on the new generation: median {:?}, max {:?} (20 saves)",
        latencies[10], latencies[19]
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_save_keeps_the_old_policy_and_reports_file_and_line() {
    let d = TestDaemon::start(&[("gate", &refusing("a@example.org"))], "").await;
    let policy = d.dir.path().join("gate.lua");
    let ctl = d.dir.path().join("ctl.sock");
    let generation = d.daemon.as_ref().unwrap().engine.current().id;

    save_by_rename(
        &policy,
        "local milter = require 'milter'\nreturn {\n  mail = function(ctx)\n    if then end\n  end,\n}\n",
    );
    let answer = control::request(&ctl, "reload").await.unwrap();
    assert!(
        answer.starts_with(&format!(
            "error: reload failed, keeping generation {generation}"
        )),
        "{answer}"
    );
    assert!(answer.contains("gate.lua:4:"), "{answer}");
    let mut c = fresh(&d).await;
    assert!(matches!(
        mail(&mut c, "a@example.org").await,
        Status::Reject { .. }
    ));
    let stats = control::request(&ctl, "stats").await.unwrap();
    assert!(stats.contains("reloads_failed "), "{stats}");
    assert!(
        stats.contains("last_reload_error") && stats.contains("gate.lua:4:"),
        "{stats}"
    );

    save_by_rename(&policy, &refusing("b@example.org"));
    wait_until_refused(&d, "b@example.org", Duration::from_secs(5)).await;
    let answer = control::request(&ctl, "reload").await.unwrap();
    assert!(answer.starts_with("ok: generation"), "{answer}");
    let stats = control::request(&ctl, "stats").await.unwrap();
    assert!(!stats.contains("last_reload_error"), "{stats}");
    d.stop().await;
}

/// An editor writing the policy in place, slowly: the first half (not valid Lua on its own),
/// a pause longer than the watcher's debounce, then the rest. One successful reload, no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_written_in_two_halves_reloads_once_without_error() {
    use std::io::Write;
    let d = TestDaemon::start(&[("gate", &refusing("a@example.org"))], "").await;
    let stats = &d.daemon.as_ref().unwrap().reloader.stats;
    let text = refusing("b@example.org");
    let (first, rest) = text.split_at(text.len() / 2);
    let mut file = std::fs::File::create(d.dir.path().join("gate.lua")).unwrap();
    file.write_all(first.as_bytes()).unwrap();
    file.sync_all().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    file.write_all(rest.as_bytes()).unwrap();
    drop(file);
    wait_until_refused(&d, "b@example.org", Duration::from_secs(5)).await;
    // Anything still pending from the write would reload within the settle time.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let count = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        (count(&stats.succeeded), count(&stats.failed)),
        (1, 0),
        "reloads (succeeded, failed); last error: {:?}",
        stats.last_error()
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_changes_apply_and_those_needing_a_restart_are_named() {
    let d = TestDaemon::start(&[("gate", &refusing("a@example.org"))], "").await;
    let config_path = d.dir.path().join("luamilter.toml");
    let text = std::fs::read_to_string(&config_path).unwrap();
    let text = text.replace(
        "listen = \"inet:0@127.0.0.1\"",
        "listen = \"inet:1@127.0.0.1\"",
    ) + "[engine]\nexception_policy = \"reject\"\n";
    std::fs::write(&config_path, text).unwrap();
    let report = d.daemon.as_ref().unwrap().reloader.reload("test").await;
    assert!(report.applied, "{report}");
    assert_eq!(report.restart_needed, ["milter.listen"]);
    let current = d.daemon.as_ref().unwrap().engine.current();
    assert_eq!(
        current.config.engine.exception_policy,
        luamilter::config::ExceptionPolicy::Reject
    );
    assert_eq!(current.config.milter.listen.to_string(), "inet:0@127.0.0.1");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_policy_directory_symlink_is_followed() {
    let root = tempfile::TempDir::new().unwrap();
    let (v1, v2) = (root.path().join("v1"), root.path().join("v2"));
    std::fs::create_dir(&v1).unwrap();
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v1.join("gate.lua"), refusing("a@example.org")).unwrap();
    std::fs::write(v2.join("gate.lua"), refusing("b@example.org")).unwrap();
    let link = root.path().join("policies");
    std::os::unix::fs::symlink(&v1, &link).unwrap();
    let dir = tempfile::TempDir::new().unwrap();
    let config = format!(
        "[milter]\nlisten = \"inet:0@127.0.0.1\"\ncontrol_socket = {:?}\n[policies]\ndirs = [{:?}]\nchain = [\"gate\"]\n",
        dir.path().join("ctl.sock"),
        link
    );
    let path = dir.path().join("luamilter.toml");
    std::fs::write(&path, config).unwrap();
    let d = TestDaemon::start_config(dir, &path).await.unwrap();
    let mut c = fresh(&d).await;
    assert!(matches!(
        mail(&mut c, "a@example.org").await,
        Status::Reject { .. }
    ));
    // Deploy tools swap a symlink atomically: new link, rename over the old one.
    let tmp = root.path().join("policies.new");
    std::os::unix::fs::symlink(&v2, &tmp).unwrap();
    std::fs::rename(&tmp, &link).unwrap();
    wait_until_refused(&d, "b@example.org", Duration::from_secs(5)).await;
    d.stop().await;
}

/// A policy that stamps each message with its version at MAIL and again at EOM.
fn versioned(version: usize) -> String {
    format!(
        r#"local milter = require "milter"
local V = "{version}"
return {{
  mail = function(ctx) ctx.msg.v = V end,
  eom = function(ctx) ctx:add_header("X-Gen", ctx.msg.v .. "/" .. V) end,
}}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_storm_under_load_fails_no_message() {
    let d = Arc::new(TestDaemon::start(&[("v", &versioned(0))], "").await);
    let policy = d.dir.path().join("v.lua");
    let storm_over = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for task in 0..8 {
        let d = Arc::clone(&d);
        let storm_over = Arc::clone(&storm_over);
        clients.push(tokio::spawn(async move {
            let mut versions = Vec::new();
            // Bounded: until the storm is over, at most 400 connections per task.
            for conn in 0..400 {
                if storm_over.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let mut c = fresh(&d).await;
                let mut seen = None;
                for msg in 0..3 {
                    c.mail([format!("<s{task}.{conn}.{msg}@example.org>")])
                        .await
                        .unwrap();
                    c.rcpt(["<r@example.org>"]).await.unwrap();
                    let (actions, status) = c.eom().await.unwrap();
                    assert_eq!(status, Status::Continue);
                    let header = actions
                        .actions
                        .iter()
                        .find_map(|a| match a {
                            indymilter_test::EomAction::AddHeader { name, value }
                                if name.to_str() == Ok("X-Gen") =>
                            {
                                Some(value.to_string_lossy().into_owned())
                            }
                            _ => None,
                        })
                        .expect("X-Gen header");
                    let (at_mail, at_eom) = header.split_once('/').unwrap();
                    assert_eq!(at_mail, at_eom, "one message saw two generations");
                    // A connection keeps its generation for all its messages.
                    assert_eq!(*seen.get_or_insert(at_eom.to_string()), at_eom);
                }
                versions.push(seen.unwrap());
            }
            versions
        }));
    }
    for version in 1..=50 {
        if version % 5 == 0 {
            // Now and then a truncate-and-write in place, which a reload may read half-done.
            std::fs::write(&policy, versioned(version)).unwrap();
        } else {
            save_by_rename(&policy, &versioned(version));
        }
        // Bursts of quick saves (coalesced by the debounce), then a pause that lets a reload run.
        let pause = if version % 5 == 4 { 300 } else { 30 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    storm_over.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut seen_versions = std::collections::BTreeSet::new();
    let mut messages = 0;
    for client in clients {
        let versions = client.await.expect("a session failed");
        messages += versions.len() * 3;
        seen_versions.extend(versions);
    }
    println!(
        "storm: {messages} messages, 0 failed, {} policy versions served",
        seen_versions.len()
    );
    assert!(
        seen_versions.len() >= 3,
        "the load did not overlap the reloads: {seen_versions:?}"
    );
    let latest = "50".to_string();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = fresh(&d).await;
        c.mail(["<x@example.org>"]).await.unwrap();
        c.rcpt(["<r@example.org>"]).await.unwrap();
        let (actions, _) = c.eom().await.unwrap();
        if actions.has_add_header("X-Gen", format!("{latest}/{latest}").as_str()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the last save never became current"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Arc::try_unwrap(d).ok().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_reloads_leave_one_generation() {
    let d = TestDaemon::start(&[("gate", &refusing("a@example.org"))], "").await;
    let daemon = d.daemon.as_ref().unwrap();
    let held = fresh(&d).await;
    let pinned = Arc::downgrade(&daemon.engine.current());
    let baseline_rss = rss_kib();
    let mut generations = Vec::new();
    for _ in 0..1000 {
        assert!(daemon.reloader.reload("test").await.applied);
        generations.push(Arc::downgrade(&daemon.engine.current()));
    }
    let alive =
        |gs: &[std::sync::Weak<Generation>]| gs.iter().filter(|g| g.strong_count() > 0).count();
    // Only the current generation and the one the open connection pins are alive.
    assert_eq!(alive(&generations), 1);
    assert!(pinned.strong_count() > 0, "a generation in use was freed");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    while pinned.strong_count() > 0 {
        assert!(
            Instant::now() < deadline,
            "the pinned generation outlived its connection"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let grown = rss_kib().saturating_sub(baseline_rss);
    println!("RSS growth after 1000 reloads: {grown} KiB");
    assert!(
        grown < 64 * 1024,
        "RSS grew by {grown} KiB over 1000 reloads"
    );
    d.stop().await;
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_saves_are_seen_again_and_again() {
    let policy = r#"local milter = require "milter"
return {
  options = { refuse = "a@example.org" },
  mail = function(ctx, s, args, opts) if s == opts.refuse then return milter.reject() end end,
}"#;
    let d = TestDaemon::start(&[("gate", policy)], "").await;
    let config = d.dir.path().join("luamilter.toml");
    let base = std::fs::read_to_string(&config).unwrap();
    // A log file written next to the config must not matter.
    std::fs::write(d.dir.path().join("luamilter.log"), "noise\n").unwrap();
    for who in ["b@example.org", "c@example.org", "d@example.org"] {
        let text = format!("{base}[policy.gate]\nrefuse = {who:?}\n");
        let tmp = config.with_extension("toml.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &config).unwrap();
        wait_until_refused(&d, who, Duration::from_secs(5)).await;
    }
    d.stop().await;
}
