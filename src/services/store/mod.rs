//! Persistent state shared by policies: the [`Store`] interface, its value and error types, the
//! configuration section, and the rules that sit above the backends (address normalisation,
//! list matching, greylist keys).
//!
//! Two backends implement [`Store`]: [`sqlite::SqliteStore`] (embedded, the default) and
//! [`redis::RedisStore`] (shared by several MX hosts). Backends store and fetch; everything that
//! decides *what* key to look at (IP grouping, wildcard domains, address-then-domain lookups)
//! lives here so both backends behave the same. Every time comes from an injectable [`Clock`]
//! (unix milliseconds), so expiry and greylisting can be tested without waiting.

pub mod lock;
pub mod redis;
mod redis_link;
pub mod sqlite;
pub mod zone;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// Current time as unix milliseconds. Injected so tests can move time forward.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The wall clock, in unix milliseconds.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    })
}

/// A clock that stands still until moved: case files move it (`advance = "10m"`), and so do
/// tests. It starts at the wall clock's time, so Redis' own expiry (which follows real time) is
/// never earlier than the store's.
#[derive(Clone)]
pub struct ManualClock(Arc<std::sync::atomic::AtomicI64>);

impl Default for ManualClock {
    fn default() -> ManualClock {
        ManualClock(Arc::new(
            std::sync::atomic::AtomicI64::new(system_clock()()),
        ))
    }
}

impl ManualClock {
    /// A clock at the current time.
    pub fn new() -> ManualClock {
        ManualClock::default()
    }

    /// The store clock reading this one.
    pub fn clock(&self) -> Clock {
        let t = Arc::clone(&self.0);
        Arc::new(move || t.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let by = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.0.fetch_add(by, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Why a store call failed. Policies see [`StoreError::code`].
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot be reached or refused the operation (Redis down, disk full, I/O error).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The call did not finish within the configured per-call timeout.
    #[error("store call timed out after {0:?}")]
    Timeout(Duration),
    /// The value or argument cannot be stored or used (e.g. `incr` on a non-integer).
    #[error("invalid store value: {0}")]
    Invalid(String),
}

impl StoreError {
    /// The short error word handed to Lua: "unavailable", "timeout" or "invalid".
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Timeout(_) => "timeout",
            StoreError::Invalid(_) => "invalid",
        }
    }
}

/// Result of a store call.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Runs `fut` under the per-call timeout.
pub(crate) async fn with_timeout<T>(
    limit: Duration,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or(Err(StoreError::Timeout(limit)))
}

/// One element of a stored value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    Bool(bool),
    Int(i64),
    Num(f64),
    Str(String),
}

/// A stored value: a scalar or a flat table (a list or a string-keyed map of scalars).
/// Stored as JSON text, so an integer is stored as its decimal digits and `incr` works on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Scalar(Scalar),
    List(Vec<Scalar>),
    Map(BTreeMap<String, Scalar>),
}

impl Value {
    /// Serialises to the stored text form (JSON).
    pub fn encode(&self) -> Result<String> {
        let finite = |s: &Scalar| !matches!(s, Scalar::Num(n) if !n.is_finite());
        let ok = match self {
            Value::Scalar(s) => finite(s),
            Value::List(l) => l.iter().all(finite),
            Value::Map(m) => m.values().all(finite),
        };
        if !ok {
            return Err(StoreError::Invalid("numbers must be finite".into()));
        }
        serde_json::to_string(self).map_err(|e| StoreError::Invalid(e.to_string()))
    }

    /// Parses the stored text form.
    pub fn decode(text: &str) -> Result<Value> {
        serde_json::from_str(text).map_err(|e| StoreError::Invalid(format!("stored value: {e}")))
    }
}

/// The named lists: banned IPs and domains, whitelist and blacklist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum List {
    /// Client IPs; entries are normalised IP addresses, matched exactly.
    BannedIp,
    /// Sender domains; `example.com` matches itself, `*.example.com` any subdomain.
    BannedDomain,
    /// Addresses or domains (or IPs); an address also matches an entry for its domain.
    Whitelist,
    /// Same matching as the whitelist.
    Blacklist,
}

