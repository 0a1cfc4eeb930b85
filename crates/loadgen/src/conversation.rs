//! What the load generator says to a milter and how it reacts, modelled on
//! Postfix's milter client (`milter8.c`, `smtpd.c`): macros are sent before
//! every event (even one the milter negotiated away), skipped stages are not
//! sent, NOREPLY stages are not waited for, a final verdict ends the message
//! (at connect or HELO the whole connection), a reject or tempfail at RCPT
//! refuses only that recipient, and every transaction that got past MAIL
//! is closed with an ABORT, as Postfix's `mail_reset` does.

use super::client::{ClientError, Connection, unexpected};
use bytes::Bytes;
use indymilter::{
    MacroStage, ProtoOpts, SocketInfo,
    message::{
        command::{
            Command, ConnInfoPayload, EnvAddrPayload, HeaderPayload, HeloPayload, MacroPayload,
        },
        reply::Reply,
    },
};
use luamilter_vocab::{Stage, VerdictKind};
use std::{
    ffi::CString,
    net::{Ipv4Addr, SocketAddr},
};

/// Body chunk size, as Postfix's `MILTER_CHUNK_SIZE`.
pub const CHUNK_SIZE: usize = 65535;

/// The sender that the benchmark policy rejects.
pub const SPAM_SENDER: &str = "spam@bad.example";

/// The end of one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// How the message ended, as the SMTP client sees it: accept, reject, tempfail or
    /// discard (never continue).
    pub verdict: VerdictKind,
    pub stage: Stage,
    /// Recipients refused with a reject or tempfail at RCPT.
    pub rcpt_rejects: u32,
    /// Modification requests received at end of message.
    pub edits: u32,
}

impl Outcome {
    fn at(stage: Stage, verdict: VerdictKind) -> Self {
        Self {
            verdict,
            stage,
            rcpt_rejects: 0,
            edits: 0,
        }
    }
}

/// The parts every message of a run shares.
pub struct Shape {
    chunks: Vec<Bytes>,
    body_len: usize,
    /// The headers of a given message (`--message`), sent instead of the generated ones.
    headers: Option<Vec<(String, String)>>,
}

impl Shape {
    /// A plain-text body of `body_len` bytes in CRLF lines, cut into chunks.
    pub fn new(body_len: usize) -> Self {
        const LINE: &[u8] =
            b"The quick brown fox jumps over the lazy dog. 0123456789 ABCDEFGHIJKLMNOPQRS\r\n";
        let body: Vec<u8> = LINE.iter().copied().cycle().take(body_len).collect();
        Self::with_body(Bytes::from(body), None)
    }

    /// A given message (CRLF or LF line ends): its headers as the MTA sends them (value without
    /// the space after the colon, continuation lines kept with LF) and its body, with CRLF.
    pub fn from_message(message: &[u8]) -> Result<Self, String> {
        let text = String::from_utf8_lossy(message).replace("\r\n", "\n");
        let (head, body) = text
            .split_once("\n\n")
            .ok_or("the message has no empty line between header and body")?;
        let mut headers: Vec<(String, String)> = Vec::new();
        for line in head.lines() {
            if line.starts_with([' ', '\t']) {
                let (_, value) = headers
                    .last_mut()
                    .ok_or("the message starts with a continuation line")?;
                value.push('\n');
                value.push_str(line);
            } else {
                let (name, value) = line
                    .split_once(':')
                    .ok_or_else(|| format!("not a header line: {line:?}"))?;
                headers.push((name.to_owned(), value.trim_start().to_owned()));
            }
        }
        let body = Bytes::from(body.replace('\n', "\r\n"));
        Ok(Self::with_body(body, Some(headers)))
    }

    /// The body's length in bytes.
    pub fn body_len(&self) -> usize {
        self.body_len
    }

    fn with_body(body: Bytes, headers: Option<Vec<(String, String)>>) -> Self {
        let body_len = body.len();
        let chunks = (0..body_len)
            .step_by(CHUNK_SIZE)
            .map(|at| body.slice(at..body_len.min(at + CHUNK_SIZE)))
            .collect();
        Self {
            chunks,
            body_len,
            headers,
        }
    }
}

