//! What `luamilter test MESSAGE` prints: the envelope and where each part came from, then stage
//! by stage what was sent, what the milter answered, which policy decided and what the policies
//! logged, then the edits, the header after them, the decision trace and the result; or all of
//! it as one JSON object (`--json`).

use super::{
    capture::Captured,
    mta::{Ending, Exchange, Transcript},
};
use luamilter_vocab::VerdictKind;
use serde::Serialize;
use std::{collections::BTreeMap, io::Write};

/// Exit status: the message was accepted (or discarded, see [`EXIT_DISCARD`]).
pub const EXIT_ACCEPT: u8 = 0;
/// Exit status: the test could not run (unreadable message, milter failure).
pub const EXIT_ERROR: u8 = 1;
/// Exit status: a bad command line, or an envelope the message does not suggest.
pub const EXIT_USAGE: u8 = 2;
/// Exit status: the message (or the connection) was rejected.
pub const EXIT_REJECT: u8 = 3;
/// Exit status: the message (or the connection) was refused for now (tempfail).
pub const EXIT_TEMPFAIL: u8 = 4;
/// Exit status: the message was accepted and discarded.
pub const EXIT_DISCARD: u8 = 5;

/// The envelope a message was tested with.
#[derive(Clone, Debug, Serialize)]
pub struct Envelope {
    /// Client IP.
    pub client: String,
    /// The client name passed at connect.
    pub client_name: String,
    /// The HELO name.
    pub helo: Option<String>,
    /// MAIL FROM address ("" for the null sender).
    pub sender: String,
    /// RCPT TO addresses.
    pub recipients: Vec<String>,
    /// SMTP AUTH user.
    pub auth: Option<String>,
    /// Where each part came from ("given", "Return-Path", "the first Received header", …).
    pub sources: BTreeMap<String, String>,
}

/// The report of one `luamilter test MESSAGE`.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The message file.
    pub message: String,
    /// Its size.
    pub bytes: usize,
    /// Its header fields.
    pub header_fields: usize,
    /// Its line ends: CRLF, LF, mixed or none.
    pub line_ends: &'static str,
    /// What was odd about it.
    pub notes: Vec<String>,
    /// The envelope.
    pub envelope: Envelope,
    /// Where DNS answers came from.
    pub dns: String,
    /// Which store was used.
    pub store: String,
    /// What happened, stage by stage.
    pub transcript: Transcript,
    /// How the message ended.
    pub result: Option<Ending>,
}

impl Report {
    /// The exit status that tells the result.
    pub fn exit_code(&self) -> u8 {
        match self.result.as_ref().map(|e| e.verdict) {
            Some(VerdictKind::Reject) => EXIT_REJECT,
            Some(VerdictKind::Tempfail) => EXIT_TEMPFAIL,
            Some(VerdictKind::Discard) => EXIT_DISCARD,
            Some(VerdictKind::Accept | VerdictKind::Continue) => EXIT_ACCEPT,
            None => EXIT_ERROR,
        }
    }

    /// The report as text.
    pub fn write_text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(
            out,
            "message  {}: {} bytes, {} header fields, {} line ends",
            self.message, self.bytes, self.header_fields, self.line_ends
        )?;
        for note in &self.notes {
            writeln!(out, "         note: {note}")?;
        }
        let e = &self.envelope;
        let source = |key: &str| {
            e.sources
                .get(key)
                .map(|s| format!("  ({s})"))
                .unwrap_or_default()
        };
        let lines = [
            (
                "client",
                format!("{} {}", e.client, e.client_name),
                "client",
            ),
            (
                "helo",
                e.helo.clone().unwrap_or_else(|| "(none)".into()),
                "helo",
            ),
            ("from", format!("<{}>", e.sender), "from"),
            (
                "rcpt",
                e.recipients
                    .iter()
                    .map(|r| format!("<{r}>"))
                    .collect::<Vec<_>>()
                    .join(" "),
                "rcpt",
            ),
        ];
        for (label, value, key) in lines {
            writeln!(out, "{label:<8} {value}{}", source(key))?;
        }
        if let Some(user) = &e.auth {
            writeln!(out, "auth     {user}")?;
        }
        writeln!(out, "dns      {}", self.dns)?;
        writeln!(out, "store    {}", self.store)?;
        writeln!(out)?;
        write_transcript(out, &self.transcript)?;
        match &self.result {
            Some(ending) => writeln!(out, "result   {}", describe(ending))?,
            None => writeln!(out, "result   none")?,
        }
        Ok(())
    }
}

