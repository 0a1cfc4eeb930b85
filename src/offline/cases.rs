//! Case files: SMTP conversations with the answers a chain of policies must give, run by
//! `luamilter test --cases DIR` (and by the test suite, on the stock pack's own cases in
//! tests/cases). The format is documented in docs/testing.md; in short:
//!
//! ```text
//! description = "what the file covers"
//! chain = ["helo", "spf"]              # the policies, in order
//! config = '''                         # TOML over the configuration (paths relative to this file)
//! [site]
//! internal_networks = ["192.168.0.0/16"]
//! '''
//! zones = ["zones"]                    # DNS answers: zone files or directories (relative)
//! zone = '''example.com. IN TXT "v=spf1 -all"'''   # and/or inline zone text
//! stores = ["sqlite"]                  # run the whole file once per store ("redis" too)
//! [preload]                            # store entries before the first case
//! whitelist = ["partner.example"]
//!
//! [[case]]                             # one SMTP connection; cases share the store, in order
//! name = "what this case shows"
//! ip = "192.0.2.10"
//! helo = "mail.example.com"
//! mail = "<a@example.com>"
//! rcpt = ["<b@example.org>"]
//! expect.rcpt = ["451 4.7.1 Greylisted*"]
//! ```
//!
//! Every file runs against a fresh milter with a fresh throwaway store (unless told otherwise)
//! and a store clock that stands still unless a case says `advance = "10m"`. DNS answers come
//! only from the zones the file (or `--dns-zone`) names: a case file gives the same answers on
//! any machine, with or without a network.

use super::{
    StoreMode,
    capture::Capture,
    message::Message,
    milter::Milter,
    mta::{self, Answer, EditAction, Ending, Mail, MailResult, Smtp, StageMacros, Transcript},
    prepare_config, receiver,
    report::{describe, write_transcript},
};
use crate::{
    config::Config,
    duration::parse_duration,
    services::{
        dns::{DnsConfig, Resolver},
        dns_zone::Zones,
        store::{self, List, ManualClock, Store},
    },
};
use serde::{Deserialize, Serialize};
use std::{
    collections::BTreeMap,
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

/// One case file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    /// What the file covers.
    #[serde(default)]
    pub description: String,
    /// The policies, in order.
    pub chain: Vec<String>,
    /// TOML merged over the configuration; its relative paths are relative to the case file,
    /// and its `[policies] dirs` are searched after the configuration's.
    #[serde(default)]
    pub config: String,
    /// Store backends to run the file on: "sqlite" (the default) and/or "redis".
    #[serde(default = "default_stores")]
    pub stores: Vec<String>,
    /// Zone files or directories of zone files, relative to the case file.
    #[serde(default)]
    pub zones: Vec<PathBuf>,
    /// Zone text.
    #[serde(default)]
    pub zone: String,
    /// Store entries made before the first case.
    #[serde(default)]
    pub preload: Preload,
    /// The cases, run in order.
    #[serde(rename = "case")]
    pub cases: Vec<Case>,
}

fn default_stores() -> Vec<String> {
    vec!["sqlite".into()]
}

/// Store entries to make before a case file (or a case) runs.
#[derive(Deserialize, Default, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct Preload {
    /// Whitelist entries (addresses, domains, IPs).
    #[serde(default)]
    pub whitelist: Vec<String>,
    /// Blacklist entries.
    #[serde(default)]
    pub blacklist: Vec<String>,
    /// Banned IPs.
    #[serde(default)]
    pub ban_ip: Vec<String>,
    /// Banned domains (`*.example.com` bans the subdomains).
    #[serde(default)]
    pub ban_domain: Vec<String>,
    /// Keys and values, as `milter.store.set` would store them.
    #[serde(default)]
    pub values: BTreeMap<String, toml::Value>,
}

