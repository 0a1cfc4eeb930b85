//! The command line: `run`, `check`, `ctl`, `db`, `why`, `bench`.

use crate::{
    config::Config, daemon::Daemon, engine::Generation, logging, services::Services, stage::Stage,
};
use clap::{Parser, Subcommand};
use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

/// The runtimes the commands use.
enum Runtime {
    /// The daemon's own small runtime (signals, reloads, control, services).
    Main,
    /// A multi-threaded runtime (the load generator).
    Threads,
    /// One thread (one-shot commands).
    Single,
}

/// Builds a tokio runtime, or says why not and gives the exit status.
fn runtime(kind: Runtime) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut builder = match kind {
        Runtime::Main => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(1).thread_name("luamilter-main");
            b
        }
        Runtime::Threads => tokio::runtime::Builder::new_multi_thread(),
        Runtime::Single => tokio::runtime::Builder::new_current_thread(),
    };
    builder.enable_all().build().map_err(|e| {
        eprintln!("luamilter: cannot start the runtime: {e}");
        ExitCode::FAILURE
    })
}

/// Exit status for configuration errors (sysexits EX_CONFIG).
pub const EX_CONFIG: u8 = 78;

/// luamilter: a milter for Postfix and Sendmail whose policies are Lua scripts.
#[derive(Parser, Debug)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the milter daemon.
    Run {
        /// Configuration file (default: built-in, loopback socket, policies in ./examples).
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Check the configuration and every policy, print each policy's state, exit 78 on errors.
    Check {
        /// Configuration file (default: built-in).
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Inspect and edit the store: bans, greylist, white- and blacklists, BIND zone export.
    Db {
        /// Configuration file, for the `[store]` section (default: built-in).
        #[arg(short, long)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: crate::db_cli::DbCommand,
    },
    /// Why a message got its answer: the decisions stored for it (`[trace] keep`), by queue id
    /// or Message-ID, or every message of a client IP around a time.
    Why {
        /// Configuration file, for the `[store]` section (default: built-in).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// A queue id or a Message-ID.
        #[arg(required_unless_present = "client")]
        id: Option<String>,
        /// The messages of this client IP instead.
        #[arg(long, conflicts_with = "id")]
        client: Option<String>,
        /// With --client: around this time, in unix seconds (default: now).
        #[arg(long, requires = "client")]
        at: Option<i64>,
        /// With --client: how far from --at ("1h", "30m").
        #[arg(long, requires = "client", default_value = "1h")]
        window: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Load-test a milter the way Postfix talks to it (see BENCHMARKS.md).
    Bench(luamilter_loadgen::BenchArgs),
    /// Run a message through the configured policies in-process (no MTA, no socket), or case
    /// files (--cases); exit 0 accept, 3 reject, 4 tempfail, 5 discard (see docs/testing.md).
    Test(crate::offline::TestArgs),
    /// Replay a corpus (directory of .eml, Maildir, mbox) through a new and an old
    /// configuration and print what changed; exit 0 no change, 1 changes (see docs/replay.md).
    Replay(crate::offline::replay::ReplayArgs),
    /// Talk to a running daemon through its control socket.
    Ctl {
        /// Configuration file, to find the control socket (default: built-in).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// The control socket (overrides the configuration).
        #[arg(short, long)]
        socket: Option<PathBuf>,
        #[command(subcommand)]
        command: CtlCommand,
    },
    /// Write the editor stubs (lua-language-server annotations of the Lua API) into DIR.
    ///
    /// Also writes DIR/.luarc.json, which points lua-language-server at them; files written
    /// earlier are replaced. See docs/editor.md.
    Stubs {
        /// Directory to write into (created if missing).
        dir: PathBuf,
    },
    /// Write the manual pages or the shell completions into a directory (for packagers).
    Generate {
        #[command(subcommand)]
        what: crate::manuals::GenerateCommand,
    },
}

#[derive(Subcommand, Debug, Clone, Copy)]
enum CtlCommand {
    /// Reload the configuration and policies now; prints the result or every error.
    Reload,
    /// Print the current generation and reload counters.
    Stats,
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(config),
        Command::Check { config } => check(config),
        Command::Bench(args) => bench(args),
        Command::Test(args) => crate::offline::command::run(args),
        Command::Replay(args) => crate::offline::replay::run(args),
        Command::Db { config, command } => db(config, command),
        Command::Why {
            config,
            id,
            client,
            at,
            window,
            json,
        } => why(
            config,
            WhyQuery {
                id,
                client,
                at,
                window,
            },
            json,
        ),
        Command::Ctl {
            config,
            socket,
            command,
        } => ctl(config, socket, command),
        Command::Stubs { dir } => stubs(&dir),
        Command::Generate { what } => crate::manuals::generate(what),
    }
}

fn load_config(path: Option<&PathBuf>) -> Result<Config, String> {
    match path {
        Some(p) => Config::load(p).map_err(|e| e.to_string()),
        None => Ok(Config::default()),
    }
}

fn run(path: Option<PathBuf>) -> ExitCode {
    let config = match load_config(path.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("luamilter: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    logging::init(&config.log);
    // The milter itself runs on the daemon's worker threads; this runtime carries signals,
    // reloads, the control socket and the services' background tasks.
    let runtime = match runtime(Runtime::Main) {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        // Signals are handled before the daemon reports READY=1: a reload right after it
        // (SIGHUP's default action ends the process) must reload, not kill.
        let signals = Signals::install();
        let daemon = match Daemon::start(config).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("luamilter: {e}");
                return ExitCode::from(EX_CONFIG);
            }
        };
        wait_for_termination(&daemon, signals).await;
        tracing::info!("shutting down");
        daemon.stop(Duration::from_secs(30)).await;
        ExitCode::SUCCESS
    })
}

