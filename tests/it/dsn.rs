//! DSNs (`milter.smtp.send`, `Smtp::send_dsn`, `services/dsn.rs`) submitted to a real relay on
//! loopback: the scripted server of `smtp_server.rs` takes `DATA` and keeps each message, which
//! the tests parse with `mailparse` — the multipart/report structure, the delivery-status fields,
//! the original header — and the envelope the relay saw.

use crate::dns_server::TestDns;
use crate::smtp::{HELO, config, fixture, session};
use crate::smtp_server::TestMx;
use crate::support::{TestDaemon, reply_text};
use indymilter_test::Status;
use luamilter::services::dsn::{Action, Dsn};
use luamilter::services::smtp::{SmtpConfig, SmtpError};
use luamilter::stage::Stage;
use mailparse::{MailHeaderMap, ParsedMail, parse_headers, parse_mail};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn relay_config(relay: SocketAddr) -> SmtpConfig {
    SmtpConfig {
        relay: relay.to_string(),
        ..config(25)
    }
}

fn sample() -> Dsn {
    Dsn {
        to: "sender@origin.test".into(),
        reporting: Some("mx.receiver.test".into()),
        subject: Some("SPF fail (EMAIL FORGERY)".into()),
        text: "THIS IS A WARNING MESSAGE ONLY.\nDelivery has been delayed.\n.\nafter a dot line\n"
            .into(),
        recipients: vec!["alice@receiver.test".into(), "bob@receiver.test".into()],
        action: Action::Delayed,
        status: Some("4.7.1".into()),
        diagnostic: Some("SPF fail for origin.test\r\nInjected: no".into()),
        headers: vec![
            (
                "Received".into(),
                "from client.test\n\tby mx.receiver.test".into(),
            ),
            ("Subject".into(), "Grüße, the original".into()),
            ("Message-ID".into(), "<orig.1@origin.test>".into()),
        ],
    }
}

/// The blocks of a `message/delivery-status` body, each parsed as header fields: the
/// per-message block first, then one per recipient.
pub(crate) fn status_blocks(body: &[u8]) -> Vec<HashMap<String, String>> {
    let mut blocks = Vec::new();
    let mut rest = body;
    while !rest.iter().all(|b| b.is_ascii_whitespace()) {
        let (fields, end) = parse_headers(rest).expect("delivery-status fields parse");
        blocks.push(
            fields
                .iter()
                .map(|f| (f.get_key().to_ascii_lowercase(), f.get_value()))
                .collect(),
        );
        assert!(end > 0 && end <= rest.len());
        rest = &rest[end..];
    }
    blocks
}

/// The first `name` field of the original header a DSN carries (its `text/rfc822-headers`).
pub(crate) fn original_header(original: &ParsedMail, name: &str) -> Option<String> {
    let raw = original.get_body_raw().unwrap();
    let (fields, _) = parse_headers(&raw).expect("the original header parses");
    fields.get_first_value(name)
}

/// Checks the structure every DSN has and returns its three parts.
pub(crate) fn report_parts<'a>(dsn: &'a ParsedMail<'a>) -> [&'a ParsedMail<'a>; 3] {
    assert_eq!(dsn.ctype.mimetype, "multipart/report");
    assert_eq!(
        dsn.ctype.params.get("report-type").map(String::as_str),
        Some("delivery-status")
    );
    assert_eq!(dsn.subparts.len(), 3, "text, delivery-status, headers");
    assert_eq!(dsn.subparts[0].ctype.mimetype, "text/plain");
    assert_eq!(dsn.subparts[1].ctype.mimetype, "message/delivery-status");
    assert_eq!(dsn.subparts[2].ctype.mimetype, "text/rfc822-headers");
    [&dsn.subparts[0], &dsn.subparts[1], &dsn.subparts[2]]
}

