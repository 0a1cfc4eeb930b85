//! Stages, verdicts, replies, edits and session state, through a real milter client.

use crate::support::{TestDaemon, reply_text};
use indymilter_test::{Status, any};
use std::net::Ipv4Addr;

/// Rejects (or tempfails, accepts, discards) at the stage named by the HELO argument
/// `VERDICT-at-STAGE`, so one policy covers every stage.
const BY_HELO: &str = r#"
local milter = require "milter"
local function decide(ctx, stage)
  local verdict, at = (ctx.vars.plan or ""):match("^(%a+)%-at%-(%a+)$")
  if at ~= stage then return nil end
  if verdict == "reject" then return milter.reject{ code = 554, xcode = "5.7.0", text = "no at " .. stage } end
  if verdict == "tempfail" then return milter.tempfail{ code = 452, xcode = "4.3.2", text = "later at " .. stage } end
  if verdict == "accept" then return milter.accept() end
  if verdict == "discard" then return milter.discard() end
end
return {
  helo = function(ctx, name) ctx.vars.plan = name; return decide(ctx, "helo") end,
  mail = function(ctx) return decide(ctx, "mail") end,
  rcpt = function(ctx) return decide(ctx, "rcpt") end,
  data = function(ctx) return decide(ctx, "data") end,
  header = function(ctx) return decide(ctx, "header") end,
  eoh = function(ctx) return decide(ctx, "eoh") end,
  body = function(ctx) return decide(ctx, "body") end,
  eom = function(ctx) return decide(ctx, "eom") end,
}
"#;

async fn run_to(d: &TestDaemon, plan: &str) -> Vec<(&'static str, Status)> {
    let mut c = d.client().await;
    let mut seen = Vec::new();
    seen.push((
        "connect",
        c.connect("client.example", Ipv4Addr::new(192, 0, 2, 1))
            .await
            .unwrap(),
    ));
    seen.push(("helo", c.helo(plan).await.unwrap()));
    seen.push(("mail", c.mail(["<a@example.org>"]).await.unwrap()));
    if is_final(&seen) {
        return seen;
    }
    seen.push(("rcpt", c.rcpt(["<b@example.org>"]).await.unwrap()));
    if is_final(&seen) {
        return seen;
    }
    seen.push(("data", c.data().await.unwrap()));
    if is_final(&seen) {
        return seen;
    }
    seen.push(("header", c.header("Subject", "hi").await.unwrap()));
    if is_final(&seen) {
        return seen;
    }
    seen.push(("eoh", c.eoh().await.unwrap()));
    if is_final(&seen) {
        return seen;
    }
    seen.push(("body", c.body("hello\r\n").await.unwrap()));
    if is_final(&seen) {
        return seen;
    }
    let (_, status) = c.eom().await.unwrap();
    seen.push(("eom", status));
    seen
}

/// Whether the message ended (a recipient-level reject or tempfail does not end it).
fn is_final(seen: &[(&str, Status)]) -> bool {
    let (stage, status) = seen.last().unwrap();
    match status {
        Status::Continue | Status::Noreply => false,
        Status::Reject { .. } | Status::Tempfail { .. } => *stage != "rcpt",
        _ => true,
    }
}