impl Preload {
    async fn apply(&self, store: &dyn Store) -> Result<(), String> {
        let lists = [
            (List::Whitelist, &self.whitelist),
            (List::Blacklist, &self.blacklist),
            (List::BannedIp, &self.ban_ip),
            (List::BannedDomain, &self.ban_domain),
        ];
        for (list, entries) in lists {
            for entry in entries {
                store
                    .list_add(list, entry, "preloaded by the case file", None)
                    .await
                    .map_err(|e| format!("preload {} {entry:?}: {e}", list.name()))?;
            }
        }
        for (key, value) in &self.values {
            let value: store::Value = serde_json::to_value(value)
                .and_then(serde_json::from_value)
                .map_err(|e| format!("preload {key:?}: not a storable value: {e}"))?;
            store
                .set(key, &value, None)
                .await
                .map_err(|e| format!("preload {key:?}: {e}"))?;
        }
        Ok(())
    }
}

/// One SMTP connection and what it must get.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// What the case shows.
    pub name: String,
    /// Client address.
    #[serde(default = "default_ip")]
    pub ip: String,
    /// The client name the MTA passes at connect: its verified host name, else "[ip]" (the
    /// default) or "unknown".
    #[serde(default)]
    pub hostname: Option<String>,
    /// HELO name; none: no HELO.
    pub helo: Option<String>,
    /// Macros per stage (`connect helo mail rcpt data eoh eom`).
    #[serde(default)]
    pub macros: StageMacros,
    /// Moves the store's clock forward before the case ("10m", "4h", "37d").
    #[serde(default)]
    pub advance: Option<String>,
    /// Store entries made before the case.
    #[serde(default)]
    pub preload: Option<Preload>,
    /// What the connection (and its single message) must get.
    #[serde(default)]
    pub expect: Expect,
    /// The single message written in the case itself.
    #[serde(flatten)]
    pub single: MessageFields,
    /// Several messages on the connection.
    #[serde(default, rename = "message")]
    pub messages: Vec<CaseMessage>,
}

fn default_ip() -> String {
    "192.0.2.1".into()
}

/// A message: envelope and content.
#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct MessageFields {
    /// MAIL FROM argument, `<a@example.com>` (maybe with ESMTP arguments); none: no message.
    pub mail: Option<String>,
    /// RCPT TO arguments.
    #[serde(default)]
    pub rcpt: Vec<String>,
    /// A message file (relative to the case file) for the header and body.
    pub eml: Option<PathBuf>,
    /// Header fields (over those of `eml`).
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// The body (over that of `eml`); LF line ends are sent as CRLF.
    pub body: Option<String>,
}

/// One of several messages of a case.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CaseMessage {
    #[serde(flatten)]
    pub fields: MessageFields,
    /// Macros of this message, per stage.
    #[serde(default)]
    pub macros: StageMacros,
    /// What this message must get.
    #[serde(default)]
    pub expect: Expect,
}

/// What a connection and its message must get. Stage answers: "pass" (continue, accept, no
/// reply or not sent: what a stage without an expectation must get, unless `result` is
/// expected), "continue", "accept", "discard", "reject", "tempfail", or the start of the SMTP
/// reply (`*` matches any text).
#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub connect: Option<String>,
    pub helo: Option<String>,
    pub mail: Option<String>,
    /// One per recipient.
    #[serde(default)]
    pub rcpt: Vec<String>,
    pub data: Option<String>,
    /// Every header field.
    pub header: Option<String>,
    pub eoh: Option<String>,
    pub body: Option<String>,
    pub eom: Option<String>,
    /// How the message ended: "accept", "reject", "tempfail", "discard", or the start of the
    /// reply.
    pub result: Option<String>,
    /// The policy that decided how the message ended ("-" for none).
    pub policy: Option<String>,
    /// Header fields added or inserted at end of message: name → value (`*` matches any text).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Header fields that must not be added.
    #[serde(default)]
    pub no_headers: Vec<String>,
    /// Header fields changed at end of message: name → new value ("" = deleted).
    #[serde(default)]
    pub changed_headers: BTreeMap<String, String>,
    /// The envelope sender as changed at end of message (`*` matches any text; "-": unchanged).
    pub sender: Option<String>,
    /// Recipients added at end of message, in order, as `<addr>` (absent: not checked).
    pub added_rcpts: Option<Vec<String>>,
    /// Recipients deleted at end of message, in order (absent: not checked).
    pub deleted_rcpts: Option<Vec<String>>,
    /// Whether the body was replaced at end of message.
    pub body_replaced: Option<bool>,
}