/// SIGTERM, SIGINT and SIGHUP, caught from the moment this is made (None if not possible).
struct Signals(Option<[tokio::signal::unix::Signal; 3]>);

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(term), Ok(int), Ok(hup)) => Signals(Some([term, int, hup])),
            _ => Signals(None),
        }
    }
}

/// Serves SIGHUP as a reload until SIGTERM or SIGINT arrives.
async fn wait_for_termination(daemon: &Daemon, signals: Signals) {
    let Signals(Some([mut term, mut int, mut hup])) = signals else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                daemon.reloader.reload("SIGHUP").await;
            }
        }
    }
}

fn ctl(config: Option<PathBuf>, socket: Option<PathBuf>, command: CtlCommand) -> ExitCode {
    let socket = match socket {
        Some(s) => s,
        None => match load_config(config.as_ref()) {
            Ok(c) => c.milter.control_socket_path(),
            Err(e) => {
                eprintln!("luamilter: {e}");
                return ExitCode::from(EX_CONFIG);
            }
        },
    };
    let word = match command {
        CtlCommand::Reload => "reload",
        CtlCommand::Stats => "stats",
    };
    let runtime = match runtime(Runtime::Single) {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(crate::control::request(&socket, word)) {
        Ok(answer) => {
            print!("{answer}");
            if answer.starts_with("error") {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("luamilter: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `work` on the configured store (one-shot commands: `db`, `why`); its result is the
/// exit status, an error is printed after `name`.
fn with_store<F, Fut>(path: Option<PathBuf>, name: &str, work: F) -> ExitCode
where
    F: FnOnce(Arc<dyn crate::services::store::Store>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<ExitCode>>,
{
    let config = match load_config(path.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("luamilter: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let runtime = match runtime(Runtime::Single) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let result = runtime.block_on(async {
        let services = Services::start(&config).map_err(anyhow::Error::msg)?;
        work(services.store).await
    });
    result.unwrap_or_else(|e| {
        eprintln!("luamilter {name}: {e:#}");
        ExitCode::FAILURE
    })
}

fn db(path: Option<PathBuf>, command: crate::db_cli::DbCommand) -> ExitCode {
    with_store(path, "db", |store| async move {
        let mut out = std::io::stdout();
        crate::db_cli::run_db(store, command, &mut out).await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// What `luamilter why` looks for.
struct WhyQuery {
    id: Option<String>,
    client: Option<String>,
    at: Option<i64>,
    window: String,
}

/// Prints the stored histories that match; exit 1 when there is none.
fn why(path: Option<PathBuf>, query: WhyQuery, json: bool) -> ExitCode {
    use crate::session::history::MessageRecord;
    with_store(path, "why", |store| async move {
        let records = match (&query.id, &query.client) {
            (Some(id), _) => MessageRecord::find(&*store, id)
                .await?
                .into_iter()
                .collect(),
            (None, Some(ip)) => {
                let window = crate::duration::parse_duration(&query.window)
                    .map_err(anyhow::Error::msg)?
                    .as_secs() as i64;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                MessageRecord::by_client(&*store, ip, query.at.unwrap_or(now), window).await?
            }
            (None, None) => Vec::new(),
        };
        if records.is_empty() {
            eprintln!("luamilter why: no stored history matches (kept for [trace] keep)");
            return Ok(ExitCode::from(1));
        }
        for record in &records {
            if json {
                println!("{}", serde_json::to_string(record)?);
            } else {
                println!("{record}");
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn stubs(dir: &std::path::Path) -> ExitCode {
    match crate::lua_api::stubs::write(dir) {
        Ok(written) => {
            for path in &written {
                println!("wrote {}", path.display());
            }
            if let Some(luarc) = written.last() {
                println!(
                    "copy {} into your policy directory (see docs/editor.md)",
                    luarc.display()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("luamilter stubs: {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

fn bench(args: luamilter_loadgen::BenchArgs) -> ExitCode {
    let runtime = match runtime(Runtime::Threads) {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(luamilter_loadgen::run_and_print(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("luamilter bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: Option<PathBuf>) -> ExitCode {
    let config = match load_config(path.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            println!("error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let config = Arc::new(config);
    println!("config: {}", config.source.name());
    println!("listen: {}", config.milter.listen);
    let runtime = match runtime(Runtime::Single) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let _in_runtime = runtime.enter();
    let services = match Services::start(&config) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            println!("error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    match Generation::build(Arc::clone(&config), services, 1) {
        Ok(generation) => {
            for decl in &generation.policies {
                let stages: Vec<&str> = Stage::ALL
                    .iter()
                    .filter(|s| decl.handles[**s])
                    .map(|s| s.name())
                    .collect();
                println!("policy {}: ok", decl.name);
                let origin = match decl.origin {
                    crate::engine::policy::Origin::Site => "",
                    crate::engine::policy::Origin::ShadowsStock => {
                        " (site file, shadows the stock policy)"
                    }
                    crate::engine::policy::Origin::Stock => " (stock pack, built in)",
                };
                println!("  source:  {}{origin}", decl.path.display());
                println!("  stages:  {}", stages.join(", "));
                if decl.shadow {
                    println!("  mode:    shadow (verdicts logged and counted, not enforced)");
                }
                for (key, value) in &decl.options {
                    println!("  option:  {key} = {value}");
                }
            }
            println!("ok: {} policies in the chain", generation.policies.len());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors {
                println!("error: {e}");
            }
            println!("{} error(s)", errors.len());
            ExitCode::from(EX_CONFIG)
        }
    }
}
