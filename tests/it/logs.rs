//! Log hygiene: the daemon process's log read back line by line. In JSON and in text, a
//! message gets one info line with its queue id, client, deciding policy, stage, verdict and
//! trace; policy lines and failures carry the same fields; nothing at warn in a normal run.

use crate::{dns_server::TestDns, support::process::DaemonProcess};
use indymilter_test::Status;
use serde_json::Value;
use std::net::Ipv4Addr;

const POLICY: &str = r#"
local milter = require "milter"
local log = require "milter.log"
local store = require "milter.store"
return {
  mail = function(ctx, sender)
    log.info("checking " .. sender)
    if sender == "spam@example.org" then return milter.reject{ code = "550", text = "no spam" } end
  end,
  header = function(ctx, name, value)
    if name == "X-Boom" then error("boom") end
  end,
  abort = function(ctx) store.incr("aborted") end,
}"#;

/// Two messages on one connection: one refused at MAIL (queue id Q1), one accepted (Q2) whose
/// header makes the policy fail (exception_policy continue).
async fn traffic(daemon: &DaemonProcess) {
    let mut mta = daemon.client().await;
    mta.connect("client.test", Ipv4Addr::new(192, 0, 2, 7))
        .await
        .unwrap();
    mta.helo("client.test").await.unwrap();
    mta.0
        .macros(indymilter::MacroStage::Mail, [("i", "Q1")])
        .await
        .unwrap();
    assert!(matches!(
        mta.mail(["<spam@example.org>"]).await.unwrap(),
        Status::Reject { .. }
    ));
    mta.0.abort().await.unwrap();
    mta.0
        .macros(indymilter::MacroStage::Mail, [("i", "Q2")])
        .await
        .unwrap();
    assert_eq!(
        mta.mail(["<friend@example.org>"]).await.unwrap(),
        Status::Continue
    );
    mta.rcpt(["<user@example.test>"]).await.unwrap();
    mta.data().await.unwrap();
    mta.header("X-Boom", "1").await.unwrap();
    mta.eoh().await.unwrap();
    let (_, status) = mta.0.eom().await.unwrap();
    assert_eq!(status, Status::Continue);
    mta.close().await.unwrap();
}

/// Runs [`traffic`] through a daemon logging in `format` and returns its log, as text and
/// line by line through `parse`.
async fn logged(format: &str, parse: fn(&str) -> Value) -> (String, Vec<Value>) {
    let extra = format!(
        "[engine]\nexception_policy = \"continue\"\n[log]\nformat = \"{format}\"\nlevel = \"info\"\n"
    );
    let daemon = DaemonProcess::start(&[("gate", POLICY)], "", &extra).unwrap();
    traffic(&daemon).await;
    // Stopping flushes every line.
    let (_, log) = daemon.stop();
    println!("{log}");
    let lines = log.lines().map(parse).collect();
    (log, lines)
}

fn field<'a>(line: &'a Value, name: &str) -> &'a str {
    line.get(name)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}

/// The first line with these field values.
fn line_with<'a>(lines: &'a [Value], wanted: &[(&str, &str)]) -> &'a Value {
    lines
        .iter()
        .find(|l| {
            wanted
                .iter()
                .all(|(k, v)| l.get(*k).and_then(Value::as_str) == Some(*v))
        })
        .unwrap_or_else(|| panic!("no line with {wanted:?}"))
}

fn assert_fields(line: &Value, wanted: &[(&str, &str)]) {
    for (name, value) in wanted {
        assert_eq!(field(line, name), *value, "{line}");
    }
}

