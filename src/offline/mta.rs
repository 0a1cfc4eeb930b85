//! The MTA side of `luamilter test`: one SMTP connection (client, HELO, messages) played to
//! the milter the way Postfix plays it (`milter8.c`, `smtpd.c`), answer by answer, with what
//! the milter logged meanwhile attached to the stage it belongs to.
//!
//! As Postfix does: macros go before every event; stages the milter negotiated away are not
//! sent, NOREPLY ones not waited for; a reject or tempfail at connect or HELO ends the
//! connection; at RCPT it refuses that recipient only; a final answer at any other stage ends
//! the message; a message whose recipients were all refused is aborted, and so is one refused
//! after RCPT. At end of message the edit requests are collected until the verdict.

use super::capture::{Capture, Captured};
use bytes::Bytes;
use indymilter::{
    ProtoOpts, SocketInfo,
    message::{
        command::{
            Command, ConnInfoPayload, EnvAddrPayload, HeaderPayload, HeloPayload, MacroPayload,
        },
        reply::Reply,
    },
};
use luamilter_loadgen::client::{ClientError, Connection};
use luamilter_vocab::{Stage, VerdictKind};
use serde::{Serialize, Serializer};
use std::{collections::BTreeMap, ffi::CString, fmt, net::IpAddr};
use tokio::io::{AsyncRead, AsyncWrite};

/// Body chunk size, as Postfix's `MILTER_CHUNK_SIZE`.
const CHUNK_SIZE: usize = 65535;

/// Macros per macro stage name (`connect helo mail rcpt data eoh eom`): name → value.
pub type StageMacros = BTreeMap<String, BTreeMap<String, String>>;

/// One SMTP connection to play.
#[derive(Clone, Debug)]
pub struct Smtp {
    /// The client's address.
    pub ip: IpAddr,
    /// The client name the MTA passes at connect: its verified host name, or `[ip]`.
    pub name: String,
    /// The HELO name; `None` sends no HELO.
    pub helo: Option<String>,
    /// The receiving host's name (macro `j`).
    pub receiver: String,
    /// Macros of the connection, per stage.
    pub macros: StageMacros,
    /// The messages, in order.
    pub mails: Vec<Mail>,
}

/// One message to play.
#[derive(Clone, Debug, Default)]
pub struct Mail {
    /// The MAIL FROM argument as given (`<a@example.com>`, maybe with ESMTP arguments).
    pub sender: String,
    /// The RCPT TO arguments.
    pub recipients: Vec<String>,
    /// Header fields: name, value as passed.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body, CRLF line ends.
    pub body: Vec<u8>,
    /// Macros of this message, per stage (over the connection's).
    pub macros: StageMacros,
    /// The queue id (macro `i`).
    pub queue_id: String,
}

/// What the milter answered one stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Not sent: the milter negotiated the stage away.
    NotSent,
    /// Sent without waiting: the milter negotiated no reply for it.
    NoReply,
    Continue,
    /// Skip the rest of this stage (headers, body chunks).
    Skip,
    Accept,
    Discard,
    /// A reject, with the SMTP reply text when the milter gave one.
    Reject(Option<String>),
    /// A tempfail, with the SMTP reply text when the milter gave one.
    Tempfail(Option<String>),
}

impl Answer {
    fn from_reply(reply: Reply, stage: Stage) -> Result<Answer, ClientError> {
        Ok(match reply {
            Reply::Continue => Answer::Continue,
            Reply::Skip => Answer::Skip,
            Reply::Accept => Answer::Accept,
            Reply::Discard => Answer::Discard,
            Reply::Reject => Answer::Reject(None),
            Reply::Tempfail => Answer::Tempfail(None),
            Reply::ReplyCode { reply } => {
                // As the SMTP client gets it: the MTA reads `%%` as `%`.
                let text = reply.to_string_lossy().replace("%%", "%");
                if text.starts_with('4') {
                    Answer::Tempfail(Some(text))
                } else {
                    Answer::Reject(Some(text))
                }
            }
            other => return Err(luamilter_loadgen::client::unexpected(&other, stage.name())),
        })
    }