#[tokio::test]
async fn every_stage_answers_every_verdict() {
    let d = TestDaemon::start(&[("byhelo", BY_HELO)], "").await;
    for stage in ["mail", "rcpt", "data", "header", "eoh", "body", "eom"] {
        let seen = run_to(&d, &format!("reject-at-{stage}")).await;
        let (at, status) = seen.iter().find(|(at, _)| *at == stage).unwrap();
        assert_eq!(
            reply_text(status),
            format!("554 5.7.0 no at {stage}"),
            "{seen:?}"
        );
        // A refused recipient leaves the message going; any other refusal ends it.
        assert_eq!(
            seen.last().unwrap().0,
            if stage == "rcpt" { "eom" } else { at },
            "{seen:?}"
        );

        let seen = run_to(&d, &format!("tempfail-at-{stage}")).await;
        let (_, status) = seen.iter().find(|(at, _)| *at == stage).unwrap();
        assert_eq!(reply_text(status), format!("452 4.3.2 later at {stage}"));

        let seen = run_to(&d, &format!("discard-at-{stage}")).await;
        assert_eq!(seen.last().unwrap(), &(stage, Status::Discard), "{seen:?}");
        if stage != "eom" {
            let seen = run_to(&d, &format!("accept-at-{stage}")).await;
            assert_eq!(seen.last().unwrap(), &(stage, Status::Accept));
        }
    }
    let seen = run_to(&d, "reject-at-helo").await;
    assert_eq!(seen[1].0, "helo");
    assert_eq!(reply_text(&seen[1].1), "554 5.7.0 no at helo");
    let seen = run_to(&d, "nothing").await;
    assert_eq!(seen.last().unwrap(), &("eom", Status::Continue));
    d.stop().await;
}

const EDITS: &str = r#"
local milter = require "milter"
return {
  eom = function(ctx)
    ctx:add_header("X-Added", "one")
    ctx:insert_header(0, "X-Top", "first")
    ctx:change_header("Subject", 1, "changed")
    ctx:delete_header("X-Remove")
    ctx:delete_header("X-Remove", 2)
    ctx:add_rcpt("<new@example.org>")
    ctx:add_rcpt("<ext@example.org>", { "NOTIFY=NEVER" })
    ctx:delete_rcpt("<old@example.org>")
    ctx:change_sender("<bounce@example.org>", "SIZE=100")
    ctx:replace_body("new body\r\n")
    ctx:quarantine("held for review")
    ctx:progress()
    return milter.accept()
  end,
}
"#;

#[tokio::test]
async fn every_eom_action_reaches_the_client() {
    let d = TestDaemon::start(&[("edits", EDITS)], "").await;
    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap();
    c.mail(["<a@example.org>"]).await.unwrap();
    c.rcpt(["<old@example.org>"]).await.unwrap();
    c.header("Subject", "original").await.unwrap();
    c.header("X-Remove", "1").await.unwrap();
    let (actions, status) = c.eom().await.unwrap();
    assert_eq!(status, Status::Accept);
    assert!(actions.has_add_header("X-Added", "one"));
    assert!(actions.has_insert_header(0, "X-Top", "first"));
    assert!(actions.has_change_header("Subject", 1, "changed"));
    assert!(actions.has_delete_header("X-Remove", 1));
    assert!(actions.has_delete_header("X-Remove", 2));
    assert!(actions.has_add_recipient("<new@example.org>", any()));
    assert!(actions.has_add_recipient("<ext@example.org>", "NOTIFY=NEVER"));
    assert!(actions.has_delete_recipient("<old@example.org>"));
    assert!(actions.has_change_sender("<bounce@example.org>", "SIZE=100"));
    assert!(actions.has_replaced_body(&b"new body\r\n"[..]));
    assert!(actions.has_quarantine("held for review"));
    d.stop().await;
}