#[tokio::test]
async fn a_dsn_is_a_multipart_report_with_the_status_and_the_original_header() {
    let dns = TestDns::start().await;
    let relay = TestMx::start().await;
    let f = fixture(&dns, relay_config(relay.addr));
    f.smtp
        .send_dsn(&sample(), None)
        .await
        .expect("relay takes the DSN");

    let commands = relay.commands();
    assert!(commands.contains(&format!("EHLO {HELO}")), "{commands:?}");
    assert!(
        commands.contains(&"MAIL FROM:<>".to_string()),
        "{commands:?}"
    );
    assert!(commands.contains(&"RCPT TO:<sender@origin.test>".to_string()));
    let messages = relay.messages();
    assert_eq!(messages.len(), 1);
    let dsn = parse_mail(messages[0].as_bytes()).expect("the DSN parses");

    let h = &dsn.headers;
    assert_eq!(h.get_first_value("To").unwrap(), "<sender@origin.test>");
    assert!(
        h.get_first_value("From")
            .unwrap()
            .contains("MAILER-DAEMON@mx.receiver.test")
    );
    assert_eq!(
        h.get_first_value("Subject").unwrap(),
        "SPF fail (EMAIL FORGERY)"
    );
    assert_eq!(h.get_first_value("Auto-Submitted").unwrap(), "auto-replied");
    assert!(
        h.get_first_value("Message-ID")
            .unwrap()
            .ends_with("@mx.receiver.test>")
    );
    assert!(h.get_first_value("Date").is_some());

    let [text, status, original] = report_parts(&dsn);
    let text = text.get_body().unwrap();
    assert!(text.contains("WARNING MESSAGE ONLY"));
    // a line holding a dot went through DATA (dot-stuffed) without ending the message
    assert!(
        text.contains("delayed.\r\n.\r\nafter a dot line"),
        "{text:?}"
    );

    let blocks = status_blocks(&status.get_body_raw().unwrap());
    assert_eq!(blocks.len(), 3, "{blocks:?}");
    assert_eq!(blocks[0]["reporting-mta"], "dns; mx.receiver.test");
    assert!(blocks[0].contains_key("arrival-date"));
    for (block, rcpt) in blocks[1..].iter().zip(["alice", "bob"]) {
        assert_eq!(
            block["final-recipient"],
            format!("rfc822; {rcpt}@receiver.test")
        );
        assert_eq!(block["action"], "delayed");
        assert_eq!(block["status"], "4.7.1");
        // the line break in the diagnostic did not make a field of its own
        assert_eq!(
            block["diagnostic-code"],
            "smtp; SPF fail for origin.test  Injected: no"
        );
        assert!(!block.contains_key("injected"));
    }

    let raw = original.get_body_raw().unwrap();
    let (fields, _) = parse_headers(&raw).unwrap();
    let names: Vec<String> = fields.iter().map(|f| f.get_key()).collect();
    assert_eq!(names, ["Received", "Subject", "Message-ID"]);
    assert_eq!(
        fields.get_first_value("Message-ID").unwrap(),
        "<orig.1@origin.test>"
    );
    assert_eq!(
        fields.get_first_value("Subject").unwrap(),
        "Grüße, the original"
    );
    assert_eq!(
        fields.get_first_value("Received").unwrap(),
        "from client.test by mx.receiver.test"
    );
    assert_eq!(f.smtp.stats().dsns_sent, 1);
}