/// What both formats must say: the message lines, a policy's own line, a failure, no warning.
fn assert_message_fields(lines: &[Value], log: &str) {
    let refused = line_with(lines, &[("message", "message"), ("queue_id", "Q1")]);
    assert_fields(
        refused,
        &[
            ("level", "INFO"),
            ("client", "192.0.2.7"),
            ("policy", "gate"),
            ("stage", "mail"),
            ("verdict", "reject 550 no spam"),
        ],
    );
    let trace = field(refused, "trace");
    assert!(
        trace.starts_with("mail:gate=reject 550 no spam ("),
        "{refused}"
    );
    // The abort handlers that a refusal runs belong to the refused message, after its MAIL,
    // and never to the connection's next message.
    assert!(trace.contains("; abort:gate=continue ("), "{refused}");
    let accepted = line_with(lines, &[("message", "message"), ("queue_id", "Q2")]);
    assert!(!field(accepted, "trace").contains("abort:"), "{accepted}");
    let accepted = line_with(lines, &[("message", "message"), ("queue_id", "Q2")]);
    assert_fields(
        accepted,
        &[("policy", "-"), ("stage", "eom"), ("verdict", "accept")],
    );
    assert!(
        field(accepted, "trace").contains("header:gate=fault: "),
        "{accepted}"
    );
    let said = line_with(lines, &[("message", "checking friend@example.org")]);
    assert_fields(
        said,
        &[
            ("policy", "gate"),
            ("stage", "mail"),
            ("queue_id", "Q2"),
            ("client", "192.0.2.7"),
        ],
    );
    let failed = line_with(lines, &[("message", "policy failed")]);
    assert_fields(
        failed,
        &[
            ("level", "ERROR"),
            ("policy", "gate"),
            ("stage", "header"),
            ("queue_id", "Q2"),
        ],
    );
    assert!(field(failed, "error").contains("boom"), "{failed}");
    // Nothing at warn; per message nothing else at info but the policy's own lines.
    assert!(!lines.iter().any(|l| l["level"] == "WARN"), "{log}");
    let messages = lines.iter().filter(|l| l["message"] == "message").count();
    assert_eq!(messages, 2, "{log}");
    let other_info = lines
        .iter()
        .filter(|l| l["level"] == "INFO" && l.get("queue_id").is_some())
        .filter(|l| l["message"] != "message" && l["target"] != "luamilter::policy")
        .count();
    assert_eq!(other_info, 0, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_carry_the_message_fields() {
    let (log, lines) = logged("json", |l| {
        serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
    })
    .await;
    assert_message_fields(&lines, &log);
}

/// The fields of a logfmt line: `name=value`, a value quoted (JSON escapes) when it must be.
fn logfmt(line: &str) -> Value {
    let mut fields = serde_json::Map::new();
    let mut rest = line;
    while let Some((name, after)) = rest.split_once('=') {
        let (value, next) = if after.starts_with('"') {
            let mut stream = serde_json::Deserializer::from_str(after).into_iter::<String>();
            let value = stream.next().unwrap().unwrap();
            (value, &after[stream.byte_offset()..])
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        fields.insert(name.to_string(), value.into());
        rest = next.trim_start();
    }
    assert!(
        fields.contains_key("timestamp") && fields.contains_key("message"),
        "not logfmt: {line}"
    );
    Value::Object(fields)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logfmt_lines_carry_the_same_fields() {
    let (log, lines) = logged("logfmt", logfmt).await;
    assert_message_fields(&lines, &log);
}

/// Whether the conversation goes on after `status`.
fn goes_on(status: &Status) -> bool {
    matches!(status, Status::Continue | Status::Skip)
}

/// One message on a new connection from `ip` (named and saying HELO `host`), with queue id
/// `queue_id`, taken as far as the daemon lets it go.
async fn message(
    daemon: &DaemonProcess,
    ip: Ipv4Addr,
    host: &str,
    queue_id: &str,
    from: &str,
    to: &str,
) {
    let mut mta = daemon.client().await;
    assert!(goes_on(&mta.connect(host, ip).await.unwrap()));
    assert!(goes_on(&mta.helo(host).await.unwrap()));
    mta.0
        .macros(indymilter::MacroStage::Mail, [("i", queue_id)])
        .await
        .unwrap();
    let mut status = mta.mail([format!("<{from}>")]).await.unwrap();
    if goes_on(&status) {
        status = mta.rcpt([format!("<{to}>")]).await.unwrap();
    }
    if goes_on(&status) {
        mta.data().await.unwrap();
        for (name, value) in [
            ("From", format!("<{from}>")),
            ("To", format!("<{to}>")),
            ("Subject", "Lunch on Friday".to_string()),
            ("Message-ID", format!("<{queue_id}@{host}>")),
            ("Date", "Fri, 4 Dec 2026 10:00:00 +0000".to_string()),
        ] {
            mta.header(name, &value).await.unwrap();
        }
        mta.eoh().await.unwrap();
        mta.body("See you at noon.\r\n").await.unwrap();
        mta.0.eom().await.unwrap();
    } else {
        mta.0.abort().await.unwrap();
    }
    mta.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_through_the_stock_chain_logs_one_info_line() {
    let dns = TestDns::start().await;
    let archive = tempfile::tempdir().unwrap();
    // The chain of examples/stock-pack.toml, this site's settings.
    let sample: toml::Table =
        toml::from_str(include_str!("../../examples/stock-pack.toml")).unwrap();
    let chain: Vec<&str> = sample["policies"]["chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let extra = format!(
        "[log]\nformat = \"json\"\nlevel = \"info\"\n\
         [dns]\nnameservers = [\"{}\"]\ntimeout = \"2s\"\nattempts = 1\n\
         [site]\nhostname = \"mx.example.org\"\ninternal_networks = [\"10.0.0.0/8\"]\n\
         internal_domains = [\"example.org\"]\n\
         [archive]\nmaildir = {:?}\n\
         [policy.srs]\nsecrets = [\"log test secret\"]\nsrs_domain = \"fwd.example.org\"\n\
         [policy.whitelist]\nwhitelist_senders = [\"@example.org\"]\n\
         [policy.honeypot]\naddresses = [\"trap@example.org\"]\n",
        dns.addr,
        archive.path()
    );
    let daemon = DaemonProcess::start_stock(&chain, &extra).unwrap();
    let outside = Ipv4Addr::new(192, 0, 2, 25);
    let inside = Ipv4Addr::new(10, 1, 2, 3);
    let host = "mail.example.test";
    // Ordinary mail: a stranger (greylisted); mail from inside going out, which whitelists its
    // recipient; that correspondent's answer, accepted. Then a stranger writing to a trap.
    message(
        &daemon,
        outside,
        host,
        "Q1",
        "user@example.test",
        "ann@example.org",
    )
    .await;
    message(
        &daemon,
        inside,
        "pc.example.org",
        "Q2",
        "ann@example.org",
        "bob@example.test",
    )
    .await;
    message(
        &daemon,
        outside,
        host,
        "Q3",
        "bob@example.test",
        "ann@example.org",
    )
    .await;
    message(
        &daemon,
        outside,
        host,
        "Q4",
        "user@example.test",
        "trap@example.org",
    )
    .await;
    // The last message's abort handlers run when the connection closes: wait for its line.
    daemon.wait_for_log(r#""message":"message","queue_id":"Q4""#);
    let (_, log) = daemon.stop();
    println!("{log}");
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let info = |queue_id: &str| -> Vec<&Value> {
        lines
            .iter()
            .filter(|l| l["level"] == "INFO" && l["queue_id"] == queue_id)
            .collect()
    };
    for queue_id in ["Q1", "Q2", "Q3"] {
        let info = info(queue_id);
        assert_eq!(info.len(), 1, "{queue_id}: {info:#?}");
        assert_eq!(info[0]["message"], "message", "{queue_id}: {info:#?}");
    }
    assert!(info("Q3")[0]["verdict"] == "accept", "{log}");
    // The trap hit costs the client a ban: a rare event, which has its own info line.
    let messages: Vec<&str> = info("Q4")
        .iter()
        .map(|l| l["message"].as_str().unwrap())
        .collect();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert!(messages.contains(&"message"), "{messages:?}");
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("banned IP 192.0.2.25")),
        "{messages:?}"
    );
    // Policies said nothing else at info (before a queue id either), and warned of nothing.
    let chatter: Vec<&Value> = lines
        .iter()
        .filter(|l| l["level"] == "INFO" && l["target"] == "luamilter::policy")
        .filter(|l| !l["message"].as_str().unwrap().starts_with("banned IP"))
        .collect();
    assert!(chatter.is_empty(), "{chatter:#?}");
    assert!(!lines.iter().any(|l| l["level"] == "WARN"), "{log}");
}

/// The session fields of a policy line do not depend on the log level (they are no spans
/// that a `warn` filter would drop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_lines_carry_the_session_fields_at_warn() {
    const WARNING: &str = r#"
local log = require "milter.log"
return {
  mail = function(ctx, sender) log.warn("odd sender " .. sender) end,
}"#;
    let extra = "[log]\nformat = \"json\"\nlevel = \"warn\"\n";
    let daemon = DaemonProcess::start(&[("odd", WARNING)], "", extra).unwrap();
    let mut mta = daemon.client().await;
    mta.connect("client.test", Ipv4Addr::new(192, 0, 2, 9))
        .await
        .unwrap();
    mta.helo("client.test").await.unwrap();
    mta.0
        .macros(indymilter::MacroStage::Mail, [("i", "Q3")])
        .await
        .unwrap();
    mta.mail(["<x@example.org>"]).await.unwrap();
    mta.close().await.unwrap();
    let (_, log) = daemon.stop();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let warned = line_with(&lines, &[("message", "odd sender x@example.org")]);
    assert_fields(
        warned,
        &[
            ("level", "WARN"),
            ("target", "luamilter::policy"),
            ("client", "192.0.2.9"),
            ("queue_id", "Q3"),
            ("policy", "odd"),
            ("stage", "mail"),
        ],
    );
}

/// A worker thread gathers its log lines and writes them when it runs out of work; a `warn`
/// line, and the lines gathered before it, are written at once, while the thread is still busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warning_is_written_while_its_thread_is_still_busy() {
    const BUSY: &str = r#"
local log = require "milter.log"
return {
  mail = function(ctx, sender)
    log.info("gathered before the warning")
    log.warn("warned while busy")
    local done = os.clock() + 4
    while os.clock() < done do end
  end,
}"#;
    let daemon = DaemonProcess::start(&[("busy", BUSY)], "", "").unwrap();
    let mut mta = daemon.client().await;
    mta.connect("client.test", Ipv4Addr::new(192, 0, 2, 9))
        .await
        .unwrap();
    let busy = tokio::spawn(async move {
        let started = std::time::Instant::now();
        mta.mail(["<x@example.org>"]).await.unwrap();
        started.elapsed()
    });
    // Blocks this test thread; the client runs on the other one.
    let log = daemon.wait_for_log("warned while busy");
    assert!(
        !busy.is_finished(),
        "the handler ended before the warning was seen"
    );
    assert!(log.contains("gathered before the warning"), "{log}");
    let took = busy.await.unwrap();
    assert!(took >= std::time::Duration::from_secs(3), "{took:?}");
}