    /// The verdict it stands for; `None` while the stage goes on.
    pub fn verdict(&self) -> Option<VerdictKind> {
        match self {
            Answer::NotSent | Answer::NoReply | Answer::Continue | Answer::Skip => None,
            Answer::Accept => Some(VerdictKind::Accept),
            Answer::Discard => Some(VerdictKind::Discard),
            Answer::Reject(_) => Some(VerdictKind::Reject),
            Answer::Tempfail(_) => Some(VerdictKind::Tempfail),
        }
    }

    /// The SMTP reply text, for a reject or tempfail that has one.
    pub fn reply(&self) -> Option<&str> {
        match self {
            Answer::Reject(r) | Answer::Tempfail(r) => r.as_deref(),
            _ => None,
        }
    }
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = match self {
            Answer::NotSent => "not sent (negotiated away)",
            Answer::NoReply => "no reply (negotiated)",
            other => other.word(),
        };
        f.write_str(word)?;
        if let Some(text) = self.reply() {
            write!(f, " {}", text.replace("\r\n", " / "))?;
        }
        Ok(())
    }
}

impl Answer {
    /// One word: not_sent, no_reply, continue, skip, accept, discard, reject, tempfail.
    pub fn word(&self) -> &'static str {
        match self {
            Answer::NotSent => "not_sent",
            Answer::NoReply => "no_reply",
            Answer::Continue => "continue",
            Answer::Skip => "skip",
            Answer::Accept => "accept",
            Answer::Discard => "discard",
            Answer::Reject(_) => "reject",
            Answer::Tempfail(_) => "tempfail",
        }
    }
}

/// In JSON, the word; the reply text goes beside it.
impl Serialize for Answer {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.word())
    }
}

fn answer_reply(answer: &Answer) -> Option<String> {
    answer.reply().map(str::to_string)
}

fn stage_name<S: Serializer>(stage: &Stage, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(stage.name())
}

/// One stage sent and answered (all the headers of a message count as one, and so do the body
/// chunks).
#[derive(Clone, Debug, Serialize)]
pub struct Exchange {
    /// The stage.
    #[serde(serialize_with = "stage_name")]
    pub stage: Stage,
    /// What was sent, in short.
    pub sent: String,
    /// The answer.
    pub answer: Answer,
    /// The SMTP reply of a reject or tempfail, when the milter gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// What the milter logged for this stage.
    pub events: Vec<Captured>,
    /// The message it belongs to (index into [`Transcript::mails`]), `None` for connect, HELO
    /// and close.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mail: Option<usize>,
}

/// An edit the milter asked for at end of message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum EditAction {
    AddHeader {
        name: String,
        value: String,
    },
    InsertHeader {
        index: i32,
        name: String,
        value: String,
    },
    /// Change the `index`-th (from 1) header `name`; an empty value deletes it.
    ChangeHeader {
        name: String,
        index: i32,
        value: String,
    },
    AddRcpt {
        rcpt: String,
        args: Option<String>,
    },
    DeleteRcpt {
        rcpt: String,
    },
    ChangeSender {
        sender: String,
        args: Option<String>,
    },
    ReplaceBody {
        bytes: usize,
    },
    Quarantine {
        reason: String,
    },
}

impl EditAction {
    fn from_reply(reply: &Reply) -> Option<EditAction> {
        let text = |c: &CString| c.to_string_lossy().into_owned();
        Some(match reply {
            Reply::AddHeader { name, value } => EditAction::AddHeader {
                name: text(name),
                value: text(value),
            },
            Reply::InsertHeader { index, name, value } => EditAction::InsertHeader {
                index: *index,
                name: text(name),
                value: text(value),
            },
            Reply::ChangeHeader { name, index, value } => EditAction::ChangeHeader {
                name: text(name),
                index: *index,
                value: text(value),
            },
            Reply::AddRcpt { rcpt } => EditAction::AddRcpt {
                rcpt: text(rcpt),
                args: None,
            },
            Reply::AddRcptExt { rcpt, args } => EditAction::AddRcpt {
                rcpt: text(rcpt),
                args: args.as_ref().map(text),
            },
            Reply::DeleteRcpt { rcpt } => EditAction::DeleteRcpt { rcpt: text(rcpt) },
            Reply::ChangeSender { mail, args } => EditAction::ChangeSender {
                sender: text(mail),
                args: args.as_ref().map(text),
            },
            Reply::ReplaceBody { chunk } => EditAction::ReplaceBody { bytes: chunk.len() },
            Reply::Quarantine { reason } => EditAction::Quarantine {
                reason: text(reason),
            },
            _ => return None,
        })
    }

