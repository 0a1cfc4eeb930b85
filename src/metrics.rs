//! Prometheus metrics (`[metrics] listen`): the `metrics` facade recording into
//! metrics-exporter-prometheus, whose HTTP listener serves `/metrics` and whose handle renders
//! the same registry for `luamilter ctl stats`. docs/metrics.md lists every series.
//!
//! Off unless configured: then every function here returns at once. On the per-stage path the
//! handles are registered once (per process, or per generation for the policy series) and an
//! event is an atomic add; label values are `&'static str` except policy names, which are
//! copied once when their series is first used. Service calls (DNS, SPF, the store), which wait
//! on I/O anyway, look their series up in the registry by name at each call.

use crate::{
    engine::policy::PolicyDecl,
    services::store::{Backend, StoreError},
    stage::{Stage, StageMap},
};
use luamilter_vocab::verdict::VerdictKind;
use metrics::{Counter, Gauge, Histogram, SharedString, counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use std::{
    future::Future,
    net::SocketAddr,
    sync::OnceLock,
    time::{Duration, Instant},
};

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `HOST:PORT` to serve `/metrics` on; unset (the default) turns metrics off.
    pub listen: Option<SocketAddr>,
}

/// Histogram buckets for durations, in seconds: 100 µs to 10 s.
const SECONDS_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];

/// How a message ended, as the `verdict` label of `luamilter_messages_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageEnd {
    /// Accepted at end of message (no policy refused it).
    Accept,
    /// Refused with a 5xx.
    Reject,
    /// Refused with a 4xx.
    Tempfail,
    /// Accepted and dropped.
    Discard,
    /// The MTA aborted it with no verdict enforced.
    Aborted,
}

impl MessageEnd {
    const ALL: [MessageEnd; 5] = [
        MessageEnd::Accept,
        MessageEnd::Reject,
        MessageEnd::Tempfail,
        MessageEnd::Discard,
        MessageEnd::Aborted,
    ];

    /// The message end for a final verdict (`continue` at end of message is an accept).
    pub fn from_kind(kind: VerdictKind) -> MessageEnd {
        match kind {
            VerdictKind::Accept | VerdictKind::Continue => MessageEnd::Accept,
            VerdictKind::Reject => MessageEnd::Reject,
            VerdictKind::Tempfail => MessageEnd::Tempfail,
            VerdictKind::Discard => MessageEnd::Discard,
        }
    }

    /// The message end for a trace step's verdict text ("reject 550 ...", "fault: ..."); a
    /// fault ends as `on_fault` (what the exception policy answered).
    pub fn from_step(verdict: &str, on_fault: MessageEnd) -> MessageEnd {
        match verdict.split_whitespace().next() {
            Some("accept") => MessageEnd::Accept,
            Some("reject") => MessageEnd::Reject,
            Some("tempfail") => MessageEnd::Tempfail,
            Some("discard") => MessageEnd::Discard,
            _ => on_fault,
        }
    }

    fn name(self) -> &'static str {
        match self {
            MessageEnd::Accept => "accept",
            MessageEnd::Reject => "reject",
            MessageEnd::Tempfail => "tempfail",
            MessageEnd::Discard => "discard",
            MessageEnd::Aborted => "aborted",
        }
    }
}

/// Why a policy handler failed, as the `kind` label of `luamilter_policy_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// A Lua error or an invalid return value.
    Error,
    /// The stage ran past `engine.time_limit`.
    TimeLimit,
    /// The Lua state ran out of `engine.memory_limit_mib`.
    MemoryLimit,
}

impl FaultKind {
    fn name(self) -> &'static str {
        match self {
            FaultKind::Error => "error",
            FaultKind::TimeLimit => "time_limit",
            FaultKind::MemoryLimit => "memory_limit",
        }
    }
}

/// The process-wide series, registered when metrics are installed.
struct Global {
    handle: PrometheusHandle,
    backend: &'static str,
    connections_open: Gauge,
    connections_total: Counter,
    messages: [Counter; 5],
    stage_seconds: StageMap<OnceLock<Histogram>>,
    reloads_ok: Counter,
    reloads_failed: Counter,
    generation: Gauge,
}

static GLOBAL: OnceLock<Global> = OnceLock::new();

fn global() -> Option<&'static Global> {
    GLOBAL.get()
}

