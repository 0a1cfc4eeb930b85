//! Counting what happened during a run (per worker, then merged) and the
//! final report: throughput, latency percentiles, verdicts, errors, and the
//! CPU and memory figures; printed as a table or as JSON.

use super::{client::ClientError, conversation::Outcome, usage::ProcSample};
use indymilter::ProtoOpts;
use luamilter_vocab::{Stage, VerdictKind};
use serde::Serialize;
use std::{collections::BTreeMap, fmt, time::Duration};

/// How many distinct error messages a report keeps.
const ERROR_SAMPLES: usize = 5;

/// What one worker saw; merged into the report at the end.
#[derive(Default)]
pub struct Tally {
    latencies_us: Vec<u32>,
    verdicts: BTreeMap<(VerdictKind, Stage), u64>,
    rcpt_rejects: u64,
    edits: u64,
    /// Connections that were opened and negotiated.
    pub connections: u64,
    errors: u64,
    error_samples: Vec<String>,
    /// The protocol options of the first negotiated connection.
    pub negotiated: Option<ProtoOpts>,
}

impl Tally {
    /// Counts one message that ended with `outcome` after `elapsed`.
    pub fn record(&mut self, outcome: Outcome, elapsed: Duration) {
        self.latencies_us
            .push(elapsed.as_micros().min(u32::MAX as u128) as u32);
        *self
            .verdicts
            .entry((outcome.verdict, outcome.stage))
            .or_default() += 1;
        self.rcpt_rejects += u64::from(outcome.rcpt_rejects);
        self.edits += u64::from(outcome.edits);
    }

    /// Counts one failed message or connection.
    pub fn error(&mut self, error: &ClientError) {
        self.errors += 1;
        let text = error.to_string();
        if self.error_samples.len() < ERROR_SAMPLES && !self.error_samples.contains(&text) {
            self.error_samples.push(text);
        }
    }

    /// Adds another worker's counts to these.
    pub fn merge(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        for (key, n) in other.verdicts {
            *self.verdicts.entry(key).or_default() += n;
        }
        self.rcpt_rejects += other.rcpt_rejects;
        self.edits += other.edits;
        self.connections += other.connections;
        self.errors += other.errors;
        for text in other.error_samples {
            if self.error_samples.len() < ERROR_SAMPLES && !self.error_samples.contains(&text) {
                self.error_samples.push(text);
            }
        }
        self.negotiated = self.negotiated.or(other.negotiated);
    }
}

/// Latency of a message in milliseconds: from its first command (for the first
/// message on a connection: from opening the socket) to its final verdict.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latency {
    fn of(mut micros: Vec<u32>) -> Option<Self> {
        if micros.is_empty() {
            return None;
        }
        micros.sort_unstable();
        let n = micros.len();
        // Nearest-rank percentile.
        let pct =
            |p: f64| f64::from(micros[((p * n as f64).ceil() as usize).clamp(1, n) - 1]) / 1000.0;
        let sum: u64 = micros.iter().map(|&m| u64::from(m)).sum();
        Some(Self {
            p50: pct(0.50),
            p90: pct(0.90),
            p99: pct(0.99),
            max: f64::from(micros[n - 1]) / 1000.0,
            mean: sum as f64 / n as f64 / 1000.0,
        })
    }
}

/// The generator's own CPU use, to show it was not the bottleneck.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ClientCpu {
    pub cpu_secs: f64,
    pub cores: usize,
    /// cpu_secs / (wall_secs × cores): 1.0 means the generator used the whole machine.
    pub share: f64,
}

/// The milter process's CPU use during the run and its memory at the end.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ServerUsage {
    pub pid: u32,
    /// CPU seconds the server used during the run.
    pub cpu_secs: f64,
    /// Messages per CPU-second of the server (steadier than wall time on a busy machine).
    pub messages_per_cpu_sec: Option<f64>,
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

impl ServerUsage {
    /// The difference between two samples of the server taken around the run.
    pub fn between(pid: u32, before: ProcSample, after: ProcSample, messages: u64) -> Self {
        let cpu_secs = after.cpu_secs - before.cpu_secs;
        Self {
            pid,
            cpu_secs,
            messages_per_cpu_sec: (messages > 0 && cpu_secs > 0.0)
                .then(|| messages as f64 / cpu_secs),
            rss_kib: after.rss_kib,
            hwm_kib: after.hwm_kib,
        }
    }
}