/// How to run case files.
#[derive(Clone)]
pub struct CaseOptions {
    /// The configuration file the case files' `config` is merged over (none: built-in
    /// defaults, with relative paths relative to each case file).
    pub base: Option<PathBuf>,
    /// The store (sqlite runs; `Copy` copies the configured SQLite file).
    pub store: StoreMode,
    /// Zone files for every case file, besides their own.
    pub zones: Vec<PathBuf>,
    /// A scratch Redis server for the files that name the redis store; without one, those runs
    /// are skipped.
    pub redis_url: Option<String>,
    /// Resolve through real DNS servers with these settings instead of the files' zones (the
    /// test suite checks that a DNS server serving the same zones gives the same results).
    pub live_dns: Option<DnsConfig>,
}

impl Default for CaseOptions {
    fn default() -> CaseOptions {
        CaseOptions {
            base: None,
            store: StoreMode::Empty,
            zones: Vec::new(),
            redis_url: None,
            live_dns: None,
        }
    }
}

/// The outcome of one case.
#[derive(Serialize, Debug)]
pub struct CaseResult {
    /// Its name.
    pub name: String,
    /// Why it failed; `None` when it passed.
    pub failure: Option<String>,
    /// What happened, for a failed case.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transcript: Option<Transcript>,
}

/// The outcome of one case file on one store.
#[derive(Serialize, Debug)]
pub struct FileResult {
    /// The case file.
    pub file: String,
    /// The store backend.
    pub store: String,
    /// Why the file could not run at all.
    pub error: Option<String>,
    /// Why it was not run.
    pub skipped: Option<String>,
    /// Its cases.
    pub cases: Vec<CaseResult>,
}

impl FileResult {
    /// Whether it ran and every case passed (a skipped run counts as passed).
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.cases.iter().all(|c| c.failure.is_none())
    }

    /// Every failure, one line each, naming file, store and case.
    pub fn failures(&self) -> Vec<String> {
        let at = format!("{} [{}]", self.file, self.store);
        let mut out: Vec<String> = self.error.iter().map(|e| format!("{at}: {e}")).collect();
        out.extend(self.cases.iter().filter_map(|c| {
            c.failure
                .as_ref()
                .map(|f| format!("{at} case {:?}: {f}", c.name))
        }));
        out
    }
}

/// The case files of `paths`: files as given, directories' `*.toml` files in name order.
pub fn collect(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "toml"))
                .collect();
            found.sort();
            files.extend(found);
        } else if path.is_file() {
            files.push(path.clone());
        } else {
            return Err(format!("{}: no such file or directory", path.display()));
        }
    }
    Ok(files)
}

/// Runs case files, each once per store it names.
pub fn run_files(files: &[PathBuf], options: &CaseOptions) -> Vec<FileResult> {
    files.iter().flat_map(|f| run_file(f, options)).collect()
}

/// Runs one case file, once per store it names.
pub fn run_file(path: &Path, options: &CaseOptions) -> Vec<FileResult> {
    let result = |store: &str| FileResult {
        file: path.display().to_string(),
        store: store.to_string(),
        error: None,
        skipped: None,
        cases: Vec::new(),
    };
    let file = match std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|text| toml::from_str::<CaseFile>(&text).map_err(|e| e.to_string()))
    {
        Ok(f) => f,
        Err(e) => {
            return vec![FileResult {
                error: Some(e),
                ..result("-")
            }];
        }
    };
    file.stores
        .iter()
        .map(|store| {
            let mut out = result(store);
            match (store.as_str(), &options.redis_url) {
                ("sqlite", _) | ("redis", Some(_)) => match run_on(path, &file, store, options) {
                    Ok(cases) => out.cases = cases,
                    Err(e) => out.error = Some(e),
                },
                ("redis", None) => {
                    out.skipped = Some("no Redis server given (--redis-url)".into());
                }
                (other, _) => {
                    out.error = Some(format!("unknown store {other:?} (sqlite or redis)"));
                }
            }
            out
        })
        .collect()
}

/// A key prefix no other run uses.
fn fresh_prefix() -> String {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    let now = (store::system_clock())();
    format!("luamilter-test:{}:{now}:{run}:", std::process::id())
}

