//! The milter load generator behind `luamilter bench`: it plays Postfix towards
//! any milter (luamilter, the native baseline, or a third-party one) and measures
//! throughput, latency, verdicts and the CPU and memory it costs. It shares the
//! milter vocabulary (stages, socket addresses, verdict kinds) with the daemon
//! through `luamilter-vocab`, and nothing else.
//!
//! Layout:
//! - [`endpoint`]: milter socket specifications and opening a stream (TCP with `TCP_NODELAY`).
//! - [`client`]: framing, negotiation and buffered writes on one milter connection.
//! - [`conversation`]: what Postfix sends per connection and message, and how it
//!   reacts to each reply.
//! - [`report`]: per-worker tallies, the merged report, and its printing.
//! - [`usage`]: CPU time of this process, CPU time and memory of the server.
//!
//! A run either sends `--messages` messages over `--concurrency` connections
//! (`--per-connection` messages each), or (`--hold K`) opens K idle connections
//! and holds them, to measure the server's memory per connection.

pub mod client;
pub mod conversation;
pub mod endpoint;
pub mod report;
pub mod usage;

pub use conversation::SPAM_SENDER;
pub use luamilter_vocab::VerdictKind;
pub use report::Report;

use anyhow::{Context, ensure};
use client::{ClientError, Connection};
use conversation::{Greeting, Plan, Session, Shape};
use luamilter_vocab::ListenAddr;
use report::{ClientCpu, ServerUsage, Setting, Tally};
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::{sync::Semaphore, task::JoinSet};
use usage::ProcSample;

/// Options of `luamilter bench`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// Milter socket: unix:/path, inet:PORT@HOST or inet:HOST:PORT
    #[arg(short, long, value_name = "SOCKET")]
    pub socket: ListenAddr,
    /// Connections open at the same time
    #[arg(short, long, default_value_t = 8)]
    pub concurrency: usize,
    /// Messages to send in total
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub messages: u64,
    /// Messages per connection (SMTP session) before it is closed and a new one opened
    #[arg(short = 'm', long, default_value_t = 1)]
    pub per_connection: usize,
    /// Body size in bytes; a k or m suffix means KiB or MiB
    #[arg(short, long, default_value = "2k", value_parser = parse_size)]
    pub body_size: usize,
    /// Send this message file (headers and body, e.g. a DKIM-signed one) instead of generated
    /// ones; --body-size is then ignored
    #[arg(long, value_name = "FILE")]
    pub message: Option<std::path::PathBuf>,
    /// Fraction of messages sent from spam@bad.example, spread evenly (0 to 1)
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    pub spam_fraction: f64,
    /// Seconds to wait for a connection or a reply before counting an error
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
    /// PID of the milter process: report its CPU time per message and its memory (Linux /proc)
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
    /// Send no mail: open K connections (negotiate, CONNECT, HELO), hold them, measure, close
    #[arg(long, value_name = "K")]
    pub hold: Option<usize>,
    /// Seconds to hold the idle connections before measuring and closing them
    #[arg(long, default_value_t = 1.0)]
    pub hold_secs: f64,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

fn parse_size(s: &str) -> Result<usize, String> {
    let lower = s.trim().to_ascii_lowercase();
    let digits = lower.trim_end_matches("ib").trim_end_matches('b');
    let (digits, unit) = match digits.strip_suffix('k') {
        Some(d) => (d, 1024),
        None => match digits.strip_suffix('m') {
            Some(d) => (d, 1024 * 1024),
            None => (digits, 1),
        },
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| format!("{s:?} is not a size such as 2048, 2k or 1m"))
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{s:?} is not a number from 0 to 1")),
    }
}

/// Whether message `index` comes from the spam sender: exactly
/// floor(n × fraction) of the first n messages do, spread evenly.
fn is_spam(index: u64, fraction: f64) -> bool {
    ((index + 1) as f64 * fraction).floor() > (index as f64 * fraction).floor()
}

