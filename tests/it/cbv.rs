//! The stock `cbv` policy and `lib/notice` against real parts on loopback: the test DNS server's
//! `cbv.test` zone (SPF neutral for `good` and `other`, pass for `pass`; every exchanger on
//! 127.0.0.1), the scripted test MX of `smtp_server.rs` as the sender's exchanger, and a second
//! one as the relay that captures the DSNs, which are parsed with `mailparse` (not the builder
//! that wrote them). Call-backs and DSNs are counted at the MX and at the relay.

use crate::content::maildir_new;
use crate::dns_server::TestDns;
use crate::dsn::{original_header, report_parts, status_blocks};
use crate::smtp::session;
use crate::smtp_server::TestMx;
use crate::support::{TestDaemon, reply_text};
use indymilter_test::{EomActions, Status};
use mailparse::{MailHeaderMap, parse_mail};
use std::net::Ipv4Addr;
use tempfile::TempDir;

/// The access map of most tests: a DSN for SPF neutral.
const DSN_ON_NEUTRAL: &str = "[site.access]\n\"SPF-Neutral:\" = \"DSN\"\n";

fn stock(name: &str) -> (&str, &'static str) {
    (name, luamilter::stock::get(name).unwrap())
}

/// The sender's side and the daemon: the test DNS, the sender's MX, the relay, and a daemon in
/// `dir` with the stock spf and cbv policies (then `more`), calling back at the MX, relaying
/// DSNs through the relay, `[site]` with `site` lines, then `extra`. Bind every field (the
/// test DNS and the MX must live as long as the daemon).
struct World {
    mx: TestMx,
    relay: TestMx,
    d: TestDaemon,
    _dns: TestDns,
}

impl World {
    async fn start(dir: TempDir, site: &str, extra: &str, more: &[(&str, &str)]) -> World {
        let dns = TestDns::start().await;
        let (mx, relay) = (TestMx::start().await, TestMx::start().await);
        let config = format!(
            "{}relay = \"{}\"\n[site]\nhostname = \"mx.receiver.test\"\n{site}{extra}",
            crate::smtp::daemon_config(&dns, &mx),
            relay.addr
        );
        let mut policies = vec![stock("spf"), stock("cbv")];
        policies.extend_from_slice(more);
        let d = TestDaemon::start_in(dir, &policies, &config, "inet:0@127.0.0.1")
            .await
            .unwrap();
        World {
            mx,
            relay,
            d,
            _dns: dns,
        }
    }

    /// The usual world: a DSN for SPF neutral, nothing more.
    async fn dsn_on_neutral() -> World {
        World::start(TempDir::new().unwrap(), "", DSN_ON_NEUTRAL, &[]).await
    }
}

/// One message from `sender` to `rcpts` (with their ESMTP arguments), from 192.0.2.1; the
/// end-of-message answer and actions.
async fn message(d: &TestDaemon, sender: &str, rcpts: &[&str]) -> (EomActions, Status) {
    let mut c = session(d).await;
    assert_eq!(
        c.mail([format!("<{sender}>")]).await.unwrap(),
        Status::Continue
    );
    for rcpt in rcpts {
        let args: Vec<&str> = rcpt.split(' ').collect();
        c.rcpt(args).await.unwrap();
    }
    c.header("From", &format!("Sender <{sender}>"))
        .await
        .unwrap();
    c.header("Subject", "quarterly report").await.unwrap();
    c.eoh().await.unwrap();
    c.body("hello\r\n").await.unwrap();
    c.eom().await.unwrap()
}