/// Deep merge of `over` into `base`; tables merge, everything else replaces.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Makes a relative path string in `table[section][key]` (a string or an array of them)
/// relative to `dir`.
fn anchor(table: &mut toml::Table, section: &str, key: &str, dir: &Path) {
    let anchored = |v: &mut toml::Value| {
        if let toml::Value::String(s) = v
            && Path::new(s.as_str()).is_relative()
        {
            *s = dir.join(s.as_str()).display().to_string();
        }
    };
    let Some(toml::Value::Table(t)) = table.get_mut(section) else {
        return;
    };
    match t.get_mut(key) {
        Some(toml::Value::Array(items)) => items.iter_mut().for_each(anchored),
        Some(v) => anchored(v),
        None => {}
    }
}

/// The configuration a case file runs on: the base (or built-in defaults), the file's own
/// `config` and chain, and the store.
fn compose(
    path: &Path,
    file: &CaseFile,
    backend: &str,
    options: &CaseOptions,
    scratch: &Path,
) -> Result<Config, String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let (mut table, source) = match &options.base {
        Some(base) => {
            let text = std::fs::read_to_string(base)
                .map_err(|e| format!("{}: cannot read: {e}", base.display()))?;
            let table: toml::Table =
                toml::from_str(&text).map_err(|e| format!("{}: {e}", base.display()))?;
            (table, base.clone())
        }
        None => (
            toml::Table::new(),
            dir.join(path.file_name().unwrap_or_default()),
        ),
    };
    let mut own: toml::Table = toml::from_str(&file.config).map_err(|e| format!("config: {e}"))?;
    anchor(&mut own, "policies", "dirs", &dir);
    anchor(&mut own, "site", "access_file", &dir);
    // The file's policy directories come after the configuration's.
    let base_dirs = table
        .get("policies")
        .and_then(|p| p.get("dirs"))
        .and_then(|d| d.as_array())
        .cloned()
        .unwrap_or_default();
    if let Some(toml::Value::Table(policies)) = own.get_mut("policies")
        && let Some(toml::Value::Array(dirs)) = policies.get_mut("dirs")
    {
        let mut all = base_dirs;
        all.append(dirs);
        *dirs = all;
    }
    merge(&mut table, own);
    let chain = toml::Value::Array(
        file.chain
            .iter()
            .cloned()
            .map(toml::Value::String)
            .collect(),
    );
    let policies = table
        .entry("policies")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(policies) = policies {
        policies.insert("chain".into(), chain);
    }
    let text = toml::to_string(&table).map_err(|e| e.to_string())?;
    let mut config = Config::parse(&text, Some(source))
        .map_err(|e| format!("the configuration with this file's config and chain: {e}"))?;
    if backend == "redis" {
        config.store.backend = store::Backend::Redis;
        config.store.url = options.redis_url.clone().unwrap_or_default();
        config.store.prefix = fresh_prefix();
        prepare_config(&mut config, StoreMode::Real, scratch)?;
    } else {
        prepare_config(&mut config, options.store, scratch)?;
    }
    Ok(config)
}

/// The zones of a case file: `--dns-zone` ones, the file's files, its inline text.
fn zones(path: &Path, file: &CaseFile, options: &CaseOptions) -> Result<Zones, String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut zones = Zones::new();
    for zone in options.zones.iter().chain(&file.zones) {
        let zone = if zone.is_relative() && file.zones.contains(zone) {
            dir.join(zone)
        } else {
            zone.clone()
        };
        zones.load(&zone).map_err(|e| e.to_string())?;
    }
    if !file.zone.trim().is_empty() {
        zones
            .add_text(&file.zone, None)
            .map_err(|e| e.to_string())?;
    }
    Ok(zones)
}

