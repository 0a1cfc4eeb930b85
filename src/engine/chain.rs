//! The chain: one milter stage becomes a Lua call per policy that handles it, in chain order,
//! until one gives a final verdict. Every call runs in its own coroutine (a new one, or one
//! whose last handler returned) under the stage's time limit; faults (errors, bad return
//! values, limits) are logged with policy, stage and `file:line`, and answered by the
//! exception policy.

use super::{
    generation::{Generation, VmLease},
    policy::{self, PolicyDecl},
    sandbox,
};
use crate::{
    config::ExceptionPolicy,
    log_fields,
    lua_api::{
        ctx::Ctx,
        verdict::{Reply, Verdict},
    },
    metrics::FaultKind,
    services::calls::counted,
    session::{SharedSession, Step},
    stage::Stage,
};
use bytes::Bytes;
use mlua::{AnyUserData, Lua, MultiValue, Value};
use std::{
    pin::pin,
    time::{Duration, Instant},
};

/// Arguments a stage passes to its handlers after `ctx`.
pub enum StageArgs {
    /// data, eoh, eom, abort, close.
    None,
    /// connect: client host name and IP (nil for non-IP clients).
    Connect(String, Option<String>),
    /// helo name, or an unknown command line.
    Text(String),
    /// mail or rcpt: address and ESMTP arguments.
    Envelope(String, Vec<String>),
    /// header name and value.
    Header(String, String),
    /// A body chunk.
    Body(Bytes),
}

/// How a stage's chain ended.
pub struct Outcome {
    /// The answer for the MTA.
    pub verdict: Verdict,
    /// The policy that decided, when one did (`None`: every policy continued).
    pub policy: Option<usize>,
}

impl VmLease {
    /// The connection's `ctx` in this lease's Lua state, made on first use.
    fn ctx(&self, session: &SharedSession) -> mlua::Result<&AnyUserData> {
        if let Some(ctx) = self.ctx.get() {
            return Ok(ctx);
        }
        let ctx = Ctx::create(&self.vm().lua, session.clone())?;
        Ok(self.ctx.get_or_init(|| ctx))
    }

