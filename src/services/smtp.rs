//! Outbound SMTP call-backs (sender address verification): [`Smtp::verify`] asks the mail
//! exchanger of an address whether it would take mail for it, without sending any.
//!
//! One call-back: the domain's MX hosts (or, with no MX, the domain itself: RFC 5321 §5.1;
//! a null MX, RFC 7505, means "no mail"), each host's A then AAAA addresses, a connection with
//! a connect timeout, the greeting, `EHLO` (`HELO` when EHLO is refused) as the receiver's name,
//! `STARTTLS` when offered (opportunistic: the certificate is not checked, RFC 7435 — a
//! call-back carries no secret), `MAIL FROM:<>`, `RCPT TO:<address>`, `QUIT`; every command
//! under the command timeout and the whole call-back under one deadline. A host that cannot be
//! reached (refused, connect timeout, closed before its greeting) gives way to the next address;
//! once a host has greeted, its answer is the answer. The SMTP dialogue is mail-send's
//! low-level client ([`mail_send::SmtpClient`]); nothing here writes protocol text beyond
//! `HELO`.
//!
//! Bounded everywhere: at most `per_domain` call-backs to one domain at once and `rate` new
//! ones per window (a token bucket: `10/m` allows a burst of 10, then one every 6 s), at most
//! `global` at once in the process, and a cache of results in the store (so every MX host
//! sharing a Redis store shares it): an accepted address is remembered `cache_ok`, a permanent
//! refusal `cache_fail`; temporary answers and errors are not remembered. A caller that waited
//! for a per-domain slot looks at the cache again before calling, so several sessions verifying
//! the same address at once make one call-back.
//!
//! [`Smtp::send_dsn`] submits a DSN (built by [`super::dsn`]) to `[smtp] relay` over the same
//! client and dialogue: `MAIL FROM:<>`, else — when the relay refuses the null sender with a
//! 5xx — `MAIL FROM:<postmaster@reporting MTA>` (the classic milter's retry), `RCPT TO`, `DATA`;
//! at most `send_global` submissions at once, each under one deadline.
//!
//! Failures without an SMTP answer are [`SmtpError`]s with short stable words for Lua
//! ([`SmtpError::code`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mail_send::SmtpClient;
use serde::Deserialize;
use smtp_proto::{EXT_START_TLS, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::calls::{self, Service};
use super::dns::{DnsError, Resolver};
use super::dsn::{Dsn, DsnError};
use super::store::{Scalar, Store, Value};
use crate::duration::{parse_duration, serde_duration};
use crate::stage::Stage;

/// Mail exchanger addresses tried at most per call-back.
const MAX_ADDRESSES: usize = 5;
/// Domains whose limiter state is kept before idle ones are dropped.
const MAX_DOMAINS: usize = 4096;
/// Prefix of the cache keys in the store: `smtp:cbv:<address, lowercased>`.
pub const CACHE_PREFIX: &str = "smtp:cbv:";

/// `[smtp]`: outbound SMTP call-backs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    /// The name given in EHLO; default: `[site] hostname`, else the system host name.
    pub helo: Option<String>,
    /// The port mail exchangers are called on.
    pub port: u16,
    /// Upper bound of one TCP connection attempt.
    #[serde(deserialize_with = "serde_duration::deserialize")]
    pub connect_timeout: Duration,
    /// Upper bound of the wait for each reply (greeting, EHLO, MAIL, RCPT, QUIT).
    #[serde(deserialize_with = "serde_duration::deserialize")]
    pub command_timeout: Duration,
    /// Upper bound of a whole call-back, DNS and queueing for a slot included (Lua's
    /// `timeout` option overrides it per call).
    #[serde(deserialize_with = "serde_duration::deserialize")]
    pub timeout: Duration,
    /// Call-backs to one domain at once; more wait for a slot.
    pub per_domain: usize,
    /// New call-backs to one domain per window (`"10/m"`, `"100/h"`, `"5/30s"`); more get
    /// `limited`.
    pub rate: Rate,
    /// Call-backs at once in the whole process; more wait for a slot.
    pub global: usize,
    /// How long an accepted address is remembered.
    #[serde(deserialize_with = "serde_duration::deserialize")]
    pub cache_ok: Duration,
    /// How long a permanent (5xx) refusal is remembered.
    #[serde(deserialize_with = "serde_duration::deserialize")]
    pub cache_fail: Duration,
    /// Where [`Smtp::send_dsn`] submits DSNs: `host:port` of a relay (the local MTA).
    pub relay: String,
    /// DSN submissions at once in the whole process; more wait for a slot.
    pub send_global: usize,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            helo: None,
            port: 25,
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(15),
            per_domain: 2,
            rate: Rate {
                count: 10,
                per: Duration::from_secs(60),
            },
            global: 20,
            cache_ok: Duration::from_secs(7 * 86400),
            cache_fail: Duration::from_secs(30 * 86400),
            relay: "127.0.0.1:25".into(),
            send_global: 4,
        }
    }
}

