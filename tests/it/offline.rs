//! `luamilter test MESSAGE`: the real binary on the message files of tests/fixtures/messages
//! (CRLF, LF, 8-bit, an mbox From line, no header/body separator, binary garbage, an empty
//! file), its stage lines, its JSON, its exit statuses, DNS from a zone file and the store
//! modes; and the worked examples of docs/testing.md and the README's quick start, as written.

use serde_json::Value;
use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};
use tempfile::TempDir;

const RCPT_CHECK: &str = r#"
local milter = require "milter"
local log = require "milter.log"
return {
  rcpt = function(ctx, rcpt)
    rcpt = rcpt:lower()
    if rcpt == "nobody@example.org" then
      log.info("no such user", rcpt)
      return milter.reject{ code = 550, xcode = "5.1.1", text = "No such user" }
    elseif rcpt == "later@example.org" then
      return milter.tempfail{ code = 451, xcode = "4.2.0", text = "Mailbox busy" }
    elseif rcpt == "void@example.org" then
      return milter.discard()
    end
  end,
}
"#;

const STAMP: &str = r#"
local milter = require "milter"
return {
  eom = function(ctx)
    ctx:add_header("X-Subject-Seen", ctx:header("Subject") or "(none)")
    ctx:change_header("Date", 1, nil)
  end,
}
"#;

const DOMAIN_TXT: &str = r#"
local milter = require "milter"
local dns = require "milter.dns"
return {
  mail = function(ctx, sender)
    local domain = sender:match("@(.+)$")
    if not domain then return end
    local txt, err = dns.txt("policy." .. domain)
    if txt and txt[1] == "refuse" then
      return milter.reject{ code = 550, xcode = "5.7.1", text = "Domain policy of " .. domain }
    elseif err == "servfail" or err == "timeout" then
      return milter.tempfail{ code = 451, xcode = "4.4.3", text = "DNS " .. err }
    end
  end,
}
"#;

const COUNTER: &str = r#"
local milter = require "milter"
local store = require "milter.store"
return {
  eom = function(ctx)
    local n = store.incr("test-counter")
    if n > 1 then return milter.tempfail{ code = 451, text = "seen " .. n .. " times" } end
  end,
}
"#;

/// A config in a temp dir with these policies (name, source), chained in this order.
fn site(policies: &[(&str, &str)]) -> TempDir {
    let dir = TempDir::new().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    for (name, source) in policies {
        std::fs::write(dir.path().join(format!("policies/{name}.lua")), source).unwrap();
    }
    let chain: Vec<String> = policies.iter().map(|(n, _)| format!("{n:?}")).collect();
    std::fs::write(
        dir.path().join("luamilter.toml"),
        format!(
            "[policies]\ndirs = [\"policies\"]\nchain = [{}]\n[dns]\nnameservers = [\"127.0.0.1:9\"]\ntimeout = \"200ms\"\nattempts = 1\n",
            chain.join(", ")
        ),
    )
    .unwrap();
    dir
}

fn message(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/messages")
        .join(name)
}