/// "reject at rcpt by greylist: 451 4.7.1 …".
pub fn describe(ending: &Ending) -> String {
    let mut text = format!("{} at {}", ending.verdict, ending.stage.name());
    if let Some(policy) = &ending.policy {
        text.push_str(&format!(" by {policy}"));
    }
    if let Some(reply) = &ending.reply {
        text.push_str(&format!(": {}", reply.replace("\r\n", " / ")));
    }
    text
}

/// The stages, the edits, the header after them and the trace of every message.
pub fn write_transcript(out: &mut dyn Write, transcript: &Transcript) -> std::io::Result<()> {
    let mut current = None;
    for exchange in &transcript.exchanges {
        if exchange.mail != current {
            if let Some(done) = current {
                write_mail_end(out, transcript, done)?;
            }
            current = exchange.mail;
        }
        write_exchange(out, exchange)?;
    }
    if let Some(done) = current {
        write_mail_end(out, transcript, done)?;
    }
    for event in &transcript.other_events {
        if let Some(line) = event_line(event) {
            writeln!(out, "         {line}")?;
        }
    }
    Ok(())
}

fn write_exchange(out: &mut dyn Write, exchange: &Exchange) -> std::io::Result<()> {
    let sent = if exchange.sent.is_empty() {
        String::new()
    } else {
        format!("{}  ", exchange.sent)
    };
    writeln!(
        out,
        "{:<8} {sent}-> {}",
        exchange.stage.name(),
        exchange.answer
    )?;
    for event in &exchange.events {
        if let Some(line) = event_line(event) {
            writeln!(out, "         {line}")?;
        }
    }
    Ok(())
}

fn write_mail_end(
    out: &mut dyn Write,
    transcript: &Transcript,
    index: usize,
) -> std::io::Result<()> {
    let Some(mail) = transcript.mails.get(index) else {
        return Ok(());
    };
    for edit in &mail.edits {
        writeln!(out, "edit     {edit}")?;
    }
    if let Some(headers) = &mail.headers {
        writeln!(out, "header   after the edits:")?;
        for (name, value) in headers {
            let value = value.replace('\n', "\n         ");
            writeln!(out, "         {name}:{value}")?;
        }
    }
    if let Some(trace) = &mail.trace {
        writeln!(out, "trace    {trace}")?;
    }
    Ok(())
}

/// One line for a captured event; `None` for what says nothing (an accept nobody decided).
fn event_line(event: &Captured) -> Option<String> {
    if event.is_message_summary() {
        return None;
    }
    let policy = event.policy.as_deref().unwrap_or("-");
    if event.is_decision() {
        let verdict = event.field("verdict").unwrap_or("?");
        return match policy {
            "-" => None,
            "(earlier stage)" => Some(format!("owed from an earlier stage: {verdict}")),
            _ => Some(format!("decided by {policy}: {verdict}")),
        };
    }
    if event.is_policy_log() {
        return Some(format!(
            "[{policy}] {}: {}",
            event.level.to_lowercase(),
            event.message
        ));
    }
    if event.message == "policy failed" {
        let error = event.field("error").unwrap_or("?");
        return Some(format!("{policy} failed: {error}"));
    }
    let fields: Vec<String> = event
        .fields
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "client" | "queue_id"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let mut line = format!("{}: {}", event.level.to_lowercase(), event.message);
    if event.policy.is_some() {
        line = format!("[{policy}] {line}");
    }
    if !fields.is_empty() {
        line.push_str(&format!(" ({})", fields.join(", ")));
    }
    Some(line)
}
