//! The milter side: indymilter callbacks that keep each connection's session, negotiate from
//! the policies in use, dispatch every stage into the engine and turn verdicts and queued edits
//! into milter replies and actions.

use crate::{
    engine::{Engine, Outcome, SUPPORTED_ACTIONS, StageArgs, VmLease, stages_sent},
    lua_api::{
        ctx::{ClientInfo, Ctx, Edit},
        verdict::Verdict,
    },
    services::{
        net::looks_dynamic,
        site::{Site, is_localhost, verified_ptr},
    },
    stage::Stage,
};
use indymilter::{
    Actions, Callbacks, ContextActions, EomActions, Macros, NegotiateContext, ProtoOpts,
    SetErrorReply, SmtpReply, SocketInfo, Status,
};
use mlua::AnyUserData;
use std::{ffi::CString, sync::Arc};
use tokio::sync::mpsc;
use tracing::Instrument;

/// Per-connection state kept in indymilter's connection data (opaque outside this module).
pub struct Conn {
    lease: VmLease,
    ctx: Option<AnyUserData>,
    opts: ProtoOpts,
    actions: Actions,
    /// A final verdict given at a message stage that could not answer (NOREPLY), owed at the
    /// next reply; forgotten when the message ends.
    pending: Option<Verdict>,
    /// A final verdict given at connect or helo without a reply: it answers every later stage
    /// of the connection that can reply, as the refusal of a connection would.
    pending_connection: Option<Verdict>,
    /// The client for log lines (its IP, else its host name).
    client: String,
    /// What the MTA said at connect (unknown when the connect stage is not negotiated).
    client_info: ClientInfo,
    /// A reject held back by `[site] delay_reject`, and the stage that decided it.
    delayed: Option<(Verdict, Stage)>,
    /// MAIL commands seen on this connection.
    mails: u32,
}

impl Conn {
    /// The session authenticated with SMTP AUTH: it counts as internal from now on.
    fn note_auth(&mut self) {
        self.client_info.authenticated = true;
        self.client_info.internal = true;
        if let Some(ctx) = &self.ctx {
            let _ = Ctx::set_authenticated(ctx);
        }
    }

    /// The session's `ctx`, created when first needed.
    fn ctx(&mut self) -> Option<AnyUserData> {
        if self.ctx.is_none() {
            let sent = stages_sent(self.opts);
            match self
                .lease
                .new_ctx(self.client_info.clone(), self.actions, sent)
            {
                Ok(ctx) => self.ctx = Some(ctx),
                Err(e) => tracing::error!(error = %e, "cannot create the session context"),
            }
        }
        self.ctx.clone()
    }

    fn noreply(&self, stage: Stage) -> bool {
        {
            let (_, no_reply) = stage.protocol_flags();
            !no_reply.is_empty() && self.opts.contains(no_reply)
        }
    }

    /// The status for a stage no policy decided.
    fn pass(&self, stage: Stage) -> Status {
        if self.noreply(stage) {
            Status::Noreply
        } else {
            Status::Continue
        }
    }
}

fn lossy(s: &std::ffi::CStr) -> String {
    s.to_string_lossy().into_owned()
}

fn strip_angle(addr: &str) -> String {
    addr.strip_prefix('<')
        .and_then(|a| a.strip_suffix('>'))
        .unwrap_or(addr)
        .to_string()
}

