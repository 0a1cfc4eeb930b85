//! End to end: a private Postfix on loopback with luamilter in `smtpd_milters`, mail sent by
//! swaks, running the example policy `examples/hygiene.lua` (and stock policies: defang, routing).

use crate::support::postfix::{Postfix, Stage, TEST_DOMAIN, e2e_ready};
use luamilter::{config::Config, daemon::Daemon};
use std::{
    fs,
    os::unix::fs::PermissionsExt,
    sync::mpsc,
    thread::{self, JoinHandle},
    time::Duration,
};
use tempfile::TempDir;
use tokio::sync::oneshot;

const RECIPIENT: &str = "user@test.example";
const WAIT: Duration = Duration::from_secs(30);

/// luamilter on its own thread and runtime, so the blocking harness cannot stall it.
struct Luamilter {
    /// The socket in Postfix's `smtpd_milters` syntax.
    socket: String,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    _dir: TempDir,
}

impl Luamilter {
    /// Runs the hygiene example, receiving for the test domain, on `listen` ("inet" or "unix").
    fn start(transport: &str) -> Luamilter {
        Self::start_with(
            transport,
            &format!(
                "[policies]\ndirs = [{:?}]\nchain = [\"hygiene\"]\n[policy.hygiene]\nlocal_domains = [{TEST_DOMAIN:?}]\n",
                concat!(env!("CARGO_MANIFEST_DIR"), "/examples")
            ),
        )
    }

    /// Runs luamilter with `policies` (TOML: the [policies] section and options) on `transport`.
    fn start_with(transport: &str, policies: &str) -> Luamilter {
        Self::start_on_store(transport, policies, None)
    }

    /// [`Luamilter::start_with`] on the Redis store at `redis` (default: SQLite in its dir).
    fn start_on_store(transport: &str, policies: &str, redis: Option<&str>) -> Luamilter {
        let dir = TempDir::new().unwrap();
        // Postfix's smtpd runs as `postfix`: a unix socket's directory must be searchable.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let listen = match transport {
            "unix" => format!("unix:{}", dir.path().join("milter.sock").display()),
            _ => "inet:0@127.0.0.1".to_string(),
        };
        let store = match redis {
            Some(url) => format!("backend = \"redis\"\nurl = {url:?}"),
            None => format!("path = {:?}", dir.path().join("store.db")),
        };
        let text = format!(
            "[milter]\nlisten = {listen:?}\nsocket_mode = \"0666\"\ncontrol_socket = {:?}\n\
             [store]\n{store}\n[log]\nlevel = \"warn\"\n{policies}",
            dir.path().join("ctl.sock"),
        );
        // Written too, for the `luamilter why` and `ctl` commands the tests run.
        let path = dir.path().join("luamilter.toml");
        fs::write(&path, &text).unwrap();
        let config = Config::parse(&text, Some(path)).unwrap();
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let daemon = Daemon::start(config).await.unwrap();
                let socket = match &daemon.local {
                    luamilter::listen::ListenAddr::Inet(a) => {
                        format!("inet:{}:{}", a.ip(), a.port())
                    }
                    luamilter::listen::ListenAddr::Unix(p) => format!("unix:{}", p.display()),
                };
                ready_tx.send(socket).unwrap();
                let _ = stop_rx.await;
                daemon.stop(Duration::from_secs(5)).await;
            });
        });
        let socket = ready_rx.recv_timeout(WAIT).expect("luamilter started");
        Luamilter {
            socket,
            stop: Some(stop_tx),
            thread: Some(thread),
            _dir: dir,
        }
    }

    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().expect("luamilter thread panicked");
        }
    }
}

