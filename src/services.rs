//! The process-wide services policies reach through `require`: one DNS resolver (and its
//! cache), SPF over that resolver, and the store. Built once at start; every generation and
//! every Lua state shares them.

use crate::{
    config::Config,
    dns::Resolver,
    spf::Spf,
    store::{self, Store},
};
use std::sync::Arc;

/// Shared services.
pub struct Services {
    /// The DNS resolver.
    pub resolver: Arc<Resolver>,
    /// SPF evaluation over `resolver`.
    pub spf: Arc<Spf>,
    /// Persistent state.
    pub store: Arc<dyn Store>,
}

impl Services {
    /// Builds the services from `config` (call inside a tokio runtime). The store's SQLite
    /// file is created if missing; a Redis store connects on first use.
    pub fn start(config: &Config) -> Result<Services, String> {
        Services::start_with_clock(config, store::system_clock())
    }

    /// [`Services::start`] with the store's time taken from `clock` (tests move it by hand).
    pub fn start_with_clock(config: &Config, clock: store::Clock) -> Result<Services, String> {
        let resolver = Arc::new(Resolver::new(&config.dns).map_err(|e| format!("[dns]: {e}"))?);
        let spf = Arc::new(
            Spf::new(Arc::clone(&resolver), &config.spf).map_err(|e| format!("[spf]: {e}"))?,
        );
        let mut store_config = config.store.clone();
        if store_config.path.is_relative() {
            store_config.path = config.source.base_dir().join(&store_config.path);
        }
        let store = store::open(&store_config, clock).map_err(|e| format!("[store]: {e}"))?;
        Ok(Services {
            resolver,
            spf,
            store,
        })
    }
}