/// A rate: `count` per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Events allowed per window (also the burst).
    pub count: u32,
    /// The window.
    pub per: Duration,
}

impl std::str::FromStr for Rate {
    type Err = String;

    /// `"10/m"`, `"10/1m"`, `"5/30s"`, `"100/h"`.
    fn from_str(text: &str) -> Result<Rate, String> {
        let bad = || format!("invalid rate {text:?}: expected e.g. \"10/m\" or \"5/30s\"");
        let (count, per) = text.split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let per = per.trim();
        let per = if per.starts_with(|c: char| c.is_ascii_digit()) {
            parse_duration(per)
        } else {
            parse_duration(&format!("1{per}"))
        }
        .map_err(|_| bad())?;
        if count == 0 || per.is_zero() {
            return Err(format!("{}: count and window must be above 0", bad()));
        }
        Ok(Rate { count, per })
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A refusal: the SMTP reply that ended the call-back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The reply code (550, 451, ...).
    pub code: u16,
    /// The reply text, the enhanced status code first when there is one ("5.1.1 User unknown").
    pub text: String,
    /// Which command it answered.
    pub stage: Stage,
}

impl Reply {
    /// A 5xx reply: asking again will not change it.
    pub fn permanent(&self) -> bool {
        self.code >= 500
    }

    fn from_response(response: Response<String>, stage: Stage) -> Reply {
        let [class, subject, detail] = response.esc;
        let text = if class > 0 {
            format!("{class}.{subject}.{detail} {}", response.message)
        } else {
            response.message
        };
        Reply {
            code: response.code,
            text,
            stage,
        }
    }
}

/// What a call-back found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `RCPT TO` was accepted.
    Accepted,
    /// The exchanger refused, permanently (5xx) or for now (4xx).
    Refused(Reply),
}

/// A [`Smtp::verify`] answer: the outcome and whether it came from the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// What the exchanger said.
    pub outcome: Outcome,
    /// True when no call-back was made: the answer was remembered.
    pub cached: bool,
}

/// Why a call-back produced no SMTP answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SmtpError {
    /// The argument is not `local@domain`.
    #[error("not an address: {0:?}")]
    Invalid(String),
    /// The domain has no MX and no address, or a null MX (RFC 7505).
    #[error("no mail exchanger for {0}")]
    NoMx(String),
    /// A DNS lookup failed temporarily.
    #[error("DNS lookup failed: {0}")]
    Dns(DnsError),
    /// No answer in time (connecting, a command, or the whole call-back).
    #[error("timed out")]
    Timeout,
    /// No exchanger could be connected to.
    #[error("connection refused: {0}")]
    Refused(String),
    /// The exchanger closed the connection (or answered something that is not SMTP).
    #[error("connection closed: {0}")]
    Closed(String),
    /// STARTTLS was offered but the TLS handshake failed.
    #[error("TLS failed: {0}")]
    Tls(String),
    /// A limit said no: the domain's rate, or no slot came free before the deadline.
    #[error("limited: {0}")]
    Limited(&'static str),
    /// The relay refused the DSN ([`Smtp::send_dsn`] only).
    #[error("rejected: {} {}", .0.code, .0.text)]
    Rejected(Reply),
}

