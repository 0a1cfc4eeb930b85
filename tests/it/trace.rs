//! Decision traces, `luamilter why`, and shadow mode, through a real milter client and the real
//! binary, on SQLite and on a real redis-server.

use crate::{redis_server::RedisServer, support::TestDaemon};
use indymilter::MacroStage;
use indymilter_test::Status;
use luamilter::control;
use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

const GREYLISTISH: &str = r#"
local milter = require "milter"
local store = require "milter.store"
return {
  rcpt = function(ctx, rcpt)
    store.incr("seen:" .. rcpt)
    if rcpt == "later@example.org" then
      return milter.tempfail{ code = 451, xcode = "4.7.1", text = "Greylisted" }
    end
  end,
  -- Reading a header has the MTA send them: the history then knows the Message-ID.
  eom = function(ctx) ctx:add_header("X-Checked", ctx:header("Subject") or "yes") end,
}"#;

/// Sends one message: queue id `queue_id`, a Message-ID header, two recipients (one refused).
async fn send(d: &TestDaemon, queue_id: &str, ip: Ipv4Addr) {
    let mut c = d.client().await;
    c.connect("client.example.net", ip).await.unwrap();
    c.helo("client.example.net").await.unwrap();
    c.macros(MacroStage::Mail, [("i", queue_id)]).await.unwrap();
    c.mail(["<alice@example.net>"]).await.unwrap();
    c.rcpt(["<bob@example.org>"]).await.unwrap();
    assert!(matches!(
        c.rcpt(["<later@example.org>"]).await.unwrap(),
        Status::Tempfail { .. }
    ));
    let message_id = format!("<{queue_id}@example.net>");
    c.header("Message-ID", message_id.as_str()).await.unwrap();
    c.macros(MacroStage::Eom, [("i", queue_id)]).await.unwrap();
    let (actions, status) = c.eom().await.unwrap();
    assert_eq!(status, Status::Continue);
    assert!(actions.has_add_header("X-Checked", "yes"));
}

