//! The milter, in-process: the configured policies behind the daemon's own indymilter callbacks
//! ([`crate::server::callbacks`]), served by `indymilter::run` on a listener whose connections
//! are in-memory pipes. Nothing is bound, no thread is started: it runs on the caller's
//! (current-thread) runtime.

use crate::{
    config::Config,
    daemon::StartError,
    engine::{Engine, Generation},
    server,
    services::{Services, dns::Resolver, store::Clock},
};
use indymilter::Listener;
use luamilter_loadgen::client::{ClientError, Connection};
use std::{
    io,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};
use tokio::{
    io::DuplexStream,
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

/// Bytes an in-memory pipe holds in each direction: a whole body chunk and more.
const PIPE_BUFFER: usize = 256 * 1024;

/// A listener whose connections are the pipes [`Milter::connect`] hands it.
struct Pipes(mpsc::UnboundedReceiver<DuplexStream>);

impl Listener for Pipes {
    type Io = DuplexStream;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<DuplexStream>> {
        match self.0.poll_recv(cx) {
            Poll::Ready(Some(pipe)) => Poll::Ready(Ok(pipe)),
            // No more connections will come; the milter runs until it is stopped.
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
}

/// The configured milter, serving in-memory connections.
pub struct Milter {
    /// The policies.
    pub engine: Arc<Engine>,
    /// The services the policies use (the store, to preload it).
    pub services: Arc<Services>,
    pipes: mpsc::UnboundedSender<DuplexStream>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<io::Result<()>>,
    wait: Duration,
}

impl Milter {
    /// Starts the services (DNS from `resolver`, the store's time from `clock`) and loads the
    /// policies of `config`, in one Lua state. Call it inside a current-thread tokio runtime.
    pub fn start(
        config: Config,
        resolver: Arc<Resolver>,
        clock: Clock,
    ) -> Result<Milter, StartError> {
        let config = Arc::new(config);
        let services =
            Arc::new(Services::start_with(&config, clock, resolver).map_err(StartError::Services)?);
        let generation = Generation::build(Arc::clone(&config), Arc::clone(&services), 1)
            .map_err(StartError::Policies)?;
        let engine = Arc::new(Engine::new(generation));
        let (pipes, incoming) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let milter_config = indymilter::Config {
            connection_timeout: config.milter.connection_timeout,
            ..Default::default()
        };
        let limit = milter_config.max_connections;
        let worker = server::Worker::new(0, limit, limit);
        let callbacks = server::callbacks(Arc::clone(&engine), worker);
        let server = tokio::spawn(indymilter::run(
            Pipes(incoming),
            callbacks,
            milter_config,
            async move {
                let _ = stopped.await;
            },
        ));
        // An MTA waits longer than the policies may take (Postfix: 30 s and 300 s).
        let wait = config.engine.time_limit * 2 + Duration::from_secs(10);
        Ok(Milter {
            engine,
            services,
            pipes,
            stop: Some(stop),
            server,
            wait,
        })
    }

    /// Opens a connection and negotiates as Postfix does.
    pub async fn connect(&self) -> Result<Connection<DuplexStream>, ClientError> {
        let (mta, milter) = tokio::io::duplex(PIPE_BUFFER);
        self.pipes
            .send(milter)
            .map_err(|_| ClientError::Io(io::Error::from(io::ErrorKind::NotConnected)))?;
        Connection::negotiate(mta, self.wait).await
    }

    /// Stops serving; open sessions end after their current command.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.server).await;
    }
}
