//! Runs policies: Lua states, the policy chain, verdict merging, limits and generations.
//!
//! # The bridge between indymilter and Lua
//!
//! indymilter drives each MTA connection as a `Send` future on the tokio runtime. mlua is built
//! with its `send` feature, so a `Lua` state can be used from any worker thread; each state sits
//! behind its own mutex that is held only while Lua code runs and released whenever a handler
//! awaits (DNS, store, `milter.sleep`). A handler call therefore runs on the worker thread that
//! polls its connection, with no thread hop and no channel: the call costs one coroutine
//! creation plus the Lua code itself.
//!
//! A [`Generation`] owns several identical states (one per worker thread by default). A new
//! connection is pinned to the least busy state for its whole life, so per-connection Lua data
//! stays in one state and Lua work spreads over all cores. Two connections on one state
//! interleave at await points (the OpenResty model): while one waits on DNS, the other runs.
//!
//! Every handler call runs in a fresh coroutine with an instruction-count hook that enforces the
//! wall-clock time limit even in loops that never yield (the sandbox's `pcall` cannot catch it),
//! under a tokio timeout for time spent awaiting. Faults (errors, bad return values, limits) are
//! logged with policy, stage and `file:line`, and answered by the exception policy.

pub mod options;
pub mod policy;
pub mod sandbox;

use crate::{
    config::{Config, ExceptionPolicy},
    lua_api::{
        ctx::{ClientInfo, Ctx},
        verdict::{Reply, Verdict},
    },
    services::{Services, site::Site},
    stage::Stage,
};
use bytes::Bytes;
use indymilter::{Actions, MacroStage, ProtoOpts};
use mlua::{AnyUserData, Lua, MultiValue, Value};
use policy::{LoadedPolicy, PolicyDecl, PolicySource};
use std::{
    collections::{BTreeMap, HashMap},
    ffi::CString,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};
use tracing::Instrument;

/// Macros the daemon itself relies on; requested alongside any a policy asks for (an MTA uses a
/// milter's macro list instead of its own defaults).
const CORE_MACROS: &[(MacroStage, &str)] = &[
    (
        MacroStage::Connect,
        "j _ {daemon_name} {daemon_port} {client_addr} {client_name}",
    ),
    (MacroStage::Helo, "{tls_version} {cipher}"),
    (
        MacroStage::Mail,
        "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_mailer}",
    ),
    (MacroStage::Rcpt, "i {rcpt_addr} {rcpt_mailer}"),
    (MacroStage::Eom, "i"),
];

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

/// What negotiation asks of the MTA for connections of this generation.
pub struct Plan {
    /// Stages the MTA need not send, and other options to ask for (REJECTED_RCPT).
    pub skip: ProtoOpts,
    /// Stages the MTA need not wait for a reply to.
    pub noreply: ProtoOpts,
    /// Stages sent without a reply only on unix sockets (collected but not handled).
    pub collect_only: ProtoOpts,
    /// Macros to request per stage (empty: the MTA's defaults).
    pub macros: HashMap<MacroStage, CString>,
}

/// Per stage index, whether the MTA sends that stage under the negotiated options.
pub fn stages_sent(opts: ProtoOpts) -> [bool; 12] {
    let mut sent = [true; 12];
    for (stage, no, _) in skippable_stages() {
        sent[stage.index()] = !opts.contains(no);
    }
    sent
}

/// The stages negotiation can skip (all but eom, abort and close). A stage is sent when a
/// policy handles it or `needs` its data.
fn skippable_stages() -> impl Iterator<Item = (Stage, ProtoOpts, ProtoOpts)> {
    Stage::ALL.into_iter().filter_map(|stage| {
        let (no, no_reply) = stage.protocol_flags();
        (!no.is_empty()).then_some((stage, no, no_reply))
    })
}

/// The actions luamilter can perform at end of message; requested masked by the MTA's offer.
pub const SUPPORTED_ACTIONS: Actions = Actions::ADD_HEADER
    .union(Actions::CHANGE_HEADER)
    .union(Actions::ADD_RCPT)
    .union(Actions::ADD_RCPT_EXT)
    .union(Actions::DELETE_RCPT)
    .union(Actions::CHANGE_SENDER)
    .union(Actions::REPLACE_BODY)
    .union(Actions::QUARANTINE);

struct Vm {
    lua: Lua,
    policies: Vec<LoadedPolicy>,
    connections: AtomicUsize,
}

