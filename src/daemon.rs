//! The running daemon: builds the first generation, binds the socket, serves until shutdown.

use crate::{
    config::Config,
    control::ControlSocket,
    engine::{Engine, Generation},
    listen::{BoundSocket, ListenAddr},
    reload::{self, Reloader},
    server,
    services::Services,
};
use std::{sync::Arc, time::Duration};
use tokio::{sync::watch, task::JoinHandle};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A service (DNS, SPF, store) could not be set up.
    #[error("{0}")]
    Services(String),
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
}

/// A daemon serving in the background of the current tokio runtime.
pub struct Daemon {
    /// The address actually listened on (a configured port 0 is resolved).
    pub local: ListenAddr,
    /// The current policy generation holder.
    pub engine: Arc<Engine>,
    /// Builds and installs new generations (file changes, SIGHUP, `ctl reload`).
    pub reloader: Arc<Reloader>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<std::io::Result<()>>,
    watcher: Option<JoinHandle<()>>,
    _control: Option<ControlSocket>,
}

/// Lua states per generation when the config says 0: one per tokio worker thread.
pub fn default_vm_count() -> usize {
    tokio::runtime::Handle::try_current()
        .map(|h| h.metrics().num_workers())
        .unwrap_or(1)
}

impl Daemon {
    /// Loads the policies, binds the socket and starts serving.
    pub async fn start(config: Config) -> Result<Daemon, StartError> {
        let config = Arc::new(config);
        let services = Arc::new(Services::start(&config).map_err(StartError::Services)?);
        let generation = Generation::build(
            Arc::clone(&config),
            Arc::clone(&services),
            default_vm_count(),
        )
        .map_err(StartError::Policies)?;
        tracing::info!(
            generation = generation.id,
            vms = generation.vm_count(),
            policies = %config.policies.chain.join(","),
            "policies loaded"
        );
        let engine = Arc::new(Engine::new(generation));
        let reloader = Arc::new(Reloader::new(
            Arc::clone(&engine),
            services,
            Arc::clone(&config),
            default_vm_count(),
        ));
        let addr = &config.milter.listen;
        let bound = BoundSocket::bind(addr, config.milter.socket_mode)
            .await
            .map_err(|source| StartError::Bind {
                addr: addr.clone(),
                source,
            })?;
        let local = bound.local.clone();
        let unix = matches!(local, ListenAddr::Unix(_));
        let (listener, socket_guard) = bound.into_parts();
        let milter_config = indymilter::Config {
            max_connections: config.milter.max_connections,
            connection_timeout: config.milter.connection_timeout,
            ..Default::default()
        };
        let callbacks = server::callbacks(Arc::clone(&engine), unix);
        let (shutdown, mut stop) = watch::channel(false);
        let task = tokio::spawn(async move {
            let _socket_guard = socket_guard;
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            indymilter::run(listener, callbacks, milter_config, stopped).await
        });
        tracing::info!(listen = %local, "luamilter listening");
        let control_path = config.milter.control_socket_path();
        let control = match ControlSocket::serve(&control_path, Arc::clone(&reloader)) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(
                    path = %control_path.display(),
                    error = %e,
                    "control socket disabled (`luamilter ctl` will not work; SIGHUP still reloads)"
                );
                None
            }
        };
        let watcher = config
            .policies
            .watch
            .then(|| reload::watch(Arc::clone(&reloader)));
        Ok(Daemon {
            local,
            engine,
            reloader,
            shutdown,
            task,
            watcher,
            _control: control,
        })
    }

    /// Stops accepting, lets every connection finish its current command, and waits (at most
    /// `grace`) for the sessions to end.
    pub async fn stop(self, grace: Duration) {
        if let Some(watcher) = &self.watcher {
            watcher.abort();
        }
        let _ = self.shutdown.send(true);
        match tokio::time::timeout(grace, self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "milter server ended with an error"),
            Ok(Err(e)) => tracing::error!(error = %e, "milter server task failed"),
            Err(_) => tracing::warn!("sessions still open after {grace:?}; exiting anyway"),
        }
    }
}