/// Runs the cases of `file` on one store backend.
fn run_on(
    path: &Path,
    file: &CaseFile,
    backend: &str,
    options: &CaseOptions,
) -> Result<Vec<CaseResult>, String> {
    let scratch =
        tempfile::TempDir::new().map_err(|e| format!("cannot make a temporary directory: {e}"))?;
    let config = compose(path, file, backend, options, scratch.path())?;
    let zones = zones(path, file, options)?;
    let runtime = super::runtime().map_err(|e| format!("cannot start the runtime: {e}"))?;
    let resolver = match &options.live_dns {
        Some(dns) => {
            let _in_runtime = runtime.enter();
            Arc::new(Resolver::new(dns).map_err(|e| e.to_string())?)
        }
        None => Arc::new(Resolver::from_zones(zones)),
    };
    let capture = Capture::default();
    let _caught = capture.install();
    let clock = ManualClock::new();
    let dir = path.parent().unwrap_or(Path::new("."));
    runtime.block_on(async {
        let receiver = receiver(&config);
        let milter = Milter::start(config, resolver, clock.clock()).map_err(|e| e.to_string())?;
        let mut results = Vec::new();
        let preloaded = file.preload.apply(&*milter.services.store).await;
        if let Err(e) = preloaded {
            milter.stop().await;
            return Err(e);
        }
        let mut queue = 0;
        for case in &file.cases {
            let run = async {
                if let Some(advance) = &case.advance {
                    clock.advance(parse_duration(advance).map_err(|e| format!("advance: {e}"))?);
                }
                if let Some(preload) = &case.preload {
                    preload.apply(&*milter.services.store).await?;
                }
                let smtp = smtp(case, dir, &receiver, &mut queue)?;
                let conn = milter.connect().await.map_err(|e| e.to_string())?;
                let transcript = mta::play(conn, &capture, &smtp)
                    .await
                    .map_err(|e| format!("the milter: {e}"))?;
                Ok::<_, String>(transcript)
            };
            let (failure, transcript) = match run.await {
                Ok(transcript) => (check_case(case, &transcript).err(), Some(transcript)),
                Err(e) => (Some(e), None),
            };
            results.push(CaseResult {
                name: case.name.clone(),
                transcript: failure.as_ref().and(transcript),
                failure,
            });
        }
        milter.stop().await;
        Ok(results)
    })
}

/// The connection a case plays.
fn smtp(case: &Case, dir: &Path, receiver: &str, queue: &mut u32) -> Result<Smtp, String> {
    let ip: IpAddr = case
        .ip
        .parse()
        .map_err(|_| format!("bad ip {:?}", case.ip))?;
    let mut mails = Vec::new();
    let mut message = |fields: &MessageFields, macros: &StageMacros| -> Result<(), String> {
        let Some(sender) = &fields.mail else {
            return Ok(());
        };
        *queue += 1;
        let (mut headers, mut body) = match &fields.eml {
            Some(eml) => {
                let path = dir.join(eml);
                let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                let m = Message::parse(&bytes);
                (m.headers, m.body)
            }
            None => (Vec::new(), Vec::new()),
        };
        if !fields.headers.is_empty() {
            headers = fields
                .headers
                .iter()
                .map(|(n, v)| (n.clone(), v.clone().into_bytes()))
                .collect();
        }
        if let Some(text) = &fields.body {
            body = Message::parse(format!("\n{text}").as_bytes()).body;
        }
        mails.push(Mail {
            sender: sender.clone(),
            recipients: fields.rcpt.clone(),
            headers,
            body,
            macros: macros.clone(),
            queue_id: format!("CASE{queue:06}"),
        });
        Ok(())
    };
    message(&case.single, &StageMacros::new())?;
    for m in &case.messages {
        message(&m.fields, &m.macros)?;
    }
    Ok(Smtp {
        ip,
        name: case.hostname.clone().unwrap_or_else(|| format!("[{ip}]")),
        helo: case.helo.clone(),
        receiver: receiver.to_string(),
        macros: case.macros.clone(),
        mails,
    })
}

/// `*` matches any text; the rest must match exactly.
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let [first, middle @ .., last] = parts.as_slice() else {
        return pattern == text;
    };
    if parts.len() == 1 {
        return pattern == text;
    }
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    for part in middle {
        let Some(at) = rest.find(part) else {
            return false;
        };
        rest = &rest[at + part.len()..];
    }
    rest.ends_with(last)
}

