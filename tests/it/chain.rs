//! Chain semantics: order, first final verdict wins, edits accumulate, options per policy.

use crate::support::{TestDaemon, reply_text};
use indymilter_test::Status;
use std::net::Ipv4Addr;

const FIRST: &str = r#"
local milter = require "milter"
return {
  options = { refuse = "x@example.org", stamp = "first" },
  rcpt = function(ctx, rcpt, args, opts)
    if rcpt == opts.refuse then return milter.reject{ text = "first says no" } end
  end,
  mail = function(ctx, sender)
    if sender == "vip@example.org" then return milter.accept() end
  end,
  eom = function(ctx, opts) ctx:add_header("X-Stamp", opts.stamp) end,
}
"#;

const SECOND: &str = r#"
local milter = require "milter"
return {
  rcpt = function(ctx, rcpt)
    ctx.msg.second_saw = (ctx.msg.second_saw or 0) + 1
    if rcpt:match("^y@") then return milter.reject{ text = "second says no" } end
  end,
  eom = function(ctx)
    ctx:add_header("X-Second", tostring(ctx.msg.second_saw))
    return milter.accept()
  end,
}
"#;

#[tokio::test]
async fn first_final_verdict_wins_and_edits_accumulate() {
    let d = TestDaemon::start(
        &[("first", FIRST), ("second", SECOND)],
        "[policy.first]\nstamp = \"configured\"\n",
    )
    .await;
    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap();
    c.mail(["<a@example.org>"]).await.unwrap();
    assert_eq!(
        reply_text(&c.rcpt(["<x@example.org>"]).await.unwrap()),
        "550 5.7.1 first says no"
    );
    assert_eq!(
        reply_text(&c.rcpt(["<y@example.org>"]).await.unwrap()),
        "550 5.7.1 second says no"
    );
    assert_eq!(c.rcpt(["<z@example.org>"]).await.unwrap(), Status::Continue);
    let (actions, status) = c.eom().await.unwrap();
    assert_eq!(status, Status::Accept);
    assert!(actions.has_add_header("X-Stamp", "configured"));
    // second ran for y and z, not for x, which first had already refused
    assert!(actions.has_add_header("X-Second", "2"));
    d.stop().await;
}

#[tokio::test]
async fn accept_stops_the_message_for_every_later_policy() {
    let d = TestDaemon::start(&[("first", FIRST), ("second", SECOND)], "").await;
    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap();
    assert_eq!(c.mail(["<vip@example.org>"]).await.unwrap(), Status::Accept);
    d.stop().await;
}

#[tokio::test]
async fn bad_option_overrides_stop_the_start_with_file_and_line() {
    let err = TestDaemon::try_start(
        &[("first", FIRST)],
        "[policy.first]\nstamp = 3\nrefuze = \"a\"\n",
        "inet:0@127.0.0.1",
    )
    .await
    .err()
    .unwrap();
    assert!(
        err.contains("luamilter.toml:8: [policy.first] stamp: expected a string, got integer 3"),
        "{err}"
    );
    assert!(
        err.contains("luamilter.toml:9: [policy.first] refuze: unknown option"),
        "{err}"
    );
}

const WITH_SETUP: &str = r#"local milter = require "milter"
return {
  options = { n = 1 },
  setup = function(opts)
    if opts.n < 0 then error("n must not be negative, got " .. opts.n) end
    opts.double = opts.n * 2
  end,
  eom = function(ctx, opts) ctx:add_header("X-Double", tostring(opts.double)) end,
}
"#;

#[tokio::test]
async fn setup_checks_and_prepares_the_options_at_load() {
    let err = TestDaemon::try_start(
        &[("s", WITH_SETUP)],
        "[policy.s]\nn = -3\n",
        "inet:0@127.0.0.1",
    )
    .await
    .err()
    .unwrap();
    assert!(
        err.contains("s.lua:5: n must not be negative, got -3"),
        "{err}"
    );
    let d = TestDaemon::start(&[("s", WITH_SETUP)], "[policy.s]\nn = 21\n").await;
    let mut c = d.client().await;
    c.mail(["<a@example.org>"]).await.unwrap();
    c.rcpt(["<b@example.org>"]).await.unwrap();
    let (actions, _) = c.eom().await.unwrap();
    assert!(actions.has_add_header("X-Double", "42"));
    d.stop().await;
}

#[tokio::test]
async fn a_bad_stock_dnsbl_zone_is_a_load_error() {
    let dir = tempfile::TempDir::new().unwrap();
    let text = format!(
        "[milter]\nlisten = \"inet:0@127.0.0.1\"\ncontrol_socket = {:?}\n[policies]\nchain = [\"dnsbl\"]\n\
         [store]\npath = {:?}\n[policy.dnsbl]\ndnsbl = [{{ zone = \"bl.test\", action = \"rejct\" }}]\n",
        dir.path().join("ctl.sock"),
        dir.path().join("s.db")
    );
    let config = luamilter::config::Config::parse(&text, Some(dir.path().join("c.toml"))).unwrap();
    let err = luamilter::daemon::Daemon::start(config)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("stock/dnsbl.lua: setup:") && err.contains("unknown action \"rejct\""),
        "{err}"
    );
}
