//! The shared backend: a Redis server (≥ 7.0) used by several MX hosts.
//!
//! One lazily connecting link to the master ([`Link`]: the daemon starts while Redis is down; it
//! reconnects by itself and follows a Sentinel failover) with short connection and response
//! timeouts, plus the per-call timeout.
//! Every operation that reads and writes is one server-side Lua script, so it is atomic across
//! hosts.
//!
//! Key layout under the configured prefix `P`: `P kv:<key>` (JSON value, plain integers for
//! counters, so `redis-cli GET` shows them), `P count:<key>` (sorted set of event times),
//! `P grey:<client>|<sender>|<rcpt>` (JSON record), `P greyclient:<client>` (passes),
//! `P list:<list>:<entry>` (JSON reason and creation time), `P decay:<key>` (JSON decaying
//! amounts and the time they were last updated), `P seq` (event id sequence).
//!
//! Expiry: keys carry a native `PEXPIREAT` computed from the store's clock, and the scripts also
//! compare `PEXPIRETIME` with the clock passed as an argument. With the system clock both agree;
//! with a test clock that runs ahead, the logical check expires keys that Redis still holds.

use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use redis::{Script, ScriptInvocation};
use serde::{Deserialize, Serialize};

use super::redis_link::{Link, Request};
use super::{
    Clock, Decayed, GreylistEntry, GreylistOptions, GreylistVerdict, List, ListEntry, Result,
    Store, StoreConfig, StoreError, Triplet, Value, decay_keep, with_timeout,
};

/// Shared by every script: is `k` present and not expired at `now`? Deletes it if expired.
/// Returns its expiry (ms, -1 for none) or false.
const LIVE: &str = r"
local function live(k, now)
  local e = redis.call('PEXPIRETIME', k)
  if e == -2 then return false end
  if e >= 0 and e <= now then redis.call('DEL', k) return false end
  return e
end
local now = tonumber(ARGV[1])
";

fn script(body: &str) -> Script {
    Script::new(&format!("{LIVE}{body}"))
}

/// KEYS: string keys. Returns value, expiry pairs (nil, nil when absent).
static READ: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local out = {}
for i, k in ipairs(KEYS) do
  local e = live(k, now)
  if e then
    out[2 * i - 1] = redis.call('GET', k)
    out[2 * i] = e
  else
    out[2 * i - 1] = false
    out[2 * i] = false
  end
end
return out",
    )
});

static DELETE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local existed = live(KEYS[1], now)
redis.call('DEL', KEYS[1])
if existed then return 1 end
return 0",
    )
});

/// ARGV: now, by, ttl ms (0 = none).
static INCR: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local existed = live(KEYS[1], now)
local n = redis.call('INCRBY', KEYS[1], ARGV[2])
local ttl = tonumber(ARGV[3])
if not existed and ttl > 0 then redis.call('PEXPIREAT', KEYS[1], now + ttl) end
return n",
    )
});

/// `Store::set_indexed`. KEYS: the index counter, then the keys of the values. ARGV: now, ttl
/// ms (0 = none), the entry, then the values. The entry's key `<index>:<n>` is known only
/// inside the script (no cluster support is needed: one master holds every key).
static SET_INDEXED: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local ttl = tonumber(ARGV[2])
local function put(k, v)
  if ttl > 0 then redis.call('SET', k, v, 'PXAT', now + ttl) else redis.call('SET', k, v) end
end
local existed = live(KEYS[1], now)
local n = redis.call('INCR', KEYS[1])
if not existed and ttl > 0 then redis.call('PEXPIREAT', KEYS[1], now + ttl) end
put(KEYS[1] .. ':' .. n, ARGV[3])
for i = 2, #KEYS do put(KEYS[i], ARGV[i + 2]) end
return n",
    )
});

/// ARGV: now, ttl ms.
static EXPIRE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
if live(KEYS[1], now) then
  redis.call('PEXPIREAT', KEYS[1], now + tonumber(ARGV[2]))
  return 1
end
return 0",
    )
});