    /// Applies the edit to a header list, as the MTA would (Postfix puts a space after the
    /// colon of a header it adds or changes unless the value starts with one).
    fn apply(&self, headers: &mut Vec<(String, String)>) {
        let spaced = |value: &str| {
            if value.starts_with([' ', '\t']) {
                value.to_string()
            } else {
                format!(" {value}")
            }
        };
        match self {
            EditAction::AddHeader { name, value } => headers.push((name.clone(), spaced(value))),
            EditAction::InsertHeader { index, name, value } => {
                let at = usize::try_from(*index).unwrap_or(0).min(headers.len());
                headers.insert(at, (name.clone(), spaced(value)));
            }
            EditAction::ChangeHeader { name, index, value } => {
                let found = headers
                    .iter()
                    .enumerate()
                    .filter(|(_, (n, _))| n.eq_ignore_ascii_case(name))
                    .nth(usize::try_from(*index).unwrap_or(1).saturating_sub(1))
                    .map(|(at, _)| at);
                match (found, value.is_empty()) {
                    (Some(at), true) => {
                        headers.remove(at);
                    }
                    (Some(at), false) => headers[at].1 = spaced(value),
                    // Changing a header that is not there adds it (as Sendmail and Postfix do).
                    (None, false) => headers.push((name.clone(), spaced(value))),
                    (None, true) => {}
                }
            }
            _ => {}
        }
    }
}

impl fmt::Display for EditAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let args = |a: &Option<String>| a.as_ref().map(|a| format!(" {a}")).unwrap_or_default();
        match self {
            EditAction::AddHeader { name, value } => write!(f, "add header {name}: {value}"),
            EditAction::InsertHeader { index, name, value } => {
                write!(f, "insert header at {index} {name}: {value}")
            }
            EditAction::ChangeHeader { name, index, value } if value.is_empty() => {
                write!(f, "delete header {name} #{index}")
            }
            EditAction::ChangeHeader { name, index, value } => {
                write!(f, "change header {name} #{index} to: {value}")
            }
            EditAction::AddRcpt { rcpt, args: a } => write!(f, "add recipient {rcpt}{}", args(a)),
            EditAction::DeleteRcpt { rcpt } => write!(f, "delete recipient {rcpt}"),
            EditAction::ChangeSender { sender, args: a } => {
                write!(f, "change sender to {sender}{}", args(a))
            }
            EditAction::ReplaceBody { bytes } => write!(f, "replace body ({bytes} bytes)"),
            EditAction::Quarantine { reason } => write!(f, "quarantine: {reason}"),
        }
    }
}

/// How a message (or, at connect and HELO, the whole connection) ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Ending {
    /// accept, reject, tempfail or discard.
    #[serde(serialize_with = "verdict_name")]
    pub verdict: VerdictKind,
    /// The stage that decided.
    #[serde(serialize_with = "stage_name")]
    pub stage: Stage,
    /// The SMTP reply text the client got, when the milter gave one.
    pub reply: Option<String>,
    /// The policy that decided, from the decision log ("(earlier stage)" for a verdict owed
    /// by an earlier stage); `None` when no policy did (accepted with no objection).
    pub policy: Option<String>,
}

fn verdict_name<S: Serializer>(verdict: &VerdictKind, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(verdict.name())
}

/// The answer to one recipient.
#[derive(Clone, Debug, Serialize)]
pub struct Recipient {
    /// RCPT TO as sent.
    pub address: String,
    /// The answer.
    pub answer: Answer,
    /// The SMTP reply of a reject or tempfail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
}