/// What every worker of a run shares.
struct Shared {
    endpoint: ListenAddr,
    timeout: Duration,
    shape: Shape,
    total: u64,
    per_connection: usize,
    spam_fraction: f64,
    next_message: AtomicU64,
    next_client: AtomicU64,
}

impl Shared {
    /// Opens, negotiates and greets a new connection.
    async fn open(&self, tally: &mut Tally) -> Result<Greeting, ClientError> {
        let conn = Connection::open(&self.endpoint, self.timeout).await?;
        tally.connections += 1;
        tally.negotiated.get_or_insert(conn.opts);
        let client = self.next_client.fetch_add(1, Ordering::Relaxed);
        Session::greet(conn, client).await
    }
}

/// One connection's worth of concurrency: takes messages until none are left.
async fn worker(shared: Arc<Shared>) -> Tally {
    let mut tally = Tally::default();
    let mut session: Option<Session> = None;
    loop {
        let index = shared.next_message.fetch_add(1, Ordering::Relaxed);
        if index >= shared.total {
            break;
        }
        let plan = Plan {
            index,
            spam: is_spam(index, shared.spam_fraction),
        };
        let start = Instant::now();
        let greeting = match session.take() {
            Some(open) => Ok(Greeting::Open(open)),
            None => shared.open(&mut tally).await,
        };
        match greeting {
            Err(e) => tally.error(&e),
            Ok(Greeting::Closed(outcome)) => tally.record(outcome, start.elapsed()),
            Ok(Greeting::Open(mut open)) => match open.deliver(plan, &shared.shape).await {
                Err(e) => tally.error(&e),
                Ok(outcome) => {
                    tally.record(outcome, start.elapsed());
                    if open.messages < shared.per_connection {
                        session = Some(open);
                    } else if let Err(e) = open.quit().await {
                        tally.error(&e);
                    }
                }
            },
        }
    }
    if let Some(open) = session
        && let Err(e) = open.quit().await
    {
        tally.error(&e);
    }
    tally
}

/// Sends all messages over `concurrency` workers.
async fn send_messages(shared: Arc<Shared>, concurrency: usize) -> anyhow::Result<Tally> {
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        workers.spawn(worker(shared.clone()));
    }
    let mut tally = Tally::default();
    while let Some(done) = workers.join_next().await {
        tally.merge(done.context("load worker failed")?);
    }
    Ok(tally)
}

/// Opens `count` connections (at most `concurrency` at a time), holds them for
/// `hold`, samples the server, then closes them.
async fn hold_connections(
    shared: Arc<Shared>,
    count: usize,
    concurrency: usize,
    hold: Duration,
    server_pid: Option<u32>,
) -> anyhow::Result<(Tally, u64, Option<ProcSample>)> {
    let gate = Arc::new(Semaphore::new(concurrency));
    let mut opening = JoinSet::new();
    for _ in 0..count {
        let permit = gate.clone().acquire_owned().await?;
        let shared = shared.clone();
        opening.spawn(async move {
            let _permit = permit;
            let mut tally = Tally::default();
            let start = Instant::now();
            let session = match shared.open(&mut tally).await {
                Ok(Greeting::Open(session)) => Some(session),
                Ok(Greeting::Closed(outcome)) => {
                    tally.record(outcome, start.elapsed());
                    None
                }
                Err(e) => {
                    tally.error(&e);
                    None
                }
            };
            (tally, session)
        });
    }
    let mut tally = Tally::default();
    let mut held = Vec::with_capacity(count);
    while let Some(done) = opening.join_next().await {
        let (part, session) = done.context("connection task failed")?;
        tally.merge(part);
        held.extend(session);
    }
    tokio::time::sleep(hold).await;
    let sample = server_pid
        .map(ProcSample::read)
        .transpose()
        .context("reading the server's /proc")?;
    let held_count = held.len() as u64;
    for session in held {
        if let Err(e) = session.quit().await {
            tally.error(&e);
        }
    }
    Ok((tally, held_count, sample))
}

