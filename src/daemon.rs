//! The running daemon: builds the first generation, binds the socket, and serves it from one
//! thread per core, each with its own single-threaded runtime and its own Lua state.
//!
//! Why threads with their own runtimes rather than one work-stealing runtime: a Lua state is
//! used by one thread at a time (mlua's `send` states sit behind a mutex), so with a shared
//! runtime two workers often wanted the same state and one of them blocked. With a runtime and a
//! state per thread, a connection lives on one thread from accept to close, the state's lock is
//! never contended, and no wakeup crosses threads. The kernel spreads new connections over the
//! threads, which all accept on the same socket.

use crate::{
    config::Config,
    control::ControlSocket,
    engine::{Engine, Generation},
    listen::{BoundSocket, ListenAddr, SocketFileGuard},
    log_output, metrics,
    pid_file::PidFile,
    privileges::Identity,
    reload::{self, Reloader},
    server,
    services::{self, Services, ServicesError, store, store::lock::DaemonLock},
    systemd,
};
use std::{sync::Arc, thread::JoinHandle, time::Duration};
use tokio::sync::watch;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A service (DNS, SPF, store) could not be set up.
    #[error("{0}")]
    Services(ServicesError),
    /// The policies did not load; every problem is listed.
    #[error("policies failed to load:\n  {}", .0.join("\n  "))]
    Policies(Vec<String>),
    /// The socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: ListenAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// `socket_activation` is on but systemd passed no usable socket.
    #[error("cannot use the socket systemd passed: {0}")]
    SocketActivation(std::io::Error),
    /// `[milter] pid_file`, `user` or `group` could not be applied.
    #[error("{0}")]
    Privileges(String),
    /// The metrics endpoint could not be served.
    #[error("{0}")]
    Metrics(String),
    /// A worker thread could not be started.
    #[error("cannot start a worker thread: {0}")]
    Worker(std::io::Error),
}

/// A daemon serving in the background.
pub struct Daemon {
    /// The address actually listened on (a configured port 0 is resolved).
    pub local: ListenAddr,
    /// The current policy generation holder.
    pub engine: Arc<Engine>,
    /// Builds and installs new generations (file changes, SIGHUP, `ctl reload`).
    pub reloader: Arc<Reloader>,
    shutdown: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
    watcher: Option<tokio::task::JoinHandle<()>>,
    watchdog: Option<tokio::task::JoinHandle<()>>,
    _control: Option<ControlSocket>,
    _socket_file: SocketFileGuard,
    _pid_file: Option<PidFile>,
    _store_lock: Option<DaemonLock>,
}