/// One message to play: its number in the run and whether it comes from the spam sender.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub index: u64,
    pub spam: bool,
}

impl Plan {
    /// 1 to 3 recipients, in turn.
    fn rcpt_count(&self) -> u64 {
        1 + self.index % 3
    }
}

/// What became of a new connection after CONNECT and HELO.
pub enum Greeting {
    /// The milter wants the session's messages.
    Open(Session),
    /// The milter ended the whole connection (accept, reject or tempfail at CONNECT or HELO).
    Closed(Outcome),
}

/// A negotiated connection on which messages are played.
pub struct Session {
    conn: Connection,
    client: u64,
    /// Messages played on this connection so far.
    pub messages: usize,
}

/// A milter's answer to one event.
enum Answer {
    Continue,
    Skip,
    Final(VerdictKind),
}

fn cstring(s: impl Into<Vec<u8>>) -> CString {
    // Every string here is built from literals and numbers: no NUL bytes.
    CString::new(s).expect("no NUL in generated text")
}

fn macros(stage: MacroStage, pairs: &[(&str, &str)]) -> Command {
    let macros = pairs
        .iter()
        .flat_map(|(k, v)| [cstring(*k), cstring(*v)])
        .collect();
    Command::DefMacros(MacroPayload { stage, macros })
}

impl Session {
    /// Plays CONNECT and HELO for client number `client` on a negotiated connection.
    pub async fn greet(conn: Connection, client: u64) -> Result<Greeting, ClientError> {
        let mut session = Self {
            conn,
            client,
            messages: 0,
        };
        let octet = (client % 250 + 1) as u8;
        let ip = Ipv4Addr::new(192, 0, 2, octet);
        let name = format!("client{client}.example");
        let addr = ip.to_string();
        let connect_macros = macros(
            MacroStage::Connect,
            &[
                ("j", "mx.bench.test"),
                ("{daemon_name}", "luamilter-bench"),
                ("{client_addr}", &addr),
                ("{client_name}", &name),
            ],
        );
        let connect = Command::ConnInfo(ConnInfoPayload {
            hostname: cstring(name.as_str()),
            socket_info: SocketInfo::Inet(SocketAddr::from((ip, 40000 + (client % 20000) as u16))),
        });
        let answer = session
            .event(Stage::Connect, Some(connect_macros), connect)
            .await?;
        if let Some(outcome) = connection_verdict(Stage::Connect, answer) {
            return Ok(Greeting::Closed(outcome));
        }
        let helo = Command::Helo(HeloPayload {
            hostname: cstring(name),
        });
        let answer = session.event(Stage::Helo, None, helo).await?;
        if let Some(outcome) = connection_verdict(Stage::Helo, answer) {
            return Ok(Greeting::Closed(outcome));
        }
        Ok(Greeting::Open(session))
    }

    /// The options the milter negotiated.
    pub fn opts(&self) -> ProtoOpts {
        self.conn.opts
    }

    /// Sends QUIT and closes.
    pub async fn quit(self) -> Result<(), ClientError> {
        self.conn.quit().await
    }

    /// Plays one message, MAIL to end of message, and returns how it ended.
    pub async fn deliver(&mut self, plan: Plan, shape: &Shape) -> Result<Outcome, ClientError> {
        self.messages += 1;
        let outcome = self.transaction(plan, shape).await?;
        // Postfix aborts the milter transaction whenever MAIL was accepted.
        let mail_refused = outcome.stage == Stage::Mail
            && matches!(outcome.verdict, VerdictKind::Reject | VerdictKind::Tempfail);
        if !mail_refused {
            self.conn.send(Command::Abort).await?;
        }
        Ok(outcome)
    }

