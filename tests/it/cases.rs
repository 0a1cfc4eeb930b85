//! Case files for the stock policy pack: `tests/cases/NAME.toml`, one per stock policy, run
//! through the daemon with a real milter client, the test DNS server and a real store.
//!
//! A file names the chain and extra config; each `[[case]]` is one SMTP connection (client IP
//! and verified host name, HELO, connect macros) with one or more messages (MAIL, RCPTs,
//! headers, body). Expected answers per stage are `"pass"` (the default: continue, accept or
//! not sent), `"continue"`, `"accept"`, `"discard"`, `"reject"`, `"tempfail"`, or the start
//! of the reply text (`"550 5.7.1 hello name cannot be numeric ip"`). Cases of a file run in
//! order against one daemon and one store, so a case can rely on what earlier cases stored.
//! Format reference: tests/cases/README.md.

use crate::{
    dns_server::TestDns,
    redis_server::RedisServer,
    support::{Mta, TestClock, added_header, reply_text},
};
use indymilter::MacroStage;
use indymilter_test::{Status, TestConnection};
use luamilter::{config::Config, daemon::Daemon, duration::parse_duration};
use serde::Deserialize;
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    #[serde(default)]
    description: String,
    /// The policies, in order (stock names, or files in tests/cases/policies).
    chain: Vec<String>,
    /// Extra config (TOML), merged over the runner's own.
    #[serde(default)]
    config: String,
    /// Store backends to run the file against: "sqlite" (default) and/or "redis".
    #[serde(default = "default_stores")]
    stores: Vec<String>,
    #[serde(rename = "case")]
    cases: Vec<Case>,
}

fn default_stores() -> Vec<String> {
    vec!["sqlite".into()]
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default = "default_ip")]
    ip: String,
    /// The client name the MTA passes at connect: its verified PTR, or "[ip]"/"unknown".
    #[serde(default)]
    hostname: Option<String>,
    helo: Option<String>,
    #[serde(default)]
    macros: BTreeMap<String, BTreeMap<String, String>>,
    /// Moves the store's clock forward before the case ("10m", "4h", "37d"): greylisting
    /// timelines, expiries.
    #[serde(default)]
    advance: Option<String>,
    #[serde(default)]
    expect: Expect,
    #[serde(flatten)]
    single: MessageFields,
    #[serde(default, rename = "message")]
    messages: Vec<Message>,
}

fn default_ip() -> String {
    "192.0.2.1".into()
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct MessageFields {
    mail: Option<String>,
    #[serde(default)]
    rcpt: Vec<String>,
    #[serde(default)]
    headers: Vec<(String, String)>,
    body: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Message {
    #[serde(flatten)]
    fields: MessageFields,
    #[serde(default)]
    macros: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    expect: Expect,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct Expect {
    connect: Option<String>,
    helo: Option<String>,
    mail: Option<String>,
    #[serde(default)]
    rcpt: Vec<String>,
    data: Option<String>,
    header: Option<String>,
    eoh: Option<String>,
    body: Option<String>,
    eom: Option<String>,
    /// Headers added or inserted at eom: name → value, `*` matching any text.
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// Headers that must not be added.
    #[serde(default)]
    no_headers: Vec<String>,
    /// Headers changed (renamed away: value "" means deleted) at eom.
    #[serde(default)]
    changed_headers: BTreeMap<String, String>,
}

fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let mut rest = text;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            let Some(at) = rest.find(part) else {
                return false;
            };
            rest = &rest[at + part.len()..];
        }
    }
    true
}

/// Whether `status` meets `expected`; the description of the mismatch otherwise.
fn check(stage: &str, expected: Option<&str>, status: &Status) -> Result<(), String> {
    let expected = expected.unwrap_or("pass");
    let ok = match expected {
        "pass" => matches!(
            status,
            Status::Continue | Status::Noreply | Status::Skip | Status::Accept
        ),
        "continue" => matches!(status, Status::Continue | Status::Noreply),
        "accept" => *status == Status::Accept,
        "discard" => *status == Status::Discard,
        "reject" => matches!(status, Status::Reject { .. }),
        "tempfail" => matches!(status, Status::Tempfail { .. }),
        text => {
            let got = reply_text(status);
            matches!(status, Status::Reject { .. } | Status::Tempfail { .. })
                && glob(&format!("{text}*"), &got)
        }
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "at {stage}: expected {expected:?}, got {:?}",
            reply_text(status)
        ))
    }
}

/// Whether the message (or connection) ended with this answer.
fn ends(status: &Status) -> bool {
    !matches!(status, Status::Continue | Status::Noreply | Status::Skip)
}

fn macro_stage(name: &str) -> MacroStage {
    match name {
        "connect" => MacroStage::Connect,
        "helo" => MacroStage::Helo,
        "mail" => MacroStage::Mail,
        "rcpt" => MacroStage::Rcpt,
        "data" => MacroStage::Data,
        "eoh" => MacroStage::Eoh,
        "eom" => MacroStage::Eom,
        other => panic!("unknown macro stage {other:?}"),
    }
}