impl List {
    /// The list's name in storage and in Lua ("ban-ip", "ban-domain", "whitelist", "blacklist").
    pub fn name(self) -> &'static str {
        match self {
            List::BannedIp => "ban-ip",
            List::BannedDomain => "ban-domain",
            List::Whitelist => "whitelist",
            List::Blacklist => "blacklist",
        }
    }

    /// The ban list for a ban kind, "ip" or "domain".
    pub fn ban(kind: &str) -> Option<List> {
        match kind {
            "ip" => Some(List::BannedIp),
            "domain" => Some(List::BannedDomain),
            _ => None,
        }
    }

    /// A white/black list by name, "whitelist" or "blacklist".
    pub fn address_list(name: &str) -> Option<List> {
        match name {
            "whitelist" => Some(List::Whitelist),
            "blacklist" => Some(List::Blacklist),
            _ => None,
        }
    }

    /// The stored form of an entry: IPs in canonical text, everything else trimmed and lowercased.
    pub fn normalize(self, entry: &str) -> Result<String> {
        let entry = entry.trim();
        if entry.is_empty() {
            return Err(StoreError::Invalid("empty list entry".into()));
        }
        match self {
            List::BannedIp => entry
                .parse::<IpAddr>()
                .map(|ip| ip.to_string())
                .map_err(|_| StoreError::Invalid(format!("not an IP address: {entry}"))),
            _ => Ok(entry.to_ascii_lowercase()),
        }
    }

    /// The stored entries that would match `key`, most specific first.
    fn candidates(self, key: &str) -> Result<Vec<String>> {
        let key = self.normalize(key)?;
        Ok(match self {
            List::BannedIp => vec![key],
            List::BannedDomain => domain_candidates(&key),
            List::Whitelist | List::Blacklist => {
                let domain = key.rsplit_once('@').map(|(_, d)| d.to_string());
                std::iter::once(key).chain(domain).collect()
            }
        })
    }
}

/// `a.b.example.com` → itself, `*.b.example.com`, `*.example.com`, `*.com` (pymilter's
/// `isbanned`: replace the leftmost label by `*` while at least two labels remain).
fn domain_candidates(domain: &str) -> Vec<String> {
    let mut out = vec![domain.to_string()];
    let mut rest = domain.trim_start_matches("*.");
    while let Some((_, parent)) = rest.split_once('.') {
        out.push(format!("*.{parent}"));
        rest = parent;
    }
    out
}

/// One list entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ListEntry {
    /// The stored (normalised) entry.
    pub entry: String,
    /// Free text given when the entry was added.
    pub reason: String,
    /// When it was added (unix ms).
    pub created: i64,
    /// When it expires (unix ms), `None` for never.
    pub expires: Option<i64>,
}

impl ListEntry {
    /// True if `search` (case-insensitive) occurs in the entry or its reason.
    pub fn matches(&self, search: &str) -> bool {
        let search = search.to_lowercase();
        self.entry.contains(&search) || self.reason.to_lowercase().contains(&search)
    }
}

/// Greylisting settings (pymilter's greylist with postgrey-style client auto-pass).
#[derive(Debug, Clone, PartialEq)]
pub struct GreylistOptions {
    /// How long a new triplet is refused ("time" in pymilter; default 5 minutes).
    pub delay: Duration,
    /// A first retry must come before this, counted from first sight ("expire"; default 6 hours).
    pub retry_window: Duration,
    /// How long a passed triplet is remembered after its last use ("retain"; default 36 days).
    pub lifetime: Duration,
    /// IPv4 clients are grouped by this prefix length (default 24).
    pub ipv4_prefix: u8,
    /// IPv6 clients are grouped by this prefix length (default 64).
    pub ipv6_prefix: u8,
    /// After this many passed triplets, any triplet from the client passes at once (0 = off).
    pub auto_pass: u32,
}

