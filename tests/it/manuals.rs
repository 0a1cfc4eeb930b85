//! `luamilter generate man|completions`: every page renders with `man -l` and shows its
//! command's options, luamilter.toml(5) shows every key of the example configuration, and the
//! bash, zsh and fish completions, loaded by their shells, complete subcommands.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use clap::CommandFactory;

/// Runs `command`, which must succeed, and returns its standard output.
fn stdout_of(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `luamilter generate WHAT DIR` and returns the files it printed.
fn generate(what: &str, dir: &Path) -> BTreeSet<String> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_luamilter"));
    stdout_of(command.args(["generate", what]).arg(dir))
        .lines()
        .map(|l| {
            let name = Path::new(l).file_name().unwrap();
            name.to_str().unwrap().to_string()
        })
        .collect()
}

/// `MANWIDTH=… man -l FILE`, asserting groff has no warnings; wide lines, so nothing is
/// hyphenated.
fn man(file: &Path) -> String {
    let out = Command::new("man")
        .env("MANWIDTH", "300")
        .args(["--warnings", "-l"])
        .arg(file)
        .output()
        .unwrap_or_else(|e| panic!("man ({e}): tests/setup.sh installs man-db"));
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Page name → long options, for the command and every subcommand.
fn commands(cmd: &clap::Command, path: &str, out: &mut Vec<(String, Vec<String>)>) {
    let options = cmd
        .get_arguments()
        .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
        .collect();
    out.push((path.to_string(), options));
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        commands(sub, &format!("{path}-{}", sub.get_name()), out);
    }
}

#[test]
fn man_pages_for_every_command_and_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let written = generate("man", dir.path());

    let mut root = luamilter::cli::Cli::command();
    root.build();
    let mut expected = Vec::new();
    commands(&root, "luamilter", &mut expected);
    assert!(expected.len() > 20, "{expected:?}");
    for (page, options) in &expected {
        let file = format!("{page}.1");
        assert!(written.contains(&file), "{file} missing from {written:?}");
        let text = man(&dir.path().join(&file));
        assert!(
            text.contains(&format!("{page} - ")),
            "NAME of {file}:\n{text}"
        );
        for option in options {
            assert!(
                text.contains(option.as_str()),
                "{file} lacks {option}:\n{text}"
            );
        }
    }
    let run = man(&dir.path().join("luamilter-run.1"));
    assert!(run.contains("Configuration file"), "{run}");

    // luamilter.toml(5): every table and every key of the annotated example, with its comment.
    assert!(written.contains("luamilter.toml.5"), "{written:?}");
    let page = man(&dir.path().join("luamilter.toml.5"));
    let example = include_str!("../../examples/luamilter.toml");
    for line in example.lines() {
        let line = line.trim_start_matches("# ");
        let is_key = line.split_once(" = ").is_some_and(|(k, _)| {
            !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        if is_key || (line.starts_with('[') && line.ends_with(']')) {
            assert!(
                page.contains(line),
                "luamilter.toml(5) lacks {line:?}:\n{page}"
            );
        }
    }
    assert!(page.contains("Permissions of a unix socket"), "{page}");
    assert!(written.len() == expected.len() + 1, "{written:?}");
}

#[test]
fn bash_completion_completes_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    let written = generate("completions", dir.path());
    let expected: BTreeSet<String> = ["luamilter.bash", "_luamilter", "luamilter.fish"]
        .map(String::from)
        .into();
    assert_eq!(written, expected);
    // What bash offers after `luamilter ge<TAB>` and `luamilter db bl<TAB>`.
    let script = r#"
        source "$1"
        complete -p luamilter
        COMP_WORDS=(luamilter ge); COMP_CWORD=1
        _luamilter luamilter ge luamilter; echo "top: ${COMPREPLY[*]}"
        COMP_WORDS=(luamilter db bl); COMP_CWORD=2
        _luamilter luamilter bl db; echo "db: ${COMPREPLY[*]}"
    "#;
    let out = Command::new("bash")
        .args(["-c", script, "bash"])
        .arg(dir.path().join("luamilter.bash"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("-F _luamilter luamilter"), "{stdout}");
    assert!(stdout.contains("top: generate\n"), "{stdout}");
    assert!(stdout.contains("db: blacklist\n"), "{stdout}");
}

/// What fish offers for `line`, with the completion file `file`: `fish -n` checks its syntax,
/// `complete -C` completes.
fn fish_completes(file: &Path, line: &str) -> Vec<String> {
    let check = Command::new("fish").arg("-n").arg(file).status();
    let check = check.unwrap_or_else(|e| panic!("fish ({e}): tests/setup.sh installs fish"));
    assert!(check.success(), "fish -n {}", file.display());
    let mut fish = Command::new("fish");
    let script = "source $argv[1]; complete -C $argv[2]";
    stdout_of(fish.args(["-c", script]).arg(file).arg(line))
        .lines()
        .map(|l| l.split('\t').next().unwrap().to_string())
        .collect()
}

/// Types `$2` and TAB in an interactive zsh (on a pseudo-terminal) whose completion system
/// loads the file `$1` from its `fpath`, and prints `HIT:candidate` for what it offers (written
/// `"HI""T:"` so that the terminal's echo of the command does not look like a hit).
const ZSH_COMPLETE: &str = r#"
zmodload zsh/zpty
zpty z zsh -f -i
zpty -w z "PS1=''; fpath=(${1:h} \$fpath); autoload -Uz compinit; compinit -u -D"
zpty -w z 'compadd() { builtin compadd -O __hits "$@"; print -l -- "HI""T:"${^__hits}" " > /dev/tty; builtin compadd "$@" }'
zpty -w z "$2"$'\t'
integer i
for i in {1..50}; do
  zpty -r -t z line && print -r -- "$line"
  [[ $line == *HIT:* ]] && break
  sleep 0.1
done
zpty -d z
"#;

/// What zsh offers for `line`, with the completion file `file` (`zsh -n` checks its syntax).
fn zsh_completes(file: &Path, line: &str) -> Vec<String> {
    let check = Command::new("zsh").arg("-n").arg(file).status();
    let check = check.unwrap_or_else(|e| panic!("zsh ({e}): tests/setup.sh installs zsh"));
    assert!(check.success(), "zsh -n {}", file.display());
    let out = Command::new("timeout")
        .args(["20", "zsh", "-f", "-c", ZSH_COMPLETE, "zsh"])
        .arg(file)
        .arg(line)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("HIT:")
        .skip(1)
        .filter_map(|hit| hit.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn zsh_and_fish_completions_complete_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    generate("completions", dir.path());
    let zsh = dir.path().join("_luamilter");
    assert_eq!(zsh_completes(&zsh, "luamilter ge"), ["generate"]);
    assert_eq!(zsh_completes(&zsh, "luamilter db bl"), ["blacklist"]);
    let fish = dir.path().join("luamilter.fish");
    assert_eq!(fish_completes(&fish, "luamilter ge"), ["generate"]);
    assert_eq!(fish_completes(&fish, "luamilter db bl"), ["blacklist"]);
}