#[tokio::test]
async fn defaults_a_failed_dsn_about_the_sender_itself() {
    let dns = TestDns::start().await;
    let relay = TestMx::start().await;
    let f = fixture(&dns, relay_config(relay.addr));
    let dsn = Dsn {
        reporting: None,
        subject: None,
        text: String::new(),
        recipients: vec![],
        action: Action::Failed,
        status: None,
        diagnostic: None,
        ..sample()
    };
    f.smtp.send_dsn(&dsn, None).await.unwrap();
    let messages = relay.messages();
    let dsn = parse_mail(messages[0].as_bytes()).unwrap();
    assert_eq!(
        dsn.headers.get_first_value("Subject").unwrap(),
        "Delivery Status Notification (Failure)"
    );
    let [text, status, _] = report_parts(&dsn);
    assert!(text.get_body().unwrap().contains(HELO));
    let blocks = status_blocks(&status.get_body_raw().unwrap());
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[0]["reporting-mta"], format!("dns; {HELO}"));
    assert_eq!(blocks[1]["final-recipient"], "rfc822; sender@origin.test");
    assert_eq!(blocks[1]["action"], "failed");
    assert_eq!(blocks[1]["status"], "5.0.0");
    assert!(!blocks[1].contains_key("diagnostic-code"));
}

#[tokio::test]
async fn a_relay_refusing_the_null_sender_gets_the_dsn_from_postmaster() {
    let dns = TestDns::start().await;
    let relay = TestMx::refusing_null_sender().await;
    let f = fixture(&dns, relay_config(relay.addr));
    f.smtp.send_dsn(&sample(), None).await.unwrap();
    let mails: Vec<String> = relay
        .commands()
        .into_iter()
        .filter(|c| c.starts_with("MAIL FROM:"))
        .collect();
    assert_eq!(
        mails,
        ["MAIL FROM:<>", "MAIL FROM:<postmaster@mx.receiver.test>"]
    );
    assert_eq!(relay.messages().len(), 1);
}

#[tokio::test]
async fn at_most_send_global_dsns_are_submitted_at_once() {
    let dns = TestDns::start().await;
    // the relay waits before each RCPT answer, so submissions overlap unless limited
    let relay = TestMx::holding(Duration::from_millis(150)).await;
    let f = fixture(
        &dns,
        SmtpConfig {
            send_global: 1,
            ..relay_config(relay.addr)
        },
    );
    let dsn = sample();
    let started = Instant::now();
    let sends = (0..3).map(|_| f.smtp.send_dsn(&dsn, Some(Duration::from_secs(3))));
    for result in futures_util::future::join_all(sends).await {
        result.unwrap();
    }
    assert_eq!(relay.messages().len(), 3);
    assert_eq!(relay.max_open(), 1, "one submission at a time");
    assert!(started.elapsed() >= Duration::from_millis(450));

    // a deadline shorter than the wait for the slot gives "timeout"
    let (first, second) = tokio::join!(
        f.smtp.send_dsn(&dsn, None),
        f.smtp.send_dsn(&dsn, Some(Duration::from_millis(50)))
    );
    first.unwrap();
    assert_eq!(second.unwrap_err().code(), "timeout");
}

#[tokio::test]
async fn relay_down_refusing_or_bad_input_are_errors() {
    let dns = TestDns::start().await;
    // a port nobody listens on
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = closed.local_addr().unwrap();
    drop(closed);
    let f = fixture(&dns, relay_config(down));
    let error = f.smtp.send_dsn(&sample(), None).await.unwrap_err();
    assert_eq!(error.code(), "refused", "{error}");

    let relay = TestMx::start().await;
    let f = fixture(&dns, relay_config(relay.addr));
    let to_unknown = Dsn {
        to: "unknown@origin.test".into(),
        ..sample()
    };
    match f.smtp.send_dsn(&to_unknown, None).await {
        Err(SmtpError::Rejected(reply)) => {
            assert_eq!((reply.code, reply.stage), (550, Stage::Rcpt));
            assert!(reply.text.starts_with("5.1.1"));
        }
        other => panic!("{other:?}"),
    }
    for bad in [
        Dsn {
            to: "no address".into(),
            ..sample()
        },
        Dsn {
            recipients: vec!["a@b\r\nRCPT TO:<x@y>".into()],
            ..sample()
        },
        Dsn {
            reporting: Some("evil\r\nhost".into()),
            ..sample()
        },
    ] {
        let error = f.smtp.send_dsn(&bad, None).await.unwrap_err();
        assert_eq!(error.code(), "invalid", "{bad:?}");
    }
    assert!(relay.messages().is_empty());
}