    /// Runs every policy that handles `stage`, in chain order, until one gives a final verdict.
    pub async fn run_stage(
        &self,
        session: &SharedSession,
        stage: Stage,
        args: StageArgs,
    ) -> Outcome {
        let generation = &*self.generation;
        let vm = self.vm();
        let mut outcome = Outcome {
            verdict: Verdict::Continue,
            policy: None,
        };
        let chain = &generation.chain[stage];
        if chain.is_empty() {
            return outcome;
        }
        let ctx = match self.ctx(session) {
            Ok(ctx) => ctx,
            Err(e) => {
                tracing::error!(stage = stage.name(), error = %e, "cannot create the session context");
                return generation.fault_outcome(outcome);
            }
        };
        let args = match stage_args(&vm.lua, args) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(stage = stage.name(), error = %e, "cannot pass stage arguments to Lua");
                return generation.fault_outcome(outcome);
            }
        };
        // One time budget for the whole stage, so the MTA hears back before its own timeout
        // however many policies the chain has.
        let deadline = Instant::now() + generation.config.engine.time_limit;
        for &index in chain {
            let decl = &generation.policies[index];
            // A shadow policy runs, but queues no edits: what it queues is dropped after it.
            let edits_before = decl.shadow.then(|| session.lock().message.edits.len());
            let started = Instant::now();
            let call = pin!(self.call_handler(index, stage, session, ctx, &args, deadline));
            let (result, calls) = counted(log_fields::in_handler(&decl.name, &stage, call)).await;
            let step = |verdict: String| {
                let mut step = Step::new(stage.name(), &decl.name, verdict, started.elapsed());
                step.calls = calls;
                step.shadow = decl.shadow;
                step
            };
            if let Some(before) = edits_before {
                session.lock().message.edits.truncate(before);
            }
            if let Ok(verdict) = &result {
                generation
                    .metrics
                    .decision(index, stage, verdict.kind(), decl.shadow);
            }
            match result {
                Ok(Verdict::Continue) => {
                    if !calls.is_empty() {
                        session.lock().record(step("continue".into()));
                    }
                }
                Ok(verdict) if decl.shadow => {
                    // Shadow mode: what the policy would have done is logged and counted, never
                    // enforced.
                    let mut s = session.lock();
                    tracing::debug!(policy = %decl.name, stage = stage.name(), client = %s.client.label(), queue_id = %s.queue_id(), verdict = %verdict, "shadow: would {verdict}");
                    super::shadow::count(&decl.name, stage, &verdict);
                    s.record(step(verdict.to_string()));
                }
                Ok(verdict) => {
                    session.lock().record(step(verdict.to_string()));
                    outcome.verdict = verdict;
                    outcome.policy = Some(index);
                    return outcome;
                }
                Err((kind, fault)) => {
                    generation.metrics.fault(index, kind);
                    let (client, queue_id) = {
                        let mut s = session.lock();
                        s.record(step(format!("fault: {fault}")));
                        (s.client.label(), s.queue_id().to_string())
                    };
                    tracing::error!(
                        policy = %decl.name,
                        stage = stage.name(),
                        %client,
                        %queue_id,
                        error = %fault,
                        "policy failed"
                    );
                    if !decl.shadow
                        && generation.config.engine.exception_policy != ExceptionPolicy::Continue
                    {
                        outcome.policy = Some(index);
                        return generation.fault_outcome(outcome);
                    }
                }
            }
        }
        outcome
    }

    async fn call_handler(
        &self,
        index: usize,
        stage: Stage,
        session: &SharedSession,
        ctx: &AnyUserData,
        args: &[Value],
        deadline: Instant,
    ) -> Result<Verdict, (FaultKind, String)> {
        let generation = &*self.generation;
        let vm = self.vm();
        let decl = &generation.policies[index];
        let loaded = &vm.policies[index];
        let Some(handler) = &loaded.handlers[stage] else {
            return Ok(Verdict::Continue);
        };
        let limit = generation.config.engine.time_limit;
        let lua_error = |e: mlua::Error| (FaultKind::Error, describe_lua_error(&e, decl));
        let time_limit = || {
            (
                FaultKind::TimeLimit,
                time_limit_message(limit, decl, handler),
            )
        };
        session.lock().running = Some((stage, index));
        let coroutine = vm.coroutine(handler, deadline).map_err(lua_error)?;
        let mut call_args = Vec::with_capacity(args.len() + 2);
        call_args.push(Value::UserData(ctx.clone()));
        call_args.extend(args.iter().cloned());
        call_args.push(Value::Table(loaded.options.clone()));
        let call = coroutine
            .thread
            .clone()
            .into_async::<Value>(MultiValue::from_vec(call_args))
            .map_err(lua_error)?;
        let result = tokio::time::timeout_at(deadline.into(), call).await;
        // Between handlers the session's ctx may not be used (see lua_api::ctx).
        session.lock().running = None;
        let result = match result {
            Err(_) => return Err(time_limit()),
            Ok(r) => r,
        };
        vm.release(coroutine);
        match result {
            Ok(value) => to_verdict(value, stage).map_err(|e| {
                let at = policy::defined_at(handler, &decl.path);
                (FaultKind::Error, format!("{at}: {e}"))
            }),
            Err(e) if e.to_string().contains(sandbox::TIME_LIMIT_MARKER) => Err(time_limit()),
            Err(e) if is_memory_error(&e) => {
                let _ = vm.lua.gc_collect();
                Err((FaultKind::MemoryLimit, describe_lua_error(&e, decl)))
            }
            Err(e) => Err(lua_error(e)),
        }
    }
}