impl Default for GreylistOptions {
    fn default() -> Self {
        GreylistOptions {
            delay: Duration::from_secs(5 * 60),
            retry_window: Duration::from_secs(6 * 3600),
            lifetime: Duration::from_secs(36 * 86_400),
            ipv4_prefix: 24,
            ipv6_prefix: 64,
            auto_pass: 0,
        }
    }
}

/// A normalised greylist triplet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Triplet {
    /// The client network ("192.0.2.0/24") or, when not an IP, the lowercased text given (a
    /// sender domain with an SPF pass, as pymilter does).
    pub client: String,
    /// Lowercased MAIL FROM address.
    pub sender: String,
    /// Lowercased RCPT TO address.
    pub rcpt: String,
}

impl Triplet {
    /// Builds the triplet, grouping an IP client by the configured prefix lengths.
    pub fn new(client: &str, sender: &str, rcpt: &str, opts: &GreylistOptions) -> Triplet {
        let client = client.trim();
        let client = match client.parse::<IpAddr>() {
            Ok(ip) => group_ip(ip, opts),
            Err(_) => client.to_ascii_lowercase(),
        };
        Triplet {
            client,
            sender: sender.trim().to_ascii_lowercase(),
            rcpt: rcpt.trim().to_ascii_lowercase(),
        }
    }
}

fn group_ip(ip: IpAddr, opts: &GreylistOptions) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let len = opts.ipv4_prefix.min(32);
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            let net = std::net::Ipv4Addr::from(u32::from(v4) & mask);
            format!("{net}/{len}")
        }
        IpAddr::V6(v6) => {
            let len = opts.ipv6_prefix.min(128);
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            let net = std::net::Ipv6Addr::from(u128::from(v6) & mask);
            format!("{net}/{len}")
        }
    }
}

/// What greylisting says about a delivery attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GreylistVerdict {
    /// Accept; `passes` counts this triplet's accepted attempts, this one included.
    Pass { passes: i64 },
    /// Refuse for now; a retry is accepted after `secs` seconds.
    Wait { secs: u64 },
}

/// One stored greylist triplet, for listing.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GreylistEntry {
    pub client: String,
    pub sender: String,
    pub rcpt: String,
    /// First sight (unix ms).
    pub first: i64,
    /// Last attempt (unix ms).
    pub last: i64,
    /// Accepted attempts so far; 0 while the triplet is still being delayed.
    pub passes: i64,
}

/// What a backend stores for a greylist attempt and answers, shared by both backends.
pub(crate) struct GreylistStep {
    /// The triplet's record after this attempt.
    pub first: i64,
    pub passes: i64,
    /// When the triplet record expires.
    pub expires: i64,
    pub verdict: GreylistVerdict,
}

/// The greylisting rules (pymilter greylist.py): `record` is the live stored triplet (first,
/// passes), `auto` whether the client has earned an auto-pass.
pub(crate) fn greylist_step(
    record: Option<(i64, i64)>,
    now: i64,
    auto: bool,
    opts: &GreylistOptions,
) -> GreylistStep {
    let delay = opts.delay.as_millis() as i64;
    let window = opts.retry_window.as_millis() as i64;
    let lifetime = opts.lifetime.as_millis() as i64;
    let pass = |first: i64, passes: i64| GreylistStep {
        first,
        passes,
        expires: now + lifetime,
        verdict: GreylistVerdict::Pass { passes },
    };
    match record {
        Some((first, passes)) if passes > 0 || (now >= first + delay && now < first + window) => {
            pass(first, passes + 1)
        }
        Some((first, _)) if auto => pass(first, 1),
        None if auto => pass(now, 1),
        Some((first, _)) if now < first + delay => GreylistStep {
            first,
            passes: 0,
            expires: first + window,
            verdict: GreylistVerdict::Wait {
                secs: ((first + delay - now) as u64).div_ceil(1000),
            },
        },
        _ => GreylistStep {
            first: now,
            passes: 0,
            expires: now + window,
            verdict: GreylistVerdict::Wait {
                secs: (delay as u64).div_ceil(1000),
            },
        },
    }
}

