//! `luamilter replay`: the real binary on the corpus of tests/fixtures/corpus, in its three
//! forms (a directory of .eml files, an mbox, a Maildir), between two configurations that differ
//! in one policy's options (tests/fixtures/corpus/old.toml and new.toml): the exact table of
//! changes with its examples, the skipped messages, the JSON and the exit statuses.

use std::{path::PathBuf, process::Output};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/corpus")
}

/// Runs `luamilter replay` in the corpus directory.
fn replay(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_luamilter"))
        .arg("replay")
        .args(args)
        .current_dir(corpus_dir())
        .output()
        .expect("run luamilter")
}

/// Standard output without the timing figures of the summary line, and the summary line.
fn split(output: &Output) -> (String, String) {
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (table, last) = text.trim_end().rsplit_once('\n').expect("a summary line");
    let summary = last.split(", ").take(3).collect::<Vec<_>>().join(", ");
    (format!("{table}\n"), summary)
}

const CHANGES: &str = "\
change               messages
accepted → rejected         1
rejected → accepted         1
reply text                  1
edits                       COUNT

accepted → rejected (1):
  B  192.0.2.2 <carol@new.example> → <bob@example.org>
    old: accept at eom
    new: reject at mail by rules: 550 5.7.1 Sender blocked

rejected → accepted (1):
  A  192.0.2.1 <alice@old.example> → <bob@example.org>
    old: reject at mail by rules: 550 5.7.1 Sender blocked
    new: accept at eom

reply text (1):
  C  192.0.2.3 <dave@both.example> → <bob@example.org>
    old: reject at mail by rules: 550 5.7.1 Sender blocked
    new: reject at mail by rules: 550 5.7.1 Sender refused

edits (COUNT):
";

const STAMP_D: &str = "  D  192.0.2.4 <erin@tag.example> → <bob@example.org>
    old: accept at eom
    new: accept at eom
    - add header X-Rules: v1
    + add header X-Rules: v2
";

const STAMP_G: &str = "  G  192.0.2.7 <grace@tag.example> → <bob@example.org> <carol@example.org>
    old: accept at eom
    new: accept at eom
    - add header X-Rules: v1
    + add header X-Rules: v2
";

const NO_CLIENT: &str = "no client address: give client in a sidecar file (the message has no Received header that names one)";

/// The expected report: the header lines, the table with the messages named as `names`
/// (a, b, c, d, g), the edit examples in corpus order, the skipped part.
fn expected(
    corpus: &str,
    kind: &str,
    names: [&str; 5],
    d_first: bool,
    edits: usize,
    skipped: &str,
) -> String {
    let [a, b, c, d, g] = names;
    let mut text = format!("corpus   {corpus} ({kind})\nold      old.toml\nnew      new.toml\n\n");
    text.push_str(
        &CHANGES
            .replace("COUNT", &edits.to_string())
            .replace("  A  ", &format!("  {a}  "))
            .replace("  B  ", &format!("  {b}  "))
            .replace("  C  ", &format!("  {c}  ")),
    );
    let stamp_d = STAMP_D.replace("  D  ", &format!("  {d}  "));
    let stamp_g = STAMP_G.replace("  G  ", &format!("  {g}  "));
    match (edits, d_first) {
        (1, _) => text.push_str(&stamp_d),
        (_, true) => text.push_str(&(stamp_d + &stamp_g)),
        (_, false) => text.push_str(&(stamp_g + &stamp_d)),
    }
    text.push('\n');
    text.push_str(skipped);
    text
}

