//! The `luamilter` binary: `check` and `run`.

use crate::support::write_config;
use std::process::Command;

fn luamilter() -> Command {
    Command::new(env!("CARGO_BIN_EXE_luamilter"))
}

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
    let out = luamilter()
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
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
        "[policy.good]\nn = \"5m\"\nadd_words = [\"b\"]\n",
    );
    let out = luamilter()
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("policy good: ok"), "{stdout}");
    assert!(stdout.contains("good.lua"), "{stdout}");
    assert!(stdout.contains("stages:  mail, eom"), "{stdout}");
    assert!(stdout.contains("option:  n = 300"), "{stdout}");
    assert!(
        stdout.contains("option:  words = [\"a\", \"b\"]"),
        "{stdout}"
    );
}

#[test]
fn check_of_the_built_in_default_uses_the_examples() {
    let out = luamilter()
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
    let out = luamilter()
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.toml:2:"), "{stderr}");
}
