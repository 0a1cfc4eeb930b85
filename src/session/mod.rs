//! One SMTP connection as luamilter knows it: the client, HELO, the negotiated protocol, the
//! current message, and the verdicts owed to later stages. The server writes it, one method per
//! event; Lua's `ctx` is a view of it (`lua_api::ctx`); nothing else keeps session state.
//!
//! Connection facts live for the whole connection. Message facts live in [`Message`] and are
//! reset in exactly one place, [`Session::reset_message`]: when MAIL starts a message, when the
//! MTA aborts one, and after end of message.

mod client;
mod edit;
pub mod history;
pub mod macros;
mod trace;

pub use client::ClientInfo;
pub use edit::Edit;
pub use trace::{Line, Step, Trace};

use crate::{lua_api::verdict::Verdict, stage::Stage};
use indymilter::{Actions, ProtoOpts};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::mpsc::UnboundedSender;

/// A session shared by the server (which writes it) and the Lua `ctx` (which reads it and queues
/// edits). Locked only for short, non-async sections.
#[derive(Clone, Default)]
pub struct SharedSession(Arc<Mutex<Session>>);

impl SharedSession {
    /// Wraps a new session.
    pub fn new(session: Session) -> SharedSession {
        SharedSession(Arc::new(Mutex::new(session)))
    }

    /// Locks the session (a panic while it was locked does not make it unusable).
    pub fn lock(&self) -> MutexGuard<'_, Session> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What negotiation settled with the MTA for this connection.
#[derive(Clone, Debug)]
pub struct Negotiated {
    /// The protocol options asked for (skipped stages, no-reply stages).
    pub opts: ProtoOpts,
    /// The edit actions the MTA granted.
    pub actions: Actions,
}

impl Negotiated {
    /// Whether the MTA sends `stage` on this connection.
    pub fn sends(&self, stage: Stage) -> bool {
        let (no, _) = stage.protocol_flags();
        no.is_empty() || !self.opts.contains(no)
    }