impl Drop for Luamilter {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn setup(transport: &str) -> Option<(Luamilter, Postfix)> {
    if !e2e_ready() {
        return None;
    }
    let milter = Luamilter::start(transport);
    let postfix = Postfix::start(&milter.socket).expect("start private postfix");
    Some((milter, postfix))
}

/// Sends a message from good@test.example with `marker` as its Subject (after `headers`) and
/// returns it as delivered.
fn deliver(postfix: &Postfix, marker: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut headers = headers.to_vec();
    headers.push(("Subject", marker));
    let sent = postfix
        .send("good@test.example", RECIPIENT, &headers, body)
        .unwrap();
    assert_eq!(sent.exit_code, 0, "{}", sent.transcript);
    postfix
        .wait_delivered(|m| m.contains(marker), WAIT)
        .unwrap_or_else(|| panic!("not delivered; mail log:\n{}", postfix.maillog()))
}

#[test]
fn blocked_sender_gets_the_policy_5xx_at_mail_from() {
    let Some((_milter, postfix)) = setup("inet") else {
        return;
    };
    let sent = postfix
        .send("spam@bad.example", RECIPIENT, &[], "never delivered\n")
        .unwrap();
    let mail = sent.reply(Stage::Mail).expect("a reply to MAIL FROM");
    assert_eq!(
        mail.lines,
        [
            "550-5.7.1 Sender <spam@bad.example> is blocked here.",
            "550 5.7.1 Contact postmaster if this is wrong.",
        ],
        "{}",
        sent.transcript
    );
    assert!(sent.reply(Stage::Rcpt).is_none(), "{}", sent.transcript);
}

#[test]
fn accepted_mail_is_delivered_with_the_policy_header() {
    let Some((_milter, postfix)) = setup("inet") else {
        return;
    };
    let delivered = deliver(
        &postfix,
        "accepted-mail-marker-4711",
        &[],
        "first line\nsecond line\n",
    );
    let (headers, body) = delivered
        .split_once("\n\n")
        .expect("a header/body separator");
    assert!(
        headers.lines().any(|l| l == "X-Hygiene: recipients=1"),
        "{delivered}"
    );
    assert!(body.starts_with("first line\nsecond line\n"), "{delivered}");
}

#[test]
fn quarantined_mail_lands_in_the_hold_queue_over_a_unix_socket() {
    let Some((_milter, postfix)) = setup("unix") else {
        return;
    };
    let sent = postfix
        .send(
            "good@test.example",
            RECIPIENT,
            &[("Subject", "urgent wire transfer")],
            "hold me\n",
        )
        .unwrap();
    assert_eq!(
        sent.exit_code,
        0,
        "{}\n{}",
        sent.transcript,
        postfix.maillog()
    );
    let queue_id = sent.queue_id().expect("a queue id in the 250 reply");
    let held = postfix.hold_queue().unwrap();
    let message = held
        .iter()
        .find(|m| m.id == queue_id)
        .unwrap_or_else(|| panic!("{queue_id} not held: {held:?}\n{}", postfix.maillog()));
    assert!(message.held);
}

#[test]
fn a_refused_recipient_and_a_stopped_milter() {
    let Some((mut milter, postfix)) = setup("inet") else {
        return;
    };
    let sent = postfix
        .send("good@test.example", "user@elsewhere.example", &[], "x\n")
        .unwrap();
    let rcpt = sent.reply(Stage::Rcpt).expect("a reply to RCPT TO");
    assert_eq!(rcpt.code(), 550, "{}", sent.transcript);
    milter.stop();
    let after = postfix
        .send("good@test.example", RECIPIENT, &[], "milter down\n")
        .unwrap();
    let mail = after.reply(Stage::Mail).expect("a reply to MAIL FROM");
    assert_eq!(mail.code(), 451, "{}", after.transcript);
    assert!(mail.lines[0].starts_with("451 4.7.1 "), "{:?}", mail.lines);
}

const SHADOWED: &str = r#"
local milter = require "milter"
return {
  mail = function(ctx, sender)
    if sender == "new-rule@test.example" then return milter.reject{ text = "the new rule" } end
  end,
}"#;

/// Shadow mode and `luamilter why` through Postfix: a shadowed reject lets the message through
/// (delivered), is counted, and `why QUEUE_ID` tells what it would have done.
/// `name` is the shadowed policy's (the shadow counters are per process, per policy name).
fn shadow_and_why_through_postfix(name: &str, redis: Option<&str>) {
    if !e2e_ready() {
        return;
    }
    let dir = TempDir::new().unwrap();
    fs::write(dir.path().join(format!("{name}.lua")), SHADOWED).unwrap();
    let policies = format!(
        "[policies]\ndirs = [{:?}, {:?}]\nchain = [{name:?}, \"hygiene\"]\n\
         [policy.{name}]\nmode = \"shadow\"\n[policy.hygiene]\nlocal_domains = [{TEST_DOMAIN:?}]\n",
        dir.path(),
        concat!(env!("CARGO_MANIFEST_DIR"), "/examples")
    );
    let milter = Luamilter::start_on_store("inet", &policies, redis);
    let postfix = Postfix::start(&milter.socket).expect("start private postfix");
    let marker = "shadowed-marker-0815";
    let sent = postfix
        .send(
            "new-rule@test.example",
            RECIPIENT,
            &[("Subject", marker)],
            "x\n",
        )
        .unwrap();
    assert_eq!(sent.exit_code, 0, "{}", sent.transcript);
    let queue_id = sent.queue_id().expect("a queue id").to_string();
    postfix
        .wait_delivered(|m| m.contains(marker), WAIT)
        .unwrap_or_else(|| panic!("not delivered; mail log:\n{}", postfix.maillog()));

    let config = milter._dir.path().join("luamilter.toml");
    let stats = crate::support::luamilter_cli("ctl", &config, &["stats"]);
    let stats = String::from_utf8_lossy(&stats.stdout);
    assert!(
        stats.contains(&format!("shadow_would {name} mail reject 1")),
        "{stats}"
    );
    let deadline = std::time::Instant::now() + WAIT;
    let why = loop {
        let out = crate::support::luamilter_cli("why", &config, &[&queue_id]);
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no history for {queue_id}"
        );
        thread::sleep(Duration::from_millis(100));
    };
    assert!(why.contains(&format!("queue id   {queue_id}")), "{why}");
    assert!(
        why.contains(&format!("mail:{name}=would reject 550 5.7.1 the new rule")),
        "{why}"
    );
    assert!(why.contains("outcome    accept"), "{why}");
}

