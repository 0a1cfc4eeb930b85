//! Hot reload: a new generation is built beside the running one from the config file and the
//! policy files, validated completely, and only then made current. A failed build changes
//! nothing: the old generation keeps serving and the errors are reported.
//!
//! Triggers: file changes seen by [`watch`] (policy directories, recursively, the parent of a
//! symlinked one for symlink swaps, and the config file itself), SIGHUP, and
//! `luamilter ctl reload`.

use crate::{
    config::Config,
    engine::{Engine, Generation},
    services::Services,
};
use notify::{
    EventKind, RecursiveMode,
    event::{AccessKind, AccessMode},
};
use notify_debouncer_full::{DebounceEventResult, DebouncedEvent, new_debouncer};
use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};
use tokio::{sync::mpsc, task::JoinHandle};

/// Quiet time after the last file event before a reload starts.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// How long a reload that failed after a file change waits for the files to settle (an editor
/// writing in place) before its one retry.
const SETTLE: Duration = Duration::from_secs(1);

/// What one reload did.
#[derive(Debug, Clone)]
pub struct ReloadReport {
    /// The generation serving new connections afterwards.
    pub generation: u64,
    /// Whether a new generation was installed.
    pub applied: bool,
    /// Why the reload failed (empty when it succeeded).
    pub errors: Vec<String>,
    /// Changed settings that only take effect after a restart.
    pub restart_needed: Vec<String>,
}

impl fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.applied {
            writeln!(
                f,
                "ok: generation {} is serving new connections",
                self.generation
            )?;
        } else {
            writeln!(
                f,
                "error: reload failed, keeping generation {}",
                self.generation
            )?;
        }
        for e in &self.errors {
            writeln!(f, "  {e}")?;
        }
        if !self.restart_needed.is_empty() {
            writeln!(
                f,
                "restart needed for: {} (everything else applied)",
                self.restart_needed.join(", ")
            )?;
        }
        Ok(())
    }
}

