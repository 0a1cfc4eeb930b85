//! Negotiation follows the policies: skipped stages, NOREPLY, actions masked by the offer.

use crate::support::TestDaemon;
use indymilter::{Actions, ProtoOpts};
use indymilter_test::{Status, TestConnection};
use std::net::Ipv4Addr;

const MAIL_AND_EOM: &str = r#"
local milter = require "milter"
return {
  mail = function(ctx, sender) if sender == "x@bad.example" then return milter.reject() end end,
  eom = function(ctx) ctx:add_header("X-Seen", "yes") end,
}
"#;

#[tokio::test]
async fn stages_nobody_handles_are_skipped() {
    let d = TestDaemon::start(&[("p", MAIL_AND_EOM)], "").await;
    let c = d.client().await;
    let opts = c.negotiated_opts();
    // Only mail and eom are handled: like a native milter, everything else is skipped.
    for skipped in [
        ProtoOpts::NO_CONNECT,
        ProtoOpts::NO_HELO,
        ProtoOpts::NO_RCPT,
        ProtoOpts::NO_DATA,
        ProtoOpts::NO_HEADER,
        ProtoOpts::NO_EOH,
        ProtoOpts::NO_BODY,
        ProtoOpts::NO_UNKNOWN,
    ] {
        assert!(opts.contains(skipped), "{skipped:?} in {opts:?}");
    }
    assert!(!opts.contains(ProtoOpts::NO_MAIL));
    assert!(!opts.intersects(ProtoOpts::NOREPLY_MAIL));
    assert_eq!(c.negotiated_actions(), luamilter::engine::SUPPORTED_ACTIONS);
    d.stop().await;
}

#[tokio::test]
async fn a_body_handler_gets_the_body_and_unix_skips_replies_for_collected_stages() {
    let policy = r#"
return {
  needs = { "client", "recipients" },
  body = function(ctx, chunk) ctx.msg.size = (ctx.msg.size or 0) + #chunk end,
  eom = function(ctx)
    ctx:add_header("X-Size", tostring(ctx.msg.size))
    ctx:add_header("X-Seen", ctx.client.ip .. " " .. table.concat(ctx.recipients, ","))
  end,
}"#;
    let d = TestDaemon::start_unix(&[("p", policy)], "").await;
    let mut c = d.client().await;
    let opts = c.negotiated_opts();
    assert!(!opts.contains(ProtoOpts::NO_BODY));
    assert!(opts.contains(ProtoOpts::NO_HEADER));
    // Needed but not handled: sent without waiting for a reply over a unix socket.
    for noreply in [ProtoOpts::NOREPLY_CONNECT, ProtoOpts::NOREPLY_RCPT] {
        assert!(opts.contains(noreply), "{noreply:?} in {opts:?}");
    }
    // Neither handled nor needed: not sent at all.
    assert!(opts.contains(ProtoOpts::NO_HELO | ProtoOpts::NO_MAIL));
    assert!(!opts.contains(ProtoOpts::NOREPLY_BODY));
    assert_eq!(
        c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap(),
        Status::Noreply
    );
    assert_eq!(c.mail(["<a@b.example>"]).await.unwrap(), Status::Skip);
    assert_eq!(c.rcpt(["<r@b.example>"]).await.unwrap(), Status::Noreply);
    assert_eq!(c.body(vec![b'x'; 70_000]).await.unwrap(), Status::Continue);
    let (actions, _) = c.eom().await.unwrap();
    assert!(actions.has_add_header("X-Size", "70000"));
    assert!(actions.has_add_header("X-Seen", "127.0.0.1 r@b.example"));
    d.stop().await;
}

const NOREPLY_HEADER: &str = r#"
local milter = require "milter"
return {
  noreply = { "header" },
  header = function(ctx, name, value)
    if name == "X-Spam" then return milter.reject{ text = "spam header" } end
  end,
  eom = function(ctx) ctx:add_header("X-Ok", "1") end,
}
"#;

#[tokio::test]
async fn declared_noreply_stage_answers_at_the_next_reply() {
    let d = TestDaemon::start(&[("p", NOREPLY_HEADER)], "").await;
    let mut c = d.client().await;
    assert!(c.negotiated_opts().contains(ProtoOpts::NOREPLY_HEADER));
    c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap();
    c.mail(["<a@b.example>"]).await.unwrap();
    c.rcpt(["<r@b.example>"]).await.unwrap();
    assert_eq!(c.header("X-Spam", "yes").await.unwrap(), Status::Noreply);
    assert_eq!(c.header("Subject", "x").await.unwrap(), Status::Noreply);
    let (actions, status) = c.eom().await.unwrap();
    assert_eq!(crate::support::reply_text(&status), "550 5.7.1 spam header");
    assert!(actions.actions.is_empty(), "no edits on a refused message");
    // The owed verdict belonged to that message only.
    c.mail(["<a@b.example>"]).await.unwrap();
    c.rcpt(["<r@b.example>"]).await.unwrap();
    c.header("Subject", "x").await.unwrap();
    let (actions, status) = c.eom().await.unwrap();
    assert_eq!(status, Status::Continue);
    assert!(actions.has_add_header("X-Ok", "1"));
    d.stop().await;
}

