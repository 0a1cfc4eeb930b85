//! Every fenced code block of README.md and docs/**/*.md runs as written.
//!
//! **Lua blocks** (```` ```lua ````) are run through a real daemon (a [`TestDaemon`] on a
//! loopback socket, its policy loaded by the real loader) and driven by a real milter client for
//! at least one message: connect, HELO, MAIL, RCPT, DATA, headers, end of headers, body and end
//! of message, each as negotiated (a stage the daemon asked the MTA to skip is not sent). A run
//! fails when the daemon refuses the policy, when the conversation breaks, when a handler faults,
//! or when an expectation of the block's annotation does not hold. To report a fault with its
//! error, the test wraps the handlers: a Lua error comes back as the reply
//! `451 4.3.0 doc example fault: ERROR` (faults the wrapper cannot catch, the time limit and a
//! bad return value, show up as the exception policy's reply, which fails the run too). DNS comes from the test DNS server
//! ([`TestDns`], zones in `tests/fixtures/zones/`), the store is the default SQLite file in the
//! daemon's temp dir. A block is one of:
//!
//! - **policy**: a line at column 0 starts with `return {`. It is the policy file, as written;
//!   its name comes from a `name = "…"` declaration, else from a `NAME.lua` mentioned in its
//!   first line or in the text line just above the block, else `example_LINE`.
//! - **entries**: a line at column 0 starts with a handler or declaration key (`mail =`,
//!   `options =`, …). The lines before the first such line go to the policy's top level, the
//!   rest into the returned table.
//! - **statements**: any other block that compiles as a Lua chunk. It becomes the body of a
//!   handler for the page's default stage (`mail`; `eom` in docs/lua-api/ctx.md), with the
//!   stage's usual parameters (`ctx, sender, args, opts` at mail, `ctx, name, opts` at helo, …).
//! - **expression**: a block that compiles only as an expression; it runs as `local _ = (…)` in
//!   such a handler.
//!
//! Generated policies (entries, statements, expressions) start with the usual module locals
//! (`milter`, `dns`, `spf`, `net`, `store`, `mime`, `site`, `access`; plus `domain_ban` on the
//! pages of docs/policies/ that use it). Every Lua block runs with strict globals: reading a
//! global that does not exist, or assigning one, is an error (so a fragment that uses a name it
//! was not given fails instead of reading `nil`). A block that is none of the above (pseudo-code,
//! a signature, an error message) belongs in a ```` ```text ```` fence.
//!
//! **TOML blocks** (```` ```toml ````) are loaded by `luamilter check --config`, the command
//! admins run, in a temp dir. A fragment without `[policies]` gets a chain of the policies its
//! `[policy.NAME]` tables configure; every block gets the test DNS server when it has no `[dns]`
//! (nothing reaches the internet). A policy in the chain that is not in the stock pack is the
//! page's Lua block of that name, else the nearest Lua block above the TOML block. Absolute paths
//! in the block (`"/etc/luamilter/access"`) are re-rooted under the temp dir, and the files it
//! names are written there as fixtures: `access_file`, `domain_files` items, `"file:NAME"` list
//! items (empty unless an annotation gives the content).
//!
//! Other fences are not run, but README.md's first block must keep its two commands.
//!
//! **Annotations.** An HTML comment on the lines just above a fence gives a block what it needs:
//!
//! ```text
//! <!-- example: stage=helo expect=helo:reject reply="is forged" helo=helo.spf.test -->
//! ```
//!
//! `key=value` pairs, a value bare or in double quotes (`\n`, `\"`, `\\` escapes). Each comment is
//! one message sent to the daemon (several comments: several messages, each on a new
//! connection, in order); the block keys of all the comments apply to all of them.
//!
//! Block keys: `kind=policy|entries|statements|expression` (override the detection),
//! `stage=STAGE` (the handler a fragment runs in), `name=NAME` (the policy's name), `given=LUA`
//! (top-level code before the fragment: names the fragment assumes), `with=ENTRIES` (more
//! entries of the generated policy table, e.g. a handler that sets up `ctx.msg`),
//! `options=FIELDS` (the generated policy's `options = { FIELDS }`), `chain="dnsbl @"` (the chain,
//! `@` being the block; default: the block alone), `config=TOML` (more daemon configuration),
//! `file="NAME=CONTENT"` (a fixture file in the temp dir; repeatable).
//!
//! Message keys: `hostname=`, `ip=` (connect; default `mail.example.test`, `192.0.2.25`),
//! `helo=` (`mail.example.test`), `sender=` (`user@example.test`, SPF pass from the default
//! client), `args="SIZE=1000 BODY=8BITMIME"` (MAIL parameters), `rcpt=` (repeatable; default
//! `friend@example.org`), `header="Name: value"` (repeatable, added to the default From, To,
//! Subject: Hello, Message-ID, Date), `body=`, `macro="STAGE {name}=value"` (repeatable, sent
//! before STAGE). Expectations: `expect=[STAGE:]VERDICT` (the first answer that is not
//! "continue", or `eom:continue` when the message went through; VERDICT is `continue`,
//! `accept`, `reject`, `tempfail` or `discard`), `reply=TEXT` (that answer's reply contains
//! TEXT), `edit=TEXT` (repeatable: an end-of-message edit contains TEXT, edits written as
//! `add_header Name: value`, `insert_header 0 Name: value`, `change_header Name[1]: value`,
//! `delete_header Name[1]`, `add_rcpt <a>`, `delete_rcpt <a>`, `change_sender <a>`,
//! `replace_body text`, `quarantine reason`, `progress`).
//!
//! Every failure names `FILE.md:LINE` of its block (and the page line of a Lua error when it
//! has one); all of them are reported together. `DOC_EXAMPLES_SHOW=1 cargo test --test it
//! doc_examples -- --nocapture` prints what every block's messages got and each TOML config.

use crate::{dns_server::TestDns, support::TestDaemon};
use indymilter::MacroStage;
use indymilter_test::{EomAction, EomActions, Status};
use luamilter::{engine::policy::DECLARATION_KEYS, stage::Stage};
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// Pages and blocks

/// A markdown page: its path relative to the repository, and its text.
struct Page {
    path: String,
    text: String,
}