/// Counters about reloads, for `luamilter ctl stats`.
#[derive(Debug, Default)]
pub struct ReloadStats {
    /// Reloads that installed a generation.
    pub succeeded: AtomicU64,
    /// Reloads that failed and kept the old generation.
    pub failed: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl ReloadStats {
    /// The errors of the last failed reload, if the last reload failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Builds and installs generations, one reload at a time.
pub struct Reloader {
    engine: Arc<Engine>,
    services: Arc<Services>,
    /// The configuration the process started with (settings that need a restart keep it).
    boot: Arc<Config>,
    default_vms: usize,
    serial: tokio::sync::Mutex<()>,
    /// Reload counters.
    pub stats: ReloadStats,
}

impl Reloader {
    /// A reloader for `engine`, which started from `boot` with `services`.
    pub fn new(
        engine: Arc<Engine>,
        services: Arc<Services>,
        boot: Arc<Config>,
        default_vms: usize,
    ) -> Reloader {
        Reloader {
            engine,
            services,
            boot,
            default_vms,
            serial: tokio::sync::Mutex::new(()),
            stats: ReloadStats::default(),
        }
    }

    /// The engine whose generations this reloader replaces.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Re-reads the config file (if the daemon has one) and every policy, builds a generation
    /// off the async threads and installs it if everything loaded. `trigger` is logged.
    pub async fn reload(&self, trigger: &str) -> ReloadReport {
        let _one_at_a_time = self.serial.lock().await;
        crate::systemd::reloading();
        let built = self.build().await;
        self.conclude(trigger, built)
    }

    /// [`Reloader::reload`] after a file change: a build that fails is tried once more after
    /// `settle`, since an editor may still be writing the file in place; `before_retry` runs
    /// just before that second build (the watcher drops the events the rest of the write
    /// caused). Only the last build is reported, so a slow save is one successful reload.
    pub async fn reload_settled(
        &self,
        trigger: &str,
        settle: Duration,
        before_retry: impl FnOnce(),
    ) -> ReloadReport {
        let _one_at_a_time = self.serial.lock().await;
        crate::systemd::reloading();
        let mut built = self.build().await;
        if let Err(errors) = &built {
            tracing::debug!(errors = %errors.join("; "), "reload failed, trying again once the files are quiet");
            tokio::time::sleep(settle).await;
            before_retry();
            built = self.build().await;
        }
        self.conclude(trigger, built)
    }

    /// Builds a generation from the files on the blocking pool.
    async fn build(&self) -> Result<(Generation, Vec<String>), Vec<String>> {
        let boot = Arc::clone(&self.boot);
        let services = Arc::clone(&self.services);
        let vms = self.default_vms;
        tokio::task::spawn_blocking(move || build(&boot, &services, vms))
            .await
            .unwrap_or_else(|e| Err(vec![format!("reload task failed: {e}")]))
    }

    /// Installs what was built, or keeps the running generation; counts, notifies and logs.
    fn conclude(
        &self,
        trigger: &str,
        built: Result<(Generation, Vec<String>), Vec<String>>,
    ) -> ReloadReport {
        let report = match built {
            Ok((generation, restart_needed)) => {
                let id = generation.id;
                self.engine.install(generation);
                self.stats.succeeded.fetch_add(1, Ordering::Relaxed);
                *self
                    .stats
                    .last_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = None;
                ReloadReport {
                    generation: id,
                    applied: true,
                    errors: Vec::new(),
                    restart_needed,
                }
            }
            Err(errors) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                *self
                    .stats
                    .last_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(errors.join("\n"));
                ReloadReport {
                    generation: self.engine.current().id,
                    applied: false,
                    errors,
                    restart_needed: Vec::new(),
                }
            }
        };
        crate::systemd::reloaded(report.generation, report.applied);
        crate::metrics::reloaded(report.applied, report.generation);
        if report.applied {
            tracing::info!(trigger, generation = report.generation, "reloaded");
            if !report.restart_needed.is_empty() {
                tracing::warn!(settings = %report.restart_needed.join(", "), "changed settings need a restart");
            }
        } else {
            tracing::error!(
                trigger,
                "reload failed, keeping generation {}: {}",
                report.generation,
                report.errors.join("; ")
            );
        }
        report
    }
}

/// Reads the configuration and builds a generation; settings that cannot change live keep
/// their boot values and are listed.
fn build(
    boot: &Arc<Config>,
    services: &Arc<Services>,
    vms: usize,
) -> Result<(Generation, Vec<String>), Vec<String>> {
    let mut config = match &boot.source.path {
        Some(path) => Config::load(path).map_err(|e| vec![e.to_string()])?,
        None => (**boot).clone(),
    };
    let restart_needed = pin_boot_settings(&mut config, boot);
    let generation = Generation::build(Arc::new(config), Arc::clone(services), vms)?;
    Ok((generation, restart_needed))
}

/// Puts the boot values back into settings that cannot change while running; returns the names
/// of those that differed.
fn pin_boot_settings(config: &mut Config, boot: &Config) -> Vec<String> {
    let mut changed = Vec::new();
    macro_rules! pin {
        ($($field:ident).+, $name:literal) => {
            if config.$($field).+ != boot.$($field).+ {
                changed.push($name.to_string());
                config.$($field).+ = boot.$($field).+.clone();
            }
        };
    }
    pin!(milter.listen, "milter.listen");
    pin!(milter.socket_mode, "milter.socket_mode");
    pin!(milter.max_connections, "milter.max_connections");
    pin!(milter.connection_timeout, "milter.connection_timeout");
    pin!(milter.control_socket, "milter.control_socket");
    pin!(milter.socket_activation, "milter.socket_activation");
    pin!(milter.pid_file, "milter.pid_file");
    pin!(milter.user, "milter.user");
    pin!(milter.group, "milter.group");
    pin!(metrics, "metrics");
    pin!(engine.worker_threads, "engine.worker_threads");
    pin!(policies.watch, "policies.watch");
    pin!(dns, "dns");
    pin!(spf, "spf");
    pin!(store, "store");
    pin!(archive, "archive");
    pin!(site.save_dir, "site.save_dir");
    pin!(srs, "srs");
    pin!(log.level, "log.level");
    pin!(log.format, "log.format");
    changed
}

/// What the watcher watches and which events concern it.
#[derive(Default)]
struct WatchSet {
    config: Option<PathBuf>,
    dirs: Vec<PathBuf>,
    watches: Vec<(PathBuf, RecursiveMode)>,
}

impl WatchSet {
    fn of(config: &Config) -> WatchSet {
        let dirs = config.policy_dirs();
        let mut watches: Vec<(PathBuf, RecursiveMode)> = Vec::new();
        let mut add = |path: PathBuf, mode: RecursiveMode| {
            if !watches.iter().any(|(p, m)| *p == path && *m == mode) {
                watches.push((path, mode));
            }
        };
        for dir in &dirs {
            add(dir.clone(), RecursiveMode::Recursive);
            // A directory that is a symlink is swapped by replacing the link in its parent.
            if dir.is_symlink()
                && let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty())
            {
                add(parent.to_path_buf(), RecursiveMode::NonRecursive);
            }
        }
        // The config file itself, not its directory: other files there (logs, the store) may
        // change all the time. A rename-over replaces the watched inode, which is seen (the old
        // one goes away), and every reload watches the current file again.
        if let Some(path) = &config.source.path {
            add(path.clone(), RecursiveMode::NonRecursive);
        }
        WatchSet {
            config: config.source.path.clone(),
            dirs,
            watches,
        }
    }