/// Builds the indymilter callbacks over `engine` for worker thread `worker` (its connections
/// run on that worker's Lua state). `unix` tells whether the socket is a unix socket, where
/// stages that only collect data are negotiated without replies.
pub fn callbacks(engine: Arc<Engine>, unix: bool, worker: usize) -> Callbacks<Conn> {
    Callbacks::new()
        .on_negotiate(move |cx, actions, opts| {
            Box::pin(negotiate(
                Arc::clone(&engine),
                unix,
                worker,
                cx,
                actions,
                opts,
            ))
        })
        .on_connect(|cx, hostname, socket| Box::pin(connect(cx, hostname, socket)))
        .on_helo(|cx, name| {
            Box::pin(async move {
                let name = lossy(&name);
                update_ctx(&mut cx.data, |c| c.helo = Some(name.clone()));
                stage(
                    &mut cx.data,
                    &cx.macros,
                    &mut cx.reply,
                    Stage::Helo,
                    StageArgs::Text(name),
                )
                .await
            })
        })
        .on_mail(|cx, args| {
            Box::pin(async move {
                let mut args = args.iter().map(|a| lossy(a));
                let sender = strip_angle(&args.next().unwrap_or_default());
                let esmtp: Vec<String> = args.collect();
                let authenticated = cx
                    .macros
                    .get(c"{auth_authen}")
                    .is_some_and(|a| !a.is_empty());
                if let Some(conn) = &mut cx.data {
                    new_message(conn, authenticated);
                }
                update_ctx(&mut cx.data, |c| {
                    c.sender = Some(sender.clone());
                    c.sender_args = esmtp.clone();
                });
                stage(
                    &mut cx.data,
                    &cx.macros,
                    &mut cx.reply,
                    Stage::Mail,
                    StageArgs::Envelope(sender, esmtp),
                )
                .await
            })
        })
        .on_rcpt(|cx, args| {
            Box::pin(async move {
                let mut args = args.iter().map(|a| lossy(a));
                let rcpt = strip_angle(&args.next().unwrap_or_default());
                let esmtp: Vec<String> = args.collect();
                let status = stage(
                    &mut cx.data,
                    &cx.macros,
                    &mut cx.reply,
                    Stage::Rcpt,
                    StageArgs::Envelope(rcpt.clone(), esmtp),
                )
                .await;
                // A recipient the MTA refused itself (passed on for REJECTED_RCPT) is no recipient.
                let refused_by_mta = cx
                    .macros
                    .get(c"{rcpt_mailer}")
                    .is_some_and(|m| m.to_bytes() == b"error");
                if !matches!(status, Status::Reject | Status::Tempfail) && !refused_by_mta {
                    update_ctx(&mut cx.data, |c| c.recipients.push(rcpt));
                }
                status
            })
        })
        .on_data(|cx| {
            Box::pin(stage(
                &mut cx.data,
                &cx.macros,
                &mut cx.reply,
                Stage::Data,
                StageArgs::None,
            ))
        })
        .on_header(|cx, name, value| {
            Box::pin(async move {
                let (name, value) = (lossy(&name), lossy(&value));
                update_ctx(&mut cx.data, |c| {
                    c.headers.push((name.clone(), value.clone()))
                });
                stage(
                    &mut cx.data,
                    &cx.macros,
                    &mut cx.reply,
                    Stage::Header,
                    StageArgs::Header(name, value),
                )
                .await
            })
        })
        .on_eoh(|cx| {
            Box::pin(stage(
                &mut cx.data,
                &cx.macros,
                &mut cx.reply,
                Stage::Eoh,
                StageArgs::None,
            ))
        })
        .on_body(|cx, chunk| {
            Box::pin(stage(
                &mut cx.data,
                &cx.macros,
                &mut cx.reply,
                Stage::Body,
                StageArgs::Body(chunk),
            ))
        })
        .on_eom(|cx| Box::pin(eom(&mut cx.data, &cx.macros, &mut cx.reply, &cx.actions)))
        .on_abort(|cx| {
            Box::pin(async move {
                let status = stage(
                    &mut cx.data,
                    &cx.macros,
                    &mut cx.reply,
                    Stage::Abort,
                    StageArgs::None,
                )
                .await;
                if let Some(conn) = &mut cx.data {
                    conn.pending = None;
                    if matches!(conn.delayed, Some((_, Stage::Mail))) {
                        conn.delayed = None;
                    }
                    if let Some(ctx) = &conn.ctx {
                        let _ = conn.lease.reset_message(ctx);
                    }
                }
                status
            })
        })
        .on_close(|cx| {
            Box::pin(async move {
                let status = stage(
                    &mut cx.data,
                    &cx.macros,
                    &mut cx.reply,
                    Stage::Close,
                    StageArgs::None,
                )
                .await;
                cx.data = None;
                status
            })
        })
        .on_unknown(|cx, line| {
            Box::pin(async move {
                let line = lossy(&line);
                stage(
                    &mut cx.data,
                    &cx.macros,
                    &mut cx.reply,
                    Stage::Unknown,
                    StageArgs::Text(line),
                )
                .await
            })
        })
}

