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
async fn content_stages_nobody_handles_are_skipped_and_the_envelope_always_sent() {
    let d = TestDaemon::start(&[("p", MAIL_AND_EOM)], "").await;
    let c = d.client().await;
    let opts = c.negotiated_opts();
    // Only mail and eom are handled: no message content crosses the socket, as with a native
    // milter; the envelope does, so every policy can read ctx.client, ctx.helo, ctx.recipients.
    for skipped in [
        ProtoOpts::NO_DATA,
        ProtoOpts::NO_HEADER,
        ProtoOpts::NO_EOH,
        ProtoOpts::NO_BODY,
        ProtoOpts::NO_UNKNOWN,
    ] {
        assert!(opts.contains(skipped), "{skipped:?} in {opts:?}");
    }
    for sent in [
        ProtoOpts::NO_CONNECT,
        ProtoOpts::NO_HELO,
        ProtoOpts::NO_MAIL,
        ProtoOpts::NO_RCPT,
    ] {
        assert!(!opts.contains(sent), "{sent:?} in {opts:?}");
    }
    // Stages sent only for their data are not waited for, over TCP as over a unix socket: the
    // MTA queues them with the next command that waits for a reply (Postfix's milter8.c writes
    // them into its buffered stream and flushes only to read a reply).
    let collected = ProtoOpts::NOREPLY_CONNECT | ProtoOpts::NOREPLY_HELO | ProtoOpts::NOREPLY_RCPT;
    assert!(opts.contains(collected), "{opts:?}");
    assert!(!opts.contains(ProtoOpts::NOREPLY_MAIL), "mail is handled");
    assert_eq!(c.negotiated_actions(), luamilter::engine::SUPPORTED_ACTIONS);
    d.stop().await;
}

