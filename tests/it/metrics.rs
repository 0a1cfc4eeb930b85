//! Prometheus metrics: mail through the daemon process (its own global recorder) with a real
//! milter client, then `/metrics` scraped over HTTP and `luamilter ctl stats` read, and the
//! same after mail through a private Postfix.

use crate::{
    dns_server::TestDns,
    support::{
        postfix::{Postfix, Stage, e2e_ready, free_port},
        process::{DaemonProcess, http_get},
    },
};
use indymilter_test::Status;
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

/// The value of the sample `name{labels}` in Prometheus text, if present. Labels may be listed
/// in any order and the sample may carry more labels than asked for.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        if line.starts_with('#') {
            return None;
        }
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = match series.split_once('{') {
            Some((metric, rest)) => (metric, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        if metric != name {
            return None;
        }
        let wanted = labels
            .iter()
            .all(|(k, v)| rest.split(',').any(|pair| pair == format!("{k}=\"{v}\"")));
        wanted.then(|| value.parse().ok()).flatten()
    })
}

fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http_get(addr, "/metrics");
    assert!(status.contains("200"), "{status}\n{body}");
    body
}

/// Scrapes until `name{labels}` reaches `at_least` (the daemon counts a message when it ends,
/// which can be just after the client has its reply); returns the last scrape.
fn scrape_until(addr: SocketAddr, name: &str, labels: &[(&str, &str)], at_least: f64) -> String {
    scrape_when(addr, name, labels, |v| v >= at_least)
}

/// Scrapes until `name{labels}` has a value `wanted` accepts; returns the last scrape.
fn scrape_when(
    addr: SocketAddr,
    name: &str,
    labels: &[(&str, &str)],
    wanted: impl Fn(f64) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body = scrape(addr);
        if sample(&body, name, labels).is_some_and(&wanted) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} never got the wanted value:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

const GATE: &str = r#"
local milter = require "milter"
local dns = require "milter.dns"
local spf = require "milter.spf"
local store = require "milter.store"
local archive = require "milter.archive"
return {
  mail = function(ctx, sender)
    if sender == "spam@example.org" then return milter.reject() end
    spf.check_host("192.0.2.5", "user@pass-ip4.spf.test", "client.test")
    dns.a("example.test")
    dns.a("example.test")
    store.incr("seen", 1)
  end,
  eom = function(ctx)
    archive.save("Subject: hi\r\n\r\nkept\r\n")
    return milter.accept()
  end,
}"#;

/// In shadow mode: its rejects are counted as "would" decisions only.
const SPY: &str = r#"
local milter = require "milter"
return { rcpt = function(ctx, rcpt) return milter.reject() end }"#;

/// Fails three ways: a Lua error, the memory limit, the time limit.
const BROKEN: &str = r#"
return {
  header = function(ctx, name, value) error("boom") end,
  data = function(ctx) return string.rep("x", 64 * 1024 * 1024) end,
  eoh = function(ctx) while true do end end,
}"#;

async fn send(daemon: &DaemonProcess, sender: &str) -> Status {
    let mut mta = daemon.client().await;
    mta.connect("client.test", Ipv4Addr::new(192, 0, 2, 5))
        .await
        .unwrap();
    mta.helo("client.test").await.unwrap();
    let status = mta.mail([format!("<{sender}>")]).await.unwrap();
    if status != Status::Continue {
        mta.close().await.unwrap();
        return status;
    }
    mta.rcpt(["<user@example.test>"]).await.unwrap();
    mta.data().await.unwrap();
    mta.header("Subject", "hi").await.unwrap();
    mta.eoh().await.unwrap();
    let (_, status) = mta.0.eom().await.unwrap();
    mta.close().await.unwrap();
    status
}