/// What became of one message.
#[derive(Clone, Debug, Serialize)]
pub struct MailResult {
    /// MAIL FROM as sent.
    pub sender: String,
    /// The answer to each recipient.
    pub recipients: Vec<Recipient>,
    /// How it ended; `None` when the connection ended before its MAIL.
    pub ending: Option<Ending>,
    /// The edits asked for at end of message.
    pub edits: Vec<EditAction>,
    /// The header after the edits, when the message was accepted at end of message.
    pub headers: Option<Vec<(String, String)>>,
    /// The message's decision trace, from its last decision log line.
    pub trace: Option<String>,
}

/// Everything that happened on one connection.
#[derive(Clone, Debug, Serialize)]
pub struct Transcript {
    /// The stages, in the order they were sent.
    pub exchanges: Vec<Exchange>,
    /// The connection was refused (or accepted as a whole) at connect or HELO.
    pub connection: Option<Ending>,
    /// The messages.
    pub mails: Vec<MailResult>,
    /// What the milter logged that belongs to no stage (warnings, the close stage).
    pub other_events: Vec<Captured>,
}

fn cstring(bytes: impl Into<Vec<u8>>) -> CString {
    let mut bytes = bytes.into();
    bytes.retain(|&b| b != 0);
    CString::new(bytes).unwrap_or_default()
}

/// The macro stage names a case file or `--macro` may use.
pub const MACRO_STAGES: [&str; 7] = ["connect", "helo", "mail", "rcpt", "data", "eoh", "eom"];

/// The macro command for `stage`: the MTA's own macros, then the given ones over them.
fn macros(stage: &str, own: &[(&str, &str)], given: &[&StageMacros]) -> Option<Command> {
    let mut all: BTreeMap<&str, &str> = own.iter().copied().collect();
    for set in given {
        if let Some(m) = set.get(stage) {
            all.extend(m.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        }
    }
    if all.is_empty() {
        return None;
    }
    let macros = all
        .iter()
        .flat_map(|(k, v)| [cstring(*k), cstring(*v)])
        .collect();
    let stage = Stage::from_name(stage).filter(|_| MACRO_STAGES.contains(&stage))?;
    Some(Command::DefMacros(MacroPayload {
        stage: crate::engine::plan::macro_stage(stage),
        macros,
    }))
}

/// Plays connections and keeps the transcript of the current one.
struct Player<'a, S> {
    conn: Connection<S>,
    capture: &'a Capture,
    transcript: Transcript,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Player<'_, S> {
    /// Sends one event and records the exchange; returns the answer.
    async fn event(
        &mut self,
        stage: Stage,
        sent: String,
        mail: Option<usize>,
        macros: Option<Command>,
        cmd: Command,
    ) -> Result<Answer, ClientError> {
        let answer = match self.conn.event(stage, macros, cmd).await? {
            Some(reply) => Answer::from_reply(reply, stage)?,
            None if self.conn.opts.contains(stage.protocol_flags().0) => Answer::NotSent,
            None => Answer::NoReply,
        };
        self.record(stage, sent, mail, answer.clone());
        Ok(answer)
    }

    /// Records an exchange and hands out what was logged since the last one.
    fn record(&mut self, stage: Stage, sent: String, mail: Option<usize>, answer: Answer) {
        self.transcript.exchanges.push(Exchange {
            stage,
            sent,
            reply: answer_reply(&answer),
            answer,
            events: Vec::new(),
            mail,
        });
        self.distribute();
    }

    /// Attaches the events caught so far to the latest exchange of their stage (the current
    /// one when they name no stage); the close stage's go to `other_events`.
    fn distribute(&mut self) {
        for event in self.capture.drain() {
            let exchanges = &mut self.transcript.exchanges;
            let target = match event.stage.as_deref() {
                Some("close") => None,
                Some(stage) => exchanges
                    .iter()
                    .rposition(|e| e.stage.name() == stage)
                    .or(exchanges.len().checked_sub(1)),
                None => exchanges.len().checked_sub(1),
            };
            match target {
                Some(at) => exchanges[at].events.push(event),
                None => self.transcript.other_events.push(event),
            }
        }
    }

    /// The policy the decision log names for the latest decision at `stage`.
    fn decided_by(&self, stage: Stage) -> Option<String> {
        let exchange = self
            .transcript
            .exchanges
            .iter()
            .rfind(|e| e.stage == stage)?;
        let decision = exchange.events.iter().rfind(|e| e.is_decision())?;
        decision.policy.clone().filter(|p| p != "-")
    }

    fn ending(&self, stage: Stage, answer: &Answer) -> Option<Ending> {
        Some(Ending {
            verdict: answer.verdict()?,
            stage,
            reply: answer.reply().map(str::to_string),
            policy: self.decided_by(stage),
        })
    }
}