/// The call-back tests' daemon config (its `[smtp]` last) with the relay and a site name.
fn daemon_config(dns: &TestDns, relay: &TestMx) -> String {
    format!(
        "{}relay = \"{}\"\n[site]\nhostname = \"mx.receiver.test\"\n",
        crate::smtp::daemon_config(dns, relay),
        relay.addr
    )
}

const DSN_POLICY: &str = r#"
local milter = require "milter"
local smtp = require "milter.smtp"
return {
  eom = function(ctx)
    local ok, raised = pcall(smtp.send, { to = ctx.sender, status = "5.7" })
    assert(not ok and tostring(raised):find("status"), tostring(raised))
    ok, raised = pcall(smtp.send, { to = ctx.sender, colour = "red" })
    assert(not ok and tostring(raised):find("unknown field"), tostring(raised))
    local none, why = smtp.send({ to = "no address", headers = { { "Subject", "pairs" } } })
    assert(none == nil and why == "invalid", tostring(why))
    local sent, err, reply = smtp.send({
      to = ctx.sender,
      reporting = ctx.receiver,
      subject = "Critical mail server configuration error",
      text = "Your message was rejected.",
      recipients = ctx.recipients,
      action = "failed",
      status = "5.7.1",
      diagnostic = "550 5.7.1 SPF fail",
      headers = ctx.headers,
    }, { timeout = "5s" })
    if sent then
      return milter.reject{ code = 550, xcode = "5.7.1", text = "DSN sent" }
    end
    local detail = reply and (" " .. reply.code .. " " .. reply.stage) or ""
    return milter.tempfail{ code = 451, xcode = "4.3.0", text = "DSN " .. err .. detail }
  end,
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_sends_a_dsn_at_eom_through_milter_smtp() {
    let dns = TestDns::start().await;
    let relay = TestMx::refusing_null_sender().await;
    let d = TestDaemon::start(&[("dsn", DSN_POLICY)], &daemon_config(&dns, &relay)).await;
    let message = |sender: &'static str| {
        let d = &d;
        async move {
            let mut c = session(d).await;
            c.mail([sender]).await.unwrap();
            c.rcpt(["<alice@receiver.test>"]).await.unwrap();
            c.header("From", "Sender <sender@origin.test>")
                .await
                .unwrap();
            c.header("Subject", "quarterly report").await.unwrap();
            c.eoh().await.unwrap();
            c.body("hello\r\n").await.unwrap();
            c.eom().await.unwrap().1
        }
    };
    assert_eq!(
        reply_text(&message("<sender@origin.test>").await),
        "550 5.7.1 DSN sent"
    );
    assert_eq!(
        reply_text(&message("<unknown@origin.test>").await),
        "451 4.3.0 DSN rejected 550 rcpt"
    );
    let messages = relay.messages();
    assert_eq!(messages.len(), 1);
    let dsn = parse_mail(messages[0].as_bytes()).unwrap();
    let [_, status, original] = report_parts(&dsn);
    let blocks = status_blocks(&status.get_body_raw().unwrap());
    assert_eq!(blocks[0]["reporting-mta"], "dns; mx.receiver.test");
    assert_eq!(blocks[1]["final-recipient"], "rfc822; alice@receiver.test");
    assert_eq!(blocks[1]["status"], "5.7.1");
    assert_eq!(blocks[1]["diagnostic-code"], "smtp; 550 5.7.1 SPF fail");
    assert_eq!(
        original_header(original, "Subject").as_deref(),
        Some("quarterly report")
    );
    assert!(
        relay
            .commands()
            .contains(&"MAIL FROM:<postmaster@mx.receiver.test>".to_string())
    );
    assert_ne!(message("<sender@origin.test>").await, Status::Continue);
    d.stop().await;
}