fn ctl_stats(daemon: &DaemonProcess) -> String {
    let out = crate::support::luamilter_cli("ctl", &daemon.config, &["stats"]);
    let stats = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stats}");
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_through_the_daemon_is_counted_on_the_endpoint_and_in_ctl_stats() {
    let dns = TestDns::start().await;
    let addr: SocketAddr = ([127, 0, 0, 1], free_port().unwrap()).into();
    let extra = format!(
        "[engine]\nexception_policy = \"continue\"\ntime_limit = \"300ms\"\nmemory_limit_mib = 16\n\
         [dns]\nnameservers = [\"{}\"]\ntimeout = \"2s\"\nattempts = 1\n\
         [metrics]\nlisten = \"{addr}\"\n[policy.spy]\nmode = \"shadow\"\n\
         [archive]\nmaildir = \"archive\"\n",
        dns.addr
    );
    let policies = [("gate", GATE), ("spy", SPY), ("broken", BROKEN)];
    let daemon = DaemonProcess::start(&policies, "", &extra).unwrap();
    assert_eq!(send(&daemon, "friend@example.org").await, Status::Accept);
    assert!(matches!(
        send(&daemon, "spam@example.org").await,
        Status::Reject { .. }
    ));
    scrape_until(
        addr,
        "luamilter_messages_total",
        &[("verdict", "accept")],
        1.0,
    );
    // The daemon sees the client's close a moment after the client is done.
    let body = scrape_when(addr, "luamilter_connections_open", &[], |open| open == 0.0);
    let value = |name: &str, labels: &[(&str, &str)]| sample(&body, name, labels);
    assert_eq!(value("luamilter_connections_total", &[]), Some(2.0));
    assert_eq!(
        value("luamilter_messages_total", &[("verdict", "reject")]),
        Some(1.0)
    );
    assert_eq!(value("luamilter_generation", &[]), Some(1.0));
    let decision = |policy, stage, verdict| {
        value(
            "luamilter_decisions_total",
            &[("policy", policy), ("stage", stage), ("verdict", verdict)],
        )
    };
    assert_eq!(decision("gate", "mail", "reject"), Some(1.0));
    assert_eq!(decision("gate", "mail", "continue"), Some(1.0));
    assert_eq!(decision("gate", "eom", "accept"), Some(1.0));
    assert_eq!(decision("spy", "rcpt", "reject"), None, "{body}");
    let shadow = [("policy", "spy"), ("stage", "rcpt"), ("verdict", "reject")];
    assert_eq!(
        value("luamilter_shadow_decisions_total", &shadow),
        Some(1.0)
    );
    let error = [("policy", "broken"), ("kind", "error")];
    assert_eq!(value("luamilter_policy_errors_total", &error), Some(1.0));
    let timeouts = [("policy", "broken"), ("kind", "time_limit")];
    assert_eq!(value("luamilter_policy_errors_total", &timeouts), Some(1.0));
    let memory = [("policy", "broken"), ("kind", "memory_limit")];
    assert_eq!(value("luamilter_policy_errors_total", &memory), Some(1.0));
    let mail = [("stage", "mail")];
    assert_eq!(
        value("luamilter_stage_duration_seconds_count", &mail),
        Some(2.0)
    );
    assert!(
        value(
            "luamilter_stage_duration_seconds_bucket",
            &[("stage", "mail"), ("le", "+Inf")]
        ) == Some(2.0),
        "{body}"
    );
    assert!(value("luamilter_lua_memory_bytes", &[("vm", "0")]).is_some_and(|b| b > 10_000.0));
    let a_ok = [("type", "A"), ("result", "ok")];
    assert_eq!(value("luamilter_dns_queries_total", &a_ok), Some(2.0));
    // The second A query came from hickory's cache.
    assert!(
        value("hickory_resolver_cache_hit_total", &[]).is_some_and(|n| n >= 1.0),
        "{body}"
    );
    let spf = [("identity", "mailfrom"), ("result", "pass")];
    assert_eq!(value("luamilter_spf_results_total", &spf), Some(1.0));
    let incr = [("backend", "sqlite"), ("op", "incr"), ("result", "ok")];
    assert_eq!(value("luamilter_store_operations_total", &incr), Some(1.0));
    assert_eq!(
        value(
            "luamilter_store_duration_seconds_count",
            &[("backend", "sqlite"), ("op", "incr")]
        ),
        Some(1.0)
    );

    // The accepted message was archived (durable in new/ before it is counted).
    let body = scrape_until(
        addr,
        "luamilter_archive_messages_total",
        &[("result", "archived")],
        1.0,
    );
    let archive = |result| {
        sample(
            &body,
            "luamilter_archive_messages_total",
            &[("result", result)],
        )
    };
    assert_eq!(
        (archive("archived"), archive("lost")),
        (Some(1.0), Some(0.0))
    );
    let kept = std::fs::read_dir(daemon.dir.path().join("archive/new")).unwrap();
    assert_eq!(kept.count(), 1);

    // ctl stats renders the same registry, the shadow counts once: as its series, without the
    // `shadow_would` lines it prints when metrics are off.
    let stats = ctl_stats(&daemon);
    let decisions = |l: &&str| {
        l.starts_with("luamilter_decisions_total") || l.starts_with("luamilter_shadow_decisions")
    };
    for line in body.lines().filter(decisions) {
        assert!(stats.contains(line), "{line} not in ctl stats:\n{stats}");
    }
    assert!(!stats.contains("shadow_would"), "{stats}");

    // A reload, then a failed one: counted, and the generation follows.
    daemon.signal(libc::SIGHUP);
    let body = scrape_until(addr, "luamilter_reloads_total", &[("result", "ok")], 1.0);
    assert_eq!(sample(&body, "luamilter_generation", &[]), Some(2.0));
    std::fs::write(daemon.dir.path().join("gate.lua"), "return {").unwrap();
    daemon.signal(libc::SIGHUP);
    let body = scrape_until(
        addr,
        "luamilter_reloads_total",
        &[("result", "failed")],
        1.0,
    );
    assert_eq!(sample(&body, "luamilter_generation", &[]), Some(2.0));
    dashboard_and_docs_match(&body);
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

/// The metric families of a scrape (its `# TYPE` lines).
fn families(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Every series the Grafana dashboard queries exists in `body`, which has every series (the
/// traffic above produced them all); docs/metrics.md names exactly luamilter's.
fn dashboard_and_docs_match(body: &str) {
    let scraped = families(body);
    let name = regex::Regex::new(r"\b(?:luamilter|hickory_resolver)_[a-z_]+").unwrap();
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/grafana/luamilter.json"
    ))
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            queried.extend(name.find_iter(expr).map(|m| {
                let m = m.as_str();
                m.strip_suffix("_bucket").unwrap_or(m).to_string()
            }));
        }
    }
    assert!(queried.len() > 10, "{queried:?}");
    for family in &queried {
        assert!(
            scraped.contains(family),
            "the dashboard queries {family}, not scraped"
        );
    }
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap();
    let documented: BTreeSet<String> = docs
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| l.split(" | ").next())
        .flat_map(|cell| name.find_iter(cell).map(|m| m.as_str().to_string()))
        .collect();
    let ours = |names: &BTreeSet<String>| -> BTreeSet<String> {
        names
            .iter()
            .filter(|f| f.starts_with("luamilter_"))
            .cloned()
            .collect()
    };
    assert_eq!(
        ours(&scraped),
        ours(&documented),
        "the scrape vs docs/metrics.md"
    );
    for family in &documented {
        assert!(
            scraped.contains(family),
            "docs/metrics.md lists {family}, not scraped"
        );
    }
}