#[test]
fn shadow_mode_and_why_through_postfix_on_sqlite() {
    shadow_and_why_through_postfix("newrule_sqlite", None);
}

#[test]
fn shadow_mode_and_why_through_postfix_on_redis() {
    let redis = crate::redis_server::RedisServer::start();
    shadow_and_why_through_postfix("newrule_redis", Some(&redis.url));
}

/// Whether NOREPLY helps or hurts over TCP with a real Postfix: the same header-reading policy,
/// once with a replying header handler and once declared `noreply`, over TCP, each under the
/// same load from Postfix's `smtp-source`. A measurement, not a test:
/// `cargo test --release --test it noreply_over_tcp -- --ignored --nocapture`.
#[test]
#[ignore = "measurement; run by hand"]
fn noreply_over_tcp_with_postfix() {
    if !e2e_ready() {
        return;
    }
    let dir = TempDir::new().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    for (name, noreply) in [("replying", ""), ("noreply", "noreply = { \"header\" },")] {
        let policy = format!(
            "return {{ {noreply} header = function(ctx, name, value) end, eom = function(ctx) ctx:add_header(\"X-Seen\", \"1\") end }}"
        );
        std::fs::write(dir.path().join(format!("{name}.lua")), policy).unwrap();
    }
    for name in ["replying", "noreply", "replying", "noreply"] {
        let milter = Luamilter::start_with(
            "inet",
            &format!(
                "[policies]\ndirs = [{:?}]\nchain = [{name:?}]\n",
                dir.path()
            ),
        );
        let postfix = Postfix::start(&milter.socket).expect("start private postfix");
        let messages = 300;
        let started = std::time::Instant::now();
        let status = std::process::Command::new("/usr/sbin/smtp-source")
            .args([
                "-s",
                "8",
                "-m",
                &messages.to_string(),
                "-l",
                "2048",
                "-f",
                "sender@test.example",
            ])
            .args(["-t", RECIPIENT, &format!("127.0.0.1:{}", postfix.port())])
            .status()
            .unwrap();
        assert!(status.success());
        let elapsed = started.elapsed();
        println!(
            "{name:<9} over TCP through Postfix: {messages} messages in {elapsed:?} = {:.0} msg/s",
            messages as f64 / elapsed.as_secs_f64()
        );
    }
}

