//! The milter side: indymilter callbacks, one function per milter stage. Each records what the
//! stage tells about the session, has the engine run the policy chain for it
//! ([`crate::engine::chain`]), and answers the MTA (`reply.rs`). Negotiation is in
//! `negotiate.rs`; the session state itself in [`crate::session`].

mod negotiate;
mod reply;
mod share;

pub use share::Worker;

use crate::{
    config::ExceptionPolicy,
    engine::{Engine, Outcome, StageArgs, VmLease},
    log_fields::{self, SessionFields},
    lua_api::verdict::{Reply, Verdict},
    metrics::{self, MessageEnd, OpenConnection},
    session::{ClientInfo, Line, Session, SharedSession, Step, macros},
    stage::Stage,
};
use indymilter::{
    Callbacks, Context, ContextActions, EomContext, Macros, SmtpReply, SocketInfo, Status,
};
use std::{
    ffi::{CStr, CString},
    pin::pin,
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::sync::mpsc;

/// Per-connection state kept in indymilter's connection data: the connection's claim on a Lua
/// state of its generation, and its session.
pub struct Conn {
    lease: VmLease,
    session: SharedSession,
    /// Counted in `luamilter_connections_open` until the connection closes.
    _open: OpenConnection,
    /// Counted against its worker thread's share of `max_connections`.
    _on_worker: share::OpenOnWorker,
}

impl Conn {
    /// The status for a stage no policy decided.
    fn pass(&self, stage: Stage) -> Status {
        if self.session.lock().negotiated.no_reply(stage) {
            Status::Noreply
        } else {
            Status::Continue
        }
    }
}

/// Builds the indymilter callbacks over `engine` for worker thread `worker` (its connections
/// run on that worker's Lua state).
pub fn callbacks(engine: Arc<Engine>, worker: Arc<Worker>) -> Callbacks<Conn> {
    Callbacks::new()
        .on_negotiate(move |cx, actions, opts| {
            Box::pin(negotiate::negotiate(
                Arc::clone(&engine),
                Arc::clone(&worker),
                cx,
                actions,
                opts,
            ))
        })
        .on_connect(|cx, hostname, socket| Box::pin(connect(cx, hostname, socket)))
        .on_helo(|cx, name| Box::pin(helo(cx, name)))
        .on_mail(|cx, args| Box::pin(mail(cx, args)))
        .on_rcpt(|cx, args| Box::pin(rcpt(cx, args)))
        .on_data(|cx| Box::pin(run(cx, Stage::Data, StageArgs::None)))
        .on_header(|cx, name, value| Box::pin(header(cx, name, value)))
        .on_eoh(|cx| Box::pin(run(cx, Stage::Eoh, StageArgs::None)))
        .on_body(|cx, chunk| Box::pin(body(cx, chunk)))
        .on_eom(|cx| Box::pin(eom(cx)))
        .on_abort(|cx| Box::pin(abort(cx)))
        .on_close(|cx| Box::pin(close(cx)))
        .on_unknown(|cx, line| Box::pin(run(cx, Stage::Unknown, StageArgs::Text(lossy(&line)))))
}

fn lossy(s: &CStr) -> String {
    s.to_string_lossy().into_owned()
}

/// MAIL and RCPT arguments: the address without angle brackets, and the ESMTP arguments.
fn envelope(args: Vec<CString>) -> (String, Vec<String>) {
    let mut args = args.iter().map(|a| lossy(a));
    let first = args.next().unwrap_or_default();
    let address = first
        .strip_prefix('<')
        .and_then(|a| a.strip_suffix('>'))
        .unwrap_or(&first)
        .to_string();
    (address, args.collect())
}

/// Whether the macros show an SMTP AUTH login.
fn authenticated(macros: &Macros) -> bool {
    macros
        .get(c"{auth_authen}")
        .is_some_and(|a| !a.to_bytes().is_empty())
}

async fn connect(cx: &mut Context<Conn>, hostname: CString, socket: SocketInfo) -> Status {
    let hostname = lossy(&hostname);
    let mut ip = None;
    if let Some(conn) = &cx.data {
        let site = &conn.lease.generation().site;
        let client = ClientInfo::from_connect(hostname.clone(), socket, site);
        ip = client.ip.map(|ip| ip.to_string());
        conn.session.lock().client = client;
    }
    run(cx, Stage::Connect, StageArgs::Connect(hostname, ip)).await
}

async fn helo(cx: &mut Context<Conn>, name: CString) -> Status {
    let name = lossy(&name);
    if let Some(conn) = &cx.data {
        conn.session.lock().helo = Some(name.clone());
    }
    run(cx, Stage::Helo, StageArgs::Text(name)).await
}

async fn mail(cx: &mut Context<Conn>, args: Vec<CString>) -> Status {
    let (sender, esmtp) = envelope(args);
    if let Some(conn) = &cx.data {
        let auth = authenticated(&cx.macros);
        conn.session
            .lock()
            .begin_message(sender.clone(), esmtp.clone(), auth);
    }
    let status = run(cx, Stage::Mail, StageArgs::Envelope(sender, esmtp)).await;
    if let Some(conn) = &cx.data
        && matches!(status, Status::Reject | Status::Tempfail)
    {
        conn.session.lock().message.refused = true;
    }
    status
}

async fn rcpt(cx: &mut Context<Conn>, args: Vec<CString>) -> Status {
    let (rcpt, esmtp) = envelope(args);
    let status = run(
        cx,
        Stage::Rcpt,
        StageArgs::Envelope(rcpt.clone(), esmtp.clone()),
    )
    .await;
    // A recipient the MTA refused itself (passed on for REJECTED_RCPT) is no recipient.
    let refused_by_mta = cx
        .macros
        .get(c"{rcpt_mailer}")
        .is_some_and(|m| m.to_bytes() == b"error");
    if let Some(conn) = &cx.data
        && !matches!(status, Status::Reject | Status::Tempfail)
        && !refused_by_mta
    {
        let mut session = conn.session.lock();
        session.message.recipients.push(rcpt);
        session.message.recipient_args.push(esmtp);
    }
    status
}

async fn header(cx: &mut Context<Conn>, name: CString, value: CString) -> Status {
    let (name, value) = match &cx.data {
        Some(conn) => (conn.session.lock()).keep_header(name.as_bytes(), value.as_bytes()),
        None => (lossy(&name), lossy(&value)),
    };
    run(cx, Stage::Header, StageArgs::Header(name, value)).await
}

async fn body(cx: &mut Context<Conn>, chunk: bytes::Bytes) -> Status {
    if let Some(conn) = &cx.data {
        conn.session.lock().keep_body(&chunk);
    }
    run(cx, Stage::Body, StageArgs::Body(chunk)).await
}

async fn abort(cx: &mut Context<Conn>) -> Status {
    let status = run(cx, Stage::Abort, StageArgs::None).await;
    if let Some(conn) = &cx.data {
        end_message(conn, None);
    }
    status
}

/// The message is over (a final answer, or the MTA aborted it): it is logged and counted, its
/// history stored for `luamilter why` and its state reset, so nothing leaks into the next one.
/// `outcome` is the answer that ended it and its stage; for an aborted message, the last
/// verdict a policy enforced.
fn end_message(conn: &Conn, outcome: Option<(&Verdict, Stage)>) {
    let ended_at = outcome.map(|(_, stage)| stage);
    let generation = conn.lease.generation();
    // A fault ended the message as the exception policy answered it.
    let on_fault = match generation.config.engine.exception_policy {
        ExceptionPolicy::Reject => MessageEnd::Reject,
        ExceptionPolicy::Tempfail => MessageEnd::Tempfail,
        ExceptionPolicy::Continue => MessageEnd::Aborted,
    };
    let keep = generation.config.trace.keep;
    let record = {
        let mut session = conn.session.lock();
        let (outcome, end) = match outcome {
            Some((verdict, _)) => (verdict.to_string(), MessageEnd::from_kind(verdict.kind())),
            None => session
                .message
                .trace
                .steps
                .iter()
                .rev()
                .find(|s| !s.shadow && s.verdict != "continue" && s.stage != Stage::Abort.name())
                .map_or_else(
                    || ("aborted".to_string(), MessageEnd::Aborted),
                    |s| {
                        (
                            s.verdict.clone(),
                            MessageEnd::from_step(&s.verdict, on_fault),
                        )
                    },
                ),
        };
        if session.message.sender.is_some() {
            metrics::message_ended(end);
            log_message(&session, &outcome, ended_at);
        }
        let record = (!keep.is_zero())
            .then(|| session.message_record(outcome, unix_now()))
            .flatten();
        session.reset_message();
        record
    };
    conn.lease.record_memory();
    if let Some(record) = record {
        let store = Arc::clone(&generation.services.store);
        tokio::spawn(async move {
            if let Err(e) = record.save(&*store, keep).await {
                tracing::warn!(queue_id = %record.queue_id, error = %e, "cannot store the message history");
            }
        });
    }
}

/// The one info line per message: how it ended, which policy at which stage decided (`-` and
/// the stage it ended at when none did), and its whole decision trace. `ended_at` is `None`
/// for an abort: the decision is then the last one a policy enforced.
fn log_message(session: &Session, outcome: &str, ended_at: Option<Stage>) {
    let decisive = session.message.trace.steps.iter().rev().find(|s| {
        !s.shadow && s.verdict != "continue" && ended_at.is_none_or(|at| s.stage == at.name())
    });
    let end_stage = ended_at.map_or("abort", Stage::name);
    let (stage, policy) = decisive.map_or((end_stage, "-"), |s| (&s.stage, &s.policy));
    tracing::info!(
        queue_id = %session.queue_id(),
        client = %session.client.label(),
        policy,
        stage,
        verdict = %outcome,
        trace = %Line(&[&session.connection_trace, &session.message.trace]),
        "message"
    );
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

async fn close(cx: &mut Context<Conn>) -> Status {
    let status = run(cx, Stage::Close, StageArgs::None).await;
    cx.data = None;
    status
}

/// Runs the chain for a stage and answers it.
async fn run(cx: &mut Context<Conn>, stage: Stage, args: StageArgs) -> Status {
    answer_stage(&mut cx.data, &cx.macros, &mut cx.reply, stage, args).await
}

/// Decides a stage and turns the decision into the answer the MTA gets: a reject held back by
/// `[site] delay_reject`, a verdict owed to a later stage when this one has no reply, or the
/// reply itself.
async fn answer_stage(
    data: &mut Option<Conn>,
    macros: &Macros,
    reply: &mut SmtpReply,
    stage: Stage,
    args: StageArgs,
) -> Status {
    let Some(conn) = data.as_mut() else {
        return Status::Continue;
    };
    let Some(outcome) = decide(conn, macros, stage, args, None).await else {
        return conn.pass(stage);
    };
    if !stage.has_reply() {
        return Status::Continue;
    }
    if delays(conn, stage, &outcome.verdict) {
        conn.session.lock().hold(outcome.verdict, stage);
        return conn.pass(stage);
    }
    {
        let mut session = conn.session.lock();
        if session.negotiated.no_reply(stage) {
            if outcome.verdict.is_final() {
                session.owe(outcome.verdict, stage);
            }
            return Status::Noreply;
        }
    }
    // A final answer inside a message ends it: the MTA sends no end of message (and indymilter
    // passes on no abort).
    let ends_message = matches!(
        stage,
        Stage::Mail | Stage::Data | Stage::Header | Stage::Eoh | Stage::Body
    );
    if ends_message && outcome.verdict.is_final() {
        finish_message(conn, macros, &outcome.verdict, stage).await;
    }
    reply::answer(reply, &outcome.verdict)
}

/// Whether `verdict` at `stage` ends the message undelivered (refused or discarded) where the
/// MTA sends no ABORT afterwards: every message stage but `rcpt`, whose refusals are per
/// recipient (a message with no recipient left is aborted by the MTA itself).
fn ends_undelivered(stage: Stage, verdict: &Verdict) -> bool {
    stage.in_message()
        && stage != Stage::Rcpt
        && matches!(
            verdict,
            Verdict::Reject(_) | Verdict::Tempfail(_) | Verdict::Discard
        )
}

/// Ends the message that `verdict` at `stage` ended: when it ends undelivered (see
/// [`ends_undelivered`]) the `abort` handlers run first, since the MTA sends no ABORT after
/// it and policies learn from refusals there; then [`end_message`].
async fn finish_message(conn: &Conn, macros: &Macros, verdict: &Verdict, stage: Stage) {
    if ends_undelivered(stage, verdict) {
        decide(conn, macros, Stage::Abort, StageArgs::None, None).await;
    }
    end_message(conn, Some((verdict, stage)));
}

/// With `[site] delay_reject`, a reject decided at connect, HELO or MAIL that is not marked
/// `immediate` is held back until DATA.
fn delays(conn: &Conn, stage: Stage, verdict: &Verdict) -> bool {
    let held = conn.lease.generation().site.delay_reject
        && matches!(stage, Stage::Connect | Stage::Helo | Stage::Mail)
        && matches!(verdict, Verdict::Reject(reply) if reply.as_ref().is_none_or(|r| !r.immediate));
    if held {
        let client = conn.session.lock().client.label();
        tracing::debug!(%client, stage = stage.name(), verdict = %verdict, "reject delayed until DATA");
    }
    held
}

/// Decides a stage: a verdict owed from an earlier stage, else the policy chain. `None` when no
/// policy handles the stage and nothing is owed.
async fn decide(
    conn: &Conn,
    macros: &Macros,
    stage: Stage,
    args: StageArgs,
    progress: Option<mpsc::UnboundedSender<()>>,
) -> Option<Outcome> {
    if conn.session.lock().outside_message(stage) {
        let verdict = out_of_sequence();
        tracing::warn!(client = %conn.session.lock().client.label(), stage = stage.name(), "a message stage without MAIL: the client is out of protocol");
        log_decision(conn, macros, stage, "(protocol)", &verdict);
        return Some(Outcome {
            verdict,
            policy: None,
        });
    }
    let owed = {
        let mut session = conn.session.lock();
        let replies = stage.has_reply() && !session.negotiated.no_reply(stage);
        replies.then(|| session.take_owed(stage)).flatten()
    };
    if let Some(verdict) = owed {
        let step = Step::new(
            stage.name(),
            "(earlier stage)",
            verdict.to_string(),
            Duration::ZERO,
        );
        conn.session.lock().record(step);
        log_decision(conn, macros, stage, "(earlier stage)", &verdict);
        return Some(Outcome {
            verdict,
            policy: None,
        });
    }
    let generation = conn.lease.generation();
    if !generation.handles(stage) {
        return None;
    }
    let (fields, session_key) = {
        let mut session = conn.session.lock();
        // The MTA sends macros before the other stages, none before a header or body chunk
        // (looking one up costs a hash per macro stage): there only a missing queue id is
        // looked for.
        let new_macros = !matches!(stage, Stage::Header | Stage::Body);
        // SMTP AUTH shows in the MAIL macros, which the MTA keeps sending for later stages.
        if new_macros && !session.client.authenticated && authenticated(macros) {
            session.note_auth();
        }
        if new_macros || session.queue_id().is_empty() {
            let queue_id = macros.get(c"i").and_then(|i| i.to_str().ok());
            session.note_queue_id(queue_id.unwrap_or(""));
        }
        session.progress = progress;
        let fields = SessionFields {
            client: session.client.label(),
            queue_id: session.queue_id().to_string(),
        };
        (fields, macros::session_key(&session))
    };
    let started = Instant::now();
    let run = pin!(conn.lease.run_stage(&conn.session, stage, args));
    let outcome = log_fields::in_session(&fields, macros::lend(macros, &session_key, run)).await;
    metrics::stage_time(stage, started.elapsed());
    if outcome.verdict.is_final() {
        let policy = outcome
            .policy
            .map_or("-", |i| generation.policies[i].name.as_str());
        log_decision(conn, macros, stage, policy, &outcome.verdict);
    }
    Some(outcome)
}

/// The answer to a message stage out of sequence: a temporary failure, as for any fault.
fn out_of_sequence() -> Verdict {
    Verdict::Tempfail(Some(Reply {
        code: "451".into(),
        xcode: Some("4.5.0".into()),
        lines: vec!["Milter commands out of sequence".into()],
        immediate: true,
    }))
}

/// A stage's final verdict: at info for the connection stages (no message line follows a
/// refused connection), at debug otherwise (the message line at its end sums them up).
fn log_decision(conn: &Conn, macros: &Macros, stage: Stage, policy: &str, verdict: &Verdict) {
    let connection_stage = matches!(stage, Stage::Connect | Stage::Helo);
    if !connection_stage && !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let queue_id = macros.get(c"i").map(lossy).unwrap_or_default();
    let session = conn.session.lock();
    let trace = Line(&[&session.connection_trace, &session.message.trace]);
    macro_rules! decision {
        ($level:expr) => {
            tracing::event!(
                $level,
                client = %session.client.label(),
                %queue_id,
                stage = stage.name(),
                policy,
                verdict = %verdict,
                %trace,
                "decision"
            )
        };
    }
    if connection_stage {
        decision!(tracing::Level::INFO);
    } else {
        decision!(tracing::Level::DEBUG);
    }
}

/// End of message: run the chain (serving `ctx:progress()` meanwhile), apply the queued edits
/// unless the message was refused, answer, and end the message.
async fn eom(cx: &mut EomContext<Conn>) -> Status {
    let Some(conn) = cx.data.as_mut() else {
        return Status::Continue;
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let outcome = {
        let decision = decide(conn, &cx.macros, Stage::Eom, StageArgs::None, Some(tx));
        tokio::pin!(decision);
        loop {
            tokio::select! {
                outcome = &mut decision => break outcome,
                Some(()) = rx.recv() => {
                    if let Err(e) = cx.actions.progress().await {
                        tracing::warn!(error = %e, "cannot send progress to the MTA");
                    }
                }
            }
        }
    };
    let verdict = outcome.map_or(Verdict::Continue, |o| o.verdict);
    let edits = {
        let mut session = conn.session.lock();
        session.progress = None;
        std::mem::take(&mut session.message.edits)
    };
    if matches!(verdict, Verdict::Continue | Verdict::Accept) {
        for edit in edits {
            if let Err(e) = reply::apply_edit(&cx.actions, &edit).await {
                let client = conn.session.lock().client.label();
                tracing::error!(%client, edit = ?edit, error = %e, "the MTA refused an edit");
            }
        }
    }
    if ends_undelivered(Stage::Eom, &verdict) {
        finish_message(conn, &cx.macros, &verdict, Stage::Eom).await;
        return reply::answer(&mut cx.reply, &verdict);
    }
    // Over whether or not the MTA sends ABORT.
    let outcome = if verdict.is_final() {
        verdict.clone()
    } else {
        Verdict::Accept
    };
    end_message(conn, Some((&outcome, Stage::Eom)));
    reply::answer(&mut cx.reply, &verdict)
}