/// Plays `smtp` on `conn` and returns what happened; every event the milter logs meanwhile is
/// taken from `capture`.
pub async fn play<S: AsyncRead + AsyncWrite + Unpin>(
    conn: Connection<S>,
    capture: &Capture,
    smtp: &Smtp,
) -> Result<Transcript, ClientError> {
    capture.drain();
    let mut p = Player {
        conn,
        capture,
        transcript: Transcript {
            exchanges: Vec::new(),
            connection: None,
            mails: Vec::new(),
            other_events: Vec::new(),
        },
    };
    let ip = smtp.ip.to_string();
    let underscore = format!("{} [{ip}]", smtp.name);
    let own = [
        ("j", smtp.receiver.as_str()),
        ("{daemon_name}", "luamilter-test"),
        ("v", "luamilter test"),
        ("_", underscore.as_str()),
        ("{client_addr}", ip.as_str()),
        ("{client_name}", smtp.name.as_str()),
    ];
    let connect = Command::ConnInfo(ConnInfoPayload {
        hostname: cstring(smtp.name.as_str()),
        socket_info: SocketInfo::Inet((smtp.ip, 25252).into()),
    });
    let connected = if smtp.name == format!("[{ip}]") {
        smtp.name.clone()
    } else {
        format!("{} [{ip}]", smtp.name)
    };
    let mut greeting = vec![(
        Stage::Connect,
        connected,
        macros("connect", &own, &[&smtp.macros]),
        connect,
    )];
    if let Some(helo) = &smtp.helo {
        greeting.push((
            Stage::Helo,
            helo.clone(),
            macros("helo", &[], &[&smtp.macros]),
            Command::Helo(HeloPayload {
                hostname: cstring(helo.as_str()),
            }),
        ));
    }
    for (stage, sent, macros, cmd) in greeting {
        let answer = p.event(stage, sent, None, macros, cmd).await?;
        // Postfix ignores a discard at connect and HELO.
        if answer.verdict().is_some_and(|v| v != VerdictKind::Discard) {
            p.transcript.connection = p.ending(stage, &answer);
            break;
        }
    }
    for (index, mail) in smtp.mails.iter().enumerate() {
        let mut result = MailResult {
            sender: mail.sender.clone(),
            recipients: Vec::new(),
            ending: None,
            edits: Vec::new(),
            headers: None,
            trace: None,
        };
        if p.transcript.connection.is_none() {
            play_mail(&mut p, smtp, index, mail, &mut result).await?;
        }
        p.transcript.mails.push(result);
    }
    p.conn.quit_and_wait().await?;
    p.distribute();
    Ok(p.transcript)
}

/// A MAIL or RCPT argument as given (`<a@example.com> SIZE=10`): the address as sent, without
/// its angle brackets, and the command's arguments.
fn envelope_args(given: &str) -> (String, String, Vec<CString>) {
    let mut words = given.split_whitespace();
    let first = words.next().unwrap_or("<>").to_string();
    let address = first
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_string();
    let args = std::iter::once(first.as_str())
        .chain(words)
        .map(cstring)
        .collect();
    (first, address, args)
}

