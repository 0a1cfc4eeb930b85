//! Where log lines go: a buffer that the threads serving mail append to, and a writer thread
//! that takes it every few milliseconds (sooner when it fills) and writes it to standard
//! error in one write. A worker thread never waits on the write, and no thread is woken per
//! line: with one line per message, a wake-up per line cost more than the line itself.

use std::{
    io::{self, Write},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
    time::Duration,
};
use tracing_subscriber::fmt::MakeWriter;

/// How long a line may wait in the buffer.
const INTERVAL: Duration = Duration::from_millis(5);
/// A buffer this full wakes the writer thread at once.
const WAKE_AT: usize = 256 * 1024;

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
}

#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The writer side handed to the log formatter.
#[derive(Clone)]
pub struct BatchedStderr(Arc<Shared>);

/// Keeps the writer thread; dropping it writes the lines still buffered and stops the thread.
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread.
pub fn start() -> io::Result<(BatchedStderr, FlushGuard)> {
    let shared = Arc::new(Shared::default());
    let thread = {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || write_until_closed(&shared))?
    };
    let guard = FlushGuard {
        shared: Arc::clone(&shared),
        thread: Some(thread),
    };
    Ok((BatchedStderr(shared), guard))
}

fn write_until_closed(shared: &Shared) {
    let mut spare = Vec::new();
    loop {
        let closed = {
            let mut pending = shared.lock();
            if !pending.closed && pending.lines.len() < WAKE_AT {
                pending = shared
                    .wake
                    .wait_timeout(pending, INTERVAL)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            std::mem::swap(&mut pending.lines, &mut spare);
            pending.closed
        };
        if !spare.is_empty() {
            // Nowhere to report a failing standard error; the lines are dropped.
            let _ = io::stderr().write_all(&spare);
            spare.clear();
        }
        if closed {
            return;
        }
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Write for BatchedStderr {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut pending = self.0.lock();
        if pending.closed {
            // After the guard: straight out.
            drop(pending);
            return io::stderr().write(line);
        }
        pending.lines.extend_from_slice(line);
        if pending.lines.len() >= WAKE_AT {
            self.0.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchedStderr {
    type Writer = BatchedStderr;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