/// Stock policies behind Postfix, the sender's side on loopback: the test DNS server's
/// `cbv.test` zone (SPF neutral for `good.cbv.test`, pass from 192.0.2.1 for `pass.cbv.test`,
/// both with their exchanger on 127.0.0.1), the scripted test MX as that exchanger (call-backs
/// go to its port), and Postfix as the DSN relay, which delivers mail for both domains to the
/// same test MX. Messages come from 192.0.2.1 through XCLIENT (luamilter does not call back
/// loopback clients).
struct SenderSide {
    runtime: tokio::runtime::Runtime,
    mx: crate::smtp_server::TestMx,
    _dns: crate::dns_server::TestDns,
}

impl SenderSide {
    fn start() -> SenderSide {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let dns = runtime.block_on(crate::dns_server::TestDns::start());
        let mx = runtime.block_on(crate::smtp_server::TestMx::start());
        SenderSide {
            runtime,
            mx,
            _dns: dns,
        }
    }

    /// luamilter (`policies`: its `[policies]` table; `site`: more `[site]` lines, then any
    /// `[site.access]`) and Postfix, luamilter relaying its DSNs through that Postfix.
    fn start_mta(&self, policies: &str, site: &str) -> Option<(Luamilter, Postfix)> {
        if !e2e_ready() {
            return None;
        }
        let _runtime = self.runtime.enter();
        let port = crate::support::postfix::free_port().unwrap();
        let milter = Luamilter::start_with(
            "inet",
            &format!(
                "{policies}{}relay = \"127.0.0.1:{port}\"\n\
                 [site]\nhostname = \"mx.{TEST_DOMAIN}\"\n{site}",
                crate::smtp::daemon_config(&self._dns, &self.mx)
            ),
        );
        let routes = [
            ("good.cbv.test", self.mx.addr),
            ("pass.cbv.test", self.mx.addr),
        ];
        let postfix =
            Postfix::start_on(&milter.socket, port, &routes).expect("start private postfix");
        Some((milter, postfix))
    }

    /// The messages the sender's MX received, once there is one (or after [`WAIT`]).
    fn wait_messages(&self) -> Vec<String> {
        let deadline = std::time::Instant::now() + WAIT;
        while self.mx.messages().is_empty() && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        self.mx.messages()
    }
}

const FORGED_CLIENT: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 0, 2, 1);

const SPF_AND_CBV: &str = "[policies]\nchain = [\"spf\", \"cbv\"]\n";

/// `[site.access]` with `value` for SPF neutral.
fn on_neutral(value: &str) -> String {
    format!("[site.access]\n\"SPF-Neutral:\" = {value:?}\n")
}

#[test]
fn a_forged_sender_is_refused_with_the_cbv_reply_through_postfix() {
    let side = SenderSide::start();
    let site = format!(
        "errors_url = \"https://errors.example.test/mail\"\n{}",
        on_neutral("CBV")
    );
    let Some((_milter, postfix)) = side.start_mta(SPF_AND_CBV, &site) else {
        return;
    };
    let sent = postfix
        .send_as(
            FORGED_CLIENT,
            "unknown@good.cbv.test",
            RECIPIENT,
            &[],
            "x\n",
        )
        .unwrap();
    let dot = sent.reply(Stage::Dot).expect("a reply to the final dot");
    assert_eq!(
        dot.lines,
        [
            "550-5.7.1 https://errors.example.test/mail/dsnrefused?mfrom=unknown@good.cbv.test\
             &msg=550+5.1.1+%3Crecipient%3E+User+unknown",
            "550 5.7.1 CBV: 550 5.1.1 <recipient> User unknown",
        ],
        "{}\n{}",
        sent.transcript,
        postfix.maillog()
    );
    assert!(
        side.mx
            .commands()
            .contains(&"RCPT TO:<unknown@good.cbv.test>".to_string())
    );
    assert_eq!(side.mx.connections(), 1);
}