    /// Whether the MTA waits for no reply to `stage`.
    pub fn no_reply(&self, stage: Stage) -> bool {
        let (_, no_reply) = stage.protocol_flags();
        !no_reply.is_empty() && self.opts.contains(no_reply)
    }
}

impl Default for Negotiated {
    /// Everything sent, with replies, and every action granted (an MTA that offers all).
    fn default() -> Negotiated {
        Negotiated {
            opts: ProtoOpts::empty(),
            actions: Actions::all(),
        }
    }
}

/// A reject held back by `[site] delay_reject` until DATA, and the stage that decided it.
#[derive(Clone, Debug)]
pub struct Delayed {
    /// The held reject.
    pub verdict: Verdict,
    /// Connect, HELO or MAIL.
    pub stage: Stage,
}

/// The message in progress (MAIL FROM to end of message).
#[derive(Debug, Default)]
pub struct Message {
    /// Counts messages on the connection; changes at every reset (`ctx.msg` follows it).
    pub seq: u64,
    /// MAIL FROM address without angle brackets ("" for the null sender).
    pub sender: Option<String>,
    /// MAIL FROM ESMTP arguments.
    pub sender_args: Vec<String>,
    /// Recipients accepted so far.
    pub recipients: Vec<String>,
    /// The ESMTP arguments of each of `recipients`, in the same order.
    pub recipient_args: Vec<Vec<String>>,
    /// Headers seen so far, in order, as text (bytes that are not UTF-8 read as U+FFFD).
    pub headers: Vec<(String, String)>,
    /// The same headers as the MTA sent their bytes, `name: value` with CRLF line ends, kept
    /// with the body (`Session::body_limit`) so that signatures over bytes that are not UTF-8
    /// verify.
    pub raw_headers: Vec<u8>,
    /// The body as received, kept when a policy needs it (`Session::body_limit`).
    pub body: Vec<u8>,
    /// Whether the body was longer than the limit (`body` then holds its start).
    pub body_truncated: bool,
    /// Edits queued for end of message.
    pub edits: Vec<Edit>,
    /// The queue id (macro `i`) as the MTA sent it at the last stage a policy handled, or "".
    queue_id: String,
    /// What the policies decided during the message.
    pub trace: Trace,
    /// A final verdict given at a message stage that could not answer (no reply), owed to the
    /// next stage that replies.
    owed: Option<Verdict>,
    /// A reject decided at MAIL and held back until DATA.
    delayed: Option<Delayed>,
    /// MAIL was answered with a reject or tempfail: the MTA has dropped the message.
    pub refused: bool,
}

/// Everything known about one SMTP connection.
#[derive(Debug, Default)]
pub struct Session {
    /// The connecting client (unknown until connect).
    pub client: ClientInfo,
    /// HELO/EHLO argument.
    pub helo: Option<String>,
    /// What the MTA sends and grants.
    pub negotiated: Negotiated,
    /// Offences counted on this connection (`ctx:demerit`).
    pub demerits: u32,
    /// The configured receiver name (`[site] hostname`), if any.
    pub receiver: Option<String>,
    /// MAIL commands seen on this connection.
    pub mails: u32,
    /// The stage being handled, and the index of the policy whose handler runs.
    pub running: Option<(Stage, usize)>,
    /// Set during eom: asks the server to send a progress notification to the MTA.
    pub progress: Option<UnboundedSender<()>>,
    /// How many body bytes a message keeps, when a policy needs the body.
    pub body_limit: Option<usize>,
    /// The message in progress.
    pub message: Message,
    /// What the policies decided at connect and HELO.
    pub connection_trace: Trace,
    /// A final verdict given at connect or HELO without a reply: it answers every later stage
    /// of the connection that can reply, as the refusal of a connection would.
    refusal: Option<Verdict>,
    /// A reject decided at connect or HELO and held back until DATA.
    delayed: Option<Delayed>,
}

impl Session {
    /// A new connection's session.
    pub fn new(negotiated: Negotiated, receiver: Option<String>) -> Session {
        Session {
            negotiated,
            receiver,
            ..Session::default()
        }
    }

    /// The stage being handled, if any.
    pub fn stage(&self) -> Option<Stage> {
        self.running.map(|(stage, _)| stage)
    }

    /// Forgets the message: envelope, headers, edits, owed verdict, a reject held at MAIL and
    /// `ctx.msg`. The one place message state is reset.
    pub fn reset_message(&mut self) {
        self.message = Message {
            seq: self.message.seq + 1,
            ..Message::default()
        };
    }

    /// MAIL starts a message: forget the last one, note SMTP AUTH, and drop a reject held back
    /// at connect or HELO where the classic milter did (AUTH, or a second MAIL).
    pub fn begin_message(&mut self, sender: String, args: Vec<String>, authenticated: bool) {
        self.mails += 1;
        self.reset_message();
        if (authenticated || self.mails > 1)
            && let Some(held) = self.delayed.take()
        {
            tracing::debug!(client = %self.client.label(), verdict = %held.verdict, authenticated, "delayed reject canceled");
        }
        if authenticated {
            self.note_auth();
        }
        self.message.sender = Some(sender);
        self.message.sender_args = args;
    }

    /// The session authenticated with SMTP AUTH: it counts as internal from now on.
    pub fn note_auth(&mut self) {
        self.client.authenticated = true;
        self.client.internal = true;
    }

    /// Holds back a reject decided at connect, HELO or MAIL until DATA.
    pub fn hold(&mut self, verdict: Verdict, stage: Stage) {
        let held = Some(Delayed { verdict, stage });
        if stage.in_message() {
            self.message.delayed = held;
        } else {
            self.delayed = held;
        }
    }

    /// The reject held back for this connection or message, as `ctx.delayed` shows it.
    pub fn delayed(&self) -> Option<&Delayed> {
        self.message.delayed.as_ref().or(self.delayed.as_ref())
    }