/// The call-backs the MX was asked: the addresses of its `RCPT TO` lines.
fn called_back(mx: &TestMx) -> Vec<String> {
    mx.commands()
        .iter()
        .filter_map(|c| c.strip_prefix("RCPT TO:<")?.strip_suffix('>'))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dsn_access_value_sends_the_template_to_the_sender_through_the_relay() {
    let World { mx, relay, d, _dns } = World::dsn_on_neutral().await;

    let (_, status) = message(
        &d,
        "ok@good.cbv.test",
        &["<alice@receiver.test>", "<bob@receiver.test> NOTIFY=NEVER"],
    )
    .await;
    assert_eq!(status, Status::Continue);
    assert!(called_back(&mx).is_empty(), "a DSN sent needs no call-back");
    let envelope: Vec<String> = relay
        .commands()
        .into_iter()
        .filter(|c| c.starts_with("MAIL") || c.starts_with("RCPT"))
        .collect();
    assert_eq!(envelope, ["MAIL FROM:<>", "RCPT TO:<ok@good.cbv.test>"]);

    let messages = relay.messages();
    assert_eq!(messages.len(), 1);
    let dsn = parse_mail(messages[0].as_bytes()).unwrap();
    assert_eq!(
        dsn.headers.get_first_value("Subject").unwrap(),
        "SPF neutral (POSSIBLE FORGERY)"
    );
    assert_eq!(
        dsn.headers.get_first_value("To").unwrap(),
        "<ok@good.cbv.test>"
    );
    let [text, status, original] = report_parts(&dsn);
    let text = text.get_body().unwrap();
    for words in [
        "THIS IS A WARNING MESSAGE ONLY.",
        "YOU DO *NOT* NEED TO RESEND YOUR MESSAGE.",
        "Delivery to the following recipients has been delayed.",
        "\talice@receiver.test\r\n",
        "Subject: quarterly report",
        "Received-SPF: neutral (192.0.2.1 is neither permitted nor denied by domain of ok@good",
        "postmaster@mx.receiver.test",
    ] {
        assert!(text.contains(words), "{words:?} in\n{text}");
    }
    assert!(!text.contains("bob@"), "bob said NOTIFY=NEVER:\n{text}");
    assert!(!text.contains('{'), "every placeholder is filled:\n{text}");
    let blocks = status_blocks(&status.get_body_raw().unwrap());
    assert_eq!(blocks.len(), 2, "the message block and alice's");
    assert_eq!(blocks[0]["reporting-mta"], "dns; mx.receiver.test");
    assert_eq!(blocks[1]["final-recipient"], "rfc822; alice@receiver.test");
    assert_eq!(blocks[1]["action"], "delayed");
    assert_eq!(blocks[1]["status"], "4.7.0");
    assert_eq!(
        original_header(original, "Subject").as_deref(),
        Some("quarterly report")
    );

    // The sender is remembered: the next message sends no DSN and calls nobody back.
    assert_eq!(
        message(&d, "ok@good.cbv.test", &["<carol@receiver.test>"])
            .await
            .1,
        Status::Continue
    );
    assert_eq!(relay.messages().len(), 1);
    assert!(called_back(&mx).is_empty());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_delay_in_notify_the_sender_is_called_back_instead() {
    let World { mx, relay, d, _dns } = World::dsn_on_neutral().await;

    let (_, status) = message(
        &d,
        "ok@good.cbv.test",
        &[
            "<alice@receiver.test> NOTIFY=NEVER",
            "<bob@receiver.test> NOTIFY=SUCCESS,FAILURE",
        ],
    )
    .await;
    assert_eq!(status, Status::Continue);
    let (_, status) = message(
        &d,
        "unknown@good.cbv.test",
        &["<alice@receiver.test> NOTIFY=NEVER"],
    )
    .await;
    assert_eq!(
        reply_text(&status),
        "550 5.7.1 CBV: 550 5.1.1 <recipient> User unknown"
    );
    assert!(relay.messages().is_empty());
    assert_eq!(
        called_back(&mx),
        ["ok@good.cbv.test", "unknown@good.cbv.test"]
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dsn_the_relay_refuses_is_answered_like_a_call_back() {
    let site = "errors_url = \"https://errors.example.test\"\n";
    let World { mx, relay, d, _dns } =
        World::start(TempDir::new().unwrap(), site, DSN_ON_NEUTRAL, &[]).await;

    // On the milter wire a `%` is doubled (the MTA reads `%%` as `%`).
    let (_, refused) = message(&d, "unknown@good.cbv.test", &["<a@receiver.test>"]).await;
    assert_eq!(
        reply_text(&refused),
        "550-5.7.1 https://errors.example.test/dsnrefused?mfrom=unknown@good.cbv.test\
         &msg=550+5.1.1+%%3Crecipient%%3E+User+unknown\r\n\
         550 5.7.1 CBV: 550 5.1.1 <recipient> User unknown"
    );
    let (_, busy) = message(&d, "busy@good.cbv.test", &["<a@receiver.test>"]).await;
    assert_eq!(
        reply_text(&busy),
        "450 4.2.0 CBV: 451 4.3.0 Try again later"
    );
    assert!(relay.messages().is_empty());
    assert!(
        called_back(&mx).is_empty(),
        "the relay's answer is the answer"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dsns_to_one_domain_are_rate_limited_then_called_back() {
    let extra = format!("{DSN_ON_NEUTRAL}[policy.cbv]\ndsn_rate = 2\ndsn_window = \"1h\"\n");
    let World { mx, relay, d, _dns } = World::start(TempDir::new().unwrap(), "", &extra, &[]).await;
    for n in 0..4 {
        let sender = format!("ok{n}@other.cbv.test");
        assert_eq!(
            message(&d, &sender, &["<a@receiver.test>"]).await.1,
            Status::Continue
        );
    }
    // Another domain has its own count.
    message(&d, "ok@good.cbv.test", &["<a@receiver.test>"]).await;
    assert_eq!(relay.messages().len(), 3, "2 to other.cbv.test, 1 to good");
    assert_eq!(
        called_back(&mx),
        ["ok2@other.cbv.test", "ok3@other.cbv.test"]
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_template_in_a_policy_dir_shadows_the_stock_one() {
    let dir = TempDir::new().unwrap();
    std::fs::create_dir(dir.path().join("templates")).unwrap();
    std::fs::write(
        dir.path().join("templates/neutral.txt"),
        "Subject: Our own words: SPF {result}\n\nHello {sender}, we saw you at {connectip} \
         writing to {rcpt}.\n",
    )
    .unwrap();
    let World {
        relay,
        d,
        mx: _mx,
        _dns,
    } = World::start(dir, "", DSN_ON_NEUTRAL, &[]).await;
    message(&d, "ok@good.cbv.test", &["<a@receiver.test>"]).await;
    let messages = relay.messages();
    let dsn = parse_mail(messages[0].as_bytes()).unwrap();
    assert_eq!(
        dsn.headers.get_first_value("Subject").unwrap(),
        "Our own words: SPF neutral"
    );
    assert_eq!(
        report_parts(&dsn)[0].get_body().unwrap().trim_end(),
        "Hello ok@good.cbv.test, we saw you at 192.0.2.1 writing to a@receiver.test."
    );
    d.stop().await;
}

const HONEYPOT: &str = r#"
local notice = require "lib.notice"
return {
  eom = function(ctx)
    return notice.quarantine(ctx, "sent to the honeypot")
  end,
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_tells_an_spf_pass_sender_and_calls_back_the_others() {
    let World { mx, relay, d, _dns } =
        World::start(TempDir::new().unwrap(), "", "", &[("honeypot", HONEYPOT)]).await;

    // SPF pass: quarantined, and the quarantine notice goes to the sender.
    let (actions, status) = message(&d, "ok@pass.cbv.test", &["<a@receiver.test>"]).await;
    assert_eq!(status, Status::Continue);
    assert!(actions.has_quarantine("sent to the honeypot"));
    let messages = relay.messages();
    assert_eq!(messages.len(), 1);
    let dsn = parse_mail(messages[0].as_bytes()).unwrap();
    assert_eq!(
        dsn.headers.get_first_value("Subject").unwrap(),
        "DELIVERY STATUS (POSSIBLE SPAM)"
    );
    let text = report_parts(&dsn)[0].get_body().unwrap();
    assert!(text.contains("Reason: sent to the honeypot"), "{text}");
    assert!(called_back(&mx).is_empty());

    // NOTIFY=NEVER: quarantined, no notice.
    let (actions, _) = message(&d, "ok2@pass.cbv.test", &["<a@receiver.test> NOTIFY=NEVER"]).await;
    assert!(actions.has_quarantine("sent to the honeypot"));
    assert_eq!(relay.messages().len(), 1);

    // SPF neutral: a call-back instead; an address its exchanger refuses is refused.
    let (actions, status) = message(&d, "ok@good.cbv.test", &["<a@receiver.test>"]).await;
    assert_eq!(status, Status::Continue);
    assert!(actions.has_quarantine("sent to the honeypot"));
    let (_, status) = message(&d, "unknown@good.cbv.test", &["<a@receiver.test>"]).await;
    assert_eq!(
        reply_text(&status),
        "550 5.7.1 CBV: 550 5.1.1 <recipient> User unknown"
    );
    assert_eq!(
        called_back(&mx),
        ["ok@good.cbv.test", "unknown@good.cbv.test"]
    );
    assert_eq!(relay.messages().len(), 1);
    d.stop().await;
}

/// The bounce a remote MTA writes when it accepted a DSN of ours and then could not deliver it:
/// to postmaster, a delivery-status report quoting the DSN's header (`dsn_header`).
fn bounce_of(dsn_header: &str) -> (Vec<(&'static str, String)>, String) {
    let headers = vec![
        ("From", "MAILER-DAEMON@good.cbv.test".to_string()),
        ("To", "postmaster@receiver.test".to_string()),
        ("Subject", "Undelivered Mail Returned to Sender".to_string()),
        ("MIME-Version", "1.0".to_string()),
        (
            "Content-Type",
            "multipart/report; report-type=delivery-status; boundary=\"b1\"".to_string(),
        ),
    ];
    let body = format!(
        "--b1\r\nContent-Type: text/plain\r\n\r\nI'm sorry to have to inform you that your message \
         could not be delivered.\r\n\r\n--b1\r\nContent-Type: message/delivery-status\r\n\r\n\
         Reporting-MTA: dns; mx.good.cbv.test\r\n\r\nFinal-Recipient: rfc822; ok@good.cbv.test\r\n\
         Action: failed\r\nStatus: 5.1.1\r\n\r\n--b1\r\nContent-Type: text/rfc822-headers\r\n\r\n\
         {dsn_header}\r\n--b1--\r\n"
    );
    (headers, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounce_of_our_signed_dsn_blacklists_its_target_and_is_discarded() {
    let config = format!(
        "save_dir = \"saved\"\n{DSN_ON_NEUTRAL}[srs]\nsecrets = [\"s3cret\"]\ndomain = \"fwd.receiver.test\"\n"
    );
    let more = [stock("srs"), stock("whitelist")];
    let World {
        relay,
        d,
        mx: _mx,
        _dns,
    } = World::start(TempDir::new().unwrap(), "", &config, &more).await;

    // SPF neutral: the template DSN goes to the sender, signed with the [srs] secret.
    let (_, status) = message(&d, "ok@good.cbv.test", &["<alice@receiver.test>"]).await;
    assert_eq!(status, Status::Continue);
    let messages = relay.messages();
    assert_eq!(messages.len(), 1);
    let dsn = parse_mail(messages[0].as_bytes()).unwrap();
    let id = dsn.headers.get_first_value("Message-ID").unwrap();
    assert!(
        id.starts_with("<SRS0=") && id.ends_with("=good.cbv.test=ok@fwd.receiver.test>"),
        "{id}"
    );
    let mailer = dsn.headers.get_first_value("X-Mailer").unwrap();
    assert!(mailer.ends_with(&id), "{mailer}");

    // A forged token in a bounce is nobody's: the bounce goes through.
    let header_end = messages[0].find("\r\n\r\n").unwrap();
    let dsn_header = &messages[0][..header_end + 2];
    let forged = dsn_header.replacen("SRS0=", "SRS0=x", 2);
    let deliver = |text: String| {
        let d = &d;
        async move {
            let (headers, body) = bounce_of(&text);
            // the bouncing MTA's HELO has an SPF record (the null sender is checked by it)
            let mut c = d.client().await;
            c.connect("mx.good.cbv.test", Ipv4Addr::new(192, 0, 2, 1))
                .await
                .unwrap();
            c.helo("good.cbv.test").await.unwrap();
            assert_eq!(c.mail(["<>"]).await.unwrap(), Status::Continue);
            let status = c.rcpt(["<postmaster@receiver.test>"]).await.unwrap();
            assert_eq!(status, Status::Continue);
            for (name, value) in &headers {
                c.header(name, value.as_str()).await.unwrap();
            }
            c.eoh().await.unwrap();
            c.body(body).await.unwrap();
            c.eom().await.unwrap().1
        }
    };
    assert_eq!(deliver(forged).await, Status::Continue);
    let (_, status) = message(&d, "ok@good.cbv.test", &["<bob@receiver.test>"]).await;
    assert_eq!(
        status,
        Status::Continue,
        "not blacklisted by a forged token"
    );

    // The real bounce quotes our token: discarded (a copy kept), the target blacklisted.
    assert_eq!(deliver(dsn_header.to_string()).await, Status::Discard);
    let kept = maildir_new(&d.dir.path().join("saved"), 1);
    assert_eq!(kept.len(), 1);
    let copy = std::fs::read_to_string(&kept[0]).unwrap();
    assert!(copy.starts_with("X-Luamilter-Kept: dsn\r\n"), "{copy}");
    assert!(copy.contains(&id), "the kept bounce quotes the token");
    let mut c = session(&d).await;
    assert_eq!(
        reply_text(&c.mail(["<ok@good.cbv.test>"]).await.unwrap()),
        "550 5.7.1 Sender email local blacklist"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_srs_secrets_a_dsn_has_a_plain_message_id() {
    let World {
        relay,
        d,
        mx: _mx,
        _dns,
    } = World::dsn_on_neutral().await;
    message(&d, "ok@good.cbv.test", &["<alice@receiver.test>"]).await;
    let messages = relay.messages();
    let dsn = parse_mail(messages[0].as_bytes()).unwrap();
    let id = dsn.headers.get_first_value("Message-ID").unwrap();
    assert!(id.ends_with(".dsn@mx.receiver.test>"), "{id}");
    assert!(dsn.headers.get_first_value("X-Mailer").is_none());
    d.stop().await;
}