/// Whether metrics are on in this process.
pub fn enabled() -> bool {
    GLOBAL.get().is_some()
}

/// Installs the recorder and serves `/metrics` on `config.listen` (nothing when it is unset).
/// Call it inside a tokio runtime, before the services and the first generation are built so
/// their series are registered with it.
pub fn install(config: &MetricsConfig, backend: Backend) -> Result<(), String> {
    let Some(listen) = config.listen else {
        return Ok(());
    };
    if enabled() {
        return Err("metrics are already installed in this process".into());
    }
    let (recorder, exporter) = PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets(&SECONDS_BUCKETS)
        .and_then(|b| b.build())
        .map_err(|e| format!("metrics.listen {listen}: {e}"))?;
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| format!("metrics: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = exporter.await {
            tracing::error!(error = ?e, "the metrics endpoint stopped");
        }
    });
    let _ = GLOBAL.set(Global {
        handle,
        backend: backend.name(),
        connections_open: gauge!("luamilter_connections_open"),
        connections_total: counter!("luamilter_connections_total"),
        messages: MessageEnd::ALL
            .map(|end| counter!("luamilter_messages_total", "verdict" => end.name())),
        stage_seconds: StageMap::from_fn(|_| OnceLock::new()),
        reloads_ok: counter!("luamilter_reloads_total", "result" => "ok"),
        reloads_failed: counter!("luamilter_reloads_total", "result" => "failed"),
        generation: gauge!("luamilter_generation"),
    });
    tracing::info!(%listen, "serving Prometheus metrics");
    Ok(())
}

/// The registry in the Prometheus text format, `None` when metrics are off.
pub fn render() -> Option<String> {
    global().map(|g| g.handle.render())
}

/// Counts an open connection for as long as it lives.
pub struct OpenConnection(());

impl OpenConnection {
    /// A connection was accepted.
    pub fn opened() -> OpenConnection {
        if let Some(g) = global() {
            g.connections_open.increment(1.0);
            g.connections_total.increment(1);
        }
        OpenConnection(())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if let Some(g) = global() {
            g.connections_open.decrement(1.0);
        }
    }
}

/// A message ended (end of message, or aborted).
pub fn message_ended(end: MessageEnd) {
    if let Some(g) = global() {
        g.messages[end as usize].increment(1);
    }
}

/// The policy chain took `elapsed` for one `stage`.
pub fn stage_time(stage: Stage, elapsed: Duration) {
    if let Some(g) = global() {
        g.stage_seconds[stage]
            .get_or_init(|| histogram!("luamilter_stage_duration_seconds", "stage" => stage.name()))
            .record(elapsed);
    }
}

/// Generation `generation` serves new connections.
pub fn serving(generation: u64) {
    if let Some(g) = global() {
        g.generation.set(generation as f64);
    }
}

/// A reload finished; `generation` serves new connections afterwards.
pub fn reloaded(ok: bool, generation: u64) {
    if let Some(g) = global() {
        if ok { &g.reloads_ok } else { &g.reloads_failed }.increment(1);
        g.generation.set(generation as f64);
    }
}

/// A DNS query of type `rtype` ended with `result` (`ok` or a [`crate::services::dns::DnsError`]
/// code).
pub fn dns_query(rtype: &'static str, result: &'static str) {
    if enabled() {
        counter!("luamilter_dns_queries_total", "type" => rtype, "result" => result).increment(1);
    }
}

/// An SPF evaluation of the `identity` (`mailfrom` or `helo`) gave `result`.
pub fn spf_result(identity: &'static str, result: &'static str) {
    if enabled() {
        counter!("luamilter_spf_results_total", "identity" => identity, "result" => result)
            .increment(1);
    }
}

/// The archive's series: messages written into the Maildir, and messages lost (queue full or
/// a failed write). Registered when the archive starts, so both are scraped from the start.
pub fn archive_messages() -> (Counter, Counter) {
    let series = |result| counter!("luamilter_archive_messages_total", "result" => result);
    (series("archived"), series("lost"))
}