fn stage_args(lua: &Lua, args: StageArgs) -> mlua::Result<Vec<Value>> {
    let s = |text: &str| lua.create_string(text).map(Value::String);
    Ok(match args {
        StageArgs::None => vec![],
        StageArgs::Connect(host, ip) => vec![
            s(&host)?,
            ip.map(|ip| s(&ip)).transpose()?.unwrap_or(Value::Nil),
        ],
        StageArgs::Text(text) => vec![s(&text)?],
        StageArgs::Envelope(addr, esmtp) => {
            let table = lua.create_table_with_capacity(0, esmtp.len())?;
            for arg in &esmtp {
                match arg.split_once('=') {
                    Some((k, v)) => table.raw_set(k.to_ascii_uppercase(), v)?,
                    None => table.raw_set(arg.to_ascii_uppercase(), true)?,
                }
            }
            vec![s(&addr)?, Value::Table(table)]
        }
        StageArgs::Header(name, value) => vec![s(&name)?, s(&value)?],
        StageArgs::Body(chunk) => vec![Value::String(lua.create_string(&chunk)?)],
    })
}

impl Generation {
    fn fault_outcome(&self, mut outcome: Outcome) -> Outcome {
        let reply = |code: &str, xcode: &str, text: &str| {
            Some(Reply {
                code: code.into(),
                xcode: Some(xcode.into()),
                lines: vec![text.into()],
                // A policy failure is not a policy's reject: never held back.
                immediate: true,
            })
        };
        outcome.verdict = match self.config.engine.exception_policy {
            ExceptionPolicy::Reject => Verdict::Reject(reply("550", "5.3.0", "Policy failure")),
            ExceptionPolicy::Tempfail | ExceptionPolicy::Continue => Verdict::Tempfail(reply(
                "451",
                "4.3.0",
                "Temporary policy failure, try again later",
            )),
        };
        outcome
    }
}

fn time_limit_message(limit: Duration, decl: &PolicyDecl, handler: &mlua::Function) -> String {
    format!(
        "{}: the stage exceeded the time limit of {limit:?} (engine.time_limit)",
        policy::defined_at(handler, &decl.path)
    )
}

/// Whether the state ran out of memory, also inside a Rust function the policy called.
fn is_memory_error(e: &mlua::Error) -> bool {
    match e {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::CallbackError { cause, .. } => is_memory_error(cause),
        _ => false,
    }
}

/// A one-line description of a Lua error: the message, located at the policy's `file:line`
/// (taken from the traceback when the error was raised inside a Rust function).
fn describe_lua_error(e: &mlua::Error, decl: &PolicyDecl) -> String {
    let (message, traceback) = match e {
        mlua::Error::CallbackError { traceback, cause } => (cause.to_string(), traceback.clone()),
        mlua::Error::MemoryError(m) => (
            format!("out of memory (engine.memory_limit_mib): {m}"),
            String::new(),
        ),
        other => (other.to_string(), other.to_string()),
    };
    let message = policy::first_line(&message);
    let message = message
        .strip_prefix("runtime error: ")
        .unwrap_or(&message)
        .to_string();
    let path = decl.path.display().to_string();
    if message.starts_with(&path) {
        return message;
    }
    let location = traceback
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(&path))
        .and_then(|l| {
            let rest = &l[path.len()..];
            let line: String = rest
                .strip_prefix(':')?
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            (!line.is_empty()).then(|| format!("{path}:{line}"))
        })
        .unwrap_or(path);
    format!("{location}: {message}")
}

fn to_verdict(value: Value, stage: Stage) -> Result<Verdict, String> {
    let verdict = match &value {
        Value::Nil => Verdict::Continue,
        Value::UserData(ud) => match ud.borrow::<Verdict>() {
            Ok(v) => v.clone(),
            Err(_) => return Err(bad_return(&value)),
        },
        _ => return Err(bad_return(&value)),
    };
    if matches!(verdict, Verdict::Discard) && matches!(stage, Stage::Connect | Stage::Helo) {
        return Err(format!(
            "milter.discard() is not allowed at stage '{stage}': there is no message to discard yet"
        ));
    }
    Ok(verdict)
}

fn bad_return(value: &Value) -> String {
    let shown = match value {
        Value::String(s) => format!("the string {:?}", s.to_string_lossy()),
        Value::Table(_) => "a table".to_string(),
        other => format!(
            "a {} ({})",
            other.type_name(),
            other.to_string().unwrap_or_default()
        ),
    };
    format!(
        "handler returned {shown}; a handler must return nil or a verdict: milter.accept(), \
         milter.continue(), milter.reject{{...}}, milter.tempfail{{...}} or milter.discard()"
    )
}