/// README.md and every docs/**/*.md, in path order.
fn pages() -> Vec<Page> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut paths = vec![root.join("README.md")];
    let mut dirs = vec![root.join("docs")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                paths.push(path);
            }
        }
    }
    paths.sort();
    paths
        .into_iter()
        .map(|p| Page {
            text: std::fs::read_to_string(&p).unwrap(),
            path: p.strip_prefix(root).unwrap().display().to_string(),
        })
        .collect()
}

/// A fenced code block.
struct Block {
    page: String,
    /// Line of the opening fence (1-based).
    line: usize,
    lang: String,
    text: String,
    /// The annotations just above it, one per message.
    notes: Vec<Note>,
    /// The last text line above the block (and its annotations).
    lead: String,
}

impl Block {
    fn at(&self) -> String {
        format!("{}:{}", self.page, self.line)
    }
}

type Note = Vec<(String, String)>;

/// Splits a page into its fenced blocks; annotation mistakes are failures.
fn blocks(page: &Page, failures: &mut Vec<String>) -> Vec<Block> {
    let mut out = Vec::new();
    let mut notes: Vec<(usize, Note)> = Vec::new();
    let mut lead = String::new();
    let lines: Vec<&str> = page.text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if let Some(rest) = trimmed.strip_prefix("<!-- example:") {
            match rest.trim_end().strip_suffix("-->") {
                Some(body) => match parse_note(body) {
                    Ok(note) => notes.push((i + 1, note)),
                    Err(e) => failures.push(format!("{}:{}: annotation: {e}", page.path, i + 1)),
                },
                None => failures.push(format!(
                    "{}:{}: annotation: an annotation is one line ending in -->",
                    page.path,
                    i + 1
                )),
            }
            i += 1;
            continue;
        }
        let fence: String = trimmed
            .chars()
            .take_while(|&c| c == '`' || c == '~')
            .collect();
        let info = &trimmed[fence.len()..];
        // CommonMark: one fence character, at least three, and no backtick in the info string
        // of a backtick fence (``` ```lua ``` in a sentence is inline code).
        if fence.len() >= 3
            && fence.chars().all(|c| c == fence.chars().next().unwrap())
            && !(fence.starts_with('`') && info.contains('`'))
        {
            let lang = info.split_whitespace().next().unwrap_or("").to_string();
            let start = i;
            let mut body = Vec::new();
            i += 1;
            while i < lines.len() {
                let l = lines[i];
                let t = l.trim_start();
                if t.starts_with(&fence) && t[fence.len()..].trim().is_empty() {
                    break;
                }
                let strip = l.len() - t.len();
                body.push(if strip >= indent { &l[indent..] } else { t });
                i += 1;
            }
            let mut text = body.join("\n");
            text.push('\n');
            out.push(Block {
                page: page.path.clone(),
                line: start + 1,
                lang,
                text,
                notes: notes.drain(..).map(|(_, n)| n).collect(),
                lead: std::mem::take(&mut lead),
            });
            i += 1;
            continue;
        }
        if !trimmed.is_empty() {
            for (at, _) in notes.drain(..) {
                failures.push(format!(
                    "{}:{at}: annotation: not followed by a code block",
                    page.path
                ));
            }
            lead = line.to_string();
        }
        i += 1;
    }
    for (at, _) in notes {
        failures.push(format!(
            "{}:{at}: annotation: not followed by a code block",
            page.path
        ));
    }
    out
}

/// Parses `key=value key="quoted value" …`.
fn parse_note(text: &str) -> Result<Note, String> {
    let mut pairs = Vec::new();
    let mut chars = text.trim().chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let key: String =
            std::iter::from_fn(|| chars.next_if(|c| *c != '=' && !c.is_whitespace())).collect();
        if chars.next() != Some('=') {
            return Err(format!("expected key=value, got {key:?}"));
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(format!("unterminated quote in the value of {key}")),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some('n') => value.push('\n'),
                        Some('r') => value.push('\r'),
                        Some('t') => value.push('\t'),
                        Some(c) => value.push(c),
                        None => return Err(format!("unterminated quote in the value of {key}")),
                    },
                    Some(c) => value.push(c),
                }
            }
        } else {
            value = std::iter::from_fn(|| chars.next_if(|c| !c.is_whitespace())).collect();
        }
        pairs.push((key, value));
    }
}

// ---------------------------------------------------------------------------------------------
// Annotations

const BLOCK_KEYS: &[&str] = &[
    "kind", "stage", "name", "given", "with", "options", "chain", "config", "file",
];
const MESSAGE_KEYS: &[&str] = &[
    "hostname", "ip", "helo", "sender", "args", "rcpt", "header", "body", "macro", "expect",
    "reply", "edit",
];
/// Whether `name` is a milter stage name.
fn is_stage(name: &str) -> bool {
    Stage::from_name(name).is_some()
}
const VERDICTS: &[&str] = &["continue", "accept", "reject", "tempfail", "discard"];

/// What a block needs, merged from all its annotations.
#[derive(Default)]
struct Setup {
    kind: Option<String>,
    stage: Option<String>,
    name: Option<String>,
    given: Option<String>,
    with: Option<String>,
    options: Option<String>,
    chain: Option<String>,
    config: Option<String>,
    files: Vec<(String, String)>,
}

/// One message of a run.
#[derive(Clone, Debug)]
struct Message {
    hostname: String,
    ip: String,
    helo: String,
    sender: String,
    args: Vec<String>,
    rcpts: Vec<String>,
    headers: Vec<(String, String)>,
    body: String,
    macros: Vec<(String, String, String)>,
    expect: Option<(Option<String>, String)>,
    reply: Option<String>,
    edits: Vec<String>,
}

impl Default for Message {
    fn default() -> Self {
        Message {
            hostname: "mail.example.test".into(),
            ip: "192.0.2.25".into(),
            helo: "mail.example.test".into(),
            sender: "user@example.test".into(),
            args: Vec::new(),
            rcpts: Vec::new(),
            headers: vec![
                ("From".into(), "User <user@example.test>".into()),
                ("To".into(), "<friend@example.org>".into()),
                ("Subject".into(), "Hello".into()),
                ("Message-ID".into(), "<1@mail.example.test>".into()),
                ("Date".into(), "Mon, 1 Jun 2026 12:00:00 +0000".into()),
            ],
            body: "Hello.\r\n".into(),
            macros: Vec::new(),
            expect: None,
            reply: None,
            edits: Vec::new(),
        }
    }
}