/// Decaying amounts (`store.decay`): named numbers that halve every half-life.
pub type Decayed = BTreeMap<String, f64>;

/// Half-lives an untouched decaying record is kept: by then its amounts are below a millionth
/// of what they were, so dropping it changes nothing a policy can see.
pub const DECAY_KEEP_HALF_LIVES: u32 = 20;

/// A decaying record as stored (JSON): the amounts as they were at `at` (unix ms).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct DecayRecord {
    pub at: i64,
    pub v: Decayed,
}

impl DecayRecord {
    /// The amounts decayed from `at` to `now`, plus `add`; the new record is stamped `now`.
    pub fn step(&self, now: i64, half_life: Duration, add: &Decayed) -> DecayRecord {
        let half_life = half_life.as_secs_f64() * 1000.0;
        let factor = 0.5f64.powf((now - self.at).max(0) as f64 / half_life);
        let mut v: Decayed = self
            .v
            .iter()
            .map(|(k, x)| (k.clone(), x * factor))
            .collect();
        for (k, x) in add {
            *v.entry(k.clone()).or_insert(0.0) += x;
        }
        DecayRecord { at: now, v }
    }
}

/// How long a decaying record stays after its last update.
pub(crate) fn decay_keep(half_life: Duration) -> Duration {
    half_life.saturating_mul(DECAY_KEEP_HALF_LIVES)
}

/// The store interface. Backends implement the required methods; the provided methods hold the
/// rules common to all backends. Every call is bounded by the configured timeout and reports
/// failures as [`StoreError`], never by panicking.
#[async_trait]
pub trait Store: Send + Sync {
    /// The value at `key`, `None` if absent or expired.
    async fn get(&self, key: &str) -> Result<Option<Value>>;
    /// Stores `value`; `ttl` `None` keeps it until deleted.
    async fn set(&self, key: &str, value: &Value, ttl: Option<Duration>) -> Result<()>;
    /// Removes `key`; true if it existed.
    async fn delete(&self, key: &str) -> Result<bool>;
    /// Adds `by` to the integer at `key` (absent = 0) and returns the new value. `ttl` sets the
    /// expiry when the key is created; an existing key keeps its expiry.
    async fn incr(&self, key: &str, by: i64, ttl: Option<Duration>) -> Result<i64>;
    /// One atomic write that files `entry` under a numbered index and stores `values`, all
    /// kept for `ttl`: the counter at `index` goes up by one (as [`Store::incr`]) to `n`,
    /// `entry` is stored at `"{index}:{n}"`, every `(key, value)` of `values` as [`Store::set`];
    /// returns `n`. A message history is one such write.
    async fn set_indexed(
        &self,
        index: &str,
        entry: &Value,
        values: &[(String, Value)],
        ttl: Option<Duration>,
    ) -> Result<i64>;
    /// Sets the expiry of an existing key; false if the key does not exist.
    async fn expire(&self, key: &str, ttl: Duration) -> Result<bool>;
    /// Records one event under `key` and returns the number of events in the last `window`,
    /// this one included (a sliding window).
    async fn count(&self, key: &str, window: Duration) -> Result<i64>;
    /// Decays the amounts at `key` (halving every `half_life` since their last update), adds
    /// `add` and returns the result, atomically. An empty `add` only reads. A record untouched
    /// for [`DECAY_KEEP_HALF_LIVES`] half-lives is gone.
    async fn decay(&self, key: &str, half_life: Duration, add: &Decayed) -> Result<Decayed>;
    /// Records an attempt of a normalised triplet and decides by `greylist_step`.
    async fn greylist_triplet(
        &self,
        triplet: &Triplet,
        opts: &GreylistOptions,
    ) -> Result<GreylistVerdict>;
    /// All live greylist triplets.
    async fn greylist_entries(&self) -> Result<Vec<GreylistEntry>>;
    /// Adds or replaces a normalised entry.
    async fn list_put(&self, list: List, entry: ListEntry) -> Result<()>;
    /// Removes a normalised entry; true if it existed.
    async fn list_delete(&self, list: List, entry: &str) -> Result<bool>;
    /// The first of the normalised `entries` present in the list.
    async fn list_first(&self, list: List, entries: &[String]) -> Result<Option<ListEntry>>;
    /// All live entries of a list.
    async fn list_all(&self, list: List) -> Result<Vec<ListEntry>>;
    /// The store's clock (unix ms).
    fn now(&self) -> i64;