#[test]
fn a_dsn_policy_message_is_delivered_and_the_dsn_reaches_the_senders_mx() {
    let side = SenderSide::start();
    let Some((_milter, postfix)) = side.start_mta(SPF_AND_CBV, &on_neutral("DSN")) else {
        return;
    };
    let marker = "dsn-policy-marker-5150";
    let sent = postfix
        .send_as(
            FORGED_CLIENT,
            "ok@good.cbv.test",
            RECIPIENT,
            &[("Subject", marker)],
            "hello\n",
        )
        .unwrap();
    assert_eq!(sent.exit_code, 0, "{}", sent.transcript);
    postfix
        .wait_delivered(|m| m.contains(marker), WAIT)
        .unwrap_or_else(|| panic!("not delivered; mail log:\n{}", postfix.maillog()));
    let messages = side.wait_messages();
    assert_eq!(messages.len(), 1, "{}", postfix.maillog());
    let dsn = mailparse::parse_mail(messages[0].as_bytes()).unwrap();
    let [text, status, original] = crate::dsn::report_parts(&dsn);
    assert!(
        text.get_body()
            .unwrap()
            .contains("THIS IS A WARNING MESSAGE ONLY."),
    );
    let blocks = crate::dsn::status_blocks(&status.get_body_raw().unwrap());
    assert_eq!(blocks[1]["final-recipient"], format!("rfc822; {RECIPIENT}"));
    assert_eq!(blocks[1]["action"], "delayed");
    assert_eq!(
        crate::dsn::original_header(original, "Subject").as_deref(),
        Some(marker)
    );
    // Through the relay: MAIL FROM:<> reached the sender's MX, and no call-back was made.
    let commands = side.mx.commands();
    assert!(
        commands.iter().any(|c| c.starts_with("MAIL FROM:<>")),
        "{commands:?}"
    );
    assert!(
        !commands.iter().any(|c| c.starts_with("RCPT")
            && c.contains("ok@")
            && !commands.iter().any(|d| d == "DATA")),
        "{commands:?}"
    );
}

/// As docs/policies/lib/notice.md and docs/policies/honeypot.md say: mail to the stock honeypot
/// policy's trap and a real recipient waits in Postfix's hold queue without the trap, the sender
/// (SPF pass) gets the quarantine notice, and `postsuper -H` releases the message to the real
/// recipient only.
#[test]
fn quarantined_with_a_notice_then_released_with_postsuper() {
    let side = SenderSide::start();
    let policies = format!(
        "[policies]\nchain = [\"spf\", \"honeypot\"]\n[policy.honeypot]\naddresses = [\"honeypot@{TEST_DOMAIN}\"]\n"
    );
    let Some((_milter, postfix)) = side.start_mta(&policies, "") else {
        return;
    };
    let marker = "honeypot-marker-8080";
    let sent = postfix
        .send_as(
            FORGED_CLIENT,
            "ok@pass.cbv.test",
            &format!("honeypot@{TEST_DOMAIN},friend@{TEST_DOMAIN}"),
            &[("Subject", marker)],
            "cheap pills\n",
        )
        .unwrap();
    assert_eq!(sent.exit_code, 0, "{}", sent.transcript);
    let queue_id = sent.queue_id().expect("a queue id in the 250 reply");
    let held = postfix.hold_queue().unwrap();
    assert!(
        held.iter().any(|m| m.id == queue_id),
        "{queue_id} not held: {held:?}\n{}",
        postfix.maillog()
    );

    let messages = side.wait_messages();
    assert_eq!(messages.len(), 1, "{}", postfix.maillog());
    let notice = mailparse::parse_mail(messages[0].as_bytes()).unwrap();
    use mailparse::MailHeaderMap;
    assert_eq!(
        notice.headers.get_first_value("Subject").as_deref(),
        Some("DELIVERY STATUS (POSSIBLE SPAM)")
    );
    let [text, _, original] = crate::dsn::report_parts(&notice);
    assert!(
        text.get_body()
            .unwrap()
            .contains("Reason: sent to the honeypot")
    );
    assert_eq!(
        crate::dsn::original_header(original, "Subject").as_deref(),
        Some(marker)
    );

    assert!(
        postfix
            .wait_delivered(|m| m.contains(marker), Duration::from_millis(500))
            .is_none()
    );
    postfix.release(queue_id).unwrap();
    let delivered = postfix
        .wait_delivered(|m| m.contains(marker), WAIT)
        .unwrap_or_else(|| panic!("not delivered after release:\n{}", postfix.maillog()));
    assert!(
        delivered.contains(&format!("Delivered-To: friend@{TEST_DOMAIN}")),
        "{delivered}"
    );
    assert!(postfix.hold_queue().unwrap().is_empty());
    // The trap was removed from the held message: it never gets a copy.
    assert!(
        postfix
            .wait_delivered(
                |m| m.contains(marker) && m.contains("Delivered-To: honeypot@"),
                Duration::from_millis(500)
            )
            .is_none(),
        "{}",
        postfix.maillog()
    );
}