async fn negotiate(
    engine: Arc<Engine>,
    unix: bool,
    worker: usize,
    cx: &mut NegotiateContext<Conn>,
    offered_actions: Actions,
    offered_opts: ProtoOpts,
) -> Status {
    let generation = engine.current();
    let plan = &generation.plan;
    let mut wanted = plan.skip | plan.noreply;
    if unix {
        wanted |= plan.collect_only;
    }
    cx.requested_actions = offered_actions & SUPPORTED_ACTIONS;
    cx.requested_opts |= wanted & offered_opts;
    cx.requested_macros = plan.macros.clone();
    let conn = Conn {
        lease: generation.lease(worker),
        ctx: None,
        opts: cx.requested_opts,
        actions: cx.requested_actions,
        pending: None,
        pending_connection: None,
        client: "-".to_string(),
        client_info: ClientInfo {
            family: "unknown",
            ..ClientInfo::default()
        },
        delayed: None,
        mails: 0,
    };
    cx.data = Some(conn);
    Status::Continue
}

async fn connect(
    cx: &mut indymilter::Context<Conn>,
    hostname: CString,
    socket: SocketInfo,
) -> Status {
    let hostname = lossy(&hostname);
    let mut client = ClientInfo {
        hostname: hostname.clone(),
        family: "unknown",
        ..ClientInfo::default()
    };
    match socket {
        SocketInfo::Inet(addr) => {
            client.ip = Some(addr.ip());
            client.port = Some(addr.port());
            client.family = if addr.is_ipv4() { "inet" } else { "inet6" };
        }
        SocketInfo::Unix(path) => {
            client.family = "unix";
            client.path = Some(lossy(&path));
        }
        SocketInfo::Unknown => {}
    }
    let ip = client.ip.map(|ip| ip.to_string());
    if let Some(conn) = &mut cx.data {
        classify(&mut client, &conn.lease.generation().site);
        conn.client = ip.clone().unwrap_or_else(|| hostname.clone());
        conn.client_info = client;
    }
    stage(
        &mut cx.data,
        &cx.macros,
        &mut cx.reply,
        Stage::Connect,
        StageArgs::Connect(hostname, ip),
    )
    .await
}

/// A MAIL command starts a message: forget the last one's state, note SMTP AUTH, and drop a
/// held-back connection reject where the classic milter did (AUTH, or a second MAIL).
fn new_message(conn: &mut Conn, authenticated: bool) {
    conn.mails += 1;
    let cancel = match &conn.delayed {
        Some((_, Stage::Mail)) => true,
        Some(_) => authenticated || conn.mails > 1,
        None => false,
    };
    if cancel {
        if let Some((verdict, _)) = conn.delayed.take() {
            tracing::info!(client = %conn.client, verdict = %verdict, authenticated, "delayed reject canceled");
        }
        update_ctx_of(conn, |c| c.delayed = None);
    }
    if authenticated {
        conn.note_auth();
    }
    if let Some(ctx) = &conn.ctx
        && let Err(e) = conn.lease.reset_message(ctx)
    {
        tracing::error!(error = %e, "cannot reset message state");
    }
}

/// Fills in what the site facts say about the client.
fn classify(client: &mut ClientInfo, site: &Site) {
    client.ptr = verified_ptr(&client.hostname);
    if let Some(ip) = client.ip {
        client.internal = site.internal(ip);
        client.trusted = site.trusted(ip);
        client.localhost = is_localhost(ip);
        client.dynamic = client
            .ptr
            .as_deref()
            .is_none_or(|ptr| looks_dynamic(ptr, ip));
    }
}

/// Records a fact of the session in `ctx`.
fn update_ctx(data: &mut Option<Conn>, f: impl FnOnce(&mut Ctx)) {
    if let Some(conn) = data.as_mut() {
        update_ctx_of(conn, f);
    }
}

fn update_ctx_of(conn: &mut Conn, f: impl FnOnce(&mut Ctx)) {
    if let Some(ctx) = conn.ctx() {
        let _ = ctx.borrow_mut_scoped::<Ctx, _>(f);
    }
}

