//! Generations: a complete, validated chain loaded into its Lua states, and the engine that
//! hands the current one to new connections while older connections keep theirs.

use super::{
    plan::Plan,
    policy::{self, LoadedPolicy, PolicyDecl, PolicySource},
    sandbox::{self, Deadline},
};
use crate::{
    config::Config,
    metrics::ChainMetrics,
    services::{Services, site::Site},
    stage::{Stage, StageMap},
};
use mlua::{AnyUserData, Function, Lua, Thread, thread::ThreadStatus};
use std::{
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Instant,
};

/// Finished coroutines a Lua state keeps for later handler calls.
const IDLE_COROUTINES: usize = 64;

/// One Lua state with the chain's policies loaded into it.
pub(super) struct Vm {
    pub(super) lua: Lua,
    pub(super) policies: Vec<LoadedPolicy>,
    connections: AtomicUsize,
    /// Coroutines whose handler returned, ready to run the next one, with the deadline their
    /// time-limit hook reads (creating a coroutine and installing its hook per call costs
    /// allocations and registry writes).
    idle_coroutines: Mutex<Vec<Coroutine>>,
}

/// A coroutine of a Lua state with its time-limit hook installed.
pub(super) struct Coroutine {
    pub(super) thread: Thread,
    deadline: Deadline,
}

impl Vm {
    /// A coroutine that will run `handler` under `deadline`: an idle one reset to it, or a new
    /// one.
    pub(super) fn coroutine(
        &self,
        handler: &Function,
        deadline: Instant,
    ) -> mlua::Result<Coroutine> {
        let idle = self
            .idle_coroutines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        if let Some(coroutine) = idle {
            coroutine.thread.reset(handler.clone())?;
            coroutine.deadline.set(deadline);
            return Ok(coroutine);
        }
        let thread = self.lua.create_thread(handler.clone())?;
        let deadline = Deadline::new(deadline);
        let (triggers, hook) = sandbox::deadline_hook(deadline.clone());
        thread.set_hook(triggers, hook)?;
        Ok(Coroutine { thread, deadline })
    }

    /// Keeps `coroutine` for a later call when its handler returned normally; one left yielded
    /// (time limit) or in error is dropped.
    pub(super) fn release(&self, coroutine: Coroutine) {
        if coroutine.thread.status() != ThreadStatus::Finished {
            return;
        }
        let mut idle = self
            .idle_coroutines
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if idle.len() < IDLE_COROUTINES {
            idle.push(coroutine);
        }
    }
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
    /// The services its policies use (the server stores message histories there).
    pub services: Arc<Services>,
    pub(super) vms: Vec<Vm>,
    /// Policy indexes with a handler, per stage.
    pub(super) chain: StageMap<Vec<usize>>,
    /// Its series: decisions and errors per policy, memory per Lua state.
    pub metrics: ChainMetrics,
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

/// A connection's claim on one Lua state of a generation, with the connection's `ctx` in that
/// state (made when a policy first runs); released on drop.
pub struct VmLease {
    pub(super) generation: Arc<Generation>,
    vm: usize,
    pub(super) ctx: OnceLock<AnyUserData>,
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

    pub(super) fn vm(&self) -> &Vm {
        &self.generation.vms[self.vm]
    }

    /// Records the memory its Lua state uses (nothing when metrics are off).
    pub fn record_memory(&self) {
        let metrics = &self.generation.metrics;
        if metrics.enabled() {
            metrics.lua_memory(self.vm, self.vm().lua.used_memory());
        }
    }
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
                idle_coroutines: Mutex::new(Vec::new()),
            });
        }
        let chain = StageMap::from_fn(|stage| {
            (0..decls.len())
                .filter(|&i| decls[i].handles[stage])
                .collect()
        });
        let plan = Plan::from_policies(&decls, site.delay_reject);
        LIVE_GENERATIONS.fetch_add(1, Ordering::Relaxed);
        let metrics = ChainMetrics::new(&decls, vms.iter().map(|vm| vm.lua.used_memory()));
        Ok(Generation {
            id: GENERATIONS.fetch_add(1, Ordering::Relaxed) + 1,
            config,
            policies: decls,
            plan,
            site,
            services,
            vms,
            chain,
            metrics,
        })
    }

    /// Pins a new connection of worker thread `worker` to that worker's Lua state.
    pub fn lease(self: &Arc<Self>, worker: usize) -> VmLease {
        let vm = worker % self.vms.len();
        self.vms[vm].connections.fetch_add(1, Ordering::Relaxed);
        VmLease {
            generation: Arc::clone(self),
            vm,
            ctx: OnceLock::new(),
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
        !self.chain[stage].is_empty()
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