    /// Whether an event concerns the configuration: a `.lua` file, the config file, a policy
    /// directory itself (a symlink swap), or a `..data` link (Kubernetes ConfigMap updates).
    /// Reads and opens never count: our own reads must not trigger reloads.
    fn relevant(&self, event: &DebouncedEvent) -> bool {
        match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
            EventKind::Access(_) => return false,
            _ => {}
        }
        event.paths.iter().any(|p| {
            p.extension().is_some_and(|e| e == "lua")
                || self.config.as_ref().is_some_and(|c| same_file_name(p, c))
                || self.dirs.iter().any(|d| same_file_name(p, d))
                || p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("..data"))
        })
    }

    /// Adds (again) every watch of this set and drops those of `old` it no longer has.
    fn apply(&self, watcher: &mut Watcher, old: &WatchSet) {
        for (path, _) in &old.watches {
            if !self.watches.iter().any(|(p, _)| p == path) {
                let _ = watcher.unwatch(path);
            }
        }
        for (path, mode) in &self.watches {
            if let Err(e) = watcher.watch(path, *mode) {
                tracing::warn!(path = %path.display(), error = %e, "cannot watch");
            }
        }
    }
}

/// Compares paths that may differ only in a leading `./`.
fn same_file_name(event_path: &Path, configured: &Path) -> bool {
    event_path == configured
        || (event_path.file_name() == configured.file_name()
            && std::fs::canonicalize(event_path.parent().unwrap_or(Path::new(".")))
                .ok()
                .zip(std::fs::canonicalize(configured.parent().unwrap_or(Path::new("."))).ok())
                .is_some_and(|(a, b)| a == b))
}

type Watcher = notify_debouncer_full::Debouncer<
    notify::RecommendedWatcher,
    notify_debouncer_full::RecommendedCache,
>;

/// Watches the policy directories and the config file; reloads after each burst of changes.
/// The returned task stops when aborted.
pub fn watch(reloader: Arc<Reloader>) -> JoinHandle<()> {
    // The first watches are in place before this returns: a save right after start counts.
    let (tx, mut rx) = mpsc::unbounded_channel::<DebounceEventResult>();
    let mut set = WatchSet::of(&reloader.engine().current().config);
    let mut watcher = match new_debouncer(DEBOUNCE, None, move |result| {
        let _ = tx.send(result);
    }) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::error!(error = %e, "cannot watch policy files; reload with SIGHUP or `luamilter ctl reload`");
            None
        }
    };
    if let Some(w) = &mut watcher {
        set.apply(w, &WatchSet::default());
    }
    tokio::spawn(async move {
        while let Some(batch) = rx.recv().await {
            let events = match batch {
                Ok(events) => events,
                Err(errors) => {
                    for e in errors {
                        tracing::warn!(error = %e, "file watch error");
                    }
                    continue;
                }
            };
            if !events.iter().any(|e| set.relevant(e)) {
                continue;
            }
            while rx.try_recv().is_ok() {}
            reloader
                .reload_settled("file change", SETTLE, || while rx.try_recv().is_ok() {})
                .await;
            // Watch again: the config file may be a new inode after a rename-over, a
            // symlinked directory may point elsewhere, the config may name other directories.
            let next = WatchSet::of(&reloader.engine().current().config);
            if let Some(w) = &mut watcher {
                next.apply(w, &set);
            }
            set = next;
        }
    })
}