/// Runs the store operation `op` (`call` gives the store's result, possibly wrapped in an outer
/// `Result`) and records its count, outcome (`ok` or the error code) and duration.
pub async fn store_call<O: StoreOutcome>(op: &'static str, call: impl Future<Output = O>) -> O {
    let Some(g) = global() else {
        return call.await;
    };
    let started = Instant::now();
    let output = call.await;
    let backend = g.backend;
    let result = output.code();
    counter!("luamilter_store_operations_total", "backend" => backend, "op" => op, "result" => result)
        .increment(1);
    histogram!("luamilter_store_duration_seconds", "backend" => backend, "op" => op)
        .record(started.elapsed());
    output
}

/// The result of a store call, as the `result` label: `ok` or the error's code.
pub trait StoreOutcome {
    /// `ok` or the error code.
    fn code(&self) -> &'static str;
}

impl<T> StoreOutcome for Result<T, StoreError> {
    fn code(&self) -> &'static str {
        self.as_ref().map_or_else(StoreError::code, |_| "ok")
    }
}

/// A Lua store function's result: the outer error is a bad argument (the store was not asked).
impl<T> StoreOutcome for mlua::Result<Result<T, StoreError>> {
    fn code(&self) -> &'static str {
        self.as_ref().map_or("bad_argument", StoreOutcome::code)
    }
}

/// The series of one generation: per policy, per Lua state. Registered on first use, so a
/// policy shows only the stages and verdicts it produced.
pub struct ChainMetrics(Option<Box<ChainSeries>>);

struct ChainSeries {
    policies: Vec<PolicySeries>,
    lua_memory: Vec<Gauge>,
}

struct PolicySeries {
    name: SharedString,
    decisions: StageMap<[OnceLock<Counter>; 5]>,
    shadow: StageMap<[OnceLock<Counter>; 5]>,
    faults: [Counter; 3],
}

fn kind_index(kind: VerdictKind) -> usize {
    match kind {
        VerdictKind::Accept => 0,
        VerdictKind::Continue => 1,
        VerdictKind::Reject => 2,
        VerdictKind::Tempfail => 3,
        VerdictKind::Discard => 4,
    }
}

impl ChainMetrics {
    /// The series for `policies` run on Lua states using `memory` bytes each after loading
    /// (nothing when metrics are off).
    pub fn new(policies: &[PolicyDecl], memory: impl Iterator<Item = usize>) -> ChainMetrics {
        if !enabled() {
            return ChainMetrics(None);
        }
        let policies = policies
            .iter()
            .map(|decl| {
                let name = SharedString::from(decl.name.clone());
                let faults = [FaultKind::Error, FaultKind::TimeLimit, FaultKind::MemoryLimit]
                    .map(|kind| {
                        counter!("luamilter_policy_errors_total", "policy" => name.clone(), "kind" => kind.name())
                    });
                PolicySeries {
                    name,
                    decisions: StageMap::from_fn(|_| Default::default()),
                    shadow: StageMap::from_fn(|_| Default::default()),
                    faults,
                }
            })
            .collect();
        let lua_memory = memory
            .enumerate()
            .map(|(vm, bytes)| {
                let gauge = gauge!("luamilter_lua_memory_bytes", "vm" => vm.to_string());
                gauge.set(bytes as f64);
                gauge
            })
            .collect();
        ChainMetrics(Some(Box::new(ChainSeries {
            policies,
            lua_memory,
        })))
    }

    /// Policy `index` answered `kind` at `stage`; `shadow` when it runs in shadow mode (the
    /// verdict was only what it would have done).
    pub fn decision(&self, index: usize, stage: Stage, kind: VerdictKind, shadow: bool) {
        let Some(series) = &self.0 else { return };
        let policy = &series.policies[index];
        let (cells, name) = if shadow {
            (&policy.shadow, "luamilter_shadow_decisions_total")
        } else {
            (&policy.decisions, "luamilter_decisions_total")
        };
        cells[stage][kind_index(kind)]
            .get_or_init(|| {
                counter!(name, "policy" => policy.name.clone(), "stage" => stage.name(), "verdict" => kind.name())
            })
            .increment(1);
    }

    /// Policy `index` failed.
    pub fn fault(&self, index: usize, kind: FaultKind) {
        if let Some(series) = &self.0 {
            series.policies[index].faults[kind as usize].increment(1);
        }
    }

    /// Whether the series are recorded (metrics are on).
    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Lua state `vm` uses `bytes`.
    pub fn lua_memory(&self, vm: usize, bytes: usize) {
        if let Some(series) = &self.0 {
            series.lua_memory[vm].set(bytes as f64);
        }
    }
}