/// Adds the recipient named in `X-Add-Rcpt` (as a policy that sends a notice would), so that
/// Postfix bounces that copy: its `error` transport refuses every domain but the test one.
const ADD_RCPT: &str = r#"
return {
  eom = function(ctx)
    local rcpt = ctx:header("X-Add-Rcpt")
    if rcpt then ctx:add_rcpt("<" .. rcpt .. ">") end
  end,
}"#;

/// Delayed-failure detection with a bounce Postfix itself writes: a notice from the site to
/// carol@victim.example carries her SRS token in its Message-ID; Postfix cannot deliver it and
/// returns a multipart/report DSN; that DSN, sent back in through Postfix, is discarded by the
/// srs policy, and carol is blacklisted.
#[test]
fn a_postfix_bounce_of_our_own_notice_blacklists_the_address_and_is_discarded() {
    if !e2e_ready() {
        return;
    }
    let dir = TempDir::new().unwrap();
    fs::write(dir.path().join("add_rcpt.lua"), ADD_RCPT).unwrap();
    let secret = "e2e srs secret";
    let milter = Luamilter::start_with(
        "inet",
        &format!(
            "[policies]\ndirs = [{:?}]\nchain = [\"add_rcpt\", \"srs\", \"whitelist\"]\n\
             [policy.srs]\nsecrets = [{secret:?}]\nsrs_domain = {TEST_DOMAIN:?}\n",
            dir.path()
        ),
    );
    let postfix = Postfix::start(&milter.socket).expect("start private postfix");

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let srs = luamilter::services::srs::Srs::new(&[secret.to_owned()], 21, 4).unwrap();
    let token = srs
        .forward("carol@victim.example", TEST_DOMAIN, now)
        .unwrap();
    let notice = postfix
        .send(
            &format!("postmaster@{TEST_DOMAIN}"),
            RECIPIENT,
            &[
                ("Subject", "DELIVERY STATUS (POSSIBLE SPAM)"),
                ("Message-Id", &format!("<{token}>")),
                ("X-Add-Rcpt", "carol@victim.example"),
            ],
            "Your message is held.\n",
        )
        .unwrap();
    assert_eq!(notice.exit_code, 0, "{}", notice.transcript);
    let dsn = postfix
        .wait_delivered(
            |m| m.contains("report-type=delivery-status") && m.contains(&token),
            WAIT,
        )
        .unwrap_or_else(|| panic!("no DSN from Postfix; mail log:\n{}", postfix.maillog()));
    assert!(dsn.contains("Action: failed"), "{dsn}");

    // The DSN comes back in from outside, as the victim's server would send it.
    let bounce = postfix
        .send_message("<>", &format!("postmaster@{TEST_DOMAIN}"), &dsn)
        .unwrap();
    assert_eq!(bounce.exit_code, 0, "{}", bounce.transcript);
    let log = postfix.maillog();
    assert!(
        log.contains("milter-discard"),
        "not discarded; mail log:\n{log}"
    );

    // carol's own mail is now refused by the whitelist policy.
    let sent = postfix
        .send("carol@victim.example", RECIPIENT, &[], "hello\n")
        .unwrap();
    let mail = sent.reply(Stage::Mail).expect("a reply to MAIL FROM");
    assert_eq!(
        mail.lines,
        ["550 5.7.1 Sender email local blacklist"],
        "{}",
        sent.transcript
    );
}