/// KEYS: the sorted set, the sequence. ARGV: now, window ms.
static COUNT: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZADD', KEYS[1], now, redis.call('INCR', KEYS[2]))
redis.call('PEXPIREAT', KEYS[1], now + window)
return redis.call('ZCARD', KEYS[1])",
    )
});

/// The rule of `super::DecayRecord::step`, run atomically inside Redis.
/// KEYS: the record. ARGV: now, half-life ms, keep ms, amounts to add (JSON object).
/// Returns the decayed amounts (JSON object); writes only when something is added.
static DECAY: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local half, keep, add = tonumber(ARGV[2]), tonumber(ARGV[3]), cjson.decode(ARGV[4])
local rec = { at = now, v = {} }
if live(KEYS[1], now) then rec = cjson.decode(redis.call('GET', KEYS[1])) end
local factor = 0.5 ^ (math.max(0, now - rec.at) / half)
local out, added = {}, false
for k, x in pairs(rec.v) do out[k] = x * factor end
for k, x in pairs(add) do out[k] = (out[k] or 0) + x added = true end
if added then
  redis.call('SET', KEYS[1], cjson.encode({ at = now, v = out }), 'PXAT', now + keep)
end
if next(out) == nil then return '{}' end
return cjson.encode(out)",
    )
});

/// The rules of `super::greylist_step`, ported to run atomically inside Redis.
/// KEYS: triplet, client. ARGV: now, delay, window, lifetime, auto_pass, client, sender, rcpt.
/// Returns {1, passes} or {0, ms to wait}.
static GREYLIST: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local delay, window, lifetime, auto =
  tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local rec = nil
if live(KEYS[1], now) then rec = cjson.decode(redis.call('GET', KEYS[1])) end
local is_auto = auto > 0 and live(KEYS[2], now) and tonumber(redis.call('GET', KEYS[2])) >= auto
local first, passes, expires, wait
if rec and (rec.passes > 0 or (now >= rec.first + delay and now < rec.first + window)) then
  first, passes, expires = rec.first, rec.passes + 1, now + lifetime
elseif is_auto then
  first, passes, expires = (rec and rec.first) or now, 1, now + lifetime
elseif rec and now < rec.first + delay then
  first, passes, expires, wait = rec.first, 0, rec.first + window, rec.first + delay - now
else
  first, passes, expires, wait = now, 0, now + window, delay
end
local record = cjson.encode({client = ARGV[6], sender = ARGV[7], rcpt = ARGV[8],
  first = first, last = now, passes = passes})
redis.call('SET', KEYS[1], record, 'PXAT', expires)
if wait then return {0, wait} end
if auto > 0 then
  if live(KEYS[2], now) then redis.call('INCR', KEYS[2]) else redis.call('SET', KEYS[2], 1) end
  redis.call('PEXPIREAT', KEYS[2], now + lifetime)
end
return {1, passes}",
    )
});

/// How a list entry is stored (the entry itself is in the key, the expiry is the key's).
#[derive(Serialize, Deserialize)]
struct StoredEntry {
    reason: String,
    created: i64,
}

/// Escapes glob characters for `SCAN MATCH`.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2)
}

/// The Redis store.
pub struct RedisStore {
    link: Link,
    prefix: String,
    timeout: Duration,
    clock: Clock,
}

impl RedisStore {
    /// Prepares the link without connecting (must run inside a tokio runtime).
    pub fn new(config: &StoreConfig, clock: Clock) -> Result<RedisStore> {
        Ok(RedisStore {
            link: Link::new(config)?,
            prefix: config.prefix.clone(),
            timeout: config.timeout,
            clock,
        })
    }

    fn key(&self, space: &str, key: &str) -> String {
        format!("{}{space}:{key}", self.prefix)
    }

    fn list_key(&self, list: List, entry: &str) -> String {
        format!("{}list:{}:{entry}", self.prefix, list.name())
    }