    /// Greylists one delivery attempt: `client` is the client IP (grouped by the prefix options)
    /// or any other identifier such as an SPF-validated sender domain.
    async fn greylist(
        &self,
        client: &str,
        sender: &str,
        rcpt: &str,
        opts: &GreylistOptions,
    ) -> Result<GreylistVerdict> {
        self.greylist_triplet(&Triplet::new(client, sender, rcpt, opts), opts)
            .await
    }

    /// Adds `entry` to `list` (replacing an existing one) with a reason and optional lifetime.
    async fn list_add(
        &self,
        list: List,
        entry: &str,
        reason: &str,
        ttl: Option<Duration>,
    ) -> Result<()> {
        let now = self.now();
        let entry = ListEntry {
            entry: list.normalize(entry)?,
            reason: reason.to_string(),
            created: now,
            expires: ttl.map(|t| now + t.as_millis() as i64),
        };
        self.list_put(list, entry).await
    }

    /// Removes `entry` from `list`; true if it was there.
    async fn list_remove(&self, list: List, entry: &str) -> Result<bool> {
        self.list_delete(list, &list.normalize(entry)?).await
    }

    /// The entry of `list` that matches `key` by the list's rules, if any.
    async fn listed(&self, list: List, key: &str) -> Result<Option<ListEntry>> {
        self.list_first(list, &list.candidates(key)?).await
    }

    /// Live entries of `list` sorted by entry, optionally only those matching `search`.
    async fn list_search(&self, list: List, search: Option<&str>) -> Result<Vec<ListEntry>> {
        let mut entries = self.list_all(list).await?;
        if let Some(search) = search {
            entries.retain(|e| e.matches(search));
        }
        entries.sort_by(|a, b| a.entry.cmp(&b.entry));
        Ok(entries)
    }
}

/// Which backend the store uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// An embedded SQLite file (the default; nothing to install).
    #[default]
    Sqlite,
    /// A Redis server shared by several MX hosts.
    Redis,
}

impl Backend {
    /// The backend's name as the config spells it.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Redis => "redis",
        }
    }
}

/// SQLite `synchronous` setting for the embedded store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync at every commit: acknowledged writes survive power loss (the default).
    #[default]
    Full,
    /// WAL without fsync per commit: acknowledged writes survive `kill -9`, not power loss.
    Normal,
}