/// Runs the load generator and returns its report.
pub async fn run(args: BenchArgs) -> anyhow::Result<Report> {
    ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    ensure!(
        args.per_connection >= 1,
        "--per-connection must be at least 1"
    );
    ensure!(
        args.timeout > 0.0 && args.timeout.is_finite(),
        "--timeout must be positive"
    );
    ensure!(
        args.hold_secs >= 0.0 && args.hold_secs.is_finite(),
        "--hold-secs must not be negative"
    );
    let shape = match &args.message {
        Some(path) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            Shape::from_message(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => Shape::new(args.body_size),
    };
    let body_bytes = shape.body_len();
    let shared = Arc::new(Shared {
        endpoint: args.socket.clone(),
        timeout: Duration::from_secs_f64(args.timeout),
        shape,
        total: args.messages,
        per_connection: args.per_connection,
        spam_fraction: args.spam_fraction,
        next_message: AtomicU64::new(0),
        next_client: AtomicU64::new(0),
    });
    let read_server =
        |pid| ProcSample::read(pid).with_context(|| format!("reading /proc/{pid} of the server"));
    let server_before = args.server_pid.map(read_server).transpose()?;

    let cpu_start = usage::own_cpu();
    let start = Instant::now();
    let (tally, held, server_after) = match args.hold {
        Some(count) => {
            let hold = Duration::from_secs_f64(args.hold_secs);
            let (tally, held, sample) =
                hold_connections(shared, count, args.concurrency, hold, args.server_pid).await?;
            (tally, Some(held), sample)
        }
        None => {
            let tally = send_messages(shared, args.concurrency).await?;
            (tally, None, args.server_pid.map(read_server).transpose()?)
        }
    };
    let wall = start.elapsed();
    let cpu_secs = (usage::own_cpu() - cpu_start).as_secs_f64();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let client_cpu = ClientCpu {
        cpu_secs,
        cores,
        share: cpu_secs / (wall.as_secs_f64() * cores as f64).max(f64::MIN_POSITIVE),
    };

    let setting = Setting {
        socket: args.socket.to_string(),
        mode: if held.is_some() { "hold" } else { "messages" },
        concurrency: args.concurrency,
        per_connection: args.per_connection,
        body_bytes,
        spam_fraction: args.spam_fraction,
    };
    let mut report = Report::new(setting, tally, wall, client_cpu);
    report.held = held;
    if let (Some(pid), Some(before), Some(after)) = (args.server_pid, server_before, server_after) {
        report.server = Some(ServerUsage::between(pid, before, after, report.messages));
    }
    Ok(report)
}

/// Runs the load generator, prints the report (a table, or JSON with `--json`),
/// and fails if any message or connection failed, so a smoke run can gate CI.
pub async fn run_and_print(args: BenchArgs) -> anyhow::Result<()> {
    let json = args.json;
    let report = run(args).await?;
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{report}");
    }
    ensure!(
        report.errors == 0,
        "{} messages or connections failed",
        report.errors
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2048"), Ok(2048));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert_eq!(parse_size("100KiB"), Ok(100 * 1024));
        assert_eq!(parse_size("1M"), Ok(1024 * 1024));
        assert!(parse_size("k").is_err());
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn fractions() {
        assert_eq!(parse_fraction("0.25"), Ok(0.25));
        assert!(parse_fraction("1.5").is_err());
        assert!(parse_fraction("nan").is_err());
    }

    #[test]
    fn spam_is_spread_evenly() {
        let count = |n: u64, f| (0..n).filter(|&i| is_spam(i, f)).count();
        assert_eq!(count(1000, 0.0), 0);
        assert_eq!(count(1000, 1.0), 1000);
        assert_eq!(count(1000, 0.1), 100);
        assert_eq!(count(10, 0.25), 2);
        let first: Vec<u64> = (0..20).filter(|&i| is_spam(i, 0.1)).collect();
        assert_eq!(first, [9, 19]);
    }
}