    /// Runs a script on the master within the call timeout; `write`s wait for replicas.
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        write: bool,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T> {
        let call = self.link.call(write, Request::Script(invocation));
        with_timeout(self.timeout, call).await
    }

    /// Runs a command on the master within the call timeout; `write`s wait for replicas.
    async fn query<T: redis::FromRedisValue>(&self, write: bool, cmd: &redis::Cmd) -> Result<T> {
        let call = self.link.call(write, Request::Command(cmd));
        with_timeout(self.timeout, call).await
    }

    /// Runs `script` with `keys` and `args` (the clock's `now` is prepended to `args`).
    async fn run<T: redis::FromRedisValue>(
        &self,
        write: bool,
        script: &Script,
        keys: &[String],
        args: &[i64],
    ) -> Result<T> {
        let mut invocation = script.prepare_invoke();
        for k in keys {
            invocation.key(k);
        }
        invocation.arg(self.now());
        for a in args {
            invocation.arg(a);
        }
        self.invoke(write, &invocation).await
    }

    /// Live values and expiries of string keys.
    async fn read(&self, keys: &[String]) -> Result<Vec<(Option<String>, Option<i64>)>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.run(false, &READ, keys, &[]).await
    }

    /// Live values and expiries of every key that starts with `prefix`.
    async fn scan(&self, prefix: &str) -> Result<Vec<(String, String, Option<i64>)>> {
        let pattern = format!("{}*", glob_escape(prefix));
        let mut cursor = 0u64;
        let mut out = Vec::new();
        loop {
            let scan = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .to_owned();
            let (next, keys): (u64, Vec<String>) = self.query(false, &scan).await?;
            for (key, (value, expires)) in keys.iter().zip(self.read(&keys).await?) {
                if let Some(value) = value {
                    out.push((key.clone(), value, expires.filter(|e| *e >= 0)));
                }
            }
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }
}

fn decode_entry(entry: String, value: &str, expires: Option<i64>) -> Result<ListEntry> {
    let stored: StoredEntry = serde_json::from_str(value)
        .map_err(|e| StoreError::Invalid(format!("list entry {entry}: {e}")))?;
    Ok(ListEntry {
        entry,
        reason: stored.reason,
        created: stored.created,
        expires,
    })
}

#[async_trait]
impl Store for RedisStore {
    async fn get(&self, key: &str) -> Result<Option<Value>> {
        let found = self.read(&[self.key("kv", key)]).await?;
        match found.into_iter().next() {
            Some((Some(text), _)) => Value::decode(&text).map(Some),
            _ => Ok(None),
        }
    }

