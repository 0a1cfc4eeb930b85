//! The `luamilter` binary: `check` and `run`.

use crate::support::{luamilter_cli, write_config};
use std::process::Command;

#[test]
fn check_reports_every_error_with_file_and_line_and_exits_78() {
    let dir = tempfile::TempDir::new().unwrap();
    let config = write_config(
        &dir,
        "inet:0@127.0.0.1",
        &[
            (
                "good",
                "return { options = { n = 1 }, mail = function() end }",
            ),
            (
                "broken",
                "return {\n  mail = function(ctx)\n    if then\n  end,\n}\n",
            ),
        ],
        "[policy.good]\nn = \"x\"\n",
    );
    let out = luamilter_cli("check", &config, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(78), "{stdout}");
    assert!(stdout.contains("broken.lua:3:"), "{stdout}");
    assert!(
        stdout.contains("[policy.good] n: expected a number"),
        "{stdout}"
    );
}

#[test]
fn check_prints_state_source_and_options() {
    let dir = tempfile::TempDir::new().unwrap();
    let config = write_config(
        &dir,
        "inet:0@127.0.0.1",
        &[(
            "good",
            "return { options = { n = 1, words = {'a'} }, mail = function() end, eom = function() end }",
        )],
        "[policy.good]\nn = \"5m\"\nadd_words = [\"b\"]\nmode = \"shadow\"\n",
    );
    let out = luamilter_cli("check", &config, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("policy good: ok"), "{stdout}");
    assert!(stdout.contains("good.lua"), "{stdout}");
    assert!(stdout.contains("stages:  mail, eom"), "{stdout}");
    assert!(stdout.contains("option:  n = 300"), "{stdout}");
    assert!(stdout.contains("mode:    shadow"), "{stdout}");
    assert!(!stdout.contains("option:  mode"), "{stdout}");
    assert!(
        stdout.contains("option:  words = [\"a\", \"b\"]"),
        "{stdout}"
    );
}

#[test]
fn check_accepts_call_back_access_values_and_names_misplaced_ones() {
    let dir = tempfile::TempDir::new().unwrap();
    std::fs::write(
        dir.path().join("access"),
        "SPF-Neutral:\tCBV\nSPF-Softfail:ebay.com DSN\nHELO-Fail: CBV\n",
    )
    .unwrap();
    let policy = [("good", "return { mail = function() end }")];
    let good = write_config(
        &dir,
        "inet:0@127.0.0.1",
        &policy,
        "[site]\naccess_file = \"access\"\n[site.access]\n\"SPF-Fail:abeb@adelphia.net\" = \"DSN\"\n",
    );
    let out = luamilter_cli("check", &good, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");

    std::fs::write(dir.path().join("access"), "SMTP-Auth:example.com CBV\n").unwrap();
    let out = luamilter_cli("check", &good, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(78), "{stdout}");
    assert!(
        stdout.contains("access:1: \"SMTP-Auth:example.com\": CBV (a call-back) applies to SPF-* and HELO-* entries only"),
        "{stdout}"
    );
}

#[test]
fn check_of_the_built_in_default_uses_the_examples() {
    let out = Command::new(env!("CARGO_BIN_EXE_luamilter"))
        .arg("check")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("policy trivial: ok"), "{stdout}");
    assert!(stdout.contains("listen: inet:8894@127.0.0.1"), "{stdout}");
}

#[test]
fn run_refuses_a_bad_config_with_78() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[milter]\nlisten = \"inet:x@y\"\n").unwrap();
    let out = luamilter_cli("run", &path, &[]);
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.toml:2:"), "{stderr}");
}

/// The daemon as a process: SIGHUP reloads, `luamilter ctl` talks to it, SIGTERM stops it
/// and removes its sockets.
#[tokio::test]
async fn run_reloads_on_sighup_and_answers_ctl() {
    let dir = tempfile::TempDir::new().unwrap();
    let sock = dir.path().join("milter.sock");
    let refusing = |who: &str| {
        format!(
            "local milter = require 'milter'\nreturn {{ mail = function(ctx, s) if s == '{who}' then return milter.reject() end end }}\n"
        )
    };
    let config = write_config(
        &dir,
        &format!("unix:{}", sock.display()),
        &[("gate", &refusing("a@example.org"))],
        "",
    );
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[policies]\n", "[policies]\nwatch = false\n");
    std::fs::write(&config, text).unwrap();
    let mut daemon =
        crate::support::DaemonProcess::start_config(dir, config.clone(), sock.clone()).unwrap();
    let refused = |sender: &'static str| {
        let sock = sock.clone();
        async move {
            let mut probe = crate::support::Mta(
                indymilter_test::TestConnection::configure()
                    .open_unix(&sock)
                    .await
                    .unwrap(),
            );
            probe
                .connect("h", std::net::Ipv4Addr::LOCALHOST)
                .await
                .unwrap();
            matches!(
                probe.mail([format!("<{sender}>")]).await.unwrap(),
                indymilter_test::Status::Reject { .. }
            )
        }
    };
    assert!(refused("a@example.org").await);
    std::fs::write(daemon.path("gate.lua"), refusing("b@example.org")).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        refused("a@example.org").await,
        "watch = false: no reload without a signal"
    );
    daemon.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !refused("b@example.org").await {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let out = luamilter_cli("ctl", &config, &["stats"]);
    let stats = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stats}");
    assert!(stats.contains("reloads_ok 1"), "{stats}");
    let out = luamilter_cli("ctl", &config, &["reload"]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("ok: generation")
    );
    std::fs::write(daemon.path("gate.lua"), "return {").unwrap();
    let out = luamilter_cli("ctl", &config, &["reload"]);
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && answer.contains("gate.lua:1:"),
        "{answer}"
    );

    daemon.signal(libc::SIGTERM);
    let status = daemon
        .exits_within(std::time::Duration::from_secs(10))
        .await;
    assert!(status.success());
    assert!(!sock.exists(), "milter socket removed at exit");
    assert!(
        !daemon.control_socket().exists(),
        "control socket removed at exit"
    );
}

/// `[policy.spf] authentication_results` and `authserv_id` moved to the authres policy; a
/// config written before that still loads, as docs/policies/spf.md says.
#[test]
fn check_accepts_the_spf_options_that_moved_to_authres() {
    let dir = tempfile::TempDir::new().unwrap();
    let config = write_config(
        &dir,
        "inet:0@127.0.0.1",
        &[],
        "[policy.spf]\nauthentication_results = true\nauthserv_id = \"mx.example.org\"\n",
    );
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("chain = []", "chain = [\"spf\"]");
    std::fs::write(&config, text).unwrap();
    let out = luamilter_cli("check", &config, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("policy spf: ok"), "{stdout}");
    assert!(
        stdout.contains("option:  authserv_id = \"mx.example.org\""),
        "{stdout}"
    );
}
