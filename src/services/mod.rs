//! What policies rely on, in plain Rust (no Lua here: the bindings are in `lua_api`).
//!
//! [`Services`] holds the process-wide ones: one DNS resolver (and its cache), SPF over that
//! resolver, and the store, built once at start and shared by every generation and Lua state.
//! The modules beside it are the services themselves: [`dns`] (with [`dns_zone`], static answers
//! from zone files for `luamilter test`) and [`dns_lists`] (several list
//! queries at once, over `dns`), [`spf`], [`dkim`] (with [`dmarc`]), [`smtp`] (call-backs to a
//! sender's mail exchanger), [`store`], [`net`] (IP sets, envelope addresses, the dynamic-PTR
//! heuristic), [`mime`] (header decoding), [`srs`] (SRS and BATV signed senders), and the
//! per-generation [`site`] facts
//! with their [`access`] map. [`calls`] counts the calls a piece of work makes of them.

pub mod access;
pub mod archive;
pub mod calls;
pub mod defang;
pub mod dkim;
pub mod dmarc;
pub mod dns;
pub mod dns_lists;
pub mod dns_zone;
pub mod dsn;
pub mod mime;
pub mod net;
pub mod site;
pub mod smtp;
pub mod spf;
pub mod srs;
pub mod store;

use crate::config::Config;
use dkim::{Dkim, KeyError};
use dns::{Resolver, SetupError};
use smtp::Smtp;
use spf::{Spf, SpfError};
use std::sync::Arc;
use store::{Store, StoreError};

/// A service could not be started; the message names its config section.
#[derive(Debug, thiserror::Error)]
pub enum ServicesError {
    /// The resolver (`[dns]`).
    #[error("[dns]: {0}")]
    Dns(#[from] SetupError),
    /// SPF (`[spf]`).
    #[error("[spf]: {0}")]
    Spf(#[from] SpfError),
    /// The store (`[store]`).
    #[error("[store]: {0}")]
    Store(#[from] StoreError),
    /// SMTP call-backs (`[smtp]`).
    #[error("[smtp]: {0}")]
    Smtp(String),
    /// DKIM signing keys (`[dkim]`); the message names file and line.
    #[error("{0}")]
    Dkim(#[from] KeyError),
    /// The archive Maildir cannot be created.
    #[error("[archive]: {0}")]
    Archive(std::io::Error),
    /// The Maildir of kept copies (`[site] save_dir`) cannot be created.
    #[error("[site] save_dir: {0}")]
    SaveDir(std::io::Error),
    /// The SRS secrets (`[srs]`) cannot be read or are invalid.
    #[error("[srs]: {0}")]
    Srs(String),
}

/// The `[store]` section with a relative database path resolved against the config file's
/// directory.
pub fn store_config(config: &Config) -> store::StoreConfig {
    let mut store_config = config.store.clone();
    if store_config.path.is_relative() {
        store_config.path = config.source.base_dir().join(&store_config.path);
    }
    store_config
}

/// Shared services.
pub struct Services {
    /// The DNS resolver.
    pub resolver: Arc<Resolver>,
    /// SPF evaluation over `resolver`.
    pub spf: Arc<Spf>,
    /// Persistent state.
    pub store: Arc<dyn Store>,
    /// SMTP call-backs over `resolver`, remembering results in `store`.
    pub smtp: Arc<Smtp>,
    /// DKIM and ARC over `resolver`, with the signing keys of `[dkim]`.
    pub dkim: Arc<Dkim>,
    /// The mail archive (`[archive]`), off when no maildir is configured.
    pub archive: Arc<archive::Archive>,
    /// The Maildir of kept copies (`[site] save_dir`), off when none is configured.
    pub saved: Arc<archive::Archive>,
    /// The site's SRS signer (`[srs]`), when secrets are configured.
    pub srs: Option<Arc<srs::SiteSrs>>,
}

impl Services {
    /// Builds the services from `config` (call inside a tokio runtime). The store's SQLite
    /// file is created if missing; a Redis store connects on first use.
    pub fn start(config: &Config) -> Result<Services, ServicesError> {
        Services::start_with_clock(config, store::system_clock())
    }

    /// [`Services::start`] with the store's time taken from `clock` (tests move it by hand).
    pub fn start_with_clock(
        config: &Config,
        clock: store::Clock,
    ) -> Result<Services, ServicesError> {
        let resolver = Arc::new(Resolver::new(&config.dns)?);
        Services::start_with(config, clock, resolver)
    }

    /// [`Services::start_with_clock`] over a resolver of the caller's (`luamilter test`
    /// answers from zone files).
    pub fn start_with(
        config: &Config,
        clock: store::Clock,
        resolver: Arc<Resolver>,
    ) -> Result<Services, ServicesError> {
        let spf = Arc::new(Spf::new(Arc::clone(&resolver), &config.spf)?);
        let store = store::open(&store_config(config), clock)?;
        let helo = (config.site.hostname.clone())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(site::system_hostname);
        let srs = srs::SiteSrs::start(&config.srs, &config.source.base_dir(), &helo)
            .map_err(ServicesError::Srs)?
            .map(Arc::new);
        let smtp = Smtp::new(
            Arc::clone(&resolver),
            Arc::clone(&store),
            &config.smtp,
            helo,
        )
        .map(Arc::new)
        .map_err(ServicesError::Smtp)?;
        let dkim = Arc::new(Dkim::new(
            Arc::clone(&resolver),
            &config.dkim,
            &config.source,
        )?);
        let archive = archive::Archive::start(&config.archive, &config.source.base_dir())
            .map(Arc::new)
            .map_err(ServicesError::Archive)?;
        let saved_config = archive::ArchiveConfig {
            maildir: config.site.save_dir.clone(),
            ..archive::ArchiveConfig::default()
        };
        let saved = archive::Archive::start(&saved_config, &config.source.base_dir())
            .map(Arc::new)
            .map_err(ServicesError::SaveDir)?;
        Ok(Services {
            resolver,
            spf,
            store,
            smtp,
            dkim,
            archive,
            saved,
            srs,
        })
    }
}