async fn send_macros(
    c: &mut Mta,
    macros: &BTreeMap<String, BTreeMap<String, String>>,
    stage: &str,
) {
    if let Some(m) = macros.get(stage) {
        c.macros(
            macro_stage(stage),
            m.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )
        .await
        .unwrap();
    }
}

async fn run_message(
    c: &mut Mta,
    m: &MessageFields,
    macros: &BTreeMap<String, BTreeMap<String, String>>,
    e: &Expect,
) -> Result<(), String> {
    let Some(mail) = &m.mail else { return Ok(()) };
    send_macros(c, macros, "mail").await;
    let status = c
        .mail([mail.as_str()])
        .await
        .map_err(|e| format!("mail: {e:?}"))?;
    check("mail", e.mail.as_deref(), &status)?;
    if ends(&status) {
        return Ok(());
    }
    let mut accepted = 0;
    for (i, rcpt) in m.rcpt.iter().enumerate() {
        send_macros(c, macros, "rcpt").await;
        let status = c
            .rcpt([rcpt.as_str()])
            .await
            .map_err(|e| format!("rcpt: {e:?}"))?;
        check(
            &format!("rcpt {rcpt}"),
            e.rcpt.get(i).map(String::as_str),
            &status,
        )?;
        match status {
            Status::Reject { .. } | Status::Tempfail { .. } => {}
            s if ends(&s) => return Ok(()),
            _ => accepted += 1,
        }
    }
    if accepted == 0 {
        c.abort().await.map_err(|e| format!("abort: {e:?}"))?;
        return Ok(());
    }
    send_macros(c, macros, "data").await;
    let status = c.data().await.map_err(|e| format!("data: {e:?}"))?;
    check("data", e.data.as_deref(), &status)?;
    if ends(&status) {
        return Ok(());
    }
    for (name, value) in &m.headers {
        let status = c
            .header(name, value)
            .await
            .map_err(|e| format!("header: {e:?}"))?;
        check(&format!("header {name}"), e.header.as_deref(), &status)?;
        if ends(&status) {
            return Ok(());
        }
    }
    send_macros(c, macros, "eoh").await;
    let status = c.eoh().await.map_err(|e| format!("eoh: {e:?}"))?;
    check("eoh", e.eoh.as_deref(), &status)?;
    if ends(&status) {
        return Ok(());
    }
    if let Some(body) = &m.body {
        let status = c
            .body(body.clone().into_bytes())
            .await
            .map_err(|e| format!("body: {e:?}"))?;
        check("body", e.body.as_deref(), &status)?;
        if ends(&status) {
            return Ok(());
        }
    }
    send_macros(c, macros, "eom").await;
    let (actions, status) = c.eom().await.map_err(|e| format!("eom: {e:?}"))?;
    check("eom", e.eom.as_deref(), &status)?;
    for (name, pattern) in &e.headers {
        let got = added_header(&actions, name)
            .ok_or_else(|| format!("no {name} header added; edits: {:?}", actions.actions))?;
        if !glob(pattern, &got) {
            return Err(format!("header {name}: expected {pattern:?}, got {got:?}"));
        }
    }
    for name in &e.no_headers {
        if let Some(got) = added_header(&actions, name) {
            return Err(format!("header {name} added ({got:?}) but should not be"));
        }
    }
    for (name, value) in &e.changed_headers {
        let found = actions.actions.iter().any(|a| match a {
            indymilter_test::EomAction::ChangeHeader {
                name: n, value: v, ..
            } => n.to_str() == Ok(name) && v.to_str() == Ok(value),
            indymilter_test::EomAction::DeleteHeader { name: n, .. } => {
                n.to_str() == Ok(name) && value.is_empty()
            }
            _ => false,
        });
        if !found {
            return Err(format!(
                "header {name} not changed to {value:?}; edits: {:?}",
                actions.actions
            ));
        }
    }
    Ok(())
}