    async fn transaction(&mut self, plan: Plan, shape: &Shape) -> Result<Outcome, ClientError> {
        let queue_id = format!("{:010X}", plan.index);
        let sender = if plan.spam {
            SPAM_SENDER.to_owned()
        } else {
            format!("user{}@sender.example", plan.index)
        };
        let size = format!("SIZE={}", shape.body_len + 600);

        let mail_macros = macros(
            MacroStage::Mail,
            &[
                ("i", &queue_id),
                ("{auth_authen}", ""),
                ("{mail_addr}", &sender),
            ],
        );
        let mail = Command::Mail(EnvAddrPayload {
            args: vec![cstring(format!("<{sender}>")), cstring(size)],
        });
        if let Answer::Final(v) = self.event(Stage::Mail, Some(mail_macros), mail).await? {
            return Ok(Outcome::at(Stage::Mail, v));
        }

        let mut refused = Vec::new();
        let rcpt_count = plan.rcpt_count();
        for n in 1..=rcpt_count {
            let rcpt = format!("rcpt{n}@example.net");
            let rcpt_macros = macros(MacroStage::Rcpt, &[("{rcpt_addr}", &rcpt)]);
            let cmd = Command::Rcpt(EnvAddrPayload {
                args: vec![cstring(format!("<{rcpt}>"))],
            });
            match self.event(Stage::Rcpt, Some(rcpt_macros), cmd).await? {
                Answer::Final(v @ (VerdictKind::Reject | VerdictKind::Tempfail)) => refused.push(v),
                Answer::Final(v) => return Ok(Outcome::at(Stage::Rcpt, v)),
                Answer::Continue | Answer::Skip => {}
            }
        }
        let rcpt_rejects = refused.len() as u32;
        if rcpt_rejects as u64 == rcpt_count {
            // No valid recipient: the SMTP client never gets to DATA.
            let verdict = if refused.contains(&VerdictKind::Tempfail) {
                VerdictKind::Tempfail
            } else {
                VerdictKind::Reject
            };
            return Ok(Outcome {
                rcpt_rejects,
                ..Outcome::at(Stage::Rcpt, verdict)
            });
        }
        let ended = |stage, verdict| Outcome {
            rcpt_rejects,
            ..Outcome::at(stage, verdict)
        };

        let data_macros = macros(MacroStage::Data, &[("i", &queue_id)]);
        if let Answer::Final(v) = self
            .event(Stage::Data, Some(data_macros), Command::Data)
            .await?
        {
            return Ok(ended(Stage::Data, v));
        }

        if !self.conn.opts.contains(ProtoOpts::NO_HEADER) {
            for (name, value) in self.headers(plan, shape, &queue_id, &sender) {
                let cmd = Command::Header(HeaderPayload {
                    name: cstring(name),
                    value: cstring(value),
                });
                match self.event(Stage::Header, None, cmd).await? {
                    Answer::Final(v) => return Ok(ended(Stage::Header, v)),
                    Answer::Skip => break,
                    Answer::Continue => {}
                }
            }
        }

        let eoh_macros = macros(MacroStage::Eoh, &[("i", &queue_id)]);
        if let Answer::Final(v) = self
            .event(Stage::Eoh, Some(eoh_macros), Command::Eoh)
            .await?
        {
            return Ok(ended(Stage::Eoh, v));
        }

        if !self.conn.opts.contains(ProtoOpts::NO_BODY) {
            for chunk in &shape.chunks {
                let cmd = Command::BodyChunk(chunk.clone());
                match self.event(Stage::Body, None, cmd).await? {
                    Answer::Final(v) => return Ok(ended(Stage::Body, v)),
                    Answer::Skip => break,
                    Answer::Continue => {}
                }
            }
        }

        self.conn
            .send(macros(MacroStage::Eom, &[("i", &queue_id)]))
            .await?;
        self.conn.send(Command::BodyEnd(Bytes::new())).await?;
        let mut edits = 0;
        loop {
            let reply = self.conn.reply().await?;
            let verdict = match reply {
                Reply::Accept | Reply::Continue | Reply::Skip => VerdictKind::Accept,
                Reply::Reject => VerdictKind::Reject,
                Reply::Tempfail => VerdictKind::Tempfail,
                Reply::Discard => VerdictKind::Discard,
                Reply::ReplyCode { reply } => code_verdict(&reply, "eom")?,
                Reply::OptNeg { .. } => return Err(unexpected(&reply, "eom")),
                _ => {
                    edits += 1;
                    continue;
                }
            };
            return Ok(Outcome {
                edits,
                ..ended(Stage::Eom, verdict)
            });
        }
    }