    async fn set(&self, key: &str, value: &Value, ttl: Option<Duration>) -> Result<()> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key("kv", key)).arg(value.encode()?);
        if let Some(ttl) = ttl {
            cmd.arg("PXAT").arg(self.now() + ms(ttl));
        }
        self.query(true, &cmd).await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        self.run(true, &DELETE, &[self.key("kv", key)], &[]).await
    }

    async fn incr(&self, key: &str, by: i64, ttl: Option<Duration>) -> Result<i64> {
        let ttl = ttl.map_or(0, ms);
        self.run(true, &INCR, &[self.key("kv", key)], &[by, ttl])
            .await
    }

    async fn set_indexed(
        &self,
        index: &str,
        entry: &Value,
        values: &[(String, Value)],
        ttl: Option<Duration>,
    ) -> Result<i64> {
        let mut invocation = SET_INDEXED.prepare_invoke();
        invocation.key(self.key("kv", index));
        for (key, _) in values {
            invocation.key(self.key("kv", key));
        }
        invocation
            .arg(self.now())
            .arg(ttl.map_or(0, ms))
            .arg(entry.encode()?);
        for (_, value) in values {
            invocation.arg(value.encode()?);
        }
        self.invoke(true, &invocation).await
    }

    async fn expire(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.run(true, &EXPIRE, &[self.key("kv", key)], &[ms(ttl)])
            .await
    }

    async fn count(&self, key: &str, window: Duration) -> Result<i64> {
        let keys = [self.key("count", key), format!("{}seq", self.prefix)];
        self.run(true, &COUNT, &keys, &[ms(window)]).await
    }

    async fn decay(&self, key: &str, half_life: Duration, add: &Decayed) -> Result<Decayed> {
        let add_is_empty = add.is_empty();
        let add = serde_json::to_string(add)
            .map_err(|e| StoreError::Invalid(format!("decaying amounts: {e}")))?;
        let mut invocation = DECAY.prepare_invoke();
        invocation
            .key(self.key("decay", key))
            .arg(self.now())
            .arg(ms(half_life).max(1))
            .arg(ms(decay_keep(half_life)).max(1))
            .arg(add);
        let text: String = self.invoke(!add_is_empty, &invocation).await?;
        serde_json::from_str(&text)
            .map_err(|e| StoreError::Invalid(format!("decaying record {key}: {e}")))
    }

    async fn greylist_triplet(
        &self,
        t: &Triplet,
        opts: &GreylistOptions,
    ) -> Result<GreylistVerdict> {
        let keys = [
            self.key("grey", &format!("{}|{}|{}", t.client, t.sender, t.rcpt)),
            self.key("greyclient", &t.client),
        ];
        let mut invocation = GREYLIST.prepare_invoke();
        for k in &keys {
            invocation.key(k);
        }
        invocation
            .arg(self.now())
            .arg(ms(opts.delay))
            .arg(ms(opts.retry_window))
            .arg(ms(opts.lifetime))
            .arg(opts.auto_pass)
            .arg(&t.client)
            .arg(&t.sender)
            .arg(&t.rcpt);
        let (passed, n): (i64, i64) = self.invoke(true, &invocation).await?;
        Ok(if passed == 1 {
            GreylistVerdict::Pass { passes: n }
        } else {
            GreylistVerdict::Wait {
                secs: (n.max(0) as u64).div_ceil(1000),
            }
        })
    }

    async fn greylist_entries(&self) -> Result<Vec<GreylistEntry>> {
        let mut entries = self
            .scan(&format!("{}grey:", self.prefix))
            .await?
            .into_iter()
            .map(|(key, value, _)| {
                serde_json::from_str(&value)
                    .map_err(|e| StoreError::Invalid(format!("greylist record {key}: {e}")))
            })
            .collect::<Result<Vec<GreylistEntry>>>()?;
        entries
            .sort_by(|a, b| (&a.client, &a.sender, &a.rcpt).cmp(&(&b.client, &b.sender, &b.rcpt)));
        Ok(entries)
    }

    async fn list_put(&self, list: List, entry: ListEntry) -> Result<()> {
        let stored = StoredEntry {
            reason: entry.reason,
            created: entry.created,
        };
        let text =
            serde_json::to_string(&stored).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.list_key(list, &entry.entry)).arg(text);
        if let Some(expires) = entry.expires {
            cmd.arg("PXAT").arg(expires);
        }
        self.query(true, &cmd).await
    }

    async fn list_delete(&self, list: List, entry: &str) -> Result<bool> {
        self.run(true, &DELETE, &[self.list_key(list, entry)], &[])
            .await
    }

    async fn list_first(&self, list: List, entries: &[String]) -> Result<Option<ListEntry>> {
        let keys: Vec<String> = entries.iter().map(|e| self.list_key(list, e)).collect();
        let found = self.read(&keys).await?;
        for (entry, (value, expires)) in entries.iter().zip(found) {
            if let Some(value) = value {
                let expires = expires.filter(|e| *e >= 0);
                return decode_entry(entry.clone(), &value, expires).map(Some);
            }
        }
        Ok(None)
    }

    async fn list_all(&self, list: List) -> Result<Vec<ListEntry>> {
        let prefix = self.list_key(list, "");
        self.scan(&prefix)
            .await?
            .into_iter()
            .map(|(key, value, expires)| {
                decode_entry(key[prefix.len()..].to_string(), &value, expires)
            })
            .collect()
    }

    fn now(&self) -> i64 {
        (self.clock)()
    }
}