/// Whether `answer` meets `expected`; the mismatch otherwise.
/// `None` checks nothing.
fn check(at: &str, expected: Option<&str>, answer: &Answer) -> Result<(), String> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let verdict = answer.verdict().map(|v| v.name());
    let ok = match expected {
        "pass" => matches!(verdict, None | Some("accept")),
        "continue" => matches!(answer, Answer::Continue | Answer::NoReply),
        "accept" | "discard" | "reject" | "tempfail" => verdict == Some(expected),
        text => answer.reply().is_some_and(|r| glob(&format!("{text}*"), r)),
    };
    if ok {
        Ok(())
    } else {
        let got = answer
            .reply()
            .map_or_else(|| answer.to_string(), str::to_string);
        Err(format!("at {at}: expected {expected:?}, got {got:?}"))
    }
}

/// The answer of the latest exchange of `stage` in message `mail` (`None`: connection).
fn answer_at(t: &Transcript, mail: Option<usize>, stage: &str) -> Answer {
    t.exchanges
        .iter()
        .rfind(|e| e.mail == mail && e.stage.name() == stage)
        .map_or(Answer::NotSent, |e| e.answer.clone())
}

/// Checks a transcript against the case's expectations.
/// What a stage nobody wrote an expectation for must get: "pass", unless the expectation is
/// about the result (then the stages on the way do not matter).
fn unwritten(e: &Expect) -> Option<&'static str> {
    e.result.is_none().then_some("pass")
}

fn check_case(case: &Case, t: &Transcript) -> Result<(), String> {
    let default = unwritten(&case.expect);
    for stage in ["connect", "helo"] {
        let expected = match stage {
            "connect" => case.expect.connect.as_deref(),
            _ => case.expect.helo.as_deref(),
        };
        check(stage, expected.or(default), &answer_at(t, None, stage))?;
    }
    let mut expects = Vec::new();
    if case.single.mail.is_some() {
        expects.push(&case.expect);
    }
    expects.extend(
        case.messages
            .iter()
            .filter(|m| m.fields.mail.is_some())
            .map(|m| &m.expect),
    );
    for (index, expect) in expects.into_iter().enumerate() {
        let Some(mail) = t.mails.get(index) else {
            continue;
        };
        check_message(t, index, mail, expect)
            .map_err(|e| format!("message {} ({}): {e}", index + 1, mail.sender))?;
    }
    Ok(())
}

fn check_message(
    t: &Transcript,
    index: usize,
    mail: &MailResult,
    e: &Expect,
) -> Result<(), String> {
    let at = Some(index);
    let default = unwritten(e);
    check(
        "mail",
        e.mail.as_deref().or(default),
        &answer_at(t, at, "mail"),
    )?;
    for (i, rcpt) in mail.recipients.iter().enumerate() {
        let expected = e.rcpt.get(i).map(String::as_str).or(default);
        check(&format!("rcpt {}", rcpt.address), expected, &rcpt.answer)?;
    }
    let stages = [
        ("data", &e.data),
        ("header", &e.header),
        ("eoh", &e.eoh),
        ("body", &e.body),
        ("eom", &e.eom),
    ];
    for (stage, expected) in stages {
        check(
            stage,
            expected.as_deref().or(default),
            &answer_at(t, at, stage),
        )?;
    }
    let ending = t.connection.as_ref().or(mail.ending.as_ref());
    if let Some(expected) = &e.result {
        check_result(expected, ending)?;
    }
    if let Some(expected) = &e.policy {
        let got = ending.and_then(|e| e.policy.as_deref()).unwrap_or("-");
        if got != expected {
            return Err(format!("decided by {got:?}, expected {expected:?}"));
        }
    }
    check_edits(&mail.edits, e)
}

fn check_result(expected: &str, ending: Option<&Ending>) -> Result<(), String> {
    let Some(ending) = ending else {
        return Err(format!(
            "expected the result {expected:?}, but the message never ended"
        ));
    };
    let ok = ending.verdict.name() == expected
        || ending
            .reply
            .as_deref()
            .is_some_and(|r| glob(&format!("{expected}*"), r));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "expected the result {expected:?}, got {}",
            describe(ending)
        ))
    }
}

