//! `luamilter test`: messages through the configured policies without an MTA or a socket.
//!
//! The milter runs in-process ([`milter`]): the daemon's own indymilter callbacks
//! ([`crate::server::callbacks`]) over in-memory pipes, so negotiation, NOREPLY stages, owed
//! and delayed verdicts and edits go through the same code as live mail. The MTA side
//! ([`mta`]) plays a connection the way Postfix does, over the load generator's milter client,
//! and [`capture`] catches what the milter logs meanwhile (which policy decided what, policy
//! log lines, faults) and files it under its stage.
//!
//! - [`message`]: a message file (`.eml`, mbox) as the MTA would pass it, and the envelope its
//!   headers suggest;
//! - [`command`]: `luamilter test MESSAGE` (report in [`report`]) and `luamilter test --cases`;
//! - [`replay`]: `luamilter replay`, a corpus through two configurations and what changed;
//! - [`cases`]: case files, the format the stock pack's tests use (tests/cases), run by
//!   `luamilter test --cases` and by the test suite.
//!
//! DNS answers come from zone files ([`crate::services::dns_zone`]) or the configured resolver;
//! the store is a throwaway one unless `--store real` says otherwise (see [`StoreMode`]).

pub mod capture;
pub mod cases;
pub mod command;
pub mod message;
pub mod milter;
pub mod mta;
pub mod replay;
pub mod report;

pub use command::TestArgs;

use crate::{
    config::Config,
    services::{
        dns::Resolver,
        dns_zone::Zones,
        store::{Backend, StoreConfig},
    },
};
use std::{path::Path, sync::Arc, time::Duration};

/// Which store a test run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreMode {
    /// A throwaway copy of the configured SQLite file (an empty store when there is none, or
    /// when the store is Redis): what the policies find there counts, what they write is lost.
    Copy,
    /// A throwaway empty store.
    Empty,
    /// The configured store itself, read and written as live mail would.
    Real,
}

/// Makes `config` fit for an in-process run: one Lua state, no message histories kept, and the
/// store `mode` asks for (throwaway ones in `scratch`). Says which store is used.
pub fn prepare_config(
    config: &mut Config,
    mode: StoreMode,
    scratch: &Path,
) -> Result<String, String> {
    config.engine.vms = 1;
    config.policies.watch = false;
    // A test message is no message to find with `luamilter why`.
    config.trace.keep = Duration::ZERO;
    let configured = {
        let mut store = config.store.clone();
        if store.path.is_relative() {
            store.path = config.source.base_dir().join(&store.path);
        }
        store
    };
    let scratch_store = scratch.join("store.db");
    let note = match mode {
        StoreMode::Real => {
            return Ok(match configured.backend {
                Backend::Sqlite => format!("the configured store {}", configured.path.display()),
                Backend::Redis => format!("the configured store {}", configured.url),
            });
        }
        StoreMode::Copy if configured.backend == Backend::Redis => {
            "a throwaway empty store (the configured store is Redis: --store real uses it)".into()
        }
        StoreMode::Copy if configured.path.exists() => {
            copy_sqlite(&configured.path, &scratch_store)?;
            format!("a throwaway copy of {}", configured.path.display())
        }
        StoreMode::Copy => format!(
            "a throwaway empty store ({} does not exist)",
            configured.path.display()
        ),
        StoreMode::Empty => "a throwaway empty store".into(),
    };
    config.store = StoreConfig {
        backend: Backend::Sqlite,
        path: scratch_store,
        ..configured
    };
    Ok(note)
}

/// A consistent copy of a SQLite store, even while the daemon writes it.
fn copy_sqlite(from: &Path, to: &Path) -> Result<(), String> {
    use rusqlite::{Connection, OpenFlags};
    let fail = |e: rusqlite::Error| format!("cannot copy the store {}: {e}", from.display());
    let db = Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(fail)?;
    db.execute("VACUUM INTO ?1", [to.display().to_string()])
        .map_err(fail)?;
    Ok(())
}

/// The resolver for a run: answers from `zones` when any were given, else the configured one.
/// Says which.
pub fn resolver(config: &Config, zones: Option<Zones>) -> Result<(Arc<Resolver>, String), String> {
    match zones {
        Some(zones) => Ok((
            Arc::new(Resolver::from_zones(zones)),
            "zone files only (no network)".into(),
        )),
        None => Resolver::new(&config.dns)
            .map(|r| (Arc::new(r), "the configured resolver".into()))
            .map_err(|e| format!("[dns]: {e}")),
    }
}

/// The name the MTA calls itself (macro `j`): `[site] hostname`, else `[spf] receiver`.
pub fn receiver(config: &Config) -> String {
    config
        .site
        .hostname
        .clone()
        .or_else(|| config.spf.receiver.clone())
        .unwrap_or_else(|| "localhost".into())
}

/// A current-thread runtime: the milter, the MTA side and the event capture share one thread.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}
