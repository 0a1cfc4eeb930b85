//! A worker thread's share of `[milter] max_connections`. indymilter stops accepting on a thread
//! once that many of its connections are open; later connections wait in the socket's backlog
//! (and the MTA, after its own timeout, applies its default action). The daemon says so, at
//! most once a minute, so that an admin sees why.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

/// At most one warning about the limit in this interval, whatever the thread.
const WARNING_INTERVAL: Duration = Duration::from_secs(60);

static LAST_WARNING: Mutex<Option<Instant>> = Mutex::new(None);

/// One worker thread: its index (and so its Lua state) and its open connections.
pub struct Worker {
    /// The worker thread's index.
    pub index: usize,
    open: AtomicUsize,
    /// Its share of `max_connections` (what indymilter enforces on it).
    limit: usize,
}

impl Worker {
    /// Worker `index`, allowed `limit` open connections.
    pub fn new(index: usize, limit: usize) -> Arc<Worker> {
        Arc::new(Worker {
            index,
            open: AtomicUsize::new(0),
            limit,
        })
    }

    /// A connection of this worker opened; it counts until the returned guard drops. Warns
    /// when it is the last one the thread's share allows.
    pub fn opened(self: &Arc<Self>, max_connections: usize) -> OpenOnWorker {
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        if open >= self.limit && due() {
            tracing::warn!(
                worker = self.index,
                open,
                max_connections,
                "a worker thread has as many connections open as its share of [milter] \
                 max_connections allows: new connections wait in the socket's backlog until one \
                 closes (raise max_connections, or look for MTA connections left idle)"
            );
        }
        OpenOnWorker(Arc::clone(self))
    }
}

/// Whether a warning may be logged now (and then not again for a while).
fn due() -> bool {
    let mut last = LAST_WARNING.lock().unwrap_or_else(|e| e.into_inner());
    let due = last.is_none_or(|at| at.elapsed() >= WARNING_INTERVAL);
    if due {
        *last = Some(Instant::now());
    }
    due
}

/// An open connection of a worker; counted until dropped.
pub struct OpenOnWorker(Arc<Worker>);

impl Drop for OpenOnWorker {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}