#[tokio::test]
async fn actions_and_options_are_masked_by_the_offer() {
    let d = TestDaemon::start(&[("p", NOREPLY_HEADER)], "").await;
    // An MTA that offers only ADD_HEADER and no NOREPLY/NO_* options still gets a working session.
    let builder = TestConnection::configure()
        .available_actions(Actions::ADD_HEADER)
        .available_opts(ProtoOpts::SKIP);
    let mut c = d.client_with(builder).await;
    assert_eq!(c.negotiated_actions(), Actions::ADD_HEADER);
    assert_eq!(c.negotiated_opts() - ProtoOpts::SKIP, ProtoOpts::empty());
    c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap();
    c.mail(["<a@b.example>"]).await.unwrap();
    assert_eq!(c.rcpt(["<r@b.example>"]).await.unwrap(), Status::Continue);
    assert_eq!(c.data().await.unwrap(), Status::Continue);
    let refused = c.header("X-Spam", "yes").await.unwrap();
    assert_eq!(
        crate::support::reply_text(&refused),
        "550 5.7.1 spam header"
    );
    c.mail(["<a@b.example>"]).await.unwrap();
    c.rcpt(["<r@b.example>"]).await.unwrap();
    assert_eq!(c.body("x").await.unwrap(), Status::Continue);
    let (actions, _) = c.eom().await.unwrap();
    assert!(actions.has_add_header("X-Ok", "1"));
    d.stop().await;
}

#[tokio::test]
async fn an_edit_the_mta_did_not_grant_is_a_policy_error() {
    let policy = r#"return { eom = function(ctx) ctx:quarantine("x") end }"#;
    let d = TestDaemon::start(&[("p", policy)], "").await;
    let builder = TestConnection::configure().available_actions(Actions::ADD_HEADER);
    let mut c = d.client_with(builder).await;
    c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap();
    c.mail(["<a@b.example>"]).await.unwrap();
    c.rcpt(["<r@b.example>"]).await.unwrap();
    let (_, status) = c.eom().await.unwrap();
    assert_eq!(
        crate::support::reply_text(&status),
        "451 4.3.0 Temporary policy failure, try again later"
    );
    d.stop().await;
}

#[tokio::test]
async fn a_connection_verdict_without_reply_answers_every_later_stage() {
    let policy = r#"
local milter = require "milter"
return {
  noreply = { "connect" },
  needs = { "helo", "sender" },
  connect = function(ctx, host, ip) return milter.reject{ text = "not from " .. ip } end,
}"#;
    let d = TestDaemon::start_unix(&[("p", policy)], "").await;
    let mut c = d.client().await;
    assert_eq!(
        c.connect("h", Ipv4Addr::new(192, 0, 2, 9)).await.unwrap(),
        Status::Noreply
    );
    // With a declared no-reply stage, the other stages reply even on a unix socket, so the
    // refusal arrives at the very next stage, and again at every later one.
    let at_helo = c.helo("h").await.unwrap();
    assert_eq!(
        crate::support::reply_text(&at_helo),
        "550 5.7.1 not from 192.0.2.9"
    );
    let first = c.mail(["<a@b.example>"]).await.unwrap();
    assert_eq!(
        crate::support::reply_text(&first),
        "550 5.7.1 not from 192.0.2.9"
    );
    let second = c.mail(["<a@b.example>"]).await.unwrap();
    assert_eq!(
        crate::support::reply_text(&second),
        "550 5.7.1 not from 192.0.2.9"
    );
    d.stop().await;
}

#[tokio::test]
async fn reading_data_of_a_stage_that_is_not_sent_says_what_to_declare() {
    let policy = r#"return { eom = function(ctx) ctx:add_header("X-Helo", ctx.helo) end }"#;
    let d = TestDaemon::start(
        &[("p", policy)],
        "[engine]\nexception_policy = \"continue\"\n",
    )
    .await;
    let mut c = d.client().await;
    assert_eq!(c.helo("h").await.unwrap(), Status::Skip);
    c.rcpt(["<r@b.example>"]).await.unwrap();
    let (actions, status) = c.eom().await.unwrap();
    // The handler failed (logged with the hint `needs = { "helo" }`); continue lets it pass.
    assert_eq!(status, Status::Continue);
    assert!(actions.actions.is_empty());
    d.stop().await;
}

#[tokio::test]
async fn recipients_the_mta_refused_reach_policies_that_ask_for_them() {
    let policy = r#"
return {
  needs = { "rejected_recipients" },
  macros = { rcpt = { "{rcpt_mailer}" } },
  rcpt = function(ctx, rcpt)
    if ctx:macro("rcpt_mailer") == "error" then ctx.vars.bad = (ctx.vars.bad or 0) + 1 end
  end,
  eom = function(ctx)
    ctx:add_header("X-Bad", tostring(ctx.vars.bad))
    ctx:add_header("X-Rcpts", table.concat(ctx.recipients, ","))
  end,
}"#;
    let d = TestDaemon::start(&[("p", policy)], "").await;
    let mut c = d.client().await;
    assert!(c.negotiated_opts().contains(ProtoOpts::REJECTED_RCPT));
    c.mail(["<a@b.example>"]).await.unwrap();
    c.macros(indymilter::MacroStage::Rcpt, [("{rcpt_mailer}", "error")])
        .await
        .unwrap();
    c.rcpt(["<nosuchuser@b.example>"]).await.unwrap();
    c.macros(indymilter::MacroStage::Rcpt, [("{rcpt_mailer}", "local")])
        .await
        .unwrap();
    c.rcpt(["<user@b.example>"]).await.unwrap();
    let (actions, _) = c.eom().await.unwrap();
    assert!(actions.has_add_header("X-Bad", "1"));
    assert!(actions.has_add_header("X-Rcpts", "user@b.example"));
    d.stop().await;
}