async fn run_case(daemon: &Daemon, clock: &TestClock, case: &Case) -> Result<(), String> {
    if let Some(advance) = &case.advance {
        clock.advance(parse_duration(advance).map_err(|e| format!("advance: {e}"))?);
    }
    let addr = &daemon.local;
    let builder = TestConnection::configure().read_timeout(Duration::from_secs(10));
    let mut c = Mta(match addr {
        luamilter::listen::ListenAddr::Inet(a) => builder.open_tcp(a).await,
        luamilter::listen::ListenAddr::Unix(p) => builder.open_unix(p).await,
    }
    .map_err(|e| format!("open: {e:?}"))?);
    let ip: IpAddr = case
        .ip
        .parse()
        .map_err(|_| format!("bad ip {:?}", case.ip))?;
    let hostname = case.hostname.clone().unwrap_or_else(|| format!("[{ip}]"));
    send_macros(&mut c, &case.macros, "connect").await;
    let status = c
        .connect(&hostname, ip)
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    check("connect", case.expect.connect.as_deref(), &status)?;
    if ends(&status) {
        return Ok(());
    }
    if let Some(helo) = &case.helo {
        send_macros(&mut c, &case.macros, "helo").await;
        let status = c.helo(helo).await.map_err(|e| format!("helo: {e:?}"))?;
        check("helo", case.expect.helo.as_deref(), &status)?;
        if ends(&status) {
            return Ok(());
        }
    }
    if case.single.mail.is_some() {
        run_message(&mut c, &case.single, &case.macros, &case.expect).await?;
    }
    for m in &case.messages {
        let mut macros = case.macros.clone();
        macros.extend(m.macros.clone());
        run_message(&mut c, &m.fields, &macros, &m.expect).await?;
    }
    let _ = c.close().await;
    Ok(())
}

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

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases")
}

/// Copies directory `from` to `to`, with everything in it.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

async fn run_file(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let file: CaseFile =
        toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let _ = &file.description;
    let mut failures = Vec::new();
    for backend in &file.stores {
        let dns = TestDns::start().await;
        let mut redis = None;
        let dir = tempfile::TempDir::new().unwrap();
        let mut config: toml::Table = toml::from_str(&format!(
            "[milter]\nlisten = \"inet:0@127.0.0.1\"\ncontrol_socket = {ctl:?}\n\
             [policies]\ndirs = [{dir:?}]\nwatch = false\n\
             [dns]\nnameservers = [\"{dns}\"]\ntimeout = \"2s\"\nattempts = 1\n\
             [spf]\nreceiver = \"mx.test\"\n\
             [store]\npath = {store:?}\n",
            ctl = dir.path().join("ctl.sock"),
            dir = cases_dir().join("policies"),
            dns = dns.addr,
            store = dir.path().join("store.db"),
        ))
        .unwrap();
        if backend == "redis" {
            let server = RedisServer::start();
            let store: toml::Table = toml::from_str(&format!(
                "[store]\nbackend = \"redis\"\nurl = {:?}\n",
                server.url
            ))
            .unwrap();
            merge(&mut config, store);
            redis = Some(server);
        }
        let policies: toml::Table =
            toml::from_str(&format!("[policies]\nchain = {:?}\n", file.chain)).unwrap();
        merge(&mut config, policies);
        // List files must lie beside the config (or in a policy dir) for read_list.
        let fixtures = dir.path().join("fixtures");
        copy_dir(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
            &fixtures,
        );
        let extra: toml::Table = toml::from_str(
            &file
                .config
                .replace("{fixtures}", &fixtures.display().to_string()),
        )
        .unwrap_or_else(|e| panic!("{}: config: {e}", path.display()));
        merge(&mut config, extra);
        let text = toml::to_string(&config).unwrap();
        let config = Config::parse(&text, Some(dir.path().join("luamilter.toml")))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let clock = TestClock::new();
        let daemon = Daemon::start_with_clock(config, clock.clock())
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for case in &file.cases {
            let result = run_case(&daemon, &clock, case).await;
            // What a policy does at close (bans) is done before the next case connects.
            let settled = settle(&daemon).await;
            if let Err(e) = result.and(settled) {
                failures.push(format!(
                    "{} [{backend}] case {:?}: {e}",
                    path.display(),
                    case.name
                ));
            }
        }
        daemon.stop(Duration::from_secs(5)).await;
        drop(redis);
    }
    failures
}

/// Waits until the daemon has ended every session (its close stage has run).
async fn settle(daemon: &Daemon) -> Result<(), String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while daemon.engine.current().connection_count() > 0 {
        if std::time::Instant::now() > deadline {
            return Err("a session did not end within 5 s".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_case_file_passes() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(cases_dir())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    let mut failures = Vec::new();
    for file in &files {
        failures.extend(run_file(file).await);
    }
    assert!(
        failures.is_empty(),
        "{} failing case(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_stock_policy_has_cases_and_a_doc_page() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut missing = Vec::new();
    for name in luamilter::stock::policy_names() {
        if !root.join(format!("tests/cases/{name}.toml")).exists() {
            missing.push(format!("tests/cases/{name}.toml"));
        }
        if !root.join(format!("docs/policies/{name}.md")).exists() {
            missing.push(format!("docs/policies/{name}.md"));
        }
    }
    assert!(
        missing.is_empty(),
        "stock policies without cases or docs: {missing:?}"
    );
}

#[test]
fn the_glob_matches_as_documented() {
    assert!(glob("pass *", "pass (mx.test: x)"));
    assert!(glob(
        "*client-ip=192.0.2.1*",
        "pass x client-ip=192.0.2.1; y"
    ));
    assert!(!glob("pass", "pass x"));
    assert!(glob("a*b*c", "aXbYc"));
}