const STATE: &str = r#"
local milter = require "milter"
return {
  connect = function(ctx) ctx.vars.messages = 0 end,
  mail = function(ctx, sender, args)
    ctx.vars.messages = ctx.vars.messages + 1
    ctx.msg.mark = (ctx.msg.mark or "") .. "m"
    ctx.msg.size = args.SIZE
    ctx.msg.body8 = args.BODY
  end,
  rcpt = function(ctx, rcpt)
    if rcpt:match("^bad@") then
      return milter.reject{ code = 550, xcode = "5.1.1", text = "no such user " .. rcpt }
    end
    if rcpt:match("^later@") then return milter.tempfail{ text = "try later" } end
  end,
  abort = function(ctx) ctx.vars.aborts = (ctx.vars.aborts or 0) + 1 end,
  eom = function(ctx)
    ctx:add_header("X-Count", tostring(ctx.vars.messages))
    ctx:add_header("X-Mark", ctx.msg.mark .. "/" .. tostring(ctx.msg.size) .. "/" .. tostring(ctx.msg.body8))
    ctx:add_header("X-Rcpts", table.concat(ctx.recipients, ","))
    ctx:add_header("X-Sender", ctx.sender .. " " .. ctx.helo .. " " .. ctx.client.ip .. " " .. ctx.client.family)
    ctx:add_header("X-Aborts", tostring(ctx.vars.aborts or 0))
    ctx:add_header("X-Headers", tostring(#ctx.headers) .. " " .. (ctx:header("subject") or "-"))
  end,
}
"#;

#[tokio::test]
async fn per_recipient_rejects_and_per_message_state() {
    let d = TestDaemon::start(&[("state", STATE)], "").await;
    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::new(198, 51, 100, 7))
        .await
        .unwrap();
    c.helo("mx.example.net").await.unwrap();

    c.mail(["<a@example.org>", "SIZE=1234", "BODY=8BITMIME"])
        .await
        .unwrap();
    assert_eq!(
        c.rcpt(["<ok1@example.org>"]).await.unwrap(),
        Status::Continue
    );
    let bad = c.rcpt(["<bad@example.org>"]).await.unwrap();
    assert_eq!(reply_text(&bad), "550 5.1.1 no such user bad@example.org");
    let later = c.rcpt(["<later@example.org>"]).await.unwrap();
    assert_eq!(reply_text(&later), "451 4.7.1 try later");
    assert_eq!(
        c.rcpt(["<ok2@example.org>"]).await.unwrap(),
        Status::Continue
    );
    c.header("Subject", "first").await.unwrap();
    let (actions, _) = c.eom().await.unwrap();
    assert!(actions.has_add_header("X-Count", "1"));
    assert!(actions.has_add_header("X-Mark", "m/1234/8BITMIME"));
    assert!(actions.has_add_header("X-Rcpts", "ok1@example.org,ok2@example.org"));
    assert!(actions.has_add_header("X-Sender", "a@example.org mx.example.net 198.51.100.7 inet"));
    assert!(actions.has_add_header("X-Headers", "1 first"));

    // An aborted message, then a second message: ctx.msg and recipients start fresh,
    // ctx.vars (per connection) keeps counting.
    c.mail(["<x@example.org>"]).await.unwrap();
    c.rcpt(["<gone@example.org>"]).await.unwrap();
    c.abort().await.unwrap();
    c.mail(["<>"]).await.unwrap();
    c.rcpt(["<ok3@example.org>"]).await.unwrap();
    let (actions, _) = c.eom().await.unwrap();
    assert!(actions.has_add_header("X-Count", "3"));
    assert!(actions.has_add_header("X-Mark", "m/nil/nil"));
    assert!(actions.has_add_header("X-Rcpts", "ok3@example.org"));
    assert!(actions.has_add_header("X-Aborts", "1"));
    assert!(actions.has_add_header("X-Headers", "0 -"));
    d.stop().await;
}

const MULTILINE: &str = r#"
local milter = require "milter"
return {
  mail = function(ctx, sender)
    return milter.reject{ code = 550, xcode = "5.7.1", text = { "line one", "line two", "line three" } }
  end,
}
"#;

#[tokio::test]
async fn multi_line_replies_keep_code_on_every_line() {
    let d = TestDaemon::start(&[("ml", MULTILINE)], "").await;
    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap();
    let status = c.mail(["<a@example.org>"]).await.unwrap();
    assert_eq!(
        reply_text(&status),
        "550-5.7.1 line one\r\n550-5.7.1 line two\r\n550 5.7.1 line three"
    );
    d.stop().await;
}

const MACROS: &str = r#"
return {
  macros = { connect = { "{daemon_port}" }, mail = { "{auth_authen}" } },
  eom = function(ctx)
    ctx:add_header("X-J", ctx:macro("j") or "-")
    ctx:add_header("X-Port", ctx:macro("{daemon_port}") or "-")
    ctx:add_header("X-Port2", ctx:macro("daemon_port") or "-")
    ctx:add_header("X-Qid", ctx.queue_id or "-")
    ctx:add_header("X-Auth", ctx.auth or "-")
  end,
}
"#;

#[tokio::test]
async fn macros_by_name_with_or_without_braces() {
    let d = TestDaemon::start(&[("macros", MACROS)], "").await;
    let mut c = d.client().await;
    let requested = c.requested_macros().clone();
    let connect = requested[&indymilter::MacroStage::Connect]
        .to_string_lossy()
        .into_owned();
    assert!(
        connect.contains("{daemon_port}") && connect.contains("j"),
        "{connect}"
    );
    let mail = requested[&indymilter::MacroStage::Mail]
        .to_string_lossy()
        .into_owned();
    assert!(
        mail.contains("{auth_authen}") && mail.contains("i"),
        "{mail}"
    );

    c.macros(
        indymilter::MacroStage::Connect,
        [("j", "mx.example.org"), ("{daemon_port}", "25")],
    )
    .await
    .unwrap();
    c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap();
    c.macros(
        indymilter::MacroStage::Mail,
        [("i", "ABC123"), ("{auth_authen}", "alice")],
    )
    .await
    .unwrap();
    c.mail(["<a@example.org>"]).await.unwrap();
    c.rcpt(["<r@example.org>"]).await.unwrap();
    let (actions, _) = c.eom().await.unwrap();
    assert!(actions.has_add_header("X-J", "mx.example.org"));
    assert!(actions.has_add_header("X-Port", "25"));
    assert!(actions.has_add_header("X-Port2", "25"));
    assert!(actions.has_add_header("X-Qid", "ABC123"));
    assert!(actions.has_add_header("X-Auth", "alice"));
    d.stop().await;
}

#[tokio::test]
async fn unix_socket_serves_and_cleans_up() {
    let d = TestDaemon::start_unix(&[("state", STATE)], "").await;
    let luamilter::listen::ListenAddr::Unix(path) = d.local().clone() else {
        panic!()
    };
    let mut c = d.client().await;
    // Over a unix socket, stages no policy answers are sent without waiting for a reply.
    assert_eq!(
        c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap(),
        Status::Continue
    );
    assert_eq!(c.helo("x").await.unwrap(), Status::Noreply);
    c.mail(["<a@example.org>"]).await.unwrap();
    c.rcpt(["<ok@example.org>"]).await.unwrap();
    let (actions, status) = c.eom().await.unwrap();
    assert_eq!(status, Status::Continue);
    assert!(actions.has_add_header("X-Rcpts", "ok@example.org"));
    c.close().await.unwrap();
    assert!(path.exists());
    let _dir = d.dir.path().to_path_buf();
    d.stop().await;
    assert!(!path.exists(), "socket file removed at exit");
}

#[tokio::test]
async fn stale_unix_socket_is_replaced_and_live_one_refused() {
    let dir = tempfile::TempDir::new().unwrap();
    let sock = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let listen = format!("unix:{}", sock.display());
    let d = TestDaemon::try_start(&[("ml", MULTILINE)], "", &listen)
        .await
        .unwrap();
    let second = TestDaemon::try_start(&[("ml", MULTILINE)], "", &listen)
        .await
        .err()
        .unwrap();
    assert!(second.contains("another process is listening"), "{second}");
    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap();
    d.stop().await;
}

#[tokio::test]
async fn examples_run_through_the_daemon() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let read = |name: &str| std::fs::read_to_string(examples.join(format!("{name}.lua"))).unwrap();

    let trivial = read("trivial");
    let d = TestDaemon::start(&[("trivial", &trivial)], "").await;
    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap();
    c.helo("h").await.unwrap();
    c.mail(["<a@example.org>"]).await.unwrap();
    c.rcpt(["<b@example.org>"]).await.unwrap();
    c.data().await.unwrap();
    c.header("Subject", "x").await.unwrap();
    c.eoh().await.unwrap();
    c.body("x").await.unwrap();
    let (actions, status) = c.eom().await.unwrap();
    assert_eq!(status, Status::Accept);
    assert!(actions.has_add_header("X-Luamilter", "checked"));
    assert_eq!(c.unknown("FOO").await.unwrap(), Status::Continue);
    d.stop().await;

    let bench = read("bench");
    let d = TestDaemon::start(&[("bench", &bench)], "").await;
    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap();
    assert_eq!(
        reply_text(&c.mail(["<spam@bad.example>"]).await.unwrap()),
        "550 5.7.1 Sender refused"
    );
    c.mail(["<good@example.org>"]).await.unwrap();
    c.rcpt(["<r@example.org>"]).await.unwrap();
    let (actions, status) = c.eom().await.unwrap();
    assert_eq!(status, Status::Accept);
    assert!(actions.has_add_header("X-Policy", "checked"));
    d.stop().await;

    let hygiene = read("hygiene");
    let d = TestDaemon::start(
        &[("hygiene", &hygiene)],
        "[policy.hygiene]\nadd_local_domains = [\"example.net\"]\n",
    )
    .await;
    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap();
    assert_eq!(
        reply_text(&c.helo("192.0.2.1").await.unwrap()),
        "550 5.7.1 hello name cannot be numeric ip"
    );
    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap();
    assert_eq!(c.helo("[192.0.2.1]").await.unwrap(), Status::Continue);
    let blocked = c.mail(["<SPAM@bad.example>"]).await.unwrap();
    assert!(
        reply_text(&blocked).starts_with("550-5.7.1 Sender <SPAM@bad.example> is blocked here.")
    );
    c.mail(["<a@example.com>"]).await.unwrap();
    assert_eq!(c.rcpt(["<u@example.org>"]).await.unwrap(), Status::Continue);
    assert_eq!(c.rcpt(["<u@example.net>"]).await.unwrap(), Status::Continue);
    assert_eq!(
        reply_text(&c.rcpt(["<u@elsewhere.test>"]).await.unwrap()),
        "550 5.7.1 Relaying denied for <u@elsewhere.test>"
    );
    c.header("Subject", "Urgent wire transfer needed")
        .await
        .unwrap();
    let (actions, status) = c.eom().await.unwrap();
    assert_eq!(status, Status::Continue);
    assert!(actions.has_add_header("X-Hygiene", "recipients=2"));
    assert!(actions.has_quarantine("subject contains URGENT WIRE TRANSFER"));
    d.stop().await;
}

#[tokio::test]
async fn a_malformed_milter_packet_closes_that_session_only() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let d = TestDaemon::start(&[("ml", MULTILINE)], "").await;
    let luamilter::listen::ListenAddr::Inet(addr) = d.local().clone() else {
        panic!()
    };
    for garbage in [
        &b"\x00\x00\x00\x05Zjunk"[..],
        b"\xff\xff\xff\xffX",
        b"\x00\x00\x00\x00X",
        b"\x00\x00\x00\x0dO\x00\x00",
    ] {
        let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
        raw.write_all(garbage).await.unwrap();
        // An unknown command, an oversized length, an empty command, or a frame cut short by
        // the client hanging up.
        raw.shutdown().await.unwrap();
        let mut buf = [0u8; 64];
        // The daemon hangs up on this session (EOF, or a reset), it does not crash.
        let read =
            tokio::time::timeout(std::time::Duration::from_secs(10), raw.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "{garbage:?}: {read:?}"
        );
    }
    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap();
    assert_eq!(
        reply_text(&c.mail(["<a@example.org>"]).await.unwrap())
            .lines()
            .count(),
        3
    );
    d.stop().await;
}