impl SmtpError {
    /// The short stable word policies branch on.
    pub fn code(&self) -> &'static str {
        match self {
            SmtpError::Invalid(_) => "invalid",
            SmtpError::NoMx(_) => "nomx",
            SmtpError::Dns(_) => "dns",
            SmtpError::Timeout => "timeout",
            SmtpError::Refused(_) => "refused",
            SmtpError::Closed(_) => "closed",
            SmtpError::Tls(_) => "tls",
            SmtpError::Limited(_) => "limited",
            SmtpError::Rejected(_) => "rejected",
        }
    }

    fn from_client(error: mail_send::Error) -> SmtpError {
        use std::io::ErrorKind;
        match error {
            mail_send::Error::Timeout => SmtpError::Timeout,
            mail_send::Error::Io(e) => match e.kind() {
                ErrorKind::ConnectionRefused
                | ErrorKind::HostUnreachable
                | ErrorKind::NetworkUnreachable
                | ErrorKind::AddrNotAvailable => SmtpError::Refused(e.to_string()),
                ErrorKind::TimedOut => SmtpError::Timeout,
                _ => SmtpError::Closed(e.to_string()),
            },
            mail_send::Error::Tls(e) => SmtpError::Tls(e.to_string()),
            mail_send::Error::InvalidTLSName => SmtpError::Tls("invalid TLS name".into()),
            mail_send::Error::UnparseableReply => {
                SmtpError::Closed("closed or not an SMTP reply".into())
            }
            other => SmtpError::Closed(other.to_string()),
        }
    }
}

/// Per-call options.
#[derive(Debug, Clone, Copy)]
pub struct VerifyOptions {
    /// The whole call-back's deadline; `None` takes `[smtp] timeout`.
    pub timeout: Option<Duration>,
    /// Read and write the cache.
    pub cache: bool,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            timeout: None,
            cache: true,
        }
    }
}

/// Counters of what [`Smtp::verify`] did since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SmtpStats {
    /// Calls of [`Smtp::verify`].
    pub verifies: u64,
    /// Calls answered from the cache (at once, or after waiting for a slot).
    pub cache_hits: u64,
    /// TCP connections opened.
    pub connections: u64,
    /// Calls refused by the rate limit or for want of a slot.
    pub limited: u64,
    /// DSNs the relay accepted.
    pub dsns_sent: u64,
}

#[derive(Default)]
struct Counters {
    verifies: AtomicU64,
    cache_hits: AtomicU64,
    connections: AtomicU64,
    limited: AtomicU64,
    dsns_sent: AtomicU64,
}

/// One domain's limiter: its concurrency slots and its token bucket.
struct Domain {
    slots: Arc<Semaphore>,
    tokens: f64,
    refilled: Instant,
}

/// The call-back service.
pub struct Smtp {
    resolver: Arc<Resolver>,
    store: Arc<dyn Store>,
    config: SmtpConfig,
    helo: String,
    tls: tokio_rustls::TlsConnector,
    global: Semaphore,
    send_global: Semaphore,
    domains: Mutex<HashMap<String, Domain>>,
    counters: Counters,
}

/// `local@domain` split, the domain lowercased and without a trailing dot.
fn split_address(address: &str) -> Result<(String, String), SmtpError> {
    let invalid = || SmtpError::Invalid(address.to_string());
    let trimmed = address.trim().trim_start_matches('<').trim_end_matches('>');
    let (local, domain) = trimmed.rsplit_once('@').ok_or_else(invalid)?;
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let bad = |c: char| c.is_whitespace() || c.is_control() || matches!(c, '<' | '>');
    if local.is_empty() || domain.is_empty() || trimmed.contains(bad) || domain.contains('@') {
        return Err(invalid());
    }
    Ok((local.to_string(), domain))
}

impl Smtp {
    /// Builds the service; `helo` is the name used when `[smtp] helo` is not set.
    pub fn new(
        resolver: Arc<Resolver>,
        store: Arc<dyn Store>,
        config: &SmtpConfig,
        helo: String,
    ) -> Result<Smtp, String> {
        if config.per_domain == 0 || config.global == 0 || config.send_global == 0 {
            return Err("per_domain, global and send_global must be at least 1".into());
        }
        if config
            .relay
            .rsplit_once(':')
            .is_none_or(|(_, port)| port.parse::<u16>().is_err())
        {
            return Err(format!("relay {:?} is not host:port", config.relay));
        }
        let tls = mail_send::smtp::tls::build_tls_connector(true)?;
        Ok(Smtp {
            resolver,
            store,
            helo: config
                .helo
                .clone()
                .filter(|h| !h.is_empty())
                .unwrap_or(helo),
            config: config.clone(),
            tls,
            global: Semaphore::new(config.global),
            send_global: Semaphore::new(config.send_global),
            domains: Mutex::new(HashMap::new()),
            counters: Counters::default(),
        })
    }