/// Worker threads for `config`: `engine.worker_threads`, or one per CPU when that is 0.
pub fn worker_count(config: &Config) -> usize {
    match config.engine.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

impl Daemon {
    /// Loads the policies, binds the socket and starts the worker threads. Call it inside a
    /// tokio runtime: control, reload and the services' background tasks run there.
    pub async fn start(config: Config) -> Result<Daemon, StartError> {
        Daemon::start_with_clock(config, store::system_clock()).await
    }

    /// [`Daemon::start`] with the store's time taken from `clock` (tests move it by hand).
    pub async fn start_with_clock(
        config: Config,
        clock: store::Clock,
    ) -> Result<Daemon, StartError> {
        let config = Arc::new(config);
        let workers = worker_count(&config);
        let identity = config
            .milter
            .user
            .as_deref()
            .map(|user| Identity::lookup(user, config.milter.group.as_deref()))
            .transpose()
            .map_err(StartError::Privileges)?;
        raise_open_files_limit(config.milter.max_connections);
        if let Some(path) = &config.milter.pid_file {
            // Before binding: a second instance must not touch the first one's sockets.
            PidFile::refuse_if_running(path).map_err(StartError::Privileges)?;
        }
        // Before the services and the first generation, which register their series.
        metrics::install(&config.metrics, config.store.backend).map_err(StartError::Metrics)?;
        let store_lock = DaemonLock::take(&services::store_config(&config))
            .map_err(|e| StartError::Services(e.into()))?;
        let services =
            Arc::new(Services::start_with_clock(&config, clock).map_err(StartError::Services)?);
        let generation = Generation::build(Arc::clone(&config), Arc::clone(&services), workers)
            .map_err(StartError::Policies)?;
        tracing::info!(
            generation = generation.id,
            vms = generation.vm_count(),
            policies = %config.policies.chain.join(","),
            "policies loaded"
        );
        metrics::serving(generation.id);
        let engine = Arc::new(Engine::new(generation));
        let reloader = Arc::new(Reloader::new(
            Arc::clone(&engine),
            services,
            Arc::clone(&config),
            workers,
        ));
        let addr = &config.milter.listen;
        let bound = if config.milter.socket_activation {
            systemd::passed_socket().map_err(StartError::SocketActivation)?
        } else {
            BoundSocket::bind(addr, config.milter.socket_mode)
                .await
                .map_err(|source| StartError::Bind {
                    addr: addr.clone(),
                    source,
                })?
        };
        let bound = Arc::new(bound);
        let local = bound.local.clone();
        let milter_config = indymilter::Config {
            // indymilter counts per run; each thread runs its own.
            max_connections: config.milter.max_connections.div_ceil(workers),
            connection_timeout: config.milter.connection_timeout,
            ..Default::default()
        };
        let control_path = config.milter.control_socket_path();
        let control = match ControlSocket::serve(&control_path, Arc::clone(&reloader)) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(
                    path = %control_path.display(),
                    error = %e,
                    "control socket disabled (`luamilter ctl` will not work; SIGHUP still reloads)"
                );
                None
            }
        };
        let pid_file = config
            .milter
            .pid_file
            .as_deref()
            .map(PidFile::create)
            .transpose()
            .map_err(StartError::Privileges)?;
        if let Some(identity) = &identity {
            drop_privileges(identity, &config, &bound, control.is_some())
                .map_err(StartError::Privileges)?;
        }
        let (shutdown, stop) = watch::channel(false);
        let watchdog_interval = systemd::watchdog_interval();
        let heartbeats = systemd::Heartbeats::new(workers);
        let mut threads = Vec::with_capacity(workers);
        let max_connections = config.milter.max_connections;
        for index in 0..workers {
            let engine = Arc::clone(&engine);
            let bound = Arc::clone(&bound);
            let milter_config = milter_config.clone();
            let mut stop = stop.clone();
            let heartbeats = Arc::clone(&heartbeats);
            let thread = std::thread::Builder::new()
                .name(format!("milter-{index}"))
                .spawn(move || {
                    log_output::gather_on_this_thread();
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .on_thread_park(log_output::flush_thread)
                        .build()
                    {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::error!(error = %e, "worker {index}: cannot start its runtime");
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        if let Some(interval) = watchdog_interval {
                            // On this thread's runtime: a stuck thread stops its heartbeat.
                            tokio::spawn(heartbeats.beat(index, interval));
                        }
                        let listener = match bound.adopt() {
                            Ok(l) => l,
                            Err(e) => {
                                tracing::error!(error = %e, "worker {index}: cannot listen");
                                return;
                            }
                        };
                        let worker = server::Worker::new(
                            index,
                            milter_config.max_connections,
                            max_connections,
                        );
                        let callbacks = server::callbacks(engine, worker);
                        let stopped = async move {
                            let _ = stop.wait_for(|s| *s).await;
                        };
                        if let Err(e) = indymilter::run(listener, callbacks, milter_config, stopped).await {
                            tracing::error!(error = %e, "worker {index}: milter server ended with an error");
                        }
                    });
                })
                .map_err(StartError::Worker)?;
            threads.push(thread);
        }
        tracing::info!(listen = %local, workers, "luamilter listening");
        systemd::ready(engine.current().id);
        let watchdog = watchdog_interval.map(|interval| {
            tracing::info!(?interval, "feeding the systemd watchdog");
            tokio::spawn(heartbeats.feed(interval))
        });
        let watcher = config
            .policies
            .watch
            .then(|| reload::watch(Arc::clone(&reloader)));
        Ok(Daemon {
            local,
            engine,
            reloader,
            shutdown,
            workers: threads,
            watcher,
            watchdog,
            _control: control,
            _socket_file: bound.guard(),
            _pid_file: pid_file,
            _store_lock: store_lock,
        })
    }

    /// Stops accepting, lets every connection finish its current command, and waits (at most
    /// `grace`) for the sessions to end.
    pub async fn stop(self, grace: Duration) {
        systemd::stopping();
        if let Some(watcher) = &self.watcher {
            watcher.abort();
        }
        if let Some(watchdog) = &self.watchdog {
            watchdog.abort();
        }
        let _ = self.shutdown.send(true);
        let workers = self.workers;
        let joined = tokio::task::spawn_blocking(move || {
            for worker in workers {
                let _ = worker.join();
            }
        });
        if tokio::time::timeout(grace, joined).await.is_err() {
            tracing::warn!("sessions still open after {grace:?}; exiting anyway");
        }
    }
}

/// Open files the daemon needs beside its milter connections: the store, the log, sockets to
/// DNS, Redis and the control socket, policy files being reloaded.
const OTHER_OPEN_FILES: u64 = 64;

/// Raises the soft limit on open files to the hard one: the usual soft limit (1024) is below the
/// default `max_connections`. Warns when even the hard limit is short of what `max_connections`
/// connections need (beyond it, connections wait in the socket's backlog).
fn raise_open_files_limit(max_connections: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `limit`, which we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads `raised`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    if limit.rlim_cur < max_connections as u64 + OTHER_OPEN_FILES {
        tracing::warn!(
            open_files = limit.rlim_cur,
            max_connections,
            "the open files limit is below what [milter] max_connections needs: connections \
             beyond it wait until others close (raise LimitNOFILE, or lower max_connections)"
        );
    }
}

/// Hands what the daemon keeps using to `identity` (the unix socket, so the MTA's group can
/// reach it; the control socket; the SQLite store and its journal files), then gives up root.
fn drop_privileges(
    identity: &Identity,
    config: &Config,
    bound: &BoundSocket,
    control: bool,
) -> Result<(), String> {
    let mut owned = Vec::new();
    if let ListenAddr::Unix(path) = &bound.local {
        owned.push(path.clone());
    }
    if control {
        owned.push(config.milter.control_socket_path());
    }
    if config.store.backend == store::Backend::Sqlite {
        let db = config.store.path.clone();
        for suffix in ["-wal", "-shm"] {
            let mut journal = db.clone().into_os_string();
            journal.push(suffix);
            owned.push(journal.into());
        }
        owned.push(db);
    }
    for path in &owned {
        identity
            .chown(path)
            .map_err(|e| format!("milter.user: cannot chown {}: {e}", path.display()))?;
    }
    identity.assume().map_err(|e| {
        format!(
            "milter.user: cannot switch to {} (uid {}, gid {}): {e}",
            identity.user, identity.uid, identity.gid
        )
    })?;
    tracing::info!(user = %identity.user, uid = identity.uid, gid = identity.gid, "dropped privileges");
    Ok(())
}