#[test]
fn a_directory_of_eml_files() {
    let out = replay(&[
        "--config",
        "new.toml",
        "--against",
        "old.toml",
        "--store",
        "empty",
        "eml",
    ]);
    let (table, summary) = split(&out);
    let want = expected(
        "eml",
        "a directory of .eml files",
        ["a.eml", "b.eml", "c.eml", "sub/d.eml", "g.eml"],
        false,
        2,
        &format!(
            "skipped (no envelope: 1, unreadable: 1):\n  f.eml: {NO_CLIENT}\n  h.eml: cannot read: No such file or directory (os error 2)\n\n"
        ),
    );
    assert_eq!(table, want, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(summary, "8 messages, 5 changed, 2 skipped");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn an_mbox() {
    let out = replay(&[
        "-c",
        "new.toml",
        "--against",
        "old.toml",
        "--jobs",
        "1",
        "corpus.mbox",
    ]);
    let (table, summary) = split(&out);
    let want = expected(
        "corpus.mbox",
        "an mbox",
        [
            "corpus.mbox:1",
            "corpus.mbox:12",
            "corpus.mbox:23",
            "corpus.mbox:34",
            "-",
        ],
        true,
        1,
        &format!("skipped (no envelope: 1):\n  corpus.mbox:56: {NO_CLIENT}\n\n"),
    );
    assert_eq!(table, want, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(summary, "6 messages, 4 changed, 1 skipped");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn a_maildir_with_a_sidecar() {
    let out = replay(&[
        "-c",
        "new.toml",
        "--against",
        "old.toml",
        "-j",
        "3",
        "maildir",
    ]);
    let (table, summary) = split(&out);
    let want = expected(
        "maildir",
        "a Maildir",
        [
            "cur/1700000001.M1P1.mx:2,S",
            "cur/1700000002.M1P1.mx:2,S",
            "cur/1700000003.M1P1.mx:2,S",
            "cur/1700000004.M1P1.mx:2,S",
            "new/1700000007.M1P1.mx",
        ],
        true,
        2,
        &format!("skipped (no envelope: 1):\n  new/1700000006.M1P1.mx: {NO_CLIENT}\n\n"),
    );
    assert_eq!(table, want, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(summary, "7 messages, 5 changed, 1 skipped");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn json_counts_and_first_examples() {
    let out = replay(&[
        "-c",
        "new.toml",
        "--against",
        "old.toml",
        "--json",
        "--examples",
        "1",
        "eml",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["messages"], 8);
    assert_eq!(v["changed"], 5);
    assert_eq!(v["skipped"], 2);
    assert_eq!(v["skip_reasons"]["unreadable"], 1);
    let kinds: Vec<(&str, u64)> = v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (k["kind"].as_str().unwrap(), k["count"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("accepted → rejected", 1),
            ("rejected → accepted", 1),
            ("reply text", 1),
            ("edits", 2)
        ]
    );
    let edits = &v["changes"][3]["examples"];
    assert_eq!(edits.as_array().unwrap().len(), 1, "--examples 1");
    assert_eq!(edits[0]["message"], "g.eml");
    assert_eq!(
        edits[0]["details"],
        serde_json::json!(["- add header X-Rules: v1", "+ add header X-Rules: v2"])
    );
}

#[test]
fn the_same_configuration_changes_nothing() {
    let out = replay(&["-c", "old.toml", "--against", "old.toml", "eml"]);
    let (table, summary) = split(&out);
    assert!(table.contains("\nno change\n"), "{table}");
    assert_eq!(summary, "8 messages, 0 changed, 2 skipped");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn bad_configurations_and_corpora() {
    let out = replay(&["-c", "missing.toml", "--against", "old.toml", "eml"]);
    assert_eq!(out.status.code(), Some(78));
    let out = replay(&["-c", "new.toml", "--against", "old.toml", "no-such-corpus"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-corpus"));
    let out = replay(&["-c", "new.toml", "eml"]);
    assert_eq!(out.status.code(), Some(2), "--against is required");
    // A policy that does not load: exit 78, the error said.
    let dir = tempfile::TempDir::new().unwrap();
    std::fs::write(dir.path().join("broken.lua"), "return {").unwrap();
    let config = dir.path().join("broken.toml");
    std::fs::write(
        &config,
        format!(
            "[policies]\ndirs = [{:?}]\nchain = [\"broken\"]\n",
            dir.path().display().to_string()
        ),
    )
    .unwrap();
    let out = replay(&[
        "-c",
        config.to_str().unwrap(),
        "--against",
        "old.toml",
        "eml",
    ]);
    assert_eq!(
        out.status.code(),
        Some(78),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("broken"));
}

/// The worked example of docs/replay.md, as written: the README's quick start as the
/// configuration in service, a copy with the page's first.lua as the new one, the page's corpus.
#[test]
fn the_worked_example_of_docs_replay_runs_as_written() {
    use super::offline::marked_files;
    let dir = tempfile::TempDir::new().unwrap();
    let (old, new, corpus) = (
        dir.path().join("luamilter"),
        dir.path().join("luamilter.new"),
        dir.path().join("corpus"),
    );
    let write = |path: PathBuf, body: &str| {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, body).unwrap();
    };
    for (name, body) in marked_files("README.md") {
        if let Some(rest) = name.strip_prefix("/etc/luamilter/") {
            write(old.join(rest), &body);
            write(new.join(rest), &body);
        }
    }
    let page = marked_files("docs/replay.md");
    let mut expected = None;
    for (name, body) in page {
        if let Some(rest) = name.strip_prefix("/etc/luamilter.new/") {
            write(new.join(rest), &body);
        } else if let Some(rest) = name.strip_prefix("/tmp/corpus/") {
            write(corpus.join(rest), &body);
        } else if name == "expected output" {
            expected = Some(body);
        }
    }
    let expected = expected.expect("docs/replay.md marks the expected output");
    assert!(
        corpus.join("3.eml").exists(),
        "docs/replay.md marks the corpus"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_luamilter"))
        .arg("replay")
        .arg(&corpus)
        .arg("--config")
        .arg(new.join("luamilter.toml"))
        .arg("--against")
        .arg(old.join("luamilter.toml"))
        .output()
        .unwrap();
    let root = dir.path().display().to_string();
    let got = String::from_utf8_lossy(&out.stdout)
        .replace(&format!("{root}/corpus"), "/tmp/corpus")
        .replace(&root, "/etc");
    let rate = regex::Regex::new(r"skipped, [0-9.]+ s, \d+ msg/s").unwrap();
    let got = rate.replace_all(&got, "skipped, T");
    let expected = rate.replace_all(&expected, "skipped, T");
    assert_eq!(
        got.trim_end(),
        expected.trim_end(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1));
}