    /// The name this service gives in EHLO.
    pub fn helo(&self) -> &str {
        &self.helo
    }

    /// What the service did since start.
    pub fn stats(&self) -> SmtpStats {
        let c = &self.counters;
        SmtpStats {
            verifies: c.verifies.load(Ordering::Relaxed),
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            connections: c.connections.load(Ordering::Relaxed),
            limited: c.limited.load(Ordering::Relaxed),
            dsns_sent: c.dsns_sent.load(Ordering::Relaxed),
        }
    }

    /// Asks `address`'s mail exchanger whether it takes mail for it (see the module doc).
    pub async fn verify(&self, address: &str, opts: VerifyOptions) -> Result<Verified, SmtpError> {
        calls::note(Service::Smtp);
        self.counters.verifies.fetch_add(1, Ordering::Relaxed);
        let (local, domain) = split_address(address)?;
        let address = format!("{local}@{domain}");
        let key = format!("{CACHE_PREFIX}{}", address.to_lowercase());
        let limit = opts.timeout.unwrap_or(self.config.timeout);
        match tokio::time::timeout(limit, self.verify_within(&address, &domain, &key, opts)).await {
            Ok(result) => result,
            Err(_) => Err(SmtpError::Timeout),
        }
    }

    async fn verify_within(
        &self,
        address: &str,
        domain: &str,
        key: &str,
        opts: VerifyOptions,
    ) -> Result<Verified, SmtpError> {
        if opts.cache
            && let Some(outcome) = self.cached(key).await
        {
            return Ok(Verified {
                outcome,
                cached: true,
            });
        }
        let slots = self.domain_slots(domain);
        let _slot = match slots.try_acquire() {
            Ok(slot) => slot,
            Err(_) => {
                // Busy: wait for a slot, then look again, since the call-back that held it
                // may have been for this very address.
                let slot = slots.acquire().await.map_err(|_| self.limited("closed"))?;
                if opts.cache
                    && let Some(outcome) = self.cached(key).await
                {
                    return Ok(Verified {
                        outcome,
                        cached: true,
                    });
                }
                slot
            }
        };
        if !self.take_token(domain) {
            return Err(self.limited("rate"));
        }
        let _global = self
            .global
            .acquire()
            .await
            .map_err(|_| self.limited("closed"))?;
        let outcome = self.call_back(address, domain).await?;
        if opts.cache {
            self.remember(key, &outcome).await;
        }
        Ok(Verified {
            outcome,
            cached: false,
        })
    }

    /// The remembered outcome of a call-back to `address` (accepted or refused permanently),
    /// without calling back; `None` when nothing is remembered.
    pub async fn cached_outcome(&self, address: &str) -> Result<Option<Outcome>, SmtpError> {
        let (local, domain) = split_address(address)?;
        let key = format!(
            "{CACHE_PREFIX}{}",
            format!("{local}@{domain}").to_lowercase()
        );
        Ok(self.cached(&key).await)
    }

    fn limited(&self, why: &'static str) -> SmtpError {
        self.counters.limited.fetch_add(1, Ordering::Relaxed);
        SmtpError::Limited(why)
    }