#[test]
fn a_metrics_address_in_use_stops_the_start_with_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = DaemonProcess::start(
        &[("p", "return {}")],
        "",
        &format!("[metrics]\nlisten = \"{addr}\"\n"),
    )
    .err()
    .expect("the daemon started although the metrics port is taken");
    assert!(err.contains(&format!("metrics.listen {addr}")), "{err}");
}

#[test]
fn without_metrics_ctl_stats_says_they_are_off() {
    let daemon = DaemonProcess::start(&[("p", "return {}")], "", "").unwrap();
    assert!(ctl_stats(&daemon).contains("metrics off"));
}

/// Through Postfix: swaks sends one accepted and one refused message; the endpoint counts them.
#[test]
fn mail_through_postfix_is_counted() {
    if !e2e_ready() {
        return;
    }
    const POLICY: &str = r#"
local milter = require "milter"
return { mail = function(ctx, sender)
  if sender == "spam@example.org" then return milter.reject{ code = "550", text = "no spam" } end
end }"#;
    let addr: SocketAddr = ([127, 0, 0, 1], free_port().unwrap()).into();
    let daemon = DaemonProcess::start(
        &[("gate", POLICY)],
        "socket_mode = \"0666\"",
        &format!("[metrics]\nlisten = \"{addr}\"\n"),
    )
    .unwrap();
    let postfix = Postfix::start(&format!("unix:{}", daemon.socket.display()))
        .expect("start private postfix");
    let sent = postfix
        .send("friend@example.org", "user@test.example", &[], "hello\n")
        .unwrap();
    assert_eq!(sent.exit_code, 0, "{}", sent.transcript);
    let refused = postfix
        .send("spam@example.org", "user@test.example", &[], "spam\n")
        .unwrap();
    let mail = refused.reply(Stage::Mail).expect("a reply to MAIL FROM");
    assert_eq!(mail.code(), 550, "{}", refused.transcript);
    let body = scrape_until(
        addr,
        "luamilter_messages_total",
        &[("verdict", "accept")],
        1.0,
    );
    let reject = [("policy", "gate"), ("stage", "mail"), ("verdict", "reject")];
    assert_eq!(
        sample(&body, "luamilter_decisions_total", &reject),
        Some(1.0)
    );
    assert!(sample(&body, "luamilter_connections_total", &[]).is_some_and(|n| n >= 2.0));
}