/// A complete, validated set of policies loaded into its Lua states. Connections keep the
/// generation they started with until they close.
pub struct Generation {
    /// Sequence number, 1 for the first load.
    pub id: u64,
    /// The configuration it was built from.
    pub config: Arc<Config>,
    /// The policies of the chain, in order.
    pub policies: Vec<PolicyDecl>,
    /// Negotiation for its connections.
    pub plan: Plan,
    /// The site facts of this generation's config.
    pub site: Arc<Site>,
    vms: Vec<Vm>,
    /// Policy indexes with a handler, per stage.
    chain: [Vec<usize>; 12],
}

static GENERATIONS: AtomicU64 = AtomicU64::new(0);
static LIVE_GENERATIONS: AtomicUsize = AtomicUsize::new(0);

impl Drop for Generation {
    fn drop(&mut self) {
        LIVE_GENERATIONS.fetch_sub(1, Ordering::Relaxed);
        // Close the Lua states first, then hand the freed pages back to the system: without
        // this, glibc keeps most of a freed generation's heap and RSS creeps up over reloads.
        self.vms.clear();
        // SAFETY: malloc_trim only releases free memory; it has no preconditions.
        unsafe {
            libc::malloc_trim(0);
        }
        tracing::debug!(generation = self.id, "generation freed");
    }
}

/// A connection's claim on one Lua state of a generation; released on drop.
pub struct VmLease {
    generation: Arc<Generation>,
    vm: usize,
}