/// Plays one message, MAIL to end of message.
async fn play_mail<S: AsyncRead + AsyncWrite + Unpin>(
    p: &mut Player<'_, S>,
    smtp: &Smtp,
    index: usize,
    mail: &Mail,
    result: &mut MailResult,
) -> Result<(), ClientError> {
    let given = [&smtp.macros, &mail.macros];
    let at = Some(index);
    let queue_id = mail.queue_id.as_str();
    let (sender, address, args) = envelope_args(&mail.sender);
    let mail_cmd = Command::Mail(EnvAddrPayload { args });
    let own = [("i", queue_id), ("{mail_addr}", address.as_str())];
    let answer = p
        .event(
            Stage::Mail,
            sender.clone(),
            at,
            macros("mail", &own, &given),
            mail_cmd,
        )
        .await?;
    if let Some(ending) = p.ending(Stage::Mail, &answer) {
        result.ending = Some(ending);
        finish(p, result);
        return Ok(());
    }
    let mut refused = Vec::new();
    for rcpt in &mail.recipients {
        let (first, address, args) = envelope_args(rcpt);
        let cmd = Command::Rcpt(EnvAddrPayload { args });
        let own = [("{rcpt_addr}", address.as_str())];
        let answer = p
            .event(Stage::Rcpt, first, at, macros("rcpt", &own, &given), cmd)
            .await?;
        result.recipients.push(Recipient {
            address: rcpt.clone(),
            reply: answer_reply(&answer),
            answer: answer.clone(),
        });
        match answer.verdict() {
            Some(VerdictKind::Reject | VerdictKind::Tempfail) => refused.push(answer),
            Some(_) => {
                result.ending = p.ending(Stage::Rcpt, &answer);
                finish(p, result);
                return Ok(());
            }
            None => {}
        }
    }
    if refused.len() == mail.recipients.len() {
        // No recipient left: the client never gets to DATA, and the MTA aborts.
        let last = refused.iter().rfind(|a| matches!(a, Answer::Tempfail(_)));
        let answer = last
            .or(refused.last())
            .cloned()
            .unwrap_or(Answer::Reject(None));
        result.ending = p.ending(Stage::Rcpt, &answer);
        p.event(Stage::Abort, String::new(), at, None, Command::Abort)
            .await?;
        finish(p, result);
        return Ok(());
    }
    let own = [("i", queue_id)];
    for stage in [Stage::Data, Stage::Header, Stage::Eoh, Stage::Body] {
        let answer = match stage {
            Stage::Header => send_headers(p, mail, at).await?,
            Stage::Body => send_body(p, mail, at).await?,
            _ => {
                let cmd = if stage == Stage::Data {
                    Command::Data
                } else {
                    Command::Eoh
                };
                let macros = macros(stage.name(), &own, &given);
                p.event(stage, String::new(), at, macros, cmd).await?
            }
        };
        if ends(p, result, stage, &answer).await? {
            return Ok(());
        }
    }
    end_of_message(p, mail, at, macros("eom", &own, &given), result).await
}

/// Sends the commands of a stage that comes in parts (header fields, body chunks) until a
/// final answer or a skip, and records them as one exchange: `whole` says what there was,
/// `sent` what was sent of it (given the count). The answer is the last one, `NotSent` when
/// the stage was negotiated away.
async fn send_parts<S: AsyncRead + AsyncWrite + Unpin>(
    p: &mut Player<'_, S>,
    stage: Stage,
    at: Option<usize>,
    parts: impl Iterator<Item = Command>,
    whole: String,
    sent: impl Fn(usize) -> String,
) -> Result<Answer, ClientError> {
    let mut answer = Answer::NotSent;
    let mut count = 0;
    if !p.conn.opts.contains(stage.protocol_flags().0) {
        for cmd in parts {
            count += 1;
            answer = match p.conn.event(stage, None, cmd).await? {
                Some(reply) => Answer::from_reply(reply, stage)?,
                None => Answer::NoReply,
            };
            if answer.verdict().is_some() || answer == Answer::Skip {
                break;
            }
        }
    }
    let summary = match answer {
        Answer::NotSent => whole,
        _ => sent(count),
    };
    p.record(stage, summary, at, answer.clone());
    Ok(answer)
}