    /// The given message's headers, else about ten headers, as a mail client writes them.
    fn headers(
        &self,
        plan: Plan,
        shape: &Shape,
        queue_id: &str,
        sender: &str,
    ) -> Vec<(String, String)> {
        const DATE: &str = "Tue, 25 Nov 2025 12:00:00 +0000";
        let lead = if self.conn.opts.contains(ProtoOpts::LEADING_SPACE) {
            " "
        } else {
            ""
        };
        if let Some(headers) = &shape.headers {
            return (headers.iter())
                .map(|(name, value)| (name.clone(), format!("{lead}{value}")))
                .collect();
        }
        let client = self.client;
        let i = plan.index;
        [
            (
                "Received",
                format!(
                    "from client{client}.example (client{client}.example [192.0.2.1]) by mx.bench.test (Postfix) with ESMTP id {queue_id}; {DATE}"
                ),
            ),
            ("From", format!("Sender {i} <{sender}>")),
            ("To", "<rcpt1@example.net>".to_owned()),
            ("Subject", format!("Load test message {i}")),
            ("Date", DATE.to_owned()),
            ("Message-ID", format!("<{queue_id}.{i}@sender.example>")),
            ("MIME-Version", "1.0".to_owned()),
            ("Content-Type", "text/plain; charset=utf-8".to_owned()),
            ("Content-Transfer-Encoding", "8bit".to_owned()),
            ("X-Mailer", "luamilter bench".to_owned()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), format!("{lead}{value}")))
        .collect()
    }

    /// Sends one event the way Postfix's `milter8_event` does.
    async fn event(
        &mut self,
        stage: Stage,
        macros: Option<Command>,
        cmd: Command,
    ) -> Result<Answer, ClientError> {
        let Some(reply) = self.conn.event(stage, macros, cmd).await? else {
            return Ok(Answer::Continue);
        };
        Ok(match reply {
            Reply::Continue => Answer::Continue,
            Reply::Skip => Answer::Skip,
            Reply::Accept => Answer::Final(VerdictKind::Accept),
            Reply::Reject => Answer::Final(VerdictKind::Reject),
            Reply::Tempfail => Answer::Final(VerdictKind::Tempfail),
            Reply::Discard => Answer::Final(VerdictKind::Discard),
            Reply::ReplyCode { reply } => Answer::Final(code_verdict(&reply, stage.name())?),
            other => return Err(unexpected(&other, stage.name())),
        })
    }
}

/// A connect or HELO answer that ends the connection; Postfix ignores discard there.
fn connection_verdict(stage: Stage, answer: Answer) -> Option<Outcome> {
    match answer {
        Answer::Final(VerdictKind::Discard) | Answer::Continue | Answer::Skip => None,
        Answer::Final(v) => Some(Outcome::at(stage, v)),
    }
}

/// The verdict of an SMTP reply text: 4xx tempfail, 5xx reject.
fn code_verdict(reply: &CString, stage: &'static str) -> Result<VerdictKind, ClientError> {
    match reply.as_bytes().first() {
        Some(b'4') => Ok(VerdictKind::Tempfail),
        Some(b'5') => Ok(VerdictKind::Reject),
        _ => Err(unexpected(
            &Reply::ReplyCode {
                reply: reply.clone(),
            },
            stage,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_cut_into_milter_chunks() {
        let shape = Shape::new(100 * 1024);
        let lens: Vec<_> = shape.chunks.iter().map(Bytes::len).collect();
        assert_eq!(lens, [CHUNK_SIZE, 100 * 1024 - CHUNK_SIZE]);
        assert!(shape.chunks[0].starts_with(b"The quick brown fox"));
        assert!(Shape::new(0).chunks.is_empty());
    }

    #[test]
    fn a_given_message_keeps_its_headers_and_body() {
        let shape = Shape::from_message(b"A: 1\r\nB: two\r\n\tlines\r\n\r\nbody\nmore\n").unwrap();
        let headers = shape.headers.unwrap();
        assert_eq!(
            headers,
            [
                ("A".into(), "1".into()),
                ("B".into(), "two\n\tlines".into())
            ]
        );
        assert_eq!(&shape.chunks[0][..], b"body\r\nmore\r\n");
        assert!(Shape::from_message(b"no body").is_err());
    }
}
