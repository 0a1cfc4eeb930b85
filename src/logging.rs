//! Log output: tracing with an env-filter level, as text or JSON lines on standard error.
//!
//! Lines are written by a background thread: a worker thread serving mail never waits on the
//! log's write (a full buffer does make it wait, so no line is dropped).

use crate::config::{LogConfig, LogFormat};
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `RUST_LOG`, when set, overrides the configured level.
/// indymilter's own logging is held at `warn` unless the filter names it. Keep the returned
/// guard until exit: dropping it flushes the lines still queued.
pub fn init(config: &LogConfig) -> WorkerGuard {
    let mut spec = std::env::var("RUST_LOG").unwrap_or_else(|_| config.level.clone());
    if !spec.contains("indymilter") {
        spec.push_str(",indymilter=warn");
    }
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = match config.format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    guard
}
