//! The reputation and honeypot stock policies through real daemons and a real milter client:
//! two MX hosts (two `luamilter run` processes) sharing one redis-server learn from each other's
//! verdicts; a honeypot among
//! real recipients quarantines the message without the trap; `abort` handlers see a message a
//! verdict ended, with `ctx.verdicts`. The policies' rules: tests/cases/reputation.toml and
//! tests/cases/honeypot.toml.

use std::net::Ipv4Addr;

use indymilter_test::Status;
use tempfile::TempDir;

use crate::redis_server::RedisServer;
use crate::support::{DaemonProcess, Mta, TestDaemon, added_header, reply_text};

/// One MX host: a `luamilter run` process with the stock reputation and honeypot policies on
/// the shared Redis store.
struct MxHost {
    process: DaemonProcess,
}

async fn mx_host(redis: &RedisServer) -> MxHost {
    let dir = TempDir::new().unwrap();
    let socket = dir.path().join("milter.sock");
    let extra = format!(
        "[log]\nlevel = \"warn\"\n[store]\nbackend = \"redis\"\nurl = {:?}\n[policy.honeypot]\naddresses = [\"trap@example.org\"]\n[policy.reputation]\nbad_score = -0.4\nbad_confidence = 0.05\n",
        redis.url
    );
    let listen = format!("unix:{}", socket.display());
    let path = crate::support::write_config(&dir, &listen, &[], &extra);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("chain = []", "chain = [\"reputation\", \"honeypot\"]");
    std::fs::write(&path, text).unwrap();
    MxHost {
        process: DaemonProcess::start_config(dir, path, socket).unwrap(),
    }
}

/// Opens a message on `c`: connect from `ip`, HELO, MAIL.
async fn open(mut c: Mta, ip: Ipv4Addr, helo: &str, sender: &str) -> Mta {
    c.connect(&format!("[{ip}]"), ip).await.unwrap();
    c.helo(helo).await.unwrap();
    c.mail([sender]).await.unwrap();
    c
}

/// Opens a message from the spam client.
async fn from_spammer(host: &MxHost) -> Mta {
    let ip = Ipv4Addr::new(203, 0, 113, 9);
    let c = host.process.client().await;
    open(c, ip, "mail.spam.test", "<offers@spam.test>").await
}

/// The message's end: DATA through end of message.
async fn finish(c: &mut Mta) -> (indymilter_test::EomActions, Status) {
    c.data().await.unwrap();
    c.header("Subject", "offer").await.unwrap();
    c.eoh().await.unwrap();
    c.body("buy\r\n").await.unwrap();
    c.eom().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_mx_hosts_share_reputation_through_redis() {
    let redis = RedisServer::start();
    let (a, b) = (mx_host(&redis).await, mx_host(&redis).await);

    // Host A: honeypot-only mail is discarded and learned as spam.
    let mut c = from_spammer(&a).await;
    assert_eq!(
        c.rcpt(["<trap@example.org>"]).await.unwrap(),
        Status::Continue
    );
    let (_, status) = finish(&mut c).await;
    assert_eq!(status, Status::Discard);
    c.close().await.unwrap();

    // Host B sees that spam: the client is refused at RCPT, but postmaster gets through and
    // the message shows the score.
    let mut c = from_spammer(&b).await;
    let refused = c.rcpt(["<a@example.org>"]).await.unwrap();
    assert_eq!(
        reply_text(&refused),
        "550 5.7.1 203.0.113.0/24,mail.spam.test has been sending mostly spam"
    );
    assert_eq!(
        c.rcpt(["<postmaster@example.org>"]).await.unwrap(),
        Status::Continue
    );
    let (actions, status) = finish(&mut c).await;
    assert_eq!(status, Status::Continue);
    assert_eq!(
        added_header(&actions, "X-Reputation").as_deref(),
        Some(
            "client:203.0.113.0/24,mail.spam.test; score=-0.50; confidence=0.09; ham=0.0 spam=1.0"
        )
    );
    c.close().await.unwrap();

    // The delivery on B was ham (its own refusal teaches nothing): A sees both.
    let mut c = from_spammer(&a).await;
    assert_eq!(
        c.rcpt(["<postmaster@example.org>"]).await.unwrap(),
        Status::Continue
    );
    let (actions, _) = finish(&mut c).await;
    assert_eq!(
        added_header(&actions, "X-Reputation").as_deref(),
        Some("client:203.0.113.0/24,mail.spam.test; score=0.00; confidence=0.17; ham=1.0 spam=1.0")
    );
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honeypot_among_real_recipients_quarantines_without_the_trap() {
    let redis = RedisServer::start();
    let host = mx_host(&redis).await;
    // The null sender gets no notice (no DSN, no call-back): the quarantine alone.
    let ip = Ipv4Addr::new(198, 51, 100, 9);
    let mut c = open(host.process.client().await, ip, "mail.other.test", "<>").await;
    c.rcpt(["<a@example.org>"]).await.unwrap();
    c.rcpt(["<trap@example.org>"]).await.unwrap();
    let (actions, status) = finish(&mut c).await;
    assert_eq!(status, Status::Continue);
    assert!(
        actions.has_quarantine("sent to the honeypot"),
        "{actions:?}"
    );
    assert!(
        actions.has_delete_recipient("<trap@example.org>"),
        "{actions:?}"
    );
    assert!(!actions.has_delete_recipient("<a@example.org>"));
    c.close().await.unwrap();
}

const REFUSER: &str = r#"
local milter = require "milter"
return {
  mail = function(ctx, sender)
    if sender:match("^no@") then return milter.reject{ code = 550, text = "No" } end
  end,
  eom = function(ctx)
    if ctx.sender:match("^drop@") then return milter.discard() end
  end,
}
"#;

const WATCHER: &str = r#"
return {
  abort = function(ctx)
    local v = ctx.verdicts[#ctx.verdicts]
    ctx.vars.seen = (ctx.vars.seen or "") .. v.stage .. ":" .. v.policy .. ":" .. v.action .. " "
  end,
  eom = function(ctx) ctx:add_header("X-Aborts", ctx.vars.seen or "") end,
}
"#;

#[tokio::test]
async fn abort_handlers_see_messages_that_a_verdict_ended() {
    let d = TestDaemon::start(&[("refuser", REFUSER), ("watcher", WATCHER)], "").await;
    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::new(192, 0, 2, 7)).await.unwrap();
    c.helo("mail.example.test").await.unwrap();
    let refused = c.mail(["<no@example.test>"]).await.unwrap();
    assert_eq!(reply_text(&refused), "550 No");
    c.mail(["<drop@example.test>"]).await.unwrap();
    c.rcpt(["<a@example.org>"]).await.unwrap();
    let (_, status) = finish(&mut c).await;
    assert_eq!(status, Status::Discard);
    c.mail(["<yes@example.test>"]).await.unwrap();
    c.rcpt(["<a@example.org>"]).await.unwrap();
    let (actions, status) = finish(&mut c).await;
    assert_eq!(status, Status::Continue);
    assert_eq!(
        added_header(&actions, "X-Aborts").as_deref(),
        Some("mail:refuser:reject eom:refuser:discard ")
    );
    c.close().await.unwrap();
    d.stop().await;
}