/// Runs the chain for a stage and returns its answer.
async fn stage(
    data: &mut Option<Conn>,
    macros: &Macros,
    reply: &mut SmtpReply,
    stage: Stage,
    args: StageArgs,
) -> Status {
    let Some(outcome) = decide(data, macros, stage, args, None).await else {
        return data.as_ref().map_or(Status::Continue, |c| c.pass(stage));
    };
    let Some(conn) = data.as_mut() else {
        return Status::Continue;
    };
    if !stage.has_reply() {
        return Status::Continue;
    }
    if let Some(verdict) = delay(conn, stage, &outcome.verdict) {
        update_ctx_of(conn, |c| c.delayed = Some(verdict.clone()));
        conn.delayed = Some((verdict, stage));
        return conn.pass(stage);
    }
    if conn.noreply(stage) {
        if outcome.verdict.is_final() {
            if stage.in_message() {
                conn.pending = Some(outcome.verdict);
            } else {
                conn.pending_connection = Some(outcome.verdict);
            }
        }
        return Status::Noreply;
    }
    answer(reply, &outcome.verdict)
}

/// With `[site] delay_reject`, a reject decided at connect, HELO or MAIL that is not marked
/// `immediate` is held back until DATA; returns it when it is to be held.
fn delay(conn: &Conn, stage: Stage, verdict: &Verdict) -> Option<Verdict> {
    let held = conn.lease.generation().site.delay_reject
        && matches!(stage, Stage::Connect | Stage::Helo | Stage::Mail)
        && matches!(verdict, Verdict::Reject(reply) if reply.as_ref().is_none_or(|r| !r.immediate));
    if held {
        tracing::info!(client = %conn.client, stage = stage.name(), verdict = %verdict, "reject delayed until DATA");
    }
    held.then(|| verdict.clone())
}

/// Decides a stage: a verdict owed from an earlier no-reply stage, else the policy chain.
/// `None` when no policy handles the stage and nothing is owed.
async fn decide(
    data: &mut Option<Conn>,
    macros: &Macros,
    stage: Stage,
    args: StageArgs,
    progress: Option<mpsc::UnboundedSender<()>>,
) -> Option<Outcome> {
    let conn = data.as_mut()?;
    if stage.has_reply() && !conn.noreply(stage) {
        let held_back = matches!(
            stage,
            Stage::Data | Stage::Header | Stage::Eoh | Stage::Body | Stage::Eom
        )
        .then(|| conn.delayed.take().map(|(v, _)| v))
        .flatten();
        let owed = held_back
            .or_else(|| conn.pending.take())
            .or_else(|| conn.pending_connection.clone());
        if let Some(verdict) = owed {
            log_decision(conn, macros, stage, "(earlier stage)", &verdict);
            return Some(Outcome {
                verdict,
                policy: None,
            });
        }
    }
    let generation = Arc::clone(conn.lease.generation());
    if !generation.handles(stage) {
        return None;
    }
    let ctx = conn.ctx()?;
    // SMTP AUTH shows in the MAIL macros, which the MTA keeps sending for later stages even
    // when MAIL itself is not negotiated.
    if !conn.client_info.authenticated
        && macros
            .get(c"{auth_authen}")
            .is_some_and(|a| !a.to_bytes().is_empty())
    {
        conn.note_auth();
    }
    let _ = ctx.borrow_mut_scoped::<Ctx, _>(|c| {
        c.set_macros(macros.to_hash_map());
        c.progress = progress;
    });
    let queue_id = macros.get(c"i").map(lossy).unwrap_or_default();
    let span = tracing::info_span!("session", client = %conn.client, queue_id = %queue_id);
    let outcome = conn
        .lease
        .run_stage(&ctx, stage, args)
        .instrument(span)
        .await;
    if outcome.verdict.is_final() {
        let policy = outcome
            .policy
            .map_or("-", |i| generation.policies[i].name.as_str());
        log_decision(conn, macros, stage, policy, &outcome.verdict);
    }
    Some(outcome)
}