    /// Keeps a final verdict given at a stage without a reply for the next stage that replies.
    pub fn owe(&mut self, verdict: Verdict, stage: Stage) {
        if stage.in_message() {
            self.message.owed = Some(verdict);
        } else {
            self.refusal = Some(verdict);
        }
    }

    /// The verdict owed to `stage` (one that replies): a held-back reject once the message's
    /// content starts, else a verdict given without a reply earlier in the message, else the
    /// connection's refusal. Taking a held or message verdict answers it.
    pub fn take_owed(&mut self, stage: Stage) -> Option<Verdict> {
        let content = matches!(
            stage,
            Stage::Data | Stage::Header | Stage::Eoh | Stage::Body | Stage::Eom
        );
        let held = content
            .then(|| self.message.delayed.take().or_else(|| self.delayed.take()))
            .flatten()
            .map(|held| held.verdict);
        held.or_else(|| self.message.owed.take())
            .or_else(|| self.refusal.clone())
    }

    /// Whether `stage` belongs to a message that never started: the MTA sends MAIL on this
    /// connection, yet none came since the last message ended, or the last one was refused.
    /// Only a client out of protocol does that (the milter state machine lets an unknown
    /// command lead on to body and end of message), and answering it would accept a message
    /// whose MAIL policies never ran or refused it.
    pub fn outside_message(&self, stage: Stage) -> bool {
        stage.in_message()
            && stage != Stage::Mail
            && self.negotiated.sends(Stage::Mail)
            && (self.message.sender.is_none() || self.message.refused)
    }

    /// A macro by name, with or without braces (the MTA sends one-letter names bare and longer
    /// ones in braces), while a stage of this session is decided (see [`macros::lend`]).
    pub fn macro_value(&self, name: &str) -> Option<String> {
        macros::lent_value(macros::session_key(self), name)
    }

    /// Notes the queue id the MTA sent for the stage being decided.
    pub fn note_queue_id(&mut self, queue_id: &str) {
        if self.message.queue_id != queue_id {
            queue_id.clone_into(&mut self.message.queue_id);
        }
    }

    /// Records a step of the decision trace: in the message for message stages, else in the
    /// connection's.
    pub fn record(&mut self, step: Step) {
        // The abort handlers run as a message ends: their steps are that message's.
        let in_message = Stage::from_name(&step.stage)
            .is_some_and(|stage| stage.in_message() || stage == Stage::Abort);
        if in_message {
            self.message.trace.push(step);
        } else {
            self.connection_trace.push(step);
        }
    }

    /// The trace of the current message: the connection's steps, then the message's.
    pub fn message_trace(&self) -> Trace {
        let mut trace = self.connection_trace.clone();
        for step in &self.message.trace.steps {
            trace.push(step.clone());
        }
        trace.dropped += self.message.trace.dropped;
        trace
    }

    /// The history of the message that ends now with `outcome`, when there was a message with
    /// a queue id to file it under.
    pub fn message_record(&self, outcome: String, now: i64) -> Option<history::MessageRecord> {
        let sender = self.message.sender.clone()?;
        let queue_id = self.queue_id();
        if queue_id.is_empty() {
            return None;
        }
        let message_id = self
            .message
            .headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("Message-ID"))
            .map(|(_, value)| value.trim().to_string());
        Some(history::MessageRecord {
            queue_id: queue_id.to_string(),
            message_id,
            time: now,
            client: self.client.label(),
            helo: self.helo.clone(),
            sender,
            recipients: self.message.recipients.clone(),
            outcome,
            trace: self.message_trace(),
        })
    }

    /// Records a header: as text for the policies, and as bytes when the message is kept.
    /// Returns the text.
    pub fn keep_header(&mut self, name: &[u8], value: &[u8]) -> (String, String) {
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        let header = (text(name), text(value));
        self.message.headers.push(header.clone());
        if self.body_limit.is_some() {
            self.keep_raw_header(name, value);
        }
        header
    }

