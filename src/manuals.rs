//! `luamilter generate man|completions DIR`: a manual page per command and subcommand from the
//! clap definitions (clap_mangen), luamilter.toml(5) from the annotated example configuration,
//! and shell completions (clap_complete).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Subcommand};
use clap_complete::Shell;
use clap_mangen::roff::{Roff, bold, roman};

/// What `luamilter generate` writes.
#[derive(Subcommand, Debug)]
pub enum GenerateCommand {
    /// Write the manual pages into DIR: luamilter.1, one luamilter-COMMAND.1 per subcommand
    /// (luamilter-db-bans.1 for `luamilter db bans`...), and luamilter.toml.5.
    Man {
        /// Directory to write into (created if missing).
        dir: PathBuf,
    },
    /// Write shell completions into DIR: luamilter.bash, _luamilter (zsh), luamilter.fish.
    Completions {
        /// Directory to write into (created if missing).
        dir: PathBuf,
    },
}

/// Runs `luamilter generate`; prints each file written.
pub fn generate(command: GenerateCommand) -> ExitCode {
    let result = match command {
        GenerateCommand::Man { dir } => write_manuals(&dir),
        GenerateCommand::Completions { dir } => write_completions(&dir),
    };
    match result {
        Ok(files) => {
            for file in files {
                println!("{}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("luamilter generate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn create_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())))
}

/// Writes every page into `dir`; returns their paths.
pub fn write_manuals(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    create_dir(dir)?;
    let mut root = crate::cli::Cli::command();
    root.build();
    let mut written = Vec::new();
    write_command_pages(dir, &root, &[], &mut written)?;
    let config_page = dir.join("luamilter.toml.5");
    std::fs::write(&config_page, config_manual(EXAMPLE_CONFIG))?;
    written.push(config_page);
    Ok(written)
}

/// Writes the page of `cmd` (reached through `path` from the root) and of its subcommands.
fn write_command_pages(
    dir: &Path,
    cmd: &clap::Command,
    path: &[&str],
    written: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let mut names = vec!["luamilter"];
    names.extend_from_slice(path);
    let page = cmd.clone().name(names.join("-")).bin_name(names.join(" "));
    let file = dir.join(format!("{}.1", names.join("-")));
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .manual("luamilter manual")
        .render(&mut out)?;
    std::fs::write(&file, out)?;
    written.push(file);
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let mut sub_path = path.to_vec();
        sub_path.push(sub.get_name());
        write_command_pages(dir, sub, &sub_path, written)?;
    }
    Ok(())
}

/// Writes bash, zsh and fish completions into `dir`; returns their paths.
pub fn write_completions(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    create_dir(dir)?;
    let mut cmd = crate::cli::Cli::command();
    [Shell::Bash, Shell::Zsh, Shell::Fish]
        .into_iter()
        .map(|shell| clap_complete::generate_to(shell, &mut cmd, "luamilter", dir))
        .collect()
}

/// The annotated example configuration: every key with its default and a comment.
const EXAMPLE_CONFIG: &str = include_str!("../examples/luamilter.toml");