/// The result of one run of the load generator.
#[derive(Debug, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub setting: Setting,
    /// Protocol options the milter negotiated (skipped and NOREPLY stages).
    pub negotiated: Option<String>,
    pub wall_secs: f64,
    /// Messages that ended with a verdict.
    pub messages: u64,
    pub messages_per_sec: f64,
    pub latency_ms: Option<Latency>,
    /// Messages per final verdict: accept, reject, tempfail, discard.
    pub verdicts: BTreeMap<&'static str, u64>,
    /// Messages per verdict and the stage that gave it, e.g. `reject@mail`.
    pub by_stage: BTreeMap<String, u64>,
    pub rcpt_rejects: u64,
    /// Modification requests (add header, ...) received at end of message.
    pub edits: u64,
    pub connections: u64,
    /// Connections held open at the end of a hold run.
    pub held: Option<u64>,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub client_cpu: ClientCpu,
    pub server: Option<ServerUsage>,
}

/// The run settings a report repeats.
#[derive(Debug, Serialize)]
pub struct Setting {
    pub socket: String,
    /// "messages" for a load run, "hold" for an idle-connection run.
    pub mode: &'static str,
    pub concurrency: usize,
    pub per_connection: usize,
    pub body_bytes: usize,
    pub spam_fraction: f64,
}

impl Report {
    /// Builds the report from the merged tally and the measurements around the run.
    pub fn new(setting: Setting, tally: Tally, wall: Duration, client_cpu: ClientCpu) -> Self {
        let messages = tally.latencies_us.len() as u64;
        let wall_secs = wall.as_secs_f64();
        let mut verdicts = BTreeMap::new();
        let mut by_stage = BTreeMap::new();
        for (&(verdict, stage), &n) in &tally.verdicts {
            *verdicts.entry(verdict.name()).or_default() += n;
            by_stage.insert(format!("{}@{}", verdict.name(), stage.name()), n);
        }
        Self {
            setting,
            negotiated: tally.negotiated.map(|o| format!("{o:?}")),
            wall_secs,
            messages,
            messages_per_sec: if wall_secs > 0.0 {
                messages as f64 / wall_secs
            } else {
                0.0
            },
            latency_ms: Latency::of(tally.latencies_us),
            verdicts,
            by_stage,
            rcpt_rejects: tally.rcpt_rejects,
            edits: tally.edits,
            connections: tally.connections,
            held: None,
            errors: tally.errors,
            error_samples: tally.error_samples,
            client_cpu,
            server: None,
        }
    }

    /// Count of messages with this verdict.
    pub fn verdict(&self, verdict: VerdictKind) -> u64 {
        self.verdicts.get(verdict.name()).copied().unwrap_or(0)
    }

    /// The report as pretty-printed JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report always serialises")
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "milter      {}  mode={} c={} per-conn={} body={} B spam={:.3}",
            self.setting.socket,
            self.setting.mode,
            self.setting.concurrency,
            self.setting.per_connection,
            self.setting.body_bytes,
            self.setting.spam_fraction
        )?;
        if let Some(opts) = &self.negotiated {
            writeln!(f, "negotiated  {opts}")?;
        }
        writeln!(
            f,
            "messages    {} in {:.3} s = {:.1} msg/s over {} connections",
            self.messages, self.wall_secs, self.messages_per_sec, self.connections
        )?;
        if let Some(held) = self.held {
            writeln!(f, "held        {held} idle connections")?;
        }
        if let Some(l) = &self.latency_ms {
            writeln!(
                f,
                "latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}  mean {:.3}",
                l.p50, l.p90, l.p99, l.max, l.mean
            )?;
        }
        let stages: Vec<String> = self
            .by_stage
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        writeln!(
            f,
            "verdicts    {}",
            if stages.is_empty() {
                "-".into()
            } else {
                stages.join("  ")
            }
        )?;
        writeln!(
            f,
            "rcpt-rejects {}  eom-edits {}  errors {}",
            self.rcpt_rejects, self.edits, self.errors
        )?;
        for e in &self.error_samples {
            writeln!(f, "  error: {e}")?;
        }
        let c = &self.client_cpu;
        writeln!(
            f,
            "client cpu  {:.3} s = {:.1}% of {} cores",
            c.cpu_secs,
            c.share * 100.0,
            c.cores
        )?;
        if let Some(s) = &self.server {
            let per_cpu = s
                .messages_per_cpu_sec
                .map_or("-".into(), |v| format!("{v:.0}"));
            writeln!(
                f,
                "server      pid {}: cpu {:.3} s, {per_cpu} msg/cpu-s, rss {} KiB, peak {} KiB",
                s.pid, s.cpu_secs, s.rss_kib, s.hwm_kib
            )?;
        }
        Ok(())
    }
}
