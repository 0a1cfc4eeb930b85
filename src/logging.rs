//! Log output: tracing with an env-filter level, as text or JSON lines.

use crate::config::{LogConfig, LogFormat};
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `RUST_LOG`, when set, overrides the configured level.
/// indymilter's own logging is held at `warn` unless the filter names it.
pub fn init(config: &LogConfig) {
    let mut spec = std::env::var("RUST_LOG").unwrap_or_else(|_| config.level.clone());
    if !spec.contains("indymilter") {
        spec.push_str(",indymilter=warn");
    }
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