fn check_edits(edits: &[EditAction], e: &Expect) -> Result<(), String> {
    let added = |name: &str| {
        edits.iter().find_map(|edit| match edit {
            EditAction::AddHeader { name: n, value }
            | EditAction::InsertHeader { name: n, value, .. }
                if n.eq_ignore_ascii_case(name) =>
            {
                Some(value.clone())
            }
            _ => None,
        })
    };
    let list = || {
        edits
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    };
    for (name, pattern) in &e.headers {
        let got =
            added(name).ok_or_else(|| format!("no {name} header added; edits: {}", list()))?;
        // The MTA's header values start after the colon; the case writes them without the
        // space most policies put there.
        let value = got.strip_prefix(' ').unwrap_or(&got);
        if !glob(pattern, value) && !glob(pattern, &got) {
            return Err(format!("header {name}: expected {pattern:?}, got {got:?}"));
        }
    }
    for name in &e.no_headers {
        if let Some(got) = added(name) {
            return Err(format!("header {name} added ({got:?}) but should not be"));
        }
    }
    for (name, value) in &e.changed_headers {
        let found = edits.iter().any(|edit| {
            matches!(edit, EditAction::ChangeHeader { name: n, value: v, .. }
                if n.eq_ignore_ascii_case(name) && v == value)
        });
        if !found {
            return Err(format!(
                "header {name} not changed to {value:?}; edits: {}",
                list()
            ));
        }
    }
    if let Some(pattern) = &e.sender {
        let changed = edits.iter().find_map(|edit| match edit {
            EditAction::ChangeSender { sender, .. } => Some(sender.as_str()),
            _ => None,
        });
        match changed {
            None if pattern == "-" => {}
            Some(got) if pattern != "-" && glob(pattern, got) => {}
            _ => {
                return Err(format!(
                    "sender: expected {pattern:?}, got {}",
                    changed.map_or("no change".to_owned(), |s| format!("{s:?}"))
                ));
            }
        }
    }
    let rcpts = |added: bool| -> Vec<String> {
        edits
            .iter()
            .filter_map(|edit| match edit {
                EditAction::AddRcpt { rcpt, .. } if added => Some(rcpt.clone()),
                EditAction::DeleteRcpt { rcpt } if !added => Some(rcpt.clone()),
                _ => None,
            })
            .collect()
    };
    for (what, expected, added) in [
        ("added", &e.added_rcpts, true),
        ("deleted", &e.deleted_rcpts, false),
    ] {
        if let Some(expected) = expected
            && rcpts(added) != *expected
        {
            return Err(format!(
                "recipients {what}: expected {expected:?}; edits: {}",
                list()
            ));
        }
    }
    if let Some(want) = e.body_replaced {
        let replaced = edits
            .iter()
            .any(|edit| matches!(edit, EditAction::ReplaceBody { .. }));
        if replaced != want {
            return Err(format!(
                "body replaced: expected {want}, got {replaced}; edits: {}",
                list()
            ));
        }
    }
    Ok(())
}

/// One line per case (and the transcript of a failed one), then the totals.
pub fn write_summary(out: &mut dyn Write, results: &[FileResult]) -> std::io::Result<()> {
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for file in results {
        writeln!(out, "{} [{}]", file.file, file.store)?;
        if let Some(reason) = &file.skipped {
            writeln!(out, "  skipped: {reason}")?;
            skipped += 1;
        }
        if let Some(error) = &file.error {
            writeln!(out, "  ERROR {error}")?;
            failed += 1;
        }
        for case in &file.cases {
            match &case.failure {
                None => {
                    passed += 1;
                    writeln!(out, "  ok    {}", case.name)?;
                }
                Some(failure) => {
                    failed += 1;
                    writeln!(out, "  FAIL  {}: {failure}", case.name)?;
                    if let Some(t) = &case.transcript {
                        let mut text = Vec::new();
                        write_transcript(&mut text, t)?;
                        for line in String::from_utf8_lossy(&text).lines() {
                            writeln!(out, "        {line}")?;
                        }
                    }
                }
            }
        }
    }
    writeln!(out, "{passed} passed, {failed} failed, {skipped} skipped")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_glob_matches_as_documented() {
        assert!(glob("pass *", "pass (mx.test: x)"));
        assert!(glob(
            "*client-ip=192.0.2.1*",
            "pass x client-ip=192.0.2.1; y"
        ));
        assert!(!glob("pass", "pass x"));
        assert!(glob("a*b*c", "aXbYc"));
        assert!(!glob("a*b*c", "aXbY"));
        assert!(glob("*", ""));
    }
}