/// The `[store]` configuration section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// "sqlite" (default) or "redis".
    pub backend: Backend,
    /// SQLite file (sqlite backend).
    pub path: PathBuf,
    /// "full" (default) or "normal" (sqlite backend).
    pub synchronous: Synchronous,
    /// Redis URL, e.g. "redis://127.0.0.1:6379/0" or "unix:///run/redis/redis.sock" (redis).
    pub url: String,
    /// Prefix of every Redis key, so several applications can share a server (redis).
    pub prefix: String,
    /// Upper bound of every store call ("2s").
    #[serde(deserialize_with = "crate::duration::serde_duration::deserialize")]
    pub timeout: Duration,
    /// Upper bound of one Redis connection attempt ("1s").
    #[serde(deserialize_with = "crate::duration::serde_duration::deserialize")]
    pub connect_timeout: Duration,
    /// File whose first line is the Redis password (AUTH; the user is the URL's), so the
    /// password need not be in the configuration (redis).
    pub password_file: Option<PathBuf>,
    /// PEM file of the CA that signed the Redis server's certificate, for `rediss://` URLs;
    /// without it the system's roots are used (redis).
    pub tls_ca_file: Option<PathBuf>,
    /// Sentinels ("host:port", or "rediss://host:port" for TLS with `tls_ca_file`) that know
    /// where the master is; the URL then gives only the scheme, credentials and database (redis).
    pub sentinels: Vec<String>,
    /// File whose first line is the sentinels' password (their `requirepass` or an ACL user's);
    /// without it the sentinels are asked without AUTH (redis).
    pub sentinel_password_file: Option<PathBuf>,
    /// The ACL user of `sentinel_password_file`; without it the sentinels' default user (redis).
    pub sentinel_user: Option<String>,
    /// The master's name as the sentinels know it (`sentinel monitor NAME ...`) (redis).
    pub sentinel_master: String,
    /// A write is acknowledged only once this many replicas have it (Redis `WAIT`); 0 (the
    /// default) acknowledges what the master has (redis).
    pub min_replicas: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: Backend::Sqlite,
            path: PathBuf::from("luamilter.db"),
            synchronous: Synchronous::Full,
            url: "redis://127.0.0.1:6379/".into(),
            prefix: "luamilter:".into(),
            timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            password_file: None,
            tls_ca_file: None,
            sentinels: Vec::new(),
            sentinel_password_file: None,
            sentinel_user: None,
            sentinel_master: "mymaster".into(),
            min_replicas: 0,
        }
    }
}

/// Opens the configured backend (call it inside a tokio runtime). The Redis backend connects
/// lazily, so this succeeds while the server is down; the SQLite backend creates the file and
/// its tables.
pub fn open(config: &StoreConfig, clock: Clock) -> Result<Arc<dyn Store>> {
    Ok(match config.backend {
        Backend::Sqlite => Arc::new(sqlite::SqliteStore::open(
            &config.path,
            config.synchronous,
            config.timeout,
            clock,
        )?),
        Backend::Redis => Arc::new(redis::RedisStore::new(config, clock)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_wildcards_follow_pymilter() {
        assert_eq!(
            domain_candidates("bif.foo.bar"),
            ["bif.foo.bar", "*.foo.bar", "*.bar"]
        );
        assert_eq!(domain_candidates("foo.info"), ["foo.info", "*.info"]);
        assert_eq!(domain_candidates("localhost"), ["localhost"]);
        assert_eq!(
            domain_candidates("a.b.example.com"),
            [
                "a.b.example.com",
                "*.b.example.com",
                "*.example.com",
                "*.com"
            ]
        );
    }

    #[test]
    fn ip_grouping() {
        let opts = GreylistOptions::default();
        let t = Triplet::new("192.0.2.77", "A@X.example", "b@y.example", &opts);
        assert_eq!(t.client, "192.0.2.0/24");
        assert_eq!(t.sender, "a@x.example");
        let t = Triplet::new("2001:db8:1:2:3:4:5:6", "", "", &opts);
        assert_eq!(t.client, "2001:db8:1:2::/64");
        let exact = GreylistOptions {
            ipv4_prefix: 32,
            ..opts
        };
        assert_eq!(
            Triplet::new("192.0.2.77", "", "", &exact).client,
            "192.0.2.77/32"
        );
        assert_eq!(
            Triplet::new("Example.COM", "", "", &exact).client,
            "example.com"
        );
    }

    #[test]
    fn values_round_trip_as_json() {
        let int = Value::Scalar(Scalar::Int(5));
        assert_eq!(int.encode().unwrap(), "5");
        let s = Value::Scalar(Scalar::Str("5".into()));
        assert_eq!(Value::decode(&s.encode().unwrap()).unwrap(), s);
        let f = Value::Scalar(Scalar::Num(2.5));
        assert_eq!(Value::decode(&f.encode().unwrap()).unwrap(), f);
        assert!(Value::Scalar(Scalar::Num(f64::NAN)).encode().is_err());
    }
}