#[tokio::test]
async fn a_body_handler_gets_the_body_and_unix_skips_replies_for_collected_stages() {
    let policy = r#"
return {
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
    // Sent for their data but not handled: without a reply over a unix socket. A policy that
    // reads the body may read headers too, so they come along.
    for noreply in [
        ProtoOpts::NOREPLY_CONNECT,
        ProtoOpts::NOREPLY_HELO,
        ProtoOpts::NOREPLY_MAIL,
        ProtoOpts::NOREPLY_RCPT,
        ProtoOpts::NOREPLY_HEADER,
    ] {
        assert!(opts.contains(noreply), "{noreply:?} in {opts:?}");
    }
    assert!(opts.contains(ProtoOpts::NO_DATA | ProtoOpts::NO_UNKNOWN));
    assert!(!opts.contains(ProtoOpts::NOREPLY_BODY));
    assert_eq!(
        c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap(),
        Status::Noreply
    );
    assert_eq!(c.mail(["<a@b.example>"]).await.unwrap(), Status::Noreply);
    assert_eq!(c.rcpt(["<r@b.example>"]).await.unwrap(), Status::Noreply);
    assert_eq!(c.body(vec![b'x'; 70_000]).await.unwrap(), Status::Continue);
    let (actions, _) = c.eom().await.unwrap();
    assert!(actions.has_add_header("X-Size", "70000"));
    assert!(actions.has_add_header("X-Seen", "127.0.0.1 r@b.example"));
    d.stop().await;
}

/// Regression (issue 13, bug 1): docs/lua-api/spf.md's example read `ctx.client.ip` and
/// `ctx.helo` in `mail` without `needs`; those stages were negotiated away, the read raised, and
/// every message was tempfailed.
#[tokio::test]
async fn envelope_facts_are_there_without_declaring_anything() {
    let policy = r#"
local milter = require "milter"
return {
  mail = function(ctx, sender)
    return milter.reject{ text = ctx.client.ip .. " " .. ctx.helo .. " " .. ctx.sender }
  end,
}"#;
    for unix in [false, true] {
        let d = if unix {
            TestDaemon::start_unix(&[("p", policy)], "").await
        } else {
            TestDaemon::start(&[("p", policy)], "").await
        };
        let mut c = d.client().await;
        c.connect("h", Ipv4Addr::new(192, 0, 2, 7)).await.unwrap();
        c.helo("mx.example.net").await.unwrap();
        let refused = c.mail(["<a@b.example>"]).await.unwrap();
        assert_eq!(
            crate::support::reply_text(&refused),
            "550 5.7.1 192.0.2.7 mx.example.net a@b.example",
            "unix socket: {unix}"
        );
        d.stop().await;
    }
}

/// A daemon on TCP loopback whose one policy is `policy`, with the Lua module `lib.NAME`
/// (`module`) in its policy directory.
async fn start_with_module(name: &str, module: &str, policy: &str) -> TestDaemon {
    let dir = tempfile::TempDir::new().unwrap();
    std::fs::create_dir(dir.path().join("lib")).unwrap();
    std::fs::write(dir.path().join(format!("lib/{name}.lua")), module).unwrap();
    TestDaemon::start_in(dir, &[("p", policy)], "", "inet:0@127.0.0.1")
        .await
        .unwrap()
}

#[tokio::test]
async fn headers_read_at_eom_are_sent_without_declaring_them() {
    // The policy reads headers only at eom: its source mentions them, so the MTA sends them.
    let direct =
        r#"return { eom = function(ctx) ctx:add_header("X-Subject", ctx:header("Subject")) end }"#;
    // Here only a module it requires does.
    let module = r#"return { subject = function(ctx) return ctx:header("Subject") end }"#;
    let indirect = r#"
local lib = require "lib.subject"
return { eom = function(ctx) ctx:add_header("X-Subject", lib.subject(ctx)) end }"#;
    for policy in [direct, indirect] {
        let d = start_with_module("subject", module, policy).await;
        let mut c = d.client().await;
        assert!(!c.negotiated_opts().contains(ProtoOpts::NO_HEADER));
        c.mail(["<a@b.example>"]).await.unwrap();
        c.rcpt(["<r@b.example>"]).await.unwrap();
        c.header("Subject", "hello").await.unwrap();
        let (actions, status) = c.eom().await.unwrap();
        assert_eq!(status, Status::Continue);
        assert!(actions.has_add_header("X-Subject", "hello"), "{policy}");
        d.stop().await;
    }
}

#[tokio::test]
async fn headers_reached_in_a_way_the_source_does_not_show_need_declaring() {
    let hidden = r#"return { eom = function(ctx) ctx:add_header("X-N", tostring(#ctx["head" .. "ers"])) end }"#;
    let d = TestDaemon::start(
        &[("p", hidden)],
        "[engine]\nexception_policy = \"continue\"\n",
    )
    .await;
    let mut c = d.client().await;
    assert!(c.negotiated_opts().contains(ProtoOpts::NO_HEADER));
    c.mail(["<a@b.example>"]).await.unwrap();
    c.rcpt(["<r@b.example>"]).await.unwrap();
    let (actions, status) = c.eom().await.unwrap();
    // The handler failed (logged with the hint `needs = { "headers" }`); continue lets it pass.
    assert_eq!(status, Status::Continue);
    assert!(actions.actions.is_empty());
    d.stop().await;

    let declared = hidden.replace("return {", "return { needs = { \"headers\" },");
    let d = TestDaemon::start(&[("p", &declared)], "").await;
    let mut c = d.client().await;
    c.mail(["<a@b.example>"]).await.unwrap();
    c.rcpt(["<r@b.example>"]).await.unwrap();
    c.header("Subject", "hello").await.unwrap();
    let (actions, _) = c.eom().await.unwrap();
    assert!(actions.has_add_header("X-N", "1"));
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
    let opts = c.negotiated_opts();
    assert!(opts.contains(ProtoOpts::NOREPLY_HEADER));
    // The envelope, collected before the first declared no-reply stage, goes without replies.
    assert!(opts.contains(ProtoOpts::NOREPLY_CONNECT | ProtoOpts::NOREPLY_RCPT));
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
  needs = { "helo", "sender" }, -- no longer needed, still accepted
  connect = function(ctx, host, ip) return milter.reject{ text = "not from " .. ip } end,
}"#;
    let d = TestDaemon::start_unix(&[("p", policy)], "").await;
    let mut c = d.client().await;
    assert_eq!(
        c.connect("h", Ipv4Addr::new(192, 0, 2, 9)).await.unwrap(),
        Status::Noreply
    );
    // Stages collected after a declared no-reply stage reply, so the refusal arrives at the
    // very next stage, and again at every later one.
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

/// The body crosses the socket only for a policy that loads milter.dkim or milter.dmarc: the
/// stock authres policy requires milter.dkim in `setup` only when `arc_seal` is set, and a
/// module a policy requires counts as the policy.
#[tokio::test]
async fn the_body_is_sent_only_to_chains_that_load_the_dkim_module() {
    let off = TestDaemon::try_start_stock(&["authres"], "").await.unwrap();
    let opts = off.client().await.negotiated_opts();
    assert!(opts.contains(ProtoOpts::NO_BODY), "arc_seal off: {opts:?}");
    assert!(
        !opts.contains(ProtoOpts::NO_HEADER),
        "authres reads headers"
    );
    off.stop().await;

    let keys = tempfile::TempDir::new().unwrap();
    let key = crate::dkim::Key::rsa(keys.path(), "k", 2048);
    let sealing = format!(
        "[policy.authres]\narc_seal = \"example.test\"\n[dkim.keys.\"example.test\"]\n\
         selector = \"k\"\nkey = {:?}\n",
        key.path
    );
    let on = TestDaemon::try_start_stock(&["authres"], &sealing)
        .await
        .unwrap();
    let opts = on.client().await.negotiated_opts();
    assert!(!opts.contains(ProtoOpts::NO_BODY), "arc_seal on: {opts:?}");
    on.stop().await;

    // A module required at the top level loads milter.dkim: the policy gets the body. One
    // that requires it only in a handler is too late: the MTA was not asked for the body, and
    // the module says so.
    let lib = r#"local dkim = require "milter.dkim"
return { count = function(ctx) return #dkim.verify(ctx) end }"#;
    let through_module = r#"
local sigs = require "lib.sigs"
return { eom = function(ctx) ctx:add_header("X-Sigs", tostring(sigs.count(ctx))) end }"#;
    let d = start_with_module("sigs", lib, through_module).await;
    let mut c = d.client().await;
    assert!(!c.negotiated_opts().contains(ProtoOpts::NO_BODY));
    c.mail(["<a@b.example>"]).await.unwrap();
    c.rcpt(["<r@b.example>"]).await.unwrap();
    c.header("Subject", "x").await.unwrap();
    c.body("hi\r\n").await.unwrap();
    let (actions, _) = c.eom().await.unwrap();
    assert!(actions.has_add_header("X-Sigs", "0"), "{actions:?}");
    d.stop().await;

    let late = r#"
return { eom = function(ctx)
  local ok, err = pcall(function() return require("milter.dkim").verify(ctx) end)
  ctx:add_header("X-Late", tostring(err))
end }"#;
    let d = TestDaemon::start(&[("p", late)], "").await;
    let mut c = d.client().await;
    assert!(c.negotiated_opts().contains(ProtoOpts::NO_BODY));
    c.mail(["<a@b.example>"]).await.unwrap();
    c.rcpt(["<r@b.example>"]).await.unwrap();
    let (actions, _) = c.eom().await.unwrap();
    let late = crate::support::added_header(&actions, "X-Late").unwrap_or_default();
    assert!(
        late.contains("the body was not kept") && late.contains("when the policy loads"),
        "{late}"
    );
    d.stop().await;
}
