//! Log hygiene: the daemon process's log read back line by line. In JSON and in text, a
//! message gets one info line with its queue id, client, deciding policy, stage, verdict and
//! trace; policy lines and failures carry the same fields; nothing at warn in a normal run.

use crate::support::process::DaemonProcess;
use indymilter_test::Status;
use serde_json::Value;
use std::net::Ipv4Addr;

const POLICY: &str = r#"
local milter = require "milter"
local log = require "milter.log"
return {
  mail = function(ctx, sender)
    log.info("checking " .. sender)
    if sender == "spam@example.org" then return milter.reject{ code = "550", text = "no spam" } end
  end,
  header = function(ctx, name, value)
    if name == "X-Boom" then error("boom") end
  end,
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

fn start(format: &str) -> DaemonProcess {
    let extra = format!(
        "[engine]\nexception_policy = \"continue\"\n[log]\nformat = \"{format}\"\nlevel = \"info\"\n"
    );
    DaemonProcess::start(&[("gate", POLICY)], "", &extra).unwrap()
}

fn field<'a>(line: &'a Value, name: &str) -> &'a str {
    line.get(name)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_carry_the_message_fields() {
    let daemon = start("json");
    traffic(&daemon).await;
    daemon.wait_for_log("\"queue_id\":\"Q2\"");
    let (_, log) = daemon.stop();
    println!("{log}");
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let messages: Vec<&Value> = lines.iter().filter(|l| l["message"] == "message").collect();
    assert_eq!(messages.len(), 2, "{log}");
    for m in &messages {
        assert_eq!(m["level"], "INFO");
        assert_eq!(field(m, "client"), "192.0.2.7");
    }
    let refused = messages.iter().find(|m| m["queue_id"] == "Q1").unwrap();
    assert_eq!(field(refused, "policy"), "gate");
    assert_eq!(field(refused, "stage"), "mail");
    assert!(
        field(refused, "verdict").starts_with("reject 550"),
        "{refused}"
    );
    assert!(
        field(refused, "trace").starts_with("mail:gate=reject 550"),
        "{refused}"
    );
    let accepted = messages.iter().find(|m| m["queue_id"] == "Q2").unwrap();
    assert_eq!(field(accepted, "policy"), "-");
    assert_eq!(field(accepted, "stage"), "eom");
    assert_eq!(field(accepted, "verdict"), "accept");
    assert!(
        field(accepted, "trace").contains("header:gate=fault: "),
        "{accepted}"
    );

    // A policy's own line and its failure name the policy, the stage and the message.
    let said = lines
        .iter()
        .find(|l| l["message"] == "checking friend@example.org")
        .unwrap_or_else(|| panic!("no policy line in {log}"));
    for (name, value) in [("policy", "gate"), ("stage", "mail"), ("queue_id", "Q2")] {
        assert_eq!(field(said, name), value, "{said}");
    }
    assert_eq!(field(said, "client"), "192.0.2.7");
    let failed = lines
        .iter()
        .find(|l| l["message"] == "policy failed")
        .unwrap_or_else(|| panic!("no failure line in {log}"));
    assert_eq!(failed["level"], "ERROR");
    for (name, value) in [("policy", "gate"), ("stage", "header"), ("queue_id", "Q2")] {
        assert_eq!(field(failed, name), value, "{failed}");
    }
    assert!(field(failed, "error").contains("boom"), "{failed}");

    // Nothing at warn, and per message nothing else at info.
    assert!(!lines.iter().any(|l| l["level"] == "WARN"), "{log}");
    let info_per_message = lines
        .iter()
        .filter(|l| l["level"] == "INFO" && l.get("queue_id").is_some())
        .filter(|l| l["message"] != "message" && l.get("policy").is_none_or(|p| p != "gate"))
        .count();
    assert_eq!(info_per_message, 0, "{log}");
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
    Value::Object(fields)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logfmt_lines_carry_the_same_fields() {
    let daemon = start("logfmt");
    traffic(&daemon).await;
    daemon.wait_for_log("queue_id=Q2");
    let (_, log) = daemon.stop();
    println!("{log}");
    let lines: Vec<Value> = log.lines().map(logfmt).collect();
    for (text, line) in log.lines().zip(&lines) {
        assert!(
            line.get("timestamp").is_some() && line.get("message").is_some(),
            "{text}"
        );
    }
    let refused = lines
        .iter()
        .find(|l| l["message"] == "message" && l["queue_id"] == "Q1")
        .unwrap_or_else(|| panic!("no message line for Q1 in {log}"));
    for (name, value) in [
        ("level", "INFO"),
        ("client", "192.0.2.7"),
        ("policy", "gate"),
        ("stage", "mail"),
        ("verdict", "reject 550 no spam"),
    ] {
        assert_eq!(field(refused, name), value, "{refused}");
    }
    let said = lines
        .iter()
        .find(|l| l["message"] == "checking friend@example.org")
        .unwrap_or_else(|| panic!("no policy line in {log}"));
    for (name, value) in [("policy", "gate"), ("stage", "mail"), ("queue_id", "Q2")] {
        assert_eq!(field(said, name), value, "{said}");
    }
    assert!(!lines.iter().any(|l| l["level"] == "WARN"), "{log}");
}
