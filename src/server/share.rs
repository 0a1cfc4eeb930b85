//! A worker thread's share of `[milter] max_connections`. indymilter stops accepting on a thread
//! once that many of its connections are open; later connections wait in the socket's backlog
//! (and the MTA, after its own timeout, applies its default action). The daemon says so, at
//! most once a minute, so that an admin sees why.

use crate::throttle::Throttle;
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

/// At most one warning about the limit a minute, whatever the thread.
static WARNINGS: Throttle = Throttle::new(Duration::from_secs(60));

/// One worker thread: its index (and so its Lua state) and its open connections.
pub struct Worker {
    /// The worker thread's index.
    pub index: usize,
    open: AtomicUsize,
    /// Its share of `max_connections` (what indymilter enforces on it).
    limit: usize,
    /// `[milter] max_connections`, for the warning.
    max_connections: usize,
}

impl Worker {
    /// Worker `index`, allowed `limit` open connections of the daemon's `max_connections`.
    pub fn new(index: usize, limit: usize, max_connections: usize) -> Arc<Worker> {
        Arc::new(Worker {
            index,
            open: AtomicUsize::new(0),
            limit,
            max_connections,
        })
    }

    /// A connection of this worker opened; it counts until the returned guard drops. Warns
    /// when it is the last one the thread's share allows.
    pub fn opened(self: &Arc<Self>) -> OpenOnWorker {
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        if open >= self.limit && WARNINGS.due() {
            tracing::warn!(
                worker = self.index,
                open,
                max_connections = self.max_connections,
                "a worker thread has as many connections open as its share of [milter] \
                 max_connections allows: new connections wait in the socket's backlog until one \
                 closes (raise max_connections, or look for MTA connections left idle)"
            );
        }
        OpenOnWorker(Arc::clone(self))
    }
}

/// An open connection of a worker; counted until dropped.
pub struct OpenOnWorker(Arc<Worker>);

impl Drop for OpenOnWorker {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}