fn log_decision(conn: &Conn, macros: &Macros, stage: Stage, policy: &str, verdict: &Verdict) {
    let queue_id = macros.get(c"i").map(lossy).unwrap_or_default();
    tracing::info!(
        client = %conn.client,
        queue_id = %queue_id,
        stage = stage.name(),
        policy,
        verdict = %verdict,
        "decision"
    );
}

fn answer(reply: &mut SmtpReply, verdict: &Verdict) -> Status {
    match verdict {
        Verdict::Continue => Status::Continue,
        Verdict::Accept => Status::Accept,
        Verdict::Discard => Status::Discard,
        Verdict::Reject(r) | Verdict::Tempfail(r) => {
            if let Some(r) = r {
                let lines: Vec<&str> = if r.lines.is_empty() {
                    vec![""]
                } else {
                    r.lines.iter().map(String::as_str).collect()
                };
                if let Err(e) = reply.set_error_reply(&r.code, r.xcode.as_deref(), lines) {
                    tracing::error!(error = %e, "invalid SMTP reply; the MTA's default text is used");
                }
            }
            if matches!(verdict, Verdict::Reject(_)) {
                Status::Reject
            } else {
                Status::Tempfail
            }
        }
    }
}

/// End of message: run the chain (serving `ctx:progress()` meanwhile), apply the queued edits
/// unless the message was refused, answer.
async fn eom(
    data: &mut Option<Conn>,
    macros: &Macros,
    reply: &mut SmtpReply,
    actions: &EomActions,
) -> Status {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let outcome = {
        let decision = decide(data, macros, Stage::Eom, StageArgs::None, Some(tx));
        tokio::pin!(decision);
        loop {
            tokio::select! {
                outcome = &mut decision => break outcome,
                Some(()) = rx.recv() => {
                    if let Err(e) = actions.progress().await {
                        tracing::warn!(error = %e, "cannot send progress to the MTA");
                    }
                }
            }
        }
    };
    let verdict = outcome.map_or(Verdict::Continue, |o| o.verdict);
    let Some(conn) = data.as_mut() else {
        return Status::Continue;
    };
    let edits = conn
        .ctx
        .as_ref()
        .and_then(|ctx| {
            ctx.borrow_mut_scoped::<Ctx, _>(|c| {
                c.progress = None;
                std::mem::take(&mut c.edits)
            })
            .ok()
        })
        .unwrap_or_default();
    if matches!(verdict, Verdict::Continue | Verdict::Accept) {
        for edit in edits {
            if let Err(e) = apply_edit(actions, &edit).await {
                tracing::error!(client = %conn.client, edit = ?edit, error = %e, "the MTA refused an edit");
            }
        }
    }
    if !verdict.is_final() {
        log_decision(conn, macros, Stage::Eom, "-", &Verdict::Accept);
    }
    // The message is over: its state must not leak into the next one, whether or not the MTA
    // sends MAIL (negotiation may skip it).
    conn.pending = None;
    if let Some(ctx) = &conn.ctx
        && let Err(e) = conn.lease.reset_message(ctx)
    {
        tracing::error!(error = %e, "cannot reset message state");
    }
    answer(reply, &verdict)
}

async fn apply_edit(actions: &EomActions, edit: &Edit) -> Result<(), indymilter::ActionError> {
    match edit {
        Edit::AddHeader(name, value) => actions.add_header(name.as_str(), value.as_str()).await,
        Edit::InsertHeader(index, name, value) => {
            actions
                .insert_header(*index, name.as_str(), value.as_str())
                .await
        }
        Edit::ChangeHeader(name, index, value) => {
            actions
                .change_header(name.as_str(), *index, value.as_deref())
                .await
        }
        Edit::AddRcpt(addr, None) => actions.add_recipient(addr.as_str()).await,
        Edit::AddRcpt(addr, Some(args)) => {
            actions
                .add_recipient_ext(addr.as_str(), Some(args.as_str()))
                .await
        }
        Edit::DeleteRcpt(addr) => actions.delete_recipient(addr.as_str()).await,
        Edit::ChangeSender(addr, args) => {
            actions.change_sender(addr.as_str(), args.as_deref()).await
        }
        Edit::ReplaceBody(body) => actions.replace_body(body).await,
        Edit::Quarantine(reason) => actions.quarantine(reason.as_str()).await,
    }
}
