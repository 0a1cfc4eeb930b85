//! `luamilter test`: one message file through the configured policies, or case files.

use super::{
    StoreMode,
    capture::Capture,
    cases::{self, CaseOptions},
    message::Message,
    milter::Milter,
    mta::{self, Mail, Smtp, StageMacros},
    prepare_config, receiver,
    report::{self, EXIT_ERROR, EXIT_USAGE, Envelope, Report},
    resolver, runtime,
};
use crate::{
    cli::EX_CONFIG,
    config::Config,
    services::{dns_zone::Zones, store},
};
use std::{
    collections::BTreeMap,
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

/// Options of `luamilter test`.
#[derive(Clone, Debug, clap::Args)]
pub struct TestArgs {
    /// Configuration file (default: built-in)
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    /// The message: an .eml file (CRLF or LF line ends; an mbox "From " line first is skipped)
    #[arg(required_unless_present = "cases", conflicts_with = "cases")]
    pub message: Option<PathBuf>,
    /// Client IP address (default: from the first Received header)
    #[arg(long, value_name = "IP")]
    pub client: Option<IpAddr>,
    /// The client's verified host name, as the MTA passes it (default: from the first
    /// Received header, else "[IP]")
    #[arg(long, value_name = "NAME")]
    pub client_name: Option<String>,
    /// HELO name (default: from the first Received header, else the client name)
    #[arg(long, value_name = "NAME")]
    pub helo: Option<String>,
    /// MAIL FROM address, "" or "<>" for the null sender (default: Return-Path, else From)
    #[arg(long, value_name = "ADDR")]
    pub from: Option<String>,
    /// RCPT TO address, repeatable (default: X-Original-To, Delivered-To, else To and Cc)
    #[arg(long, value_name = "ADDR")]
    pub rcpt: Vec<String>,
    /// Send the message as this SMTP AUTH user
    #[arg(long, value_name = "USER")]
    pub auth: Option<String>,
    /// A macro the MTA sends, at connect unless a stage is named (connect helo mail rcpt data
    /// eoh eom); repeatable
    #[arg(long = "macro", value_name = "[STAGE:]NAME=VALUE")]
    pub macros: Vec<String>,
    /// Answer DNS from this zone file (or every *.zone file of a directory) and nothing else;
    /// repeatable (see docs/testing.md)
    #[arg(long, value_name = "FILE")]
    pub dns_zone: Vec<PathBuf>,
    /// Which store the policies use [default: copy for a message, empty for case files]
    #[arg(long, value_enum)]
    pub store: Option<StoreMode>,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
    /// Run case files (a file, or every *.toml file of a directory); repeatable
    #[arg(long, value_name = "DIR|FILE")]
    pub cases: Vec<PathBuf>,
    /// A scratch Redis server for case files that name the redis store (keys go under a new
    /// prefix per run)
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,
}

/// Runs `luamilter test`.
pub fn run(args: TestArgs) -> ExitCode {
    let config = match &args.config {
        Some(path) => Config::load(path),
        None => Ok(Config::default()),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("luamilter test: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let zones = match load_zones(&args.dns_zone) {
        Ok(z) => z,
        Err(e) => {
            eprintln!("luamilter test: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if !args.cases.is_empty() {
        let options = CaseOptions {
            base: args.config.clone(),
            store: args.store.unwrap_or(StoreMode::Empty),
            zones: args.dns_zone.clone(),
            redis_url: args.redis_url.clone(),
            live_dns: None,
        };
        return run_cases(&args.cases, &options, args.json);
    }
    let Some(path) = &args.message else {
        return ExitCode::from(EXIT_USAGE);
    };
    match test_message(&args, path, config, zones) {
        Ok(report) => {
            let mut out = std::io::stdout().lock();
            let written = if args.json {
                serde_json::to_writer_pretty(&mut out, &report)
                    .map_err(std::io::Error::other)
                    .and_then(|()| writeln!(out))
            } else {
                report.write_text(&mut out)
            };
            if written.is_err() {
                return ExitCode::from(EXIT_ERROR);
            }
            ExitCode::from(report.exit_code())
        }
        Err((code, e)) => {
            eprintln!("luamilter test: {e}");
            ExitCode::from(code)
        }
    }
}

/// The zone files given, or `None` for the configured resolver.
pub fn load_zones(paths: &[PathBuf]) -> Result<Option<Zones>, String> {
    if paths.is_empty() {
        return Ok(None);
    }
    let mut zones = Zones::new();
    for path in paths {
        zones.load(path).map_err(|e| e.to_string())?;
    }
    Ok(Some(zones))
}

/// `[STAGE:]NAME=VALUE` → stage, name, value.
fn parse_macro(text: &str) -> Result<(String, String, String), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("--macro {text:?}: expected [STAGE:]NAME=VALUE"))?;
    let (stage, name) = match name.split_once(':') {
        Some((stage, name)) if mta::MACRO_STAGES.contains(&stage) => (stage, name),
        Some((stage, _)) => {
            return Err(format!(
                "--macro {text:?}: unknown stage {stage:?} (one of {})",
                mta::MACRO_STAGES.join(" ")
            ));
        }
        None => ("connect", name),
    };
    Ok((stage.into(), name.into(), value.into()))
}

/// An address without angle brackets; "<>" is the null sender "".
fn bare(address: &str) -> String {
    address
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_string()
}

/// The parts of an envelope given on the command line (or in a replay sidecar file); what is
/// not given comes from the message's headers.
#[derive(Clone, Debug, Default)]
pub struct Given {
    pub client: Option<IpAddr>,
    pub client_name: Option<String>,
    pub helo: Option<String>,
    /// MAIL FROM, "" or "<>" for the null sender.
    pub from: Option<String>,
    pub rcpt: Vec<String>,
    pub auth: Option<String>,
}

impl TestArgs {
    fn given(&self) -> Given {
        Given {
            client: self.client,
            client_name: self.client_name.clone(),
            helo: self.helo.clone(),
            from: self.from.clone(),
            rcpt: self.rcpt.clone(),
            auth: self.auth.clone(),
        }
    }
}

/// The envelope: what was given, else what the message suggests.
pub fn envelope(args: &Given, message: &Message) -> Result<Envelope, String> {
    let hints = message.envelope_hints();
    let mut sources = BTreeMap::new();
    let mut note = |key: &str, source: &str| {
        sources.insert(key.to_string(), source.to_string());
    };
    let received = "the first Received header";
    let client = match (args.client, &hints.received) {
        (Some(ip), _) => ip,
        (None, Some(r)) => {
            note("client", received);
            r.ip
        }
        (None, None) => {
            return Err("no client address: give --client IP (the message has no Received header that names one)".into());
        }
    };
    // What the Received header says about this client, when it is the one tested.
    let about = hints.received.as_ref().filter(|r| r.ip == client);
    let client_name = match (&args.client_name, about.and_then(|r| r.name.clone())) {
        (Some(name), _) => name.clone(),
        (None, Some(name)) => {
            note("client", received);
            name
        }
        (None, None) => format!("[{client}]"),
    };
    let helo = match (&args.helo, about.and_then(|r| r.helo.clone())) {
        (Some(helo), _) => helo.clone(),
        (None, Some(helo)) => {
            note("helo", received);
            helo
        }
        (None, None) => {
            note("helo", "the client name");
            if client_name == "unknown" {
                format!("[{client}]")
            } else {
                client_name.clone()
            }
        }
    };
    let sender = match (&args.from, &hints.sender) {
        (Some(from), _) => bare(from),
        (None, Some((sender, header))) => {
            note("from", header);
            sender.clone()
        }
        (None, None) => {
            return Err(
                "no sender: give --from ADDR (the message has no Return-Path or From)".into(),
            );
        }
    };
    let recipients = match (args.rcpt.is_empty(), &hints.recipients) {
        (false, _) => args.rcpt.iter().map(|r| bare(r)).collect(),
        (true, Some((rcpts, header))) => {
            note("rcpt", header);
            rcpts.clone()
        }
        (true, None) => {
            return Err(
                "no recipient: give --rcpt ADDR (the message has no To, Cc or Delivered-To)".into(),
            );
        }
    };
    Ok(Envelope {
        client: client.to_string(),
        client_name,
        helo: Some(helo),
        sender,
        recipients,
        auth: args.auth.clone(),
        sources,
    })
}

/// The connection that delivers `message` with `envelope`: one message, the AUTH macros when
/// the envelope has a user.
pub fn smtp(
    envelope: &Envelope,
    message: &Message,
    receiver: String,
    macros: StageMacros,
    queue_id: &str,
) -> Result<Smtp, String> {
    let mut mail_macros = StageMacros::new();
    if let Some(user) = &envelope.auth {
        let mail = mail_macros.entry("mail".into()).or_default();
        mail.insert("{auth_authen}".into(), user.clone());
        mail.insert("{auth_type}".into(), "PLAIN".into());
    }
    Ok(Smtp {
        ip: envelope
            .client
            .parse()
            .map_err(|_| "bad client address".to_string())?,
        name: envelope.client_name.clone(),
        helo: envelope.helo.clone(),
        receiver,
        macros,
        mails: vec![Mail {
            sender: format!("<{}>", envelope.sender),
            recipients: envelope
                .recipients
                .iter()
                .map(|r| format!("<{r}>"))
                .collect(),
            headers: message.headers.clone(),
            body: message.body.clone(),
            macros: mail_macros,
            queue_id: queue_id.into(),
        }],
    })
}

/// Runs one message file; on failure, the exit status and why.
fn test_message(
    args: &TestArgs,
    path: &Path,
    mut config: Config,
    zones: Option<Zones>,
) -> Result<Report, (u8, String)> {
    let bytes = std::fs::read(path)
        .map_err(|e| (EXIT_ERROR, format!("{}: cannot read: {e}", path.display())))?;
    let message = Message::parse(&bytes);
    let envelope = envelope(&args.given(), &message).map_err(|e| (EXIT_USAGE, e))?;
    let mut macros = StageMacros::new();
    for text in &args.macros {
        let (stage, name, value) = parse_macro(text).map_err(|e| (EXIT_USAGE, e))?;
        macros.entry(stage).or_default().insert(name, value);
    }
    let scratch = tempfile::TempDir::new().map_err(|e| {
        (
            EXIT_ERROR,
            format!("cannot make a temporary directory: {e}"),
        )
    })?;
    let store_note = prepare_config(
        &mut config,
        args.store.unwrap_or(StoreMode::Copy),
        scratch.path(),
    )
    .map_err(|e| (EXIT_ERROR, e))?;
    let smtp = smtp(&envelope, &message, receiver(&config), macros, "TEST000001")
        .map_err(|e| (EXIT_USAGE, e))?;
    let runtime = runtime().map_err(|e| (EXIT_ERROR, format!("cannot start the runtime: {e}")))?;
    let capture = Capture::default();
    let _caught = capture.install();
    let (transcript, dns_note) = runtime.block_on(async {
        let (resolver, dns_note) = resolver(&config, zones).map_err(|e| (EX_CONFIG, e))?;
        let milter = Milter::start(config, resolver, store::system_clock())
            .map_err(|e| (EX_CONFIG, e.to_string()))?;
        let played = async {
            let conn = milter.connect().await?;
            mta::play(conn, &capture, &smtp).await
        }
        .await;
        milter.stop().await;
        let transcript = played.map_err(|e| (EXIT_ERROR, format!("the milter: {e}")))?;
        Ok::<_, (u8, String)>((transcript, dns_note))
    })?;
    let result = transcript
        .connection
        .clone()
        .or_else(|| transcript.mails.first().and_then(|m| m.ending.clone()));
    Ok(Report {
        message: path.display().to_string(),
        bytes: bytes.len(),
        header_fields: message.headers.len(),
        line_ends: message.line_ends,
        notes: message.notes,
        envelope,
        dns: dns_note,
        store: store_note,
        transcript,
        result,
    })
}

/// Runs case files and prints one line per case (or JSON); exit 0 when every case passed.
fn run_cases(paths: &[PathBuf], options: &CaseOptions, json: bool) -> ExitCode {
    let files = match cases::collect(paths) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("luamilter test: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let results = cases::run_files(&files, options);
    let mut out = std::io::stdout().lock();
    let written = if json {
        serde_json::to_writer_pretty(&mut out, &results)
            .map_err(std::io::Error::other)
            .and_then(|()| writeln!(out))
    } else {
        cases::write_summary(&mut out, &results)
    };
    if written.is_err() {
        return ExitCode::from(EXIT_ERROR);
    }
    let failed = results.iter().any(|r| !r.passed());
    ExitCode::from(if failed {
        EXIT_ERROR
    } else {
        report::EXIT_ACCEPT
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macros_name_a_stage_or_default_to_connect() {
        assert_eq!(
            parse_macro("{daemon_port}=25").unwrap(),
            ("connect".into(), "{daemon_port}".into(), "25".into())
        );
        assert_eq!(
            parse_macro("mail:{auth_authen}=bob").unwrap(),
            ("mail".into(), "{auth_authen}".into(), "bob".into())
        );
        assert!(parse_macro("nope").is_err());
        assert!(
            parse_macro("body:x=1")
                .unwrap_err()
                .contains("unknown stage")
        );
    }
}