/// `luamilter why ARGS` with the daemon's config: (exit code, stdout).
fn why(config: &Path, args: &[&str]) -> (i32, String) {
    let out = crate::support::luamilter_cli("why", config, args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Waits for the history of `queue_id` (written in the background when the message ends).
fn why_eventually(config: &Path, queue_id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, out) = why(config, &[queue_id]);
        if code == 0 {
            return out;
        }
        assert!(Instant::now() < deadline, "no history for {queue_id}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn why_answers(extra: &str) {
    let d = TestDaemon::start(&[("gl", GREYLISTISH)], extra).await;
    let config = d.dir.path().join("luamilter.toml");
    send(&d, "4XyZ1", Ipv4Addr::new(192, 0, 2, 31)).await;
    let out = why_eventually(&config, "4XyZ1");
    assert!(out.contains("queue id   4XyZ1"), "{out}");
    assert!(out.contains("client     192.0.2.31"), "{out}");
    assert!(out.contains("to         bob@example.org"), "{out}");
    assert!(out.contains("outcome    accept"), "{out}");
    assert!(
        out.contains("rcpt:gl=tempfail 451 4.7.1 Greylisted ("),
        "{out}"
    );
    assert!(out.contains("store=1)"), "the store call is counted: {out}");

    // By Message-ID, with or without brackets, and by client IP; JSON for machines.
    for id in ["<4XyZ1@example.net>", "4XyZ1@example.net"] {
        let (code, by_id) = why(&config, &[id]);
        assert_eq!(
            (code, by_id.contains("queue id   4XyZ1")),
            (0, true),
            "{by_id}"
        );
    }
    let (code, json) = why(&config, &["--client", "192.0.2.31", "--json"]);
    assert_eq!(code, 0);
    let record: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(record["queue_id"], "4XyZ1");
    assert_eq!(record["trace"]["steps"][0]["policy"], "gl");
    let (code, _) = why(&config, &["NOSUCHID"]);
    assert_eq!(code, 1);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn why_answers_by_queue_id_message_id_and_client_on_sqlite() {
    why_answers("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn why_answers_by_queue_id_message_id_and_client_on_redis() {
    let redis = RedisServer::start();
    why_answers(&format!(
        "[store]\nbackend = \"redis\"\nurl = {:?}\n",
        redis.url
    ))
    .await;
}

#[tokio::test]
async fn no_history_is_kept_with_keep_zero() {
    let d = TestDaemon::start(&[("gl", GREYLISTISH)], "[trace]\nkeep = \"0\"\n").await;
    send(&d, "NoKeep1", Ipv4Addr::new(192, 0, 2, 32)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (code, _) = why(&d.dir.path().join("luamilter.toml"), &["NoKeep1"]);
    assert_eq!(code, 1, "keep = 0 stores nothing");
    d.stop().await;
}

const SHADOWED: &str = r#"
local milter = require "milter"
return {
  mail = function(ctx, sender)
    if sender == "bad@example.net" then
      return milter.reject{ text = "not you" }
    end
  end,
  eom = function(ctx) ctx:add_header("X-Shadowed", "edited") end,
}"#;

#[tokio::test]
async fn shadow_mode_logs_and_counts_but_never_enforces_and_a_reload_switches_it() {
    let d = TestDaemon::start(
        &[("shadowed_strict", SHADOWED)],
        "[policy.shadowed_strict]\nmode = \"shadow\"\n",
    )
    .await;
    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::new(192, 0, 2, 33)).await.unwrap();
    c.macros(MacroStage::Mail, [("i", "SHADOW1")])
        .await
        .unwrap();
    // Not refused: the policy's reject is only logged and counted.
    assert_eq!(
        c.mail(["<bad@example.net>"]).await.unwrap(),
        Status::Continue
    );
    c.rcpt(["<r@example.org>"]).await.unwrap();
    let (actions, status) = c.eom().await.unwrap();
    assert_eq!(status, Status::Continue);
    assert!(
        actions.actions.is_empty(),
        "a shadow policy's edits are dropped"
    );
    let ctl = d.dir.path().join("ctl.sock");
    let stats = control::request(&ctl, "stats").await.unwrap();
    assert!(
        stats.contains("shadow_would shadowed_strict mail reject 1"),
        "{stats}"
    );
    let out = why_eventually(&d.dir.path().join("luamilter.toml"), "SHADOW1");
    assert!(
        out.contains("mail:shadowed_strict=would reject 550 5.7.1 not you"),
        "{out}"
    );
    assert!(out.contains("outcome    accept"), "{out}");

    // mode = "enforce" (the default) by a live reload.
    let config = d.dir.path().join("luamilter.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("mode = \"shadow\"", "mode = \"enforce\""),
    )
    .unwrap();
    let answer = control::request(&ctl, "reload").await.unwrap();
    assert!(answer.starts_with("ok"), "{answer}");
    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::new(192, 0, 2, 33)).await.unwrap();
    assert_eq!(
        crate::support::reply_text(&c.mail(["<bad@example.net>"]).await.unwrap()),
        "550 5.7.1 not you"
    );
    d.stop().await;
}

#[tokio::test]
async fn an_unknown_mode_is_a_load_error_naming_the_line() {
    let err = TestDaemon::try_start(
        &[("p", SHADOWED)],
        "[policy.p]\nmode = \"sometimes\"\n",
        "inet:0@127.0.0.1",
    )
    .await
    .err()
    .unwrap();
    assert!(
        err.contains("luamilter.toml:") && err.contains("mode must be \"enforce\" or \"shadow\""),
        "{err}"
    );
}

#[tokio::test]
async fn a_policy_cannot_declare_an_option_named_mode() {
    let policy = r#"return { options = { mode = "x" }, mail = function() end }"#;
    let err = TestDaemon::try_start(&[("p", policy)], "", "inet:0@127.0.0.1")
        .await
        .err()
        .unwrap();
    assert!(
        err.contains("p.lua: option name 'mode' is reserved"),
        "{err}"
    );
}