/// Reads a block's annotations: its setup and its messages (at least one).
fn read_notes(block: &Block, lua: bool) -> Result<(Setup, Vec<Message>), String> {
    let mut setup = Setup::default();
    let mut messages = Vec::new();
    for note in &block.notes {
        let mut m = Message::default();
        for (key, value) in note {
            let key = key.as_str();
            if !BLOCK_KEYS.contains(&key) && !MESSAGE_KEYS.contains(&key) {
                return Err(format!("annotation: unknown key {key:?}"));
            }
            if !lua && !matches!(key, "file" | "config") {
                return Err(format!(
                    "annotation: {key:?} does not apply to a {} block",
                    block.lang
                ));
            }
            let once = |slot: &mut Option<String>| match slot {
                Some(old) if old != value => Err(format!(
                    "annotation: {key} is given twice ({old:?}, {value:?})"
                )),
                _ => {
                    *slot = Some(value.clone());
                    Ok(())
                }
            };
            match key {
                "kind" => {
                    if !["policy", "entries", "statements", "expression"].contains(&value.as_str())
                    {
                        return Err(format!("annotation: unknown kind {value:?}"));
                    }
                    once(&mut setup.kind)?
                }
                "stage" => {
                    if !is_stage(value) {
                        return Err(format!("annotation: unknown stage {value:?}"));
                    }
                    once(&mut setup.stage)?
                }
                "name" => once(&mut setup.name)?,
                "given" => once(&mut setup.given)?,
                "with" => once(&mut setup.with)?,
                "options" => once(&mut setup.options)?,
                "chain" => once(&mut setup.chain)?,
                "config" => once(&mut setup.config)?,
                "file" => {
                    let (name, content) = value
                        .split_once('=')
                        .ok_or("annotation: file is NAME=CONTENT")?;
                    setup.files.push((name.into(), content.into()));
                }
                "hostname" => m.hostname = value.clone(),
                "ip" => m.ip = value.clone(),
                "helo" => m.helo = value.clone(),
                "sender" => m.sender = value.clone(),
                "args" => m.args = value.split_whitespace().map(String::from).collect(),
                "rcpt" => m.rcpts.push(value.clone()),
                "header" => {
                    let (n, v) = value
                        .split_once(':')
                        .ok_or("annotation: header is \"Name: value\"")?;
                    m.headers.push((n.trim().into(), v.trim_start().into()));
                }
                "body" => m.body = value.clone(),
                "macro" => {
                    let (stage, def) = value
                        .split_once(' ')
                        .ok_or("annotation: macro is \"STAGE {name}=value\"")?;
                    let (name, v) = def
                        .split_once('=')
                        .ok_or("annotation: macro is \"STAGE {name}=value\"")?;
                    macro_stage(stage)?;
                    m.macros.push((stage.into(), name.into(), v.into()));
                }
                "expect" => {
                    let (stage, verdict) = match value.split_once(':') {
                        Some((s, v)) => (Some(s.to_string()), v.to_string()),
                        None => (None, value.clone()),
                    };
                    if stage.as_deref().is_some_and(|s| !is_stage(s))
                        || !VERDICTS.contains(&verdict.as_str())
                    {
                        return Err(format!(
                            "annotation: expect is [STAGE:]VERDICT with VERDICT one of {}, got {value:?}",
                            VERDICTS.join(", ")
                        ));
                    }
                    m.expect = Some((stage, verdict));
                }
                "reply" => m.reply = Some(value.clone()),
                "edit" => m.edits.push(value.clone()),
                _ => unreachable!(),
            }
        }
        messages.push(m);
    }
    if messages.is_empty() {
        messages.push(Message::default());
    }
    for m in &mut messages {
        if m.rcpts.is_empty() {
            m.rcpts.push("friend@example.org".into());
        }
    }
    Ok((setup, messages))
}

fn macro_stage(name: &str) -> Result<MacroStage, String> {
    Ok(match name {
        "connect" => MacroStage::Connect,
        "helo" => MacroStage::Helo,
        "mail" => MacroStage::Mail,
        "rcpt" => MacroStage::Rcpt,
        "data" => MacroStage::Data,
        "eoh" => MacroStage::Eoh,
        "eom" => MacroStage::Eom,
        other => return Err(format!("annotation: no macros are sent at stage {other:?}")),
    })
}

// ---------------------------------------------------------------------------------------------
// Lua blocks: the policy each one becomes

/// How a Lua block is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Policy,
    Entries,
    Statements,
    Expression,
}

/// The module locals of generated policies, on one line.
const PREAMBLE: &str = "local milter = require \"milter\"; local dns = require \"milter.dns\"; \
local spf = require \"milter.spf\"; local net = require \"milter.net\"; \
local store = require \"milter.store\"; local mime = require \"milter.mime\"; \
local site = require \"milter.site\"; local access = require \"milter.access\"";

/// Strict globals: what follows it in a chunk can read only globals that exist and assign none.
const STRICT: &str = "local _ENV = setmetatable({}, { __index = function(_, k) local v = _G[k]; \
if v == nil then error(\"undefined variable '\" .. tostring(k) .. \"'\", 2) end; return v end, \
__newindex = function(_, k) error(\"assignment to undefined global '\" .. tostring(k) .. \
\"' (make it local)\", 2) end });";

/// Wraps the handlers of a policy table so that an error in one comes back to the client as the
/// reply `451 4.3.0 doc example fault: ERROR` (the engine would log it and answer with the
/// exception policy, which the client cannot tell apart). The time limit still reaches the
/// engine (the sandbox's `xpcall` passes it on), and a bad return value is still the engine's.
/// It does not spell the word `header`, which would make the daemon collect headers.
const WRAP: &str = "local __doc_wrap = (function(milter, xpcall, pairs, type, tostring, pack, unpack, concat) \
local stages = { connect = 1, helo = 1, mail = 1, rcpt = 1, data = 1, [\"head\" .. \"er\"] = 1, \
eoh = 1, body = 1, eom = 1, abort = 1, close = 1, unknown = 1 } \
return function(t) if type(t) ~= \"table\" then return t end \
for k, f in pairs(t) do if stages[k] and type(f) == \"function\" then \
t[k] = function(...) local r = pack(xpcall(f, tostring, ...)) \
if r[1] then return unpack(r, 2, r.n) end \
local lines = {} for l in (\"doc example fault: \" .. r[2]):gmatch(\"[^\\r\\n]+\") do \
if #lines < 20 then lines[#lines + 1] = l:gsub(\"\\t\", \" \"):sub(1, 900) end end \
return milter.tempfail{ code = 451, xcode = \"4.3.0\", text = lines } end end end \
return t end end)(require \"milter\", xpcall, pairs, type, tostring, table.pack, table.unpack, table.concat);";