#[test]
fn a_forged_authentication_results_header_is_removed_and_ours_written() {
    if !e2e_ready() {
        return;
    }
    let milter = Luamilter::start_with(
        "inet",
        "[site]\nhostname = \"mx.e2e.test\"\n[policies]\nchain = [\"dkim\", \"authres\"]\n",
    );
    let postfix = Postfix::start(&milter.socket).expect("start private postfix");
    let delivered = deliver(
        &postfix,
        "forged-authres-marker-1717",
        &[
            (
                "Authentication-Results",
                "relay.example.net; spf=pass smtp.mailfrom=x",
            ),
            (
                "Authentication-Results",
                "MX.e2e.test; dkim=pass header.d=bank.example",
            ),
        ],
        "hello\n",
    );
    let (headers, _) = delivered.split_once("\n\n").unwrap();
    let results: Vec<&str> = headers
        .lines()
        .filter(|l| l.starts_with("Authentication-Results:"))
        .collect();
    assert!(
        !delivered.contains("bank.example"),
        "forged header kept:\n{delivered}"
    );
    assert!(
        results.contains(&"Authentication-Results: relay.example.net; spf=pass smtp.mailfrom=x"),
        "an upstream header was removed:\n{delivered}"
    );
    assert!(
        results.contains(&"Authentication-Results: mx.e2e.test; dkim=none; arc=none"),
        "ours is missing:\n{delivered}"
    );
    assert_eq!(results.len(), 2, "{delivered}");
}

#[test]
fn defang_and_a_smart_alias_through_postfix() {
    if !e2e_ready() {
        return;
    }
    let milter = Luamilter::start_with(
        "inet",
        &format!(
            "[policies]\nchain = [\"defang\", \"routing\"]\n[policy.routing]\n\
             smart_alias = [{{ sender = \"boss@{TEST_DOMAIN}\", recipient = \"{RECIPIENT}\", \
             dest = [\"assistant@{TEST_DOMAIN}\"] }}]\n"
        ),
    );
    let postfix = Postfix::start(&milter.socket).expect("start private postfix");
    let marker = "defang-e2e-marker-0815";
    // The parts spell `Content-type`: swaks replaces the first `Content-Type:` line it finds,
    // in the body too, with the --header of that name.
    let body = "--b1\nContent-type: text/plain\n\nPlease open the tool.\n\
                --b1\nContent-type: application/octet-stream; name=\"tool.exe\"\n\
                Content-Transfer-Encoding: base64\n\nTVqQAAMAAAAEAAAA\n--b1--\n";
    let sent = postfix
        .send(
            &format!("boss@{TEST_DOMAIN}"),
            RECIPIENT,
            &[
                ("Subject", marker),
                ("MIME-Version", "1.0"),
                ("Content-Type", "multipart/mixed; boundary=\"b1\""),
            ],
            body,
        )
        .unwrap();
    assert_eq!(sent.exit_code, 0, "{}", sent.transcript);
    let delivered = postfix
        .wait_delivered(|m| m.contains(marker), WAIT)
        .unwrap_or_else(|| panic!("not delivered; mail log:\n{}", postfix.maillog()));
    assert!(
        delivered.contains(&format!("Delivered-To: assistant@{TEST_DOMAIN}"))
            && !delivered.contains(&format!("Delivered-To: {RECIPIENT}")),
        "the smart alias replaced the recipient:\n{delivered}"
    );
    let parts = crate::content::python(crate::content::READ, delivered.as_bytes());
    assert!(
        parts.contains("text/plain - Please open the tool. 0"),
        "{parts}"
    );
    assert!(
        parts.contains("text/plain WARNING.TXT This message appeared to contain a virus. It was originally named 'tool.exe'"),
        "{parts}"
    );
    assert!(
        !parts.contains("octet-stream") && parts.contains("top-defects 0"),
        "{parts}"
    );
}