impl Drop for VmLease {
    fn drop(&mut self) {
        self.generation.vms[self.vm]
            .connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl VmLease {
    /// The generation this connection runs on.
    pub fn generation(&self) -> &Arc<Generation> {
        &self.generation
    }

    fn vm(&self) -> &Vm {
        &self.generation.vms[self.vm]
    }

    /// Creates the connection's `ctx`; `sent` tells which stages the MTA sends (negotiated).
    pub fn new_ctx(
        &self,
        client: ClientInfo,
        actions: Actions,
        sent: [bool; 12],
    ) -> mlua::Result<AnyUserData> {
        let ctx = Ctx {
            client: client
                .ip
                .map(|ip| ip.to_string())
                .unwrap_or_else(|| client.hostname.clone()),
            actions,
            sent,
            receiver: self.generation.site.hostname.clone(),
            ..Ctx::default()
        };
        Ctx::create(&self.vm().lua, ctx, client)
    }

    /// Starts a new message on `ctx`.
    pub fn reset_message(&self, ctx: &AnyUserData) -> mlua::Result<()> {
        Ctx::reset_message(ctx)
    }

    /// Runs every policy that handles `stage`, in chain order, until one gives a final verdict.
    pub async fn run_stage(&self, ctx: &AnyUserData, stage: Stage, args: StageArgs) -> Outcome {
        let generation = &*self.generation;
        let vm = self.vm();
        let mut outcome = Outcome {
            verdict: Verdict::Continue,
            policy: None,
        };
        let chain = &generation.chain[stage.index()];
        if chain.is_empty() {
            return outcome;
        }
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
            let span = tracing::info_span!("policy", policy = %decl.name, stage = stage.name());
            let result = generation
                .call_handler(vm, index, stage, ctx, &args, deadline)
                .instrument(span)
                .await;
            match result {
                Ok(Verdict::Continue) => {}
                Ok(verdict) => {
                    outcome.verdict = verdict;
                    outcome.policy = Some(index);
                    return outcome;
                }
                Err(fault) => {
                    let (client, queue_id) = ctx
                        .borrow_scoped::<Ctx, _>(|c| {
                            (
                                c.client.clone(),
                                c.macro_value("i").unwrap_or("").to_string(),
                            )
                        })
                        .unwrap_or_default();
                    tracing::error!(
                        policy = %decl.name,
                        stage = stage.name(),
                        %client,
                        %queue_id,
                        error = %fault,
                        "policy failed"
                    );
                    if generation.config.engine.exception_policy != ExceptionPolicy::Continue {
                        outcome.policy = Some(index);
                        return generation.fault_outcome(outcome);
                    }
                }
            }
        }
        outcome
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
    /// Loads every policy of `config`'s chain into fresh Lua states. Returns all problems found.
    pub fn build(
        config: Arc<Config>,
        services: Arc<Services>,
        default_vms: usize,
    ) -> Result<Generation, Vec<String>> {
        let dirs = config.policy_dirs();
        let mut errors = Vec::new();
        let sources: Vec<PolicySource> = config
            .policies
            .chain
            .iter()
            .filter_map(|name| {
                PolicySource::find(name, &dirs)
                    .map_err(|e| errors.push(e))
                    .ok()
            })
            .collect();
        if !errors.is_empty() {
            return Err(errors);
        }
        let count = match config.engine.vms {
            0 => default_vms.max(1),
            n => n,
        };
        let memory = config.engine.memory_limit_mib << 20;
        let site = Arc::new(Site::build(
            &config.site,
            &config.source.base_dir(),
            &config.source.name(),
        )?);
        let mut decls = Vec::new();
        let mut vms = Vec::with_capacity(count);
        for i in 0..count {
            let lua = sandbox::new_state(
                memory,
                dirs.clone(),
                Arc::clone(&services),
                Arc::clone(&site),
            )
            .map_err(|e| vec![format!("cannot create a Lua state: {e}")])?;
            let mut policies = Vec::new();
            for source in &sources {
                match policy::load(&lua, source, &config) {
                    Ok((decl, loaded)) => {
                        if i == 0 {
                            decls.push(decl);
                        }
                        policies.push(loaded);
                    }
                    Err(mut es) => errors.append(&mut es),
                }
            }
            if !errors.is_empty() {
                return Err(errors);
            }
            vms.push(Vm {
                lua,
                policies,
                connections: AtomicUsize::new(0),
            });
        }
        let mut chain: [Vec<usize>; 12] = Default::default();
        for (index, decl) in decls.iter().enumerate() {
            for stage in Stage::ALL {
                if decl.handles[stage.index()] {
                    chain[stage.index()].push(index);
                }
            }
        }
        let plan = Plan::from_policies(&decls, site.delay_reject);
        LIVE_GENERATIONS.fetch_add(1, Ordering::Relaxed);
        Ok(Generation {
            id: GENERATIONS.fetch_add(1, Ordering::Relaxed) + 1,
            config,
            policies: decls,
            plan,
            site,
            vms,
            chain,
        })
    }

    /// Pins a new connection of worker thread `worker` to that worker's Lua state.
    pub fn lease(self: &Arc<Self>, worker: usize) -> VmLease {
        let vm = worker % self.vms.len();
        self.vms[vm].connections.fetch_add(1, Ordering::Relaxed);
        VmLease {
            generation: Arc::clone(self),
            vm,
        }
    }

    /// Number of Lua states.
    pub fn vm_count(&self) -> usize {
        self.vms.len()
    }

    /// Open connections on this generation.
    pub fn connection_count(&self) -> usize {
        self.vms
            .iter()
            .map(|vm| vm.connections.load(Ordering::Relaxed))
            .sum()
    }

    /// Generations in memory: the current one plus those still serving older connections.
    pub fn live_count() -> usize {
        LIVE_GENERATIONS.load(Ordering::Relaxed)
    }

    /// Whether any policy handles `stage`.
    pub fn handles(&self, stage: Stage) -> bool {
        !self.chain[stage.index()].is_empty()
    }

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

    async fn call_handler(
        &self,
        vm: &Vm,
        index: usize,
        stage: Stage,
        ctx: &AnyUserData,
        args: &[Value],
        deadline: Instant,
    ) -> Result<Verdict, String> {
        let decl = &self.policies[index];
        let loaded = &vm.policies[index];
        let Some(handler) = &loaded.handlers[stage.index()] else {
            return Ok(Verdict::Continue);
        };
        let limit = self.config.engine.time_limit;
        let lua_error = |e: mlua::Error| describe_lua_error(&e, decl);
        ctx.borrow_mut_scoped::<Ctx, _>(|c| {
            c.policy = index;
            c.stage = Some(stage);
        })
        .map_err(lua_error)?;
        let thread = vm.lua.create_thread(handler.clone()).map_err(lua_error)?;
        let (triggers, hook) = sandbox::deadline_hook(deadline);
        thread.set_hook(triggers, hook).map_err(lua_error)?;
        let mut call_args = Vec::with_capacity(args.len() + 2);
        call_args.push(Value::UserData(ctx.clone()));
        call_args.extend(args.iter().cloned());
        call_args.push(Value::Table(loaded.options.clone()));
        let call = thread
            .into_async::<Value>(MultiValue::from_vec(call_args))
            .map_err(lua_error)?;
        let result = match tokio::time::timeout_at(deadline.into(), call).await {
            Err(_) => return Err(time_limit_message(limit, decl, handler)),
            Ok(r) => r,
        };
        match result {
            Ok(value) => to_verdict(value, stage)
                .map_err(|e| format!("{}: {e}", policy::defined_at(handler, &decl.path))),
            Err(e) if e.to_string().contains(sandbox::TIME_LIMIT_MARKER) => {
                Err(time_limit_message(limit, decl, handler))
            }
            Err(e) => {
                if matches!(e, mlua::Error::MemoryError(_)) {
                    let _ = vm.lua.gc_collect();
                }
                Err(lua_error(e))
            }
        }
    }
}

fn time_limit_message(limit: Duration, decl: &PolicyDecl, handler: &mlua::Function) -> String {
    format!(
        "{}: the stage exceeded the time limit of {limit:?} (engine.time_limit)",
        policy::defined_at(handler, &decl.path)
    )
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

impl Plan {
    fn from_policies(decls: &[PolicyDecl], delay_reject: bool) -> Plan {
        // Delayed rejects need MAIL (SMTP AUTH there cancels a held connect reject).
        let needed = |s: Stage| {
            (delay_reject && s == Stage::Mail) || decls.iter().any(|d| d.needs.contains(&s))
        };
        let mut skip = ProtoOpts::empty();
        let mut noreply = ProtoOpts::empty();
        let mut collect_only = ProtoOpts::empty();
        for (stage, no, no_reply) in skippable_stages() {
            let handlers: Vec<&PolicyDecl> =
                decls.iter().filter(|d| d.handles[stage.index()]).collect();
            if handlers.is_empty() {
                if stage == Stage::Data && delay_reject {
                    // Delayed rejects are answered at DATA: it must be sent, with a reply.
                } else if needed(stage) {
                    collect_only |= no_reply;
                } else {
                    skip |= no;
                }
            } else if handlers.iter().all(|d| d.noreply.contains(&stage)) {
                noreply |= no_reply;
            }
        }
        // indymilter (like libmilter) goes from DATA only to a header or to end of headers:
        // when both DATA and headers are sent, a message without headers needs EOH to reach
        // end of message.
        if !skip.contains(ProtoOpts::NO_DATA)
            && !skip.contains(ProtoOpts::NO_HEADER)
            && skip.contains(ProtoOpts::NO_EOH)
        {
            skip.remove(ProtoOpts::NO_EOH);
            collect_only |= ProtoOpts::NOREPLY_EOH;
        }
        if decls.iter().any(|d| d.rejected_recipients) {
            skip |= ProtoOpts::REJECTED_RCPT;
        }
        // A verdict from a declared no-reply handler is owed to the next stage that replies;
        // keep every other stage replying so it arrives at once, not at end of message.
        if decls.iter().any(|d| !d.noreply.is_empty()) {
            collect_only = ProtoOpts::empty();
        }
        let mut wanted: BTreeMap<MacroStage, Vec<String>> = BTreeMap::new();
        for d in decls {
            for (stage, names) in &d.macros {
                wanted
                    .entry(macro_stage(*stage))
                    .or_default()
                    .extend(names.iter().cloned());
            }
        }
        let mut macros = HashMap::new();
        if !wanted.is_empty() {
            for (stage, core) in CORE_MACROS {
                wanted
                    .entry(*stage)
                    .or_default()
                    .extend(core.split(' ').map(String::from));
            }
            for (stage, mut names) in wanted {
                names.sort();
                names.dedup();
                if let Ok(list) = CString::new(names.join(" ")) {
                    macros.insert(stage, list);
                }
            }
        }
        Plan {
            skip,
            noreply,
            collect_only,
            macros,
        }
    }
}

fn macro_stage(stage: Stage) -> MacroStage {
    match stage {
        Stage::Connect => MacroStage::Connect,
        Stage::Helo => MacroStage::Helo,
        Stage::Mail => MacroStage::Mail,
        Stage::Rcpt => MacroStage::Rcpt,
        Stage::Data => MacroStage::Data,
        Stage::Eoh => MacroStage::Eoh,
        _ => MacroStage::Eom,
    }
}

/// The generation new connections get; replaced as a whole on reload.
pub struct Engine {
    current: std::sync::RwLock<Arc<Generation>>,
}

impl Engine {
    /// Starts with a first generation.
    pub fn new(first: Generation) -> Engine {
        Engine {
            current: std::sync::RwLock::new(Arc::new(first)),
        }
    }

    /// The generation for a new connection.
    pub fn current(&self) -> Arc<Generation> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Makes `next` the generation for new connections; running ones keep theirs.
    pub fn install(&self, next: Generation) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
    }
}