/// The stage fragments of a page run in, and the extra module locals they assume.
fn page_defaults(page: &str) -> (&'static str, &'static str) {
    match page {
        "docs/lua-api/ctx.md" => ("eom", ""),
        "docs/policies/bans.md" | "docs/policies/lib/domain_ban.md" => {
            ("mail", "; local domain_ban = require \"lib.domain_ban\"")
        }
        _ => ("mail", ""),
    }
}

fn handler_params(stage: &str) -> &'static str {
    match stage {
        "connect" => "ctx, hostname, ip, opts",
        "helo" => "ctx, name, opts",
        "mail" => "ctx, sender, args, opts",
        "rcpt" => "ctx, rcpt, args, opts",
        "header" => "ctx, name, value, opts",
        "body" => "ctx, chunk, opts",
        "unknown" => "ctx, line, opts",
        _ => "ctx, opts",
    }
}

/// The key a line at column 0 assigns, when it is a handler or a declaration (`mail = …`).
fn entry_key(line: &str) -> Option<&str> {
    let end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(line.len());
    let (key, rest) = line.split_at(end);
    let rest = rest.trim_start();
    let assigns = rest.starts_with('=') && !rest.starts_with("==");
    (assigns && (is_stage(key) || DECLARATION_KEYS.contains(&key))).then_some(key)
}

