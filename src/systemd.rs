//! systemd integration: `Type=notify` state changes, the watchdog, and socket activation.
//!
//! Everything here is a no-op unless systemd asked for it: without `NOTIFY_SOCKET` nothing is
//! sent, without `WATCHDOG_USEC` (for this pid) nothing feeds the watchdog, and a passed socket
//! is only used when `[milter] socket_activation = true`. The protocol itself is the
//! `sd-notify` crate's.
//!
//! The watchdog is fed from the serving loops, not from a timer thread of its own: every worker
//! runtime runs a small task that stamps the worker's heartbeat, and the main runtime sends
//! `WATCHDOG=1` only while every heartbeat is fresh. A worker whose thread is stuck (a handler
//! that never yields, a deadlock) cannot run its task, its heartbeat goes stale, the pings
//! stop and systemd restarts the service after `WatchdogSec`.

use crate::listen::BoundSocket;
use sd_notify::NotifyState;
use std::{
    io,
    os::fd::{FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// The first generation is loaded and the socket is bound: `READY=1` and the status line.
pub fn ready(generation: u64) {
    let status = format!("serving generation {generation}");
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// A reload starts: `RELOADING=1` with the `MONOTONIC_USEC` systemd 253 and later want.
pub fn reloading() {
    let mut states = vec![
        NotifyState::Reloading,
        NotifyState::Status("reloading policies"),
    ];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    send(&states);
}

/// A reload ended (installed or failed): `READY=1` again and the status line.
pub fn reloaded(generation: u64, applied: bool) {
    let status = if applied {
        format!("serving generation {generation}")
    } else {
        format!("serving generation {generation} (last reload failed)")
    };
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// Shutdown begins: `STOPPING=1`.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// The watchdog interval systemd asked this process for (`WATCHDOG_USEC`, `WATCHDOG_PID`).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// One heartbeat per worker thread: milliseconds since `start`, stamped by the worker's own
/// runtime.
pub struct Heartbeats {
    start: Instant,
    beats: Vec<AtomicU64>,
}

impl Heartbeats {
    /// Heartbeats for `workers` threads, all fresh now.
    pub fn new(workers: usize) -> Arc<Heartbeats> {
        Arc::new(Heartbeats {
            start: Instant::now(),
            beats: (0..workers).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// The worker threads whose heartbeat is older than `max_age`.
    fn stale(&self, max_age: Duration) -> Vec<usize> {
        let now = self.now();
        let max = max_age.as_millis() as u64;
        self.beats
            .iter()
            .enumerate()
            .filter(|(_, b)| now.saturating_sub(b.load(Ordering::Relaxed)) > max)
            .map(|(i, _)| i)
            .collect()
    }

    /// Stamps worker `index`'s heartbeat every `interval / 4`, forever. Spawn it on the
    /// worker's own runtime: it runs only while that runtime gets to poll its tasks.
    pub async fn beat(self: Arc<Self>, index: usize, interval: Duration) {
        let mut tick = tokio::time::interval(interval / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.beats[index].store(self.now(), Ordering::Relaxed);
        }
    }

    /// Sends `WATCHDOG=1` every `interval / 2` while every worker's heartbeat is fresher than
    /// that; a stale worker stops the pings (and is logged once). Runs until aborted.
    pub async fn feed(self: Arc<Self>, interval: Duration) {
        let period = interval / 2;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut wedged = false;
        loop {
            tick.tick().await;
            let stale = self.stale(period);
            if stale.is_empty() {
                if wedged {
                    tracing::info!("every worker thread is serving again; feeding the watchdog");
                    wedged = false;
                }
                send(&[NotifyState::Watchdog]);
            } else if !wedged {
                tracing::error!(
                    workers = ?stale,
                    "worker threads are not serving; the systemd watchdog is no longer fed"
                );
                wedged = true;
            }
        }
    }
}

/// The milter socket systemd passed (`LISTEN_FDS`, `LISTEN_PID`): the first one, a TCP or unix
/// stream listener.
pub fn passed_socket() -> io::Result<BoundSocket> {
    let mut fds = sd_notify::listen_fds()?;
    let count = fds.len();
    let fd = fds.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "socket_activation is on but systemd passed no socket (LISTEN_FDS/LISTEN_PID unset)",
        )
    })?;
    if count > 1 {
        tracing::warn!(
            count,
            "systemd passed several sockets; serving the first only"
        );
    }
    // SAFETY: systemd hands descriptors from 3 on to this process (LISTEN_PID is ours), and
    // nothing else in the process owns them; only the first is taken, once.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    BoundSocket::from_listener(fd)
}