    /// The remembered outcome for `key`; a store failure reads as "not remembered".
    async fn cached(&self, key: &str) -> Option<Outcome> {
        calls::note(Service::Store);
        let found = match crate::metrics::store_call("get", self.store.get(key)).await {
            Ok(found) => found.and_then(|value| decode(&value)),
            Err(error) => {
                tracing::debug!(%error, key, "smtp cache read failed");
                None
            }
        };
        if found.is_some() {
            self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    async fn remember(&self, key: &str, outcome: &Outcome) {
        let ttl = match outcome {
            Outcome::Accepted => self.config.cache_ok,
            Outcome::Refused(reply) if reply.permanent() => self.config.cache_fail,
            Outcome::Refused(_) => return,
        };
        if ttl.is_zero() {
            return;
        }
        calls::note(Service::Store);
        let value = encode(outcome);
        let stored = self.store.set(key, &value, Some(ttl));
        if let Err(error) = crate::metrics::store_call("set", stored).await {
            tracing::debug!(%error, key, "smtp cache write failed");
        }
    }

    fn domain_slots(&self, domain: &str) -> Arc<Semaphore> {
        let mut domains = self.domains.lock().unwrap_or_else(|e| e.into_inner());
        if domains.len() >= MAX_DOMAINS && !domains.contains_key(domain) {
            let (count, per) = (f64::from(self.config.rate.count), self.config.rate.per);
            // Forget domains with nothing in flight and a full bucket: forgetting them
            // changes nothing.
            domains.retain(|_, d| {
                Arc::strong_count(&d.slots) > 1
                    || d.tokens + d.refilled.elapsed().as_secs_f64() / per.as_secs_f64() * count
                        < count
            });
        }
        let domain = domains.entry(domain.to_string()).or_insert_with(|| Domain {
            slots: Arc::new(Semaphore::new(self.config.per_domain)),
            tokens: f64::from(self.config.rate.count),
            refilled: Instant::now(),
        });
        Arc::clone(&domain.slots)
    }

    /// Takes one token of `domain`'s bucket; false when it is empty.
    fn take_token(&self, domain: &str) -> bool {
        let mut domains = self.domains.lock().unwrap_or_else(|e| e.into_inner());
        let Some(state) = domains.get_mut(domain) else {
            return true;
        };
        let count = f64::from(self.config.rate.count);
        let now = Instant::now();
        let refill = now.duration_since(state.refilled).as_secs_f64()
            / self.config.rate.per.as_secs_f64()
            * count;
        state.tokens = (state.tokens + refill).min(count);
        state.refilled = now;
        if state.tokens >= 1.0 {
            state.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The addresses to call, in order: MX hosts by preference (the domain itself without MX).
    async fn exchangers(&self, domain: &str) -> Result<Vec<(String, IpAddr)>, SmtpError> {
        let hosts = match self.resolver.mx(domain).await {
            Ok(mx) => {
                if mx.iter().any(|(_, host)| host == "." || host.is_empty()) {
                    return Err(SmtpError::NoMx(domain.to_string()));
                }
                mx.into_iter().map(|(_, host)| host).collect()
            }
            Err(DnsError::NxDomain | DnsError::NoData) => vec![domain.to_string()],
            Err(error) => return Err(SmtpError::Dns(error)),
        };
        let mut addresses = Vec::new();
        let mut temporary = None;
        for host in hosts {
            if addresses.len() >= MAX_ADDRESSES {
                break;
            }
            let v4 = self.resolver.a(&host).await;
            let v6 = self.resolver.aaaa(&host).await;
            for found in [
                v4.map(|list| list.into_iter().map(IpAddr::V4).collect::<Vec<_>>()),
                v6.map(|list| list.into_iter().map(IpAddr::V6).collect()),
            ] {
                match found {
                    Ok(ips) => addresses.extend(ips.into_iter().map(|ip| (host.clone(), ip))),
                    Err(DnsError::NxDomain | DnsError::NoData) => {}
                    Err(error) => temporary = Some(error),
                }
            }
        }
        addresses.truncate(MAX_ADDRESSES);
        match temporary {
            Some(error) if addresses.is_empty() => Err(SmtpError::Dns(error)),
            _ if addresses.is_empty() => Err(SmtpError::NoMx(domain.to_string())),
            _ => Ok(addresses),
        }
    }

    /// Calls the exchangers in turn until one greets us; its answer is the outcome.
    async fn call_back(&self, address: &str, domain: &str) -> Result<Outcome, SmtpError> {
        let mut last = SmtpError::NoMx(domain.to_string());
        for (host, ip) in self.exchangers(domain).await? {
            let target = SocketAddr::new(ip, self.config.port);
            match self.dialogue(target, &host, &Job::Verify(address)).await {
                Ok(outcome) => return Ok(outcome),
                Err(Attempt::Unreachable(error)) => {
                    tracing::debug!(%error, %target, "smtp call-back: next exchanger");
                    last = error;
                }
                Err(Attempt::Failed(error)) => return Err(error),
            }
        }
        Err(last)
    }

    /// One connection: up to the greeting, failures are [`Attempt::Unreachable`] (try the
    /// next exchanger); after it, the answer is final.
    async fn dialogue(
        &self,
        target: SocketAddr,
        host: &str,
        job: &Job<'_>,
    ) -> Result<Outcome, Attempt> {
        let unreachable = |e| Attempt::Unreachable(SmtpError::from_client(e));
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        let mut client = SmtpClient::connect(target, self.config.connect_timeout)
            .await
            .map_err(unreachable)?;
        client.timeout = self.config.command_timeout;
        let greeting = tokio::time::timeout(self.config.command_timeout, client.read())
            .await
            .map_err(|_| Attempt::Unreachable(SmtpError::Timeout))?
            .map_err(unreachable)?;
        if !(200..300).contains(&greeting.code) {
            return Ok(Outcome::Refused(Reply::from_response(
                greeting,
                Stage::Connect,
            )));
        }
        let failed = |e| Attempt::Failed(SmtpError::from_client(e));
        let starttls = match hello(&mut client, &self.helo).await.map_err(failed)? {
            Ok(starttls) => starttls,
            Err(reply) => return Ok(Outcome::Refused(reply)),
        };
        if !starttls {
            return job.run(client).await.map_err(failed);
        }
        let mut client = client
            .start_tls(&self.tls, host)
            .await
            .map_err(|e| match e {
                mail_send::Error::UnexpectedReply(r) => {
                    SmtpError::Tls(format!("STARTTLS refused: {} {}", r.code, r.message))
                }
                mail_send::Error::Timeout => SmtpError::Timeout,
                other => SmtpError::Tls(other.to_string()),
            })
            .map_err(Attempt::Failed)?;
        if let Err(reply) = hello(&mut client, &self.helo).await.map_err(failed)? {
            return Ok(Outcome::Refused(reply));
        }
        job.run(client).await.map_err(failed)
    }

    /// Submits `dsn` to `[smtp] relay` (see `docs/lua-api/smtp.md`): EHLO, STARTTLS when
    /// offered, `MAIL FROM:<>` — when the relay refuses the null sender with a 5xx, once more
    /// from `postmaster@<reporting MTA>`, as the classic milter did — `RCPT TO:<dsn.to>`, `DATA`,
    /// `QUIT`. At most `send_global` submissions at once; the whole submission, waiting for a
    /// slot included, within `timeout` (default `[smtp] timeout`). A refusal is
    /// [`SmtpError::Rejected`].
    pub async fn send_dsn(&self, dsn: &Dsn, timeout: Option<Duration>) -> Result<(), SmtpError> {
        calls::note(Service::Smtp);
        dsn.check(&self.helo).map_err(|error| match error {
            DsnError::Invalid("address", address) => SmtpError::Invalid(address),
            other => SmtpError::Invalid(other.to_string()),
        })?;
        let reporting = dsn.reporting.as_deref().unwrap_or(&self.helo);
        let message = dsn.build(&self.helo);
        let job = Job::Send {
            postmaster: format!("postmaster@{reporting}"),
            to: &dsn.to,
            message: &message,
        };
        let submission = async {
            let _slot = self
                .send_global
                .acquire()
                .await
                .map_err(|_| self.limited("closed"))?;
            self.submit(&job).await
        };
        let limit = timeout.unwrap_or(self.config.timeout);
        let outcome = tokio::time::timeout(limit, submission)
            .await
            .unwrap_or(Err(SmtpError::Timeout))?;
        match outcome {
            Outcome::Accepted => {
                self.counters.dsns_sent.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(to = dsn.to, relay = self.config.relay, "DSN sent");
                Ok(())
            }
            Outcome::Refused(reply) => Err(SmtpError::Rejected(reply)),
        }
    }

    /// The relay's addresses in turn until one greets us.
    async fn submit(&self, job: &Job<'_>) -> Result<Outcome, SmtpError> {
        let relay = self.config.relay.as_str();
        let host = relay.rsplit_once(':').map_or(relay, |(host, _)| host);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let targets = tokio::net::lookup_host(relay)
            .await
            .map_err(|e| SmtpError::Refused(format!("{relay}: {e}")))?;
        let mut last = SmtpError::Refused(format!("{relay}: no address"));
        for target in targets.take(MAX_ADDRESSES) {
            match self.dialogue(target, host, job).await {
                Ok(outcome) => return Ok(outcome),
                Err(Attempt::Unreachable(error)) => {
                    tracing::debug!(%error, %target, "DSN relay: next address");
                    last = error;
                }
                Err(Attempt::Failed(error)) => return Err(error),
            }
        }
        Err(last)
    }
}

/// What a connection is for, once the greeting and EHLO are done.
enum Job<'a> {
    /// A call-back: `MAIL FROM:<>`, `RCPT TO:<address>`.
    Verify(&'a str),
    /// A DSN submission: `MAIL FROM:<>` (else from `postmaster`), `RCPT TO:<to>`, `DATA`.
    Send {
        postmaster: String,
        to: &'a str,
        message: &'a [u8],
    },
}

impl Job<'_> {
    async fn run<T: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: SmtpClient<T>,
    ) -> mail_send::Result<Outcome> {
        match self {
            Job::Verify(address) => envelope(client, address).await,
            Job::Send {
                postmaster,
                to,
                message,
            } => deliver(client, postmaster, to, message).await,
        }
    }
}

/// How one connection attempt failed.
enum Attempt {
    /// Before the greeting: the next exchanger may do better.
    Unreachable(SmtpError),
    /// After it.
    Failed(SmtpError),
}

/// EHLO, or HELO when EHLO is refused: whether STARTTLS is offered, or the refusal.
async fn hello<T: AsyncRead + AsyncWrite + Unpin>(
    client: &mut SmtpClient<T>,
    name: &str,
) -> mail_send::Result<Result<bool, Reply>> {
    match client.ehlo(name).await {
        Ok(ehlo) => Ok(Ok(ehlo.has_capability(EXT_START_TLS))),
        Err(mail_send::Error::UnexpectedReply(r)) if r.code >= 500 => {
            let reply = client.cmd(format!("HELO {name}\r\n")).await?;
            if (200..300).contains(&reply.code) {
                Ok(Ok(false))
            } else {
                Ok(Err(Reply::from_response(reply, Stage::Helo)))
            }
        }
        Err(mail_send::Error::UnexpectedReply(r)) => Ok(Err(Reply::from_response(r, Stage::Helo))),
        Err(e) => Err(e),
    }
}

/// `MAIL FROM:<>`, `RCPT TO:<address>`, `QUIT` (its answer is not waited for longer than the
/// command timeout, and not needed).
async fn envelope<T: AsyncRead + AsyncWrite + Unpin>(
    mut client: SmtpClient<T>,
    address: &str,
) -> mail_send::Result<Outcome> {
    let params = mail_send::smtp::message::Parameters::new();
    let outcome = match client.mail_from("", &params).await {
        Ok(()) => match client.rcpt_to(address, &params).await {
            Ok(()) => Outcome::Accepted,
            Err(e) => refusal(Stage::Rcpt)(e)?,
        },
        Err(e) => refusal(Stage::Mail)(e)?,
    };
    let _ = client.quit().await;
    Ok(outcome)
}

/// An SMTP refusal as an outcome; other errors stay errors.
fn refusal(stage: Stage) -> impl Fn(mail_send::Error) -> mail_send::Result<Outcome> {
    move |e| match e {
        mail_send::Error::UnexpectedReply(r) => {
            Ok(Outcome::Refused(Reply::from_response(r, stage)))
        }
        other => Err(other),
    }
}

/// `MAIL FROM:<>` (a 5xx to it: `MAIL FROM:<postmaster>`), `RCPT TO:<to>`, `DATA`, `QUIT`.
async fn deliver<T: AsyncRead + AsyncWrite + Unpin>(
    mut client: SmtpClient<T>,
    postmaster: &str,
    to: &str,
    message: &[u8],
) -> mail_send::Result<Outcome> {
    let params = mail_send::smtp::message::Parameters::new();
    let mut from = client.mail_from("", &params).await;
    if let Err(mail_send::Error::UnexpectedReply(r)) = &from
        && r.code >= 500
    {
        tracing::debug!(
            code = r.code,
            text = r.message,
            "DSN relay refused <>, trying {postmaster}"
        );
        from = client.mail_from(postmaster, &params).await;
    }
    let outcome = match from {
        Ok(()) => match client.rcpt_to(to, &params).await {
            Ok(()) => match client.data(message).await {
                Ok(_) => Outcome::Accepted,
                Err(e) => refusal(Stage::Data)(e)?,
            },
            Err(e) => refusal(Stage::Rcpt)(e)?,
        },
        Err(e) => refusal(Stage::Mail)(e)?,
    };
    let _ = client.quit().await;
    Ok(outcome)
}

/// The cached form: `"ok"`, or `{code, text, stage}`.
fn encode(outcome: &Outcome) -> Value {
    match outcome {
        Outcome::Accepted => Value::Scalar(Scalar::Str("ok".into())),
        Outcome::Refused(reply) => Value::Map(
            [
                ("code".to_string(), Scalar::Int(i64::from(reply.code))),
                ("text".to_string(), Scalar::Str(reply.text.clone())),
                (
                    "stage".to_string(),
                    Scalar::Str(reply.stage.name().to_string()),
                ),
            ]
            .into_iter()
            .collect(),
        ),
    }
}

fn decode(value: &Value) -> Option<Outcome> {
    match value {
        Value::Scalar(Scalar::Str(ok)) if ok == "ok" => Some(Outcome::Accepted),
        Value::Map(map) => {
            let code = match map.get("code")? {
                Scalar::Int(code) => u16::try_from(*code).ok()?,
                _ => return None,
            };
            let text = match map.get("text") {
                Some(Scalar::Str(text)) => text.clone(),
                _ => String::new(),
            };
            let stage = match map.get("stage") {
                Some(Scalar::Str(stage)) => Stage::from_name(stage).unwrap_or(Stage::Rcpt),
                _ => Stage::Rcpt,
            };
            Some(Outcome::Refused(Reply { code, text, stage }))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        let rate = |s: &str| s.parse::<Rate>();
        assert_eq!(
            rate("10/m"),
            Ok(Rate {
                count: 10,
                per: Duration::from_secs(60)
            })
        );
        assert_eq!(rate("5/30s").unwrap().per, Duration::from_secs(30));
        assert_eq!(rate(" 100 / h ").unwrap().count, 100);
        assert!(rate("10").is_err());
        assert!(rate("0/m").is_err());
        assert!(rate("x/m").is_err());
        assert!(rate("10/parsec").is_err());
    }

    #[test]
    fn addresses_split() {
        assert_eq!(
            split_address("<Someone@Example.COM.>"),
            Ok(("Someone".into(), "example.com".into()))
        );
        assert_eq!(
            split_address("\"a@b\"@example.com").unwrap().1,
            "example.com"
        );
        for bad in [
            "",
            "nobody",
            "@example.com",
            "x@",
            "a b@example.com",
            "x@a\r\nDATA",
        ] {
            assert!(split_address(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cache_values_round_trip() {
        for outcome in [
            Outcome::Accepted,
            Outcome::Refused(Reply {
                code: 550,
                text: "5.1.1 no".into(),
                stage: Stage::Mail,
            }),
        ] {
            assert_eq!(decode(&encode(&outcome)), Some(outcome));
        }
        assert_eq!(decode(&Value::Scalar(Scalar::Int(1))), None);
    }

    #[test]
    fn config_defaults_and_errors() {
        let config: SmtpConfig = toml::from_str("rate = \"3/10s\"\nport = 2525").unwrap();
        assert_eq!(config.port, 2525);
        assert_eq!(config.rate.per, Duration::from_secs(10));
        assert_eq!(config.cache_ok, SmtpConfig::default().cache_ok);
        assert!(toml::from_str::<SmtpConfig>("rate = \"fast\"").is_err());
        assert!(toml::from_str::<SmtpConfig>("ports = 1").is_err());
        let config: SmtpConfig = toml::from_str("relay = \"[::1]:2525\"").unwrap();
        assert_eq!(
            (config.relay.as_str(), config.send_global),
            ("[::1]:2525", 4)
        );
    }
}