    /// Appends a header's bytes to the message as received.
    fn keep_raw_header(&mut self, name: &[u8], value: &[u8]) {
        let raw = &mut self.message.raw_headers;
        raw.extend_from_slice(name);
        raw.extend_from_slice(b": ");
        // Folded lines arrive with LF (Postfix) or CRLF line ends: CRLF on the wire.
        for (i, line) in value.split(|b| *b == b'\n').enumerate() {
            if i > 0 {
                raw.extend_from_slice(b"\r\n");
            }
            raw.extend_from_slice(line.strip_suffix(b"\r").unwrap_or(line));
        }
        raw.extend_from_slice(b"\r\n");
    }

    /// Keeps a body chunk, up to `body_limit` bytes in all.
    pub fn keep_body(&mut self, chunk: &[u8]) {
        let Some(limit) = self.body_limit else {
            return;
        };
        let body = &mut self.message.body;
        let room = limit.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        self.message.body_truncated |= chunk.len() > room;
    }

    /// The message as received, byte for byte as the MTA sent it: headers in order
    /// (`name: value`, CRLF line ends) and the kept body. Empty headers unless the body is kept.
    pub fn raw_message(&self) -> Vec<u8> {
        let headers = &self.message.raw_headers;
        let mut raw = Vec::with_capacity(headers.len() + 2 + self.message.body.len());
        raw.extend_from_slice(headers);
        raw.extend_from_slice(b"\r\n");
        raw.extend_from_slice(&self.message.body);
        raw
    }

    /// The queue id (macro `i`) at the last stage of the message a policy handled, or "".
    pub fn queue_id(&self) -> &str {
        &self.message.queue_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lua_api::verdict::Reply;

    fn reject(text: &str) -> Verdict {
        Verdict::Reject(Some(Reply {
            code: "550".into(),
            xcode: Some("5.7.1".into()),
            lines: vec![text.into()],
            immediate: false,
        }))
    }

    #[test]
    fn a_held_connection_reject_is_answered_once_and_then_forgotten() {
        let mut s = Session::default();
        s.hold(reject("no"), Stage::Connect);
        s.begin_message("a@example.com".into(), vec![], false);
        assert!(s.delayed().is_some());
        assert_eq!(s.take_owed(Stage::Rcpt), None);
        assert_eq!(s.take_owed(Stage::Data), Some(reject("no")));
        s.reset_message();
        s.begin_message("b@example.com".into(), vec![], false);
        assert!(s.delayed().is_none());
        assert_eq!(s.take_owed(Stage::Data), None);
    }

    #[test]
    fn a_reject_held_at_mail_ends_with_its_message() {
        let mut s = Session::default();
        s.begin_message("a@example.com".into(), vec![], false);
        s.hold(reject("mail"), Stage::Mail);
        s.owe(reject("owed"), Stage::Rcpt);
        s.message.recipients.push("r@example.com".into());
        let seq = s.message.seq;
        s.reset_message();
        assert!(s.delayed().is_none());
        assert!(s.message.recipients.is_empty());
        assert_ne!(s.message.seq, seq);
        assert_eq!(s.take_owed(Stage::Data), None);
    }

    #[test]
    fn a_connection_refusal_answers_every_later_stage() {
        let mut s = Session::default();
        s.owe(reject("go away"), Stage::Helo);
        s.begin_message("a@example.com".into(), vec![], false);
        assert_eq!(s.take_owed(Stage::Mail), Some(reject("go away")));
        assert_eq!(s.take_owed(Stage::Rcpt), Some(reject("go away")));
    }

    #[test]
    fn authentication_or_a_second_mail_cancels_a_held_connection_reject() {
        let mut s = Session::default();
        s.hold(reject("no"), Stage::Helo);
        s.begin_message("a@example.com".into(), vec![], true);
        assert!(s.delayed().is_none());
        assert!(s.client.internal && s.client.authenticated);

        let mut s = Session::default();
        s.hold(reject("no"), Stage::Helo);
        s.begin_message("a@example.com".into(), vec![], false);
        s.reset_message();
        s.begin_message("b@example.com".into(), vec![], false);
        assert!(s.delayed().is_none());
    }
}