fn compiles(text: &str) -> Result<(), String> {
    mlua::Lua::new()
        .load(text)
        .set_name("=block")
        .into_function()
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn classify(block: &Block, setup: &Setup) -> Result<Kind, String> {
    if let Some(kind) = &setup.kind {
        return Ok(match kind.as_str() {
            "policy" => Kind::Policy,
            "entries" => Kind::Entries,
            "statements" => Kind::Statements,
            _ => Kind::Expression,
        });
    }
    let lines = || block.text.lines();
    if lines().any(|l| l.starts_with("return {") || l.starts_with("return{")) {
        return Ok(Kind::Policy);
    }
    if lines().any(|l| entry_key(l).is_some()) {
        return Ok(Kind::Entries);
    }
    match compiles(&block.text) {
        Ok(()) => Ok(Kind::Statements),
        Err(e) => {
            if compiles(&format!("return (\n{}\n)", block.text)).is_ok() {
                Ok(Kind::Expression)
            } else {
                Err(format!(
                    "a lua block that is neither a policy, table entries, statements nor an \
                     expression (pseudo-code belongs in a text fence): {e}"
                ))
            }
        }
    }
}

/// A policy source, each line with the block line it came from.
#[derive(Default, Clone)]
struct Source {
    lines: Vec<(String, Option<usize>)>,
}

impl Source {
    fn push(&mut self, text: &str) {
        for l in text.lines() {
            self.lines.push((l.to_string(), None));
        }
    }
    fn push_block(&mut self, block: &Block, from: usize, to: usize) {
        for (i, l) in block.text.lines().enumerate().skip(from).take(to - from) {
            self.lines.push((l.to_string(), Some(block.line + 1 + i)));
        }
    }
    fn text(&self) -> String {
        let mut t = String::new();
        for (l, _) in &self.lines {
            t.push_str(l);
            t.push('\n');
        }
        t
    }
    /// Rewrites `…/NAME.lua:N` in an error to the page line it came from.
    fn locate(&self, name: &str, page: &str, error: &str) -> String {
        let needle = format!("{name}.lua:");
        let mut out = String::new();
        let mut rest = error;
        while let Some(pos) = rest.find(&needle) {
            let start = rest[..pos]
                .rfind(|c: char| c.is_whitespace() || c == '"' || c == '(' || c == '=')
                .map_or(0, |p| p + 1);
            let digits_at = pos + needle.len();
            let digits: String = rest[digits_at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            out.push_str(&rest[..start]);
            let mapped = digits
                .parse::<usize>()
                .ok()
                .and_then(|n| self.lines.get(n.wrapping_sub(1)))
                .and_then(|(_, at)| *at);
            match mapped {
                Some(at) => write!(out, "{page}:{at}").unwrap(),
                None => write!(out, "{name}.lua (generated) line {digits}").unwrap(),
            }
            rest = &rest[digits_at + digits.len()..];
        }
        out.push_str(rest);
        out
    }
}

/// Shortens an error raised by a Rust function (its message, then a Lua stack traceback) to
/// `PAGE:LINE: message`, the line being the traceback's first on the page.
fn tidy(error: &str, page: &str) -> String {
    let Some((head, traceback)) = error.split_once(" stack traceback: ") else {
        return error.to_string();
    };
    let (prefix, message) = match head.find("runtime error: ") {
        Some(at) => (&head[..at], &head[at + "runtime error: ".len()..]),
        None => ("", head),
    };
    let at = traceback.find(&format!("{page}:")).map(|start| {
        let rest = &traceback[start + page.len() + 1..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        format!("{page}:{digits}: ")
    });
    format!("{prefix}{}{message}", at.unwrap_or_default())
}

/// A Lua block made ready to load: its name, and its source as the daemon runs it (strict
/// globals, and the wrapper of a fragment) and as `luamilter check` loads it for TOML blocks.
struct LuaPolicy {
    kind: Kind,
    name: String,
    run: Source,
    plain: String,
}

fn policy_name(block: &Block, setup: &Setup, kind: Kind) -> String {
    if let Some(name) = &setup.name {
        return name.clone();
    }
    if kind == Kind::Policy {
        for line in block.text.lines() {
            let value = line
                .trim_start()
                .strip_prefix("name")
                .and_then(|rest| rest.trim_start().strip_prefix('='))
                .and_then(|rest| rest.trim().strip_prefix('"'));
            if let Some(value) = value
                && let Some(end) = value.find('"')
            {
                return value[..end].to_string();
            }
        }
    }
    let first = block
        .text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    for text in [first, block.lead.as_str()] {
        if let Some(end) = text.find(".lua") {
            let start = text[..end]
                .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                .map_or(0, |p| p + 1);
            if start < end {
                return text[start..end].to_string();
            }
        }
    }
    format!("example_{}", block.line)
}

fn lua_policy(block: &Block, setup: &Setup) -> Result<LuaPolicy, String> {
    let kind = classify(block, setup)?;
    let name = policy_name(block, setup, kind);
    let count = block.text.lines().count();
    let (default_stage, extra_modules) = page_defaults(&block.page);
    let mut src = Source::default();
    if kind == Kind::Policy {
        for (i, l) in block.text.lines().enumerate() {
            let text = if i == 0 {
                format!("{WRAP} {STRICT} return __doc_wrap((function(...) {l}")
            } else {
                l.to_string()
            };
            src.lines.push((text, Some(block.line + 1 + i)));
        }
        src.push("end)(...))");
        return Ok(LuaPolicy {
            kind,
            name,
            run: src,
            plain: block.text.clone(),
        });
    }
    src.push(&format!("{PREAMBLE}{extra_modules}"));
    src.push(WRAP);
    src.push(STRICT);
    if let Some(given) = &setup.given {
        src.push(given);
    }
    let table_head = |src: &mut Source| {
        src.push("return __doc_wrap({");
        if let Some(options) = &setup.options {
            src.push(&format!("options = {{ {options} }},"));
        }
        if let Some(with) = &setup.with {
            src.push(with);
        }
    };
    match kind {
        Kind::Entries => {
            let first = block
                .text
                .lines()
                .position(|l| entry_key(l).is_some())
                .unwrap_or(0);
            src.push_block(block, 0, first);
            table_head(&mut src);
            src.push_block(block, first, count);
            src.push("})");
        }
        Kind::Statements | Kind::Expression => {
            let stage = setup.stage.as_deref().unwrap_or(default_stage);
            table_head(&mut src);
            src.push(&format!("{stage} = function({})", handler_params(stage)));
            if kind == Kind::Expression {
                src.push("local _ = (");
            }
            src.push_block(block, 0, count);
            if kind == Kind::Expression {
                src.push(")");
            }
            src.push("end,");
            src.push("})");
        }
        Kind::Policy => unreachable!(),
    }
    let plain = src.text();
    Ok(LuaPolicy {
        kind,
        name,
        run: src,
        plain,
    })
}

// ---------------------------------------------------------------------------------------------
// Lua blocks: running them

/// How many Lua blocks of each kind ran, and how many messages.
#[derive(Default, Debug)]
struct Counts {
    policies: usize,
    entries: usize,
    statements: usize,
    expressions: usize,
    messages: usize,
    toml: usize,
    ignored: usize,
}

/// The daemon configuration of a Lua block's run.
fn daemon_config(dir: &Path, chain: &[String], dns: &TestDns, extra: &str) -> String {
    let chain: Vec<String> = chain.iter().map(|n| format!("{n:?}")).collect();
    let mut text = format!(
        "[milter]\nlisten = \"inet:0@127.0.0.1\"\ncontrol_socket = {:?}\n\
         [policies]\ndirs = [\".\"]\nchain = [{}]\n\
         [dns]\nnameservers = [\"{}\"]\ntimeout = \"2s\"\nattempts = 1\n",
        dir.join("ctl.sock"),
        chain.join(", "),
        dns.addr
    );
    if !extra.contains("[engine]") {
        text.push_str("[engine]\nvms = 1\nworker_threads = 1\n");
    }
    text.push_str(extra);
    text.push('\n');
    text
}

/// Runs one Lua block: loads it into a daemon and sends its messages.
async fn run_lua(block: &Block, dns: &TestDns, counts: &mut Counts) -> Result<(), String> {
    let (setup, messages) = read_notes(block, true)?;
    let policy = lua_policy(block, &setup)?;
    match policy.kind {
        Kind::Policy => counts.policies += 1,
        Kind::Entries => counts.entries += 1,
        Kind::Statements => counts.statements += 1,
        Kind::Expression => counts.expressions += 1,
    }
    let dir = TempDir::new().unwrap();
    for (name, content) in &setup.files {
        std::fs::write(dir.path().join(name), content).unwrap();
    }
    std::fs::write(
        dir.path().join(format!("{}.lua", policy.name)),
        policy.run.text(),
    )
    .unwrap();
    let chain: Vec<String> = match &setup.chain {
        Some(chain) => chain
            .split([' ', ','])
            .filter(|s| !s.is_empty())
            .map(|s| {
                if s == "@" {
                    policy.name.clone()
                } else {
                    s.to_string()
                }
            })
            .collect(),
        None => vec![policy.name.clone()],
    };
    let config = daemon_config(
        dir.path(),
        &chain,
        dns,
        setup.config.as_deref().unwrap_or(""),
    );
    let path = dir.path().join("luamilter.toml");
    std::fs::write(&path, config).unwrap();
    let locate = |e: &str| {
        tidy(
            &policy.run.locate(&policy.name, &block.page, e),
            &block.page,
        )
    };
    let daemon = TestDaemon::start_config(dir, &path)
        .await
        .map_err(|e| format!("the daemon refused the policy: {}", locate(&e)))?;
    let mut result = Ok(());
    for (n, m) in messages.iter().enumerate() {
        counts.messages += 1;
        let outcome = tokio::time::timeout(Duration::from_secs(30), converse(&daemon, m))
            .await
            .unwrap_or_else(|_| Err("the conversation took more than 30 s".into()))
            .and_then(|t| {
                if show() {
                    eprintln!(
                        "{} ({:?} {}): {}",
                        block.at(),
                        policy.kind,
                        policy.name,
                        t.show()
                    );
                }
                t.check(m)
            });
        if let Err(e) = outcome {
            result = Err(format!("message {}: {}", n + 1, locate(&e)));
            break;
        }
    }
    daemon.stop().await;
    result
}

/// Whether to print what every block does (`DOC_EXAMPLES_SHOW=1`).
fn show() -> bool {
    std::env::var_os("DOC_EXAMPLES_SHOW").is_some()
}

/// What the daemon answered to one message.
struct Transcript {
    answers: Vec<(&'static str, Status)>,
    edits: Vec<String>,
}

/// Whether an answer ends the message (a refused recipient does not).
fn ends_message(stage: &str, status: &Status) -> bool {
    match status {
        Status::Continue | Status::Noreply | Status::Skip => false,
        Status::Reject { .. } | Status::Tempfail { .. } => stage != "rcpt",
        Status::Accept | Status::Discard => true,
    }
}

fn verdict_word(status: &Status) -> &'static str {
    match status {
        Status::Accept => "accept",
        Status::Discard => "discard",
        Status::Reject { .. } => "reject",
        Status::Tempfail { .. } => "tempfail",
        _ => "continue",
    }
}

fn reply_of(status: &Status) -> String {
    match status {
        Status::Reject { message: Some(m) } | Status::Tempfail { message: Some(m) } => {
            m.to_string_lossy().into_owned()
        }
        _ => String::new(),
    }
}

fn describe_edit(action: &EomAction) -> String {
    let s = |c: &std::ffi::CStr| c.to_string_lossy().into_owned();
    let args = |a: &Option<std::ffi::CString>| {
        a.as_deref()
            .map(|a| format!(" {}", a.to_string_lossy()))
            .unwrap_or_default()
    };
    match action {
        EomAction::AddHeader { name, value } => format!("add_header {}: {}", s(name), s(value)),
        EomAction::InsertHeader { index, name, value } => {
            format!("insert_header {index} {}: {}", s(name), s(value))
        }
        EomAction::ChangeHeader { name, index, value } => {
            format!("change_header {}[{index}]: {}", s(name), s(value))
        }
        EomAction::DeleteHeader { name, index } => format!("delete_header {}[{index}]", s(name)),
        EomAction::ChangeSender { mail, args: a } => {
            format!("change_sender {}{}", s(mail), args(a))
        }
        EomAction::AddRecipient { rcpt, args: a } => format!("add_rcpt {}{}", s(rcpt), args(a)),
        EomAction::DeleteRecipient { rcpt } => format!("delete_rcpt {}", s(rcpt)),
        EomAction::ReplaceBody { chunk } => {
            format!("replace_body {}", String::from_utf8_lossy(chunk))
        }
        EomAction::Progress => "progress".into(),
        EomAction::Quarantine { reason } => format!("quarantine {}", s(reason)),
    }
}

impl Transcript {
    fn show(&self) -> String {
        let answers: Vec<String> = self
            .answers
            .iter()
            .map(|(stage, status)| match (status, reply_of(status)) {
                // The client sends no stage the daemon asked it to skip.
                (Status::Skip, _) => format!("{stage}: not sent"),
                (Status::Noreply, _) => format!("{stage}: no reply"),
                (_, r) if r.is_empty() => format!("{stage}: {}", verdict_word(status)),
                (_, r) => format!("{stage}: {} {r:?}", verdict_word(status)),
            })
            .collect();
        format!("answers [{}], edits {:?}", answers.join(", "), self.edits)
    }

    /// The first answer that is not "continue", or the end of message.
    fn decision(&self) -> (&'static str, &Status) {
        self.answers
            .iter()
            .find(|(_, s)| !matches!(s, Status::Continue | Status::Noreply | Status::Skip))
            .or_else(|| self.answers.last())
            .map(|(stage, s)| (*stage, s))
            .unwrap()
    }

    fn check(&self, m: &Message) -> Result<(), String> {
        if let Some((stage, status)) = self
            .answers
            .iter()
            .find(|(_, s)| reply_of(s).contains("doc example fault: "))
        {
            let reply = reply_of(status);
            let lines: Vec<&str> = reply
                .lines()
                .map(|l| l.get(10..).unwrap_or(l).trim())
                .collect();
            let error = lines.join(" ");
            let error = error.trim_start_matches("doc example fault: ");
            return Err(format!("a handler failed at {stage}: {error}"));
        }
        if let Some((stage, status)) = self.answers.iter().find(|(_, s)| {
            let r = reply_of(s);
            r.contains("Temporary policy failure") || r.contains("5.3.0 Policy failure")
        }) {
            return Err(format!(
                "a handler failed (the exception policy answered at {stage}: {:?}; the \
                 daemon's log has the error); {}",
                reply_of(status),
                self.show()
            ));
        }
        let (stage, status) = self.decision();
        if let Some((want_stage, want)) = &m.expect {
            let stage_ok = want_stage.as_deref().is_none_or(|s| s == stage);
            if !stage_ok || verdict_word(status) != want {
                return Err(format!(
                    "expected {}{want}, got {stage}:{}; {}",
                    want_stage
                        .as_deref()
                        .map(|s| format!("{s}:"))
                        .unwrap_or_default(),
                    verdict_word(status),
                    self.show()
                ));
            }
        }
        if let Some(reply) = &m.reply
            && !reply_of(status).contains(reply.as_str())
        {
            return Err(format!(
                "expected a reply containing {reply:?}; {}",
                self.show()
            ));
        }
        for edit in &m.edits {
            if !self.edits.iter().any(|e| e.contains(edit.as_str())) {
                return Err(format!(
                    "expected an edit containing {edit:?}; {}",
                    self.show()
                ));
            }
        }
        Ok(())
    }
}

/// Sends one message the way an MTA does, stopping where the daemon's answers end it.
async fn converse(daemon: &TestDaemon, m: &Message) -> Result<Transcript, String> {
    let mut c = daemon.client().await;
    let mut t = Transcript {
        answers: Vec::new(),
        edits: Vec::new(),
    };
    let broke = |stage: &str, e: indymilter_test::TestError| {
        format!("the conversation broke at {stage}: {e}")
    };
    macro_rules! step {
        ($stage:literal, $call:expr) => {{
            for (s, name, value) in &m.macros {
                if s == $stage {
                    c.0.macros(macro_stage(s)?, [(name.as_str(), value.as_str())])
                        .await
                        .map_err(|e| broke($stage, e))?;
                }
            }
            let status = $call.await.map_err(|e| broke($stage, e))?;
            let ends = ends_message($stage, &status);
            t.answers.push(($stage, status));
            if ends {
                let _ = c.close().await;
                return Ok(t);
            }
        }};
    }
    let ip: std::net::IpAddr =
        m.ip.parse()
            .map_err(|_| format!("annotation: bad ip {:?}", m.ip))?;
    step!("connect", c.connect(&m.hostname, ip));
    step!("helo", c.helo(&m.helo));
    let mut mail = vec![format!("<{}>", m.sender)];
    mail.extend(m.args.iter().cloned());
    step!("mail", c.mail(mail));
    let mut accepted = 0;
    for rcpt in &m.rcpts {
        step!("rcpt", c.rcpt([format!("<{rcpt}>")]));
        if !matches!(
            t.answers.last().unwrap().1,
            Status::Reject { .. } | Status::Tempfail { .. }
        ) {
            accepted += 1;
        }
    }
    if accepted == 0 {
        let _ = c.close().await;
        return Ok(t);
    }
    step!("data", c.data());
    for (name, value) in &m.headers {
        step!("header", c.header(name, value));
    }
    step!("eoh", c.eoh());
    if !m.body.is_empty() {
        step!("body", c.body(m.body.clone().into_bytes()));
    }
    for (s, name, value) in &m.macros {
        if s == "eom" {
            c.0.macros(MacroStage::Eom, [(name.as_str(), value.as_str())])
                .await
                .map_err(|e| broke("eom", e))?;
        }
    }
    let (actions, status): (EomActions, Status) = c.0.eom().await.map_err(|e| broke("eom", e))?;
    t.edits = actions.actions.iter().map(describe_edit).collect();
    t.answers.push(("eom", status));
    let _ = c.close().await;
    Ok(t)
}

// ---------------------------------------------------------------------------------------------
// TOML blocks

/// Loads a TOML block with `luamilter check`, as an admin would.
async fn check_toml(
    block: &Block,
    lua: &[(usize, String, String)],
    dns: &TestDns,
) -> Result<(), String> {
    let (setup, _) = read_notes(block, false)?;
    let dir = TempDir::new().unwrap();
    let root = dir.path().display().to_string();
    // Absolute paths are re-rooted under the temp dir.
    let text = block
        .text
        .replace("\"/", &format!("\"{root}/"))
        .replace("'/", &format!("'{root}/"));
    let table: toml::Table = toml::from_str(&text).map_err(|e| format!("not valid TOML: {e}"))?;
    let mut config = text.clone();
    let configured: Vec<String> = table
        .get("policy")
        .and_then(|p| p.as_table())
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    let (dirs, chain): (Vec<String>, Vec<String>) = match table.get("policies") {
        None => {
            let chain: Vec<String> = configured.iter().map(|n| format!("{n:?}")).collect();
            write!(
                config,
                "\n[policies]\ndirs = [\".\"]\nchain = [{}]\n",
                chain.join(", ")
            )
            .unwrap();
            (vec![".".into()], configured.clone())
        }
        Some(p) => {
            let strings = |key: &str| -> Vec<String> {
                p.get(key)
                    .and_then(|v| v.as_array())
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let mut dirs = strings("dirs");
            if p.get("dirs").is_none() {
                dirs.push("examples".into());
            }
            (dirs, strings("chain"))
        }
    };
    if !table.contains_key("dns") {
        write!(
            config,
            "\n[dns]\nnameservers = [\"{}\"]\ntimeout = \"2s\"\nattempts = 1\n",
            dns.addr
        )
        .unwrap();
    }
    if let Some(extra) = &setup.config {
        config.push('\n');
        config.push_str(extra);
        config.push('\n');
    }
    let base = dir.path();
    let resolve = |p: &str| -> PathBuf {
        let p = Path::new(p);
        if p.starts_with(base) {
            p.to_path_buf()
        } else if p.is_absolute() {
            // An annotation's absolute path, re-rooted like the block's.
            base.join(p.strip_prefix("/").unwrap())
        } else {
            base.join(p)
        }
    };
    // The policies of the chain that are not stock: the page's Lua blocks.
    let stock: Vec<&str> = luamilter::stock::policy_names().collect();
    let policy_dir = resolve(dirs.first().map_or(".", String::as_str));
    std::fs::create_dir_all(&policy_dir).unwrap();
    for name in chain.iter().filter(|n| !stock.contains(&n.as_str())) {
        let source = lua
            .iter()
            .find(|(_, n, _)| n == name)
            .or_else(|| lua.iter().rev().find(|(line, _, _)| *line < block.line))
            .map(|(_, _, s)| s)
            .ok_or_else(|| {
                format!(
                    "the chain names {name:?}, which is neither stock nor a Lua block of the page"
                )
            })?;
        std::fs::write(policy_dir.join(format!("{name}.lua")), source).unwrap();
    }
    // Fixture files the block names.
    let mut fixtures: Vec<PathBuf> = Vec::new();
    if let Some(access) = table
        .get("site")
        .and_then(|s| s.get("access_file"))
        .and_then(|v| v.as_str())
    {
        fixtures.push(resolve(access));
    }
    fn file_values(value: &toml::Value, key: &str, out: &mut Vec<String>) {
        match value {
            toml::Value::String(s) => {
                if let Some(name) = s.strip_prefix("file:") {
                    out.push(name.to_string());
                } else if key == "domain_files" {
                    out.push(s.clone());
                }
            }
            toml::Value::Array(items) => items.iter().for_each(|v| file_values(v, key, out)),
            toml::Value::Table(t) => t.iter().for_each(|(k, v)| file_values(v, k, out)),
            _ => {}
        }
    }
    let mut names = Vec::new();
    file_values(&toml::Value::Table(table.clone()), "", &mut names);
    fixtures.extend(names.iter().map(|n| resolve(n)));
    for path in fixtures {
        let content = setup
            .files
            .iter()
            .find(|(n, _)| resolve(n) == path)
            .map_or("", |(_, c)| c.as_str());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, content).unwrap();
    }
    for (name, content) in &setup.files {
        let path = resolve(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    let path = base.join("luamilter.toml");
    std::fs::write(&path, &config).unwrap();
    if show() {
        eprintln!("{}: luamilter check on:\n{config}", block.at());
    }
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_luamilter"))
        .args(["check", "--config"])
        .arg(&path)
        .current_dir(base)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .map_err(|_| "luamilter check took more than 60 s".to_string())?
        .map_err(|e| format!("cannot run luamilter check: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<String> = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| l.starts_with("error") || l.contains("error:"))
        .map(|l| l.replace(&format!("{}/luamilter.toml", root), "luamilter.toml"))
        .collect();
    Err(format!(
        "luamilter check failed ({}): {}",
        out.status,
        errors.join(" | ")
    ))
}

// ---------------------------------------------------------------------------------------------
// The whole check

/// Runs every block of `pages`; returns the counts and every failure.
async fn check_pages(pages: &[Page], dns: &TestDns) -> (Counts, Vec<String>) {
    let mut failures = Vec::new();
    let mut counts = Counts::default();
    for page in pages {
        let blocks = blocks(page, &mut failures);
        // Every Lua block as a policy source, for the TOML blocks of the page.
        let mut lua_sources = Vec::new();
        for block in blocks.iter().filter(|b| b.lang == "lua") {
            if let Ok((setup, _)) = read_notes(block, true)
                && let Ok(p) = lua_policy(block, &setup)
            {
                lua_sources.push((block.line, p.name, p.plain));
            }
        }
        for block in &blocks {
            let result = match block.lang.as_str() {
                "lua" => run_lua(block, dns, &mut counts).await,
                "toml" => {
                    counts.toml += 1;
                    check_toml(block, &lua_sources, dns).await
                }
                _ => {
                    counts.ignored += 1;
                    if block.notes.is_empty() {
                        Ok(())
                    } else {
                        Err(format!(
                            "annotation on a {:?} block, which is not run",
                            block.lang
                        ))
                    }
                }
            };
            if let Err(e) = result {
                failures.push(format!("{}: {e}", block.at()));
            }
        }
    }
    (counts, failures)
}

#[tokio::test]
async fn every_code_block_in_the_docs_runs() {
    let dns = TestDns::start().await;
    let pages = pages();
    let (counts, failures) = check_pages(&pages, &dns).await;
    eprintln!("doc examples: {counts:?}");
    assert!(
        failures.is_empty(),
        "{} doc example(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The walk found the documentation (a test that reads nothing passes nothing).
    assert!(
        counts.policies >= 5 && counts.entries + counts.statements >= 40,
        "{counts:?}"
    );
    assert!(counts.toml >= 15, "{counts:?}");
}

#[test]
fn the_readme_starts_with_its_two_commands() {
    let readme = pages().into_iter().next().unwrap();
    assert_eq!(readme.path, "README.md");
    let mut failures = Vec::new();
    let first = blocks(&readme, &mut failures).into_iter().next().unwrap();
    assert_eq!(first.lang, "sh");
    let commands: Vec<&str> = first.text.lines().collect();
    assert_eq!(commands.len(), 2, "{commands:?}");
    assert_eq!(commands[0], "cargo run --release -- run");
    assert!(
        commands[1].starts_with("bash tests/setup.sh && cargo test"),
        "{commands:?}"
    );
}

/// The checker itself: broken examples are found and reported with their page and line.
#[tokio::test]
async fn broken_examples_are_reported_with_their_line() {
    let dns = TestDns::start().await;
    let text = r#"# A page

A fragment calling a method that does not exist:

```lua
ctx:add_heder("X-A", "1")
```

A policy whose verdict is not the one announced:

<!-- example: expect=mail:reject -->
```lua
local milter = require "milter"
return {
  mail = function(ctx, sender) return nil end,
}
```

A fragment reading a name nobody gave it:

```lua
if blacklisted then ctx:demerit(1) end
```

A policy using `milter` without requiring it:

```lua
return {
  mail = function(ctx, sender) return milter.reject "no" end,
}
```

Pseudo-code:

```lua
if a then ... end
```

A config with a typo:

```toml
[site]
hostnme = "mx.example.org"
```

An annotation with a typo:

<!-- example: expcet=mail:reject -->
```lua
local x = 1
```

A fragment that runs (no failure):

<!-- example: edit="add_header X-A: 1" -->
```lua
ctx:add_header("X-A", "1")
```
"#;
    let page = Page {
        path: "docs/broken.md".into(),
        text: text.into(),
    };
    let (_, failures) = check_pages(&[page], &dns).await;
    let report = failures.join("\n");
    for (line, what) in [
        (
            5,
            "docs/broken.md:6: ctx has no field or method 'add_heder'",
        ),
        (12, "expected mail:reject, got eom:continue"),
        (21, "docs/broken.md:22: undefined variable 'blacklisted'"),
        (27, "docs/broken.md:29: undefined variable 'milter'"),
        (35, "pseudo-code belongs in a text fence"),
        (41, "unknown field `hostnme`"),
        (49, "unknown key \"expcet\""),
    ] {
        let at = format!("docs/broken.md:{line}: ");
        assert!(
            failures
                .iter()
                .any(|f| f.starts_with(&at) && f.contains(what)),
            "no failure at {at} with {what:?}:\n{report}"
        );
    }
    assert_eq!(failures.len(), 7, "{report}");
}

#[test]
fn annotations_parse() {
    let note = parse_note(r#"stage=helo expect=helo:reject reply="is \"forged\"\n" x="""#).unwrap();
    assert_eq!(
        note,
        vec![
            ("stage".to_string(), "helo".to_string()),
            ("expect".into(), "helo:reject".into()),
            ("reply".into(), "is \"forged\"\n".into()),
            ("x".into(), String::new()),
        ]
    );
    assert!(parse_note("stage").is_err());
    assert!(parse_note("reply=\"open").is_err());
}

#[test]
fn fences_are_found_as_markdown_has_them() {
    let page = Page {
        path: "docs/fences.md".into(),
        text: "A sentence with ```` ```lua ```` in it.\n\
               ```` ```lua ```` at the start of a line is inline code too.\n\
               \n\
               - a list item:\n\
               \n\
               \x20 ```toml\n\
               \x20 [site]\n\
               \x20 ```\n\
               \n\
               ~~~lua\n\
               local a = 1\n\
               ~~~\n\
               \n\
               ````text\n\
               ```lua\n\
               not a block\n\
               ```\n\
               ````\n\
               <!-- example: expect=eom:continue -->\n\
               ```lua title\n\
               local b = 2\n\
               ```\n"
            .into(),
    };
    let mut failures = Vec::new();
    let found: Vec<(usize, String, String, usize)> = blocks(&page, &mut failures)
        .into_iter()
        .map(|b| (b.line, b.lang, b.text, b.notes.len()))
        .collect();
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(
        found,
        vec![
            (6, "toml".into(), "[site]\n".into(), 0),
            (10, "lua".into(), "local a = 1\n".into(), 0),
            (14, "text".into(), "```lua\nnot a block\n```\n".into(), 0),
            (20, "lua".into(), "local b = 2\n".into(), 1),
        ]
    );
}