/// One piece of the example configuration, as the page shows it.
enum Piece<'a> {
    /// Comment prose.
    Prose(&'a str),
    /// A blank comment line: a paragraph break.
    Break,
    /// A blank line: ends the comment above it.
    Blank,
    /// A comment line indented by more than one space, or a commented example table: shown as
    /// written.
    Verbatim(&'a str),
    /// `[section]`.
    Section(&'a str),
    /// `key = value`, also when commented out (a key without a default).
    Key(&'a str),
}

/// Is `text` a `key = value` line?
fn is_key_line(text: &str) -> bool {
    text.split_once(" = ").is_some_and(|(key, _)| {
        !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

fn pieces(config: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut in_example = false;
    for line in config.lines() {
        let Some(comment) = line.strip_prefix('#') else {
            in_example = false;
            if line.starts_with('[') {
                out.push(Piece::Section(line));
            } else if line.trim().is_empty() {
                out.push(Piece::Blank);
            } else {
                out.push(Piece::Key(line));
            }
            continue;
        };
        let text = comment.strip_prefix(' ').unwrap_or(comment);
        if text.starts_with('[') && text.ends_with(']') {
            in_example = true;
        }
        out.push(if in_example || text.starts_with(' ') {
            Piece::Verbatim(text)
        } else if text.is_empty() {
            Piece::Break
        } else if is_key_line(text) {
            Piece::Key(text)
        } else {
            Piece::Prose(text)
        });
    }
    out
}

/// luamilter.toml(5), in roff, from the annotated example configuration: its opening comment is
/// the description, each table a section, each key a tagged paragraph with the comment above
/// it.
pub fn config_manual(config: &str) -> String {
    let mut page = Roff::new();
    page.control("TH", ["LUAMILTER.TOML", "5"])
        .control("SH", ["NAME"])
        .text([roman(
            "luamilter.toml - configuration file of luamilter, a milter whose policies are Lua scripts",
        )])
        .control("SH", ["SYNOPSIS"])
        .text([bold("/etc/luamilter/luamilter.toml")])
        .control("SH", ["DESCRIPTION"]);
    let mut prose: Vec<&str> = Vec::new();
    let mut verbatim = false;
    // After a blank line, prose starts a paragraph of its own (not the last key's).
    let mut after_blank = false;
    let flush = |page: &mut Roff, prose: &mut Vec<&str>| {
        if !prose.is_empty() {
            page.text([roman(prose.join(" "))]);
            prose.clear();
        }
    };
    for piece in pieces(config) {
        if verbatim && !matches!(piece, Piece::Verbatim(_)) {
            page.control("fi", []);
            verbatim = false;
        }
        let blank = matches!(piece, Piece::Blank);
        match piece {
            Piece::Prose(text) => {
                if after_blank {
                    page.control("PP", []);
                }
                prose.push(text);
            }
            Piece::Break => {
                flush(&mut page, &mut prose);
                page.control("PP", []);
            }
            Piece::Blank => flush(&mut page, &mut prose),
            Piece::Verbatim(text) => {
                flush(&mut page, &mut prose);
                if !verbatim {
                    page.control("nf", []);
                    verbatim = true;
                }
                page.text([roman(text)]);
            }
            Piece::Section(name) => {
                // A comment right above a table introduces it.
                let mut intro = std::mem::take(&mut prose);
                page.control("SH", [name]);
                flush(&mut page, &mut intro);
            }
            Piece::Key(line) => {
                page.control("TP", []).text([bold(line)]);
                flush(&mut page, &mut prose);
            }
        }
        after_blank = blank;
    }
    if verbatim {
        page.control("fi", []);
    }
    flush(&mut page, &mut prose);
    page.control("SH", ["SEE ALSO"])
        .text([roman("luamilter(1), luamilter-check(1), luamilter-run(1)")]);
    page.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sections_and_examples_are_told_apart() {
        let config = "# Intro.\n#\n# More.\n\n[milter]\n# The socket.\nlisten = \"x\"\n\
                      # An optional key.\n# receiver = \"mx\"\n# A table:\n#   \"a\" one\n\
                      # [policy.x]\n# key = 1\n[policy.trivial]\nvalue = 1\n";
        let page = config_manual(config);
        assert!(
            page.contains("Intro.\n.PP\nMore.\n.SH [milter]\n"),
            "{page}"
        );
        assert!(
            page.contains(".TP\n\\fBlisten = \"x\"\\fR\nThe socket.\n"),
            "{page}"
        );
        assert!(
            page.contains("\\fBreceiver = \"mx\"\\fR\nAn optional key.\n"),
            "{page}"
        );
        assert!(page.contains(".nf\n  \"a\" one\n"), "{page}");
        assert!(page.contains("[policy.x]\nkey = 1\n.fi\n"), "{page}");
    }
}