/// Runs `luamilter test --config DIR/luamilter.toml ARGS…`.
fn test(dir: &TempDir, args: &[&str]) -> Output {
    crate::support::luamilter_cli("test", &dir.path().join("luamilter.toml"), args)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            stdout(out),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_message_is_reported_stage_by_stage() {
    let dir = site(&[("rcpt_check", RCPT_CHECK), ("stamp", STAMP)]);
    let out = test(&dir, &[path(&message("crlf.eml"))]);
    let text = stdout(&out);
    assert_eq!(code(&out), 0, "{text}");
    for line in [
        "message  ",
        "crlf.eml: 419 bytes, 7 header fields, CRLF line ends",
        "client   192.0.2.25 mail.example.com  (the first Received header)",
        "helo     mail.example.com  (the first Received header)",
        "from     <alice@example.com>  (Return-Path)",
        "rcpt     <bob@example.org> <nobody@example.org>  (To)",
        "connect  mail.example.com [192.0.2.25]  -> ",
        "rcpt     <bob@example.org>  -> continue\n",
        "rcpt     <nobody@example.org>  -> reject 550 5.1.1 No such user\n",
        "         [rcpt_check] info: no such user nobody@example.org\n",
        "         decided by rcpt_check: reject 550 5.1.1 No such user\n",
        "header   7 of 7 header fields  -> ",
        "body     ",
        "eom      -> continue\n",
        "edit     add header X-Subject-Seen: Lunch on Friday?\n",
        "edit     delete header Date #1\n",
        "header   after the edits:\n",
        "         Subject: Lunch on Friday?\n         Message-ID: <lunch.1@example.com>\n         X-Subject-Seen: Lunch on Friday?\n",
        "trace    rcpt:rcpt_check=reject 550 5.1.1 No such user",
        "result   accept at eom\n",
    ] {
        assert!(text.contains(line), "no {line:?} in:\n{text}");
    }
    assert!(!text.contains("Date: Mon"), "{text}");
}

#[test]
fn lf_crlf_and_mbox_files_are_the_same_message() {
    let dir = site(&[("rcpt_check", RCPT_CHECK), ("stamp", STAMP)]);
    let reports: Vec<Value> = ["lf.eml", "crlf.eml", "mbox.eml"]
        .iter()
        .map(|m| json(&test(&dir, &["--json", path(&message(m))])))
        .collect();
    let shape = |r: &Value| {
        let mut t = r["transcript"].clone();
        for e in t["exchanges"].as_array_mut().unwrap() {
            e["events"] = Value::Null;
        }
        t["mails"][0]["trace"] = Value::Null;
        (t, r["result"].clone(), r["envelope"].clone())
    };
    assert_eq!(shape(&reports[0]), shape(&reports[1]));
    assert_eq!(shape(&reports[0]), shape(&reports[2]));
    assert_eq!(reports[0]["line_ends"], "LF");
    assert_eq!(reports[1]["line_ends"], "CRLF");
    assert_eq!(reports[2]["notes"][0], "mbox \"From \" line skipped");
    let body = &reports[0]["transcript"]["exchanges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["stage"] == "body")
        .unwrap()["sent"];
    assert_eq!(
        body, "45 bytes",
        "LF body lines are sent as CRLF (40 bytes in the file)"
    );
}

#[test]
fn eight_bit_headers_and_bodies_pass_as_they_are() {
    let dir = site(&[("stamp", STAMP)]);
    let out = test(&dir, &["--json", path(&message("8bit.eml"))]);
    let report = json(&out);
    assert_eq!(code(&out), 0);
    assert!(report["notes"][0].as_str().unwrap().contains("not UTF-8"));
    let edits = &report["transcript"]["mails"][0]["edits"];
    // The policy read the Latin-1 subject (lossily, as the daemon does with live mail).
    assert_eq!(edits[0]["action"], "add_header");
    assert_eq!(edits[0]["value"], "Caf\u{fffd} cr\u{fffd}me");
}

#[test]
fn malformed_files_still_run() {
    let dir = site(&[("rcpt_check", RCPT_CHECK), ("stamp", STAMP)]);
    let envelope = [
        "--client",
        "198.51.100.7",
        "--from",
        "alice@example.com",
        "--rcpt",
        "bob@example.org",
    ];
    let cases = [
        ("no-separator.eml", 2, "is not a header field"),
        ("garbage.bin", 0, "is not a header field"),
        ("empty.eml", 0, "the file is empty"),
    ];
    for (file, headers, note) in cases {
        let file_path = message(file);
        let mut args = envelope.to_vec();
        args.extend(["--json", path(&file_path)]);
        let out = test(&dir, &args);
        let report = json(&out);
        assert_eq!(code(&out), 0, "{file}: {report}");
        assert_eq!(report["header_fields"], headers, "{file}");
        let notes = report["notes"].to_string();
        assert!(notes.contains(note), "{file}: {notes}");
        assert_eq!(report["result"]["verdict"], "accept", "{file}");
        assert_eq!(report["envelope"]["client_name"], "[198.51.100.7]");
        assert_eq!(report["envelope"]["helo"], "[198.51.100.7]");
    }
    // Without an envelope in the file or on the command line: a usage error naming the option.
    let out = test(&dir, &[path(&message("empty.eml"))]);
    assert_eq!(code(&out), 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--client"));
    let out = test(&dir, &[path(&message("no-such-file.eml"))]);
    assert_eq!(code(&out), 1);
}

#[test]
fn the_exit_status_tells_the_result() {
    let dir = site(&[("rcpt_check", RCPT_CHECK)]);
    let lf = message("lf.eml");
    let cases = [
        ("bob@example.org", 0, "accept"),
        ("nobody@example.org", 3, "reject"),
        ("later@example.org", 4, "tempfail"),
        ("void@example.org", 5, "discard"),
    ];
    for (rcpt, status, verdict) in cases {
        let out = test(&dir, &["--rcpt", rcpt, "--json", path(&lf)]);
        let report = json(&out);
        assert_eq!(code(&out), status, "{rcpt}: {report}");
        assert_eq!(report["result"]["verdict"], verdict, "{rcpt}");
        assert_eq!(
            report["result"]["stage"],
            if status == 0 { "eom" } else { "rcpt" }
        );
        if status == 3 {
            assert_eq!(report["result"]["policy"], "rcpt_check");
            assert_eq!(report["result"]["reply"], "550 5.1.1 No such user");
        }
    }
    // A refused recipient beside an accepted one: the message is accepted.
    let out = test(
        &dir,
        &[
            "--rcpt",
            "nobody@example.org",
            "--rcpt",
            "bob@example.org",
            path(&lf),
        ],
    );
    assert_eq!(code(&out), 0, "{}", stdout(&out));
}

#[test]
fn dns_answers_come_from_the_zone_file() {
    let dir = site(&[("domain_txt", DOMAIN_TXT)]);
    let zone = dir.path().join("test.zone");
    std::fs::write(
        &zone,
        "; answers for the test\npolicy.example.com TXT \"refuse\"\npolicy.example.net TXT \"welcome\"\n$SERVFAIL broken.example\n",
    )
    .unwrap();
    let lf = message("lf.eml");
    let run = |from: &str| {
        let out = test(
            &dir,
            &["--dns-zone", path(&zone), "--from", from, path(&lf)],
        );
        (code(&out), stdout(&out))
    };
    let (status, text) = run("alice@example.com");
    assert_eq!(status, 3, "{text}");
    assert!(
        text.contains("dns      zone files only (no network)"),
        "{text}"
    );
    assert!(
        text.contains(
            "mail     <alice@example.com>  -> reject 550 5.7.1 Domain policy of example.com"
        ),
        "{text}"
    );
    assert!(
        text.contains("trace    mail:domain_txt=reject 550 5.7.1 Domain policy of example.com (")
            && text.contains(" dns=1)"),
        "{text}"
    );
    assert_eq!(run("alice@example.net").0, 0);
    assert_eq!(
        run("alice@elsewhere.example").0,
        0,
        "NXDOMAIN for names in no zone"
    );
    let (status, text) = run("alice@broken.example");
    assert_eq!(status, 4, "{text}");
    assert!(text.contains("451 4.4.3 DNS servfail"), "{text}");
    // A zone file that does not parse is a usage error naming it.
    std::fs::write(&zone, "policy.example.com BOGUS data\n").unwrap();
    let out = test(&dir, &["--dns-zone", path(&zone), path(&lf)]);
    assert_eq!(code(&out), 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("test.zone"));
}

#[test]
fn the_store_is_a_throwaway_copy_unless_told_otherwise() {
    let dir = site(&[("counter", COUNTER)]);
    let lf = message("lf.eml");
    let config = dir.path().join("luamilter.toml");
    // Give the configured store a count of 1.
    let db =
        crate::support::luamilter_cli("db", &config, &["whitelist", "add", "someone@example.com"]);
    assert!(
        db.status.success(),
        "{}",
        String::from_utf8_lossy(&db.stderr)
    );
    for _ in 0..2 {
        let out = test(&dir, &[path(&lf)]);
        assert_eq!(
            code(&out),
            0,
            "copies never keep what a run wrote: {}",
            stdout(&out)
        );
        assert!(
            stdout(&out).contains("store    a throwaway copy of "),
            "{}",
            stdout(&out)
        );
    }
    let out = test(&dir, &["--store", "empty", path(&lf)]);
    assert!(stdout(&out).contains("store    a throwaway empty store\n"));
    let first = test(&dir, &["--store", "real", path(&lf)]);
    assert_eq!(code(&first), 0, "{}", stdout(&first));
    let second = test(&dir, &["--store", "real", path(&lf)]);
    assert_eq!(
        code(&second),
        4,
        "the real store kept the count: {}",
        stdout(&second)
    );
    assert!(stdout(&second).contains("seen 2 times"));
}

#[test]
fn macros_and_auth_reach_the_policies() {
    let policy = r#"
local milter = require "milter"
return {
  mail = function(ctx)
    if ctx.client.authenticated and ctx:macro("{daemon_port}") == "587" then
      return milter.accept()
    end
    return milter.reject{ code = 550, text = "not submission" }
  end,
}
"#;
    let dir = site(&[("submission", policy)]);
    let lf = message("lf.eml");
    let out = test(
        &dir,
        &["--auth", "alice", "--macro", "{daemon_port}=587", path(&lf)],
    );
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    assert!(stdout(&out).contains("result   accept at mail by submission"));
    let out = test(&dir, &["--macro", "mail:{daemon_port}=587", path(&lf)]);
    assert_eq!(code(&out), 3);
    let out = test(&dir, &["--macro", "nonsense", path(&lf)]);
    assert_eq!(code(&out), 2);
}

/// The fenced blocks of a page marked `<!-- file: PATH -->` on the line above, by path.
pub fn marked_files(page: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(page)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut files = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line
            .strip_prefix("<!-- file: ")
            .and_then(|l| l.strip_suffix(" -->"))
        else {
            continue;
        };
        // Other comments (doc_examples' annotations) may stand between the mark and the fence.
        let fence = (i + 1..lines.len())
            .find(|&j| !lines[j].starts_with("<!--"))
            .filter(|&j| lines[j].starts_with("```"))
            .unwrap_or_else(|| panic!("{page}:{}: no fence below", i + 1));
        let body: Vec<&str> = lines[fence + 1..]
            .iter()
            .take_while(|l| !l.starts_with("```"))
            .copied()
            .collect();
        files.push((name.to_string(), body.join("\n") + "\n"));
    }
    files
}

/// Writes the marked files of `page` into a temp dir; `/etc/luamilter/` and `/tmp/` become it.
fn write_marked(page: &str) -> (TempDir, Vec<(String, String)>) {
    let dir = TempDir::new().unwrap();
    let files = marked_files(page);
    for (name, body) in &files {
        let relative = name
            .trim_start_matches("/etc/luamilter/")
            .trim_start_matches("/tmp/");
        let target = dir.path().join(relative);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(target, body).unwrap();
    }
    (dir, files)
}

#[test]
fn the_worked_example_of_docs_testing_runs_as_written() {
    let (dir, files) = write_marked("docs/testing.md");
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    for wanted in [
        "/etc/luamilter/policies/sender_mx.lua",
        "/etc/luamilter/cases/sender_mx.toml",
        "/etc/luamilter/cases/test.zone",
        "/tmp/hello.eml",
        "expected output",
    ] {
        assert!(
            names.contains(&wanted),
            "docs/testing.md marks no {wanted}: {names:?}"
        );
    }
    // The admin's config: the quick start's, with sender_mx in the chain.
    std::fs::write(
        dir.path().join("luamilter.toml"),
        "[policies]\ndirs = [\"policies\"]\nchain = [\"sender_mx\"]\n",
    )
    .unwrap();
    let config = dir.path().join("luamilter.toml");
    let cases = Command::new(env!("CARGO_BIN_EXE_luamilter"))
        .args(["test", "--config", path(&config), "--cases"])
        .arg(dir.path().join("cases"))
        .output()
        .unwrap();
    let text = stdout(&cases);
    assert!(cases.status.success(), "{text}");
    assert!(text.ends_with("4 passed, 0 failed, 0 skipped\n"), "{text}");
    let message = dir.path().join("hello.eml");
    let out = Command::new(env!("CARGO_BIN_EXE_luamilter"))
        .args(["test", "--config", path(&config), "--dns-zone"])
        .arg(dir.path().join("cases/test.zone"))
        .arg(&message)
        .output()
        .unwrap();
    let expected = &files
        .iter()
        .find(|(n, _)| n == "expected output")
        .unwrap()
        .1;
    let timings = regex::Regex::new(r"\(\d+\.\dms").unwrap();
    let got = stdout(&out)
        .replace(path(&message), "/tmp/hello.eml")
        .replace(path(dir.path()), "/etc/luamilter");
    let got = timings.replace_all(&got, "(0.1ms");
    let expected = timings.replace_all(expected, "(0.1ms");
    assert_eq!(got.trim_end(), expected.trim_end());
    assert_eq!(code(&out), 0);
}

#[test]
fn the_readme_quick_start_test_step_runs_as_written() {
    let (dir, files) = write_marked("README.md");
    assert!(
        files.iter().any(|(n, _)| n.ends_with("first.lua")),
        "{files:?}"
    );
    let config = dir.path().join("luamilter.toml");
    let spam = dir.path().join("spam.eml");
    assert!(spam.exists(), "README.md marks no /tmp/spam.eml");
    let out = Command::new(env!("CARGO_BIN_EXE_luamilter"))
        .args([
            "test",
            "--config",
            path(&config),
            "--client",
            "192.0.2.1",
            path(&spam),
        ])
        .output()
        .unwrap();
    assert_eq!(code(&out), 3, "{}", stdout(&out));
    assert!(stdout(&out).contains("decided by first: reject 550 5.7.1 Sender blocked"));
}

#[test]
fn case_files_preload_the_store_read_eml_files_and_report_failures() {
    let policy = r#"
local milter = require "milter"
local store = require "milter.store"
local dns = require "milter.dns"
return {
  mail = function(ctx, sender)
    if store.listed("whitelist", sender) then return milter.accept() end
    if store.banned("ip", ctx.client.ip) then
      return milter.reject{ code = 550, xcode = "5.7.1", text = "banned" }
    end
    local limit = store.get("limit")
    if limit and limit.max == 0 then return milter.tempfail{ code = 451, text = "closed" } end
    if not dns.a("mx." .. sender:match("@(.+)$")) then
      return milter.reject{ code = 550, text = "no mx host" }
    end
  end,
}
"#;
    let dir = site(&[("gate", policy)]);
    let cases = dir.path().join("cases");
    std::fs::create_dir(&cases).unwrap();
    std::fs::copy(message("lf.eml"), cases.join("lunch.eml")).unwrap();
    std::fs::write(
        cases.join("gate.toml"),
        r#"
chain = ["gate"]
zone = '''
mx.example.com A 192.0.2.25
'''
[preload]
whitelist = ["friend@elsewhere.example"]
ban_ip = ["203.0.113.66"]

[[case]]
name = "a whitelisted sender is accepted at MAIL"
mail = "<friend@elsewhere.example>"
rcpt = ["<bob@example.org>"]
expect.result = "accept"
expect.policy = "gate"

[[case]]
name = "a banned client is refused"
ip = "203.0.113.66"
mail = "<alice@example.com>"
rcpt = ["<bob@example.org>"]
expect.mail = "550 5.7.1 banned"

[[case]]
name = "a message from a file goes through"
mail = "<alice@example.com>"
rcpt = ["<bob@example.org>"]
eml = "lunch.eml"
expect.result = "accept"
expect.policy = "-"

[[case]]
name = "a preloaded value counts from its case on"
preload = { values = { limit = { max = 0 } } }
mail = "<alice@example.com>"
rcpt = ["<bob@example.org>"]
expect.result = "451 closed"

[[case]]
name = "this expectation is wrong"
mail = "<alice@nowhere.example>"
rcpt = ["<bob@example.org>"]
expect.result = "accept"
"#,
    )
    .unwrap();
    let out = test(&dir, &["--cases", path(&cases)]);
    let text = stdout(&out);
    assert_eq!(code(&out), 1, "{text}");
    assert!(text.ends_with("4 passed, 1 failed, 0 skipped\n"), "{text}");
    assert!(
        text.contains("  FAIL  this expectation is wrong: message 1 (<alice@nowhere.example>): expected the result \"accept\", got tempfail at mail by gate: 451 closed"),
        "{text}"
    );
    // The failed case's conversation follows it.
    assert!(
        text.contains("        mail     <alice@nowhere.example>  -> tempfail 451 closed"),
        "{text}"
    );
    let out = test(&dir, &["--json", "--cases", path(&cases)]);
    let results = json(&out);
    assert_eq!(
        results[0]["cases"][4]["transcript"]["mails"][0]["ending"]["verdict"],
        "tempfail"
    );
    assert!(results[0]["cases"][0]["transcript"].is_null());
}

/// Shadow mode in `luamilter test`: the message is accepted, and the report says what the
/// shadowed policy would have done (the log line the daemon writes, caught by the report).
#[test]
fn a_shadowed_policy_is_reported_as_what_it_would_do() {
    let refuse = r#"
local milter = require "milter"
return {
  mail = function(ctx, sender)
    return milter.reject{ code = 550, xcode = "5.7.1", text = "Not from " .. sender }
  end,
}
"#;
    let dir = site(&[("refuse", refuse)]);
    let config = dir.path().join("luamilter.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text + "[policy.refuse]\nmode = \"shadow\"\n").unwrap();
    let out = test(&dir, &[path(&message("crlf.eml"))]);
    let report = stdout(&out);
    assert_eq!(code(&out), 0, "accepted: {report}");
    assert!(
        report.contains("would reject 550 5.7.1 Not from alice@example.com"),
        "{report}"
    );
}