/// Every header field, as one exchange.
async fn send_headers<S: AsyncRead + AsyncWrite + Unpin>(
    p: &mut Player<'_, S>,
    mail: &Mail,
    at: Option<usize>,
) -> Result<Answer, ClientError> {
    let lead = p.conn.opts.contains(ProtoOpts::LEADING_SPACE);
    let fields = mail.headers.iter().map(|(name, value)| {
        let blanks = value.iter().take_while(|b| **b == b' ' || **b == b'\t');
        let value = if lead {
            value
        } else {
            &value[blanks.count()..]
        };
        Command::Header(HeaderPayload {
            name: cstring(name.as_str()),
            value: cstring(value),
        })
    });
    let total = mail.headers.len();
    let whole = format!("{total} header fields");
    let sent = |n| format!("{n} of {total} header fields");
    send_parts(p, Stage::Header, at, fields, whole, sent).await
}

/// The body in chunks, as one exchange.
async fn send_body<S: AsyncRead + AsyncWrite + Unpin>(
    p: &mut Player<'_, S>,
    mail: &Mail,
    at: Option<usize>,
) -> Result<Answer, ClientError> {
    let chunks = mail
        .body
        .chunks(CHUNK_SIZE)
        .map(|chunk| Command::BodyChunk(Bytes::copy_from_slice(chunk)));
    let size = mail.body.len();
    let sent = |n| format!("{size} bytes in {n} chunk(s)");
    send_parts(p, Stage::Body, at, chunks, format!("{size} bytes"), sent).await
}

/// Whether the message ended with `answer` at `stage` (then it is recorded and aborted).
async fn ends<S: AsyncRead + AsyncWrite + Unpin>(
    p: &mut Player<'_, S>,
    result: &mut MailResult,
    stage: Stage,
    answer: &Answer,
) -> Result<bool, ClientError> {
    let Some(ending) = p.ending(stage, answer) else {
        return Ok(false);
    };
    let refused = matches!(ending.verdict, VerdictKind::Reject | VerdictKind::Tempfail);
    result.ending = Some(ending);
    if refused {
        let at = p.transcript.exchanges.last().and_then(|e| e.mail);
        p.event(Stage::Abort, String::new(), at, None, Command::Abort)
            .await?;
    }
    finish(p, result);
    Ok(true)
}

/// End of message: the edit requests, then the verdict.
async fn end_of_message<S: AsyncRead + AsyncWrite + Unpin>(
    p: &mut Player<'_, S>,
    mail: &Mail,
    at: Option<usize>,
    macros: Option<Command>,
    result: &mut MailResult,
) -> Result<(), ClientError> {
    if let Some(macros) = macros {
        p.conn.send(macros).await?;
    }
    p.conn.send(Command::BodyEnd(Bytes::new())).await?;
    let answer = loop {
        let reply = p.conn.reply().await?;
        match EditAction::from_reply(&reply) {
            Some(edit) => result.edits.push(edit),
            None => break Answer::from_reply(reply, Stage::Eom)?,
        }
    };
    p.record(Stage::Eom, String::new(), at, answer.clone());
    // Continue at end of message accepts it.
    let verdict_answer = match answer {
        Answer::Continue | Answer::Skip => Answer::Accept,
        other => other,
    };
    result.ending = p.ending(Stage::Eom, &verdict_answer);
    if matches!(verdict_answer, Answer::Accept) {
        let mut headers: Vec<(String, String)> = mail
            .headers
            .iter()
            .map(|(n, v)| (n.clone(), String::from_utf8_lossy(v).into_owned()))
            .collect();
        for edit in &result.edits {
            edit.apply(&mut headers);
        }
        result.headers = Some(headers);
    }
    finish(p, result);
    Ok(())
}

/// The message's trace, from its last decision line.
fn finish<S>(p: &Player<'_, S>, result: &mut MailResult) {
    let index = p.transcript.mails.len();
    result.trace = p
        .transcript
        .exchanges
        .iter()
        .filter(|e| e.mail == Some(index))
        .flat_map(|e| &e.events)
        .rfind(|e| e.is_message_summary() || e.is_decision())
        .and_then(|e| e.field("trace"))
        .map(str::to_string);
}
