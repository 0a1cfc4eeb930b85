//! Where log lines go: standard error, written by the thread that logs them, with no thread in
//! between. A milter worker thread gathers its lines and writes them with one `write` when it
//! runs out of work (its runtime calls [`flush_thread`] before it parks), when they pass 64 KiB
//! or when the oldest is 100 ms old, when a `warn` or `error` line comes, and when the thread
//! ends; any other thread writes each line at once. So a line costs no thread wake-up, and a
//! busy worker writes many lines in one system call. Lines are never dropped: when the reader
//! of standard error is slow, the writing thread waits for it.

use std::{
    cell::RefCell,
    io::{self, Write},
    time::{Duration, Instant},
};
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// Gathered lines are written once they reach this size...
const FLUSH_BYTES: usize = 64 * 1024;
/// ...or when a line is added this long after the first one gathered.
const FLUSH_AGE: Duration = Duration::from_millis(100);

/// The lines a worker thread has gathered and not yet written.
struct Gathered {
    lines: Vec<u8>,
    since: Option<Instant>,
}

impl Gathered {
    fn push(&mut self, line: &[u8], urgent: bool) {
        self.lines.extend_from_slice(line);
        let since = *self.since.get_or_insert_with(Instant::now);
        if urgent || self.lines.len() >= FLUSH_BYTES || since.elapsed() >= FLUSH_AGE {
            self.flush();
        }
    }

    fn flush(&mut self) {
        write_out(&self.lines);
        self.lines.clear();
        self.since = None;
    }
}

impl Drop for Gathered {
    fn drop(&mut self) {
        self.flush();
    }
}

thread_local! {
    static GATHERED: RefCell<Option<Gathered>> = const { RefCell::new(None) };
}

/// Makes the calling thread (a milter worker) gather its log lines; its runtime must call
/// [`flush_thread`] before it parks.
pub fn gather_on_this_thread() {
    GATHERED.with_borrow_mut(|g| {
        *g = Some(Gathered {
            lines: Vec::with_capacity(FLUSH_BYTES),
            since: None,
        })
    });
}

/// Writes the lines this thread has gathered (none on a thread that does not gather).
pub fn flush_thread() {
    let _ = GATHERED.try_with(|g| {
        if let Ok(mut g) = g.try_borrow_mut()
            && let Some(g) = g.as_mut()
        {
            g.flush();
        }
    });
}

fn write_out(bytes: &[u8]) {
    if !bytes.is_empty() {
        // A log that cannot be written has nowhere to report it.
        let _ = io::stderr().lock().write_all(bytes);
    }
}

/// tracing's writer for log lines (see the module doc).
#[derive(Clone, Copy, Default)]
pub struct LogOutput;

/// One line being written through [`LogOutput`]; an urgent one (a problem: `warn` or `error`)
/// is written at once, after the lines gathered before it.
pub struct Line {
    urgent: bool,
}

impl<'a> MakeWriter<'a> for LogOutput {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line { urgent: false }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line {
        Line {
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let gathered = GATHERED
            .try_with(|g| match g.try_borrow_mut().as_deref_mut() {
                Ok(Some(gathered)) => {
                    gathered.push(buf, self.urgent);
                    true
                }
                _ => false,
            })
            .unwrap_or(false);
        if !gathered {
            write_out(buf);
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
