//! The embedded backend: one SQLite file in WAL mode.
//!
//! Writes go to one dedicated writer thread that owns the only writing connection. It takes
//! every queued write, runs each in its own savepoint inside one transaction, commits, and only
//! then answers the callers (group commit: one fsync for a burst of writes). A write is
//! acknowledged after its COMMIT returned, so with `synchronous=FULL` it survives power loss,
//! and with `synchronous=NORMAL` (WAL) it survives `kill -9` of the daemon: the committed WAL
//! frames are in the kernel's page cache, which outlives the process.
//!
//! Reads run on tokio's blocking pool over a small pool of read-only connections; WAL lets them
//! proceed while the writer commits. Expired rows are filtered out by every read and swept by
//! the writer about once a minute.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, ffi, params};
use tokio::sync::oneshot;

use super::{
    Clock, DecayRecord, Decayed, GreylistEntry, GreylistOptions, GreylistVerdict, List, ListEntry,
    Result, StoreError, Synchronous, Triplet, Value, decay_keep, greylist_step, with_timeout,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, value TEXT NOT NULL, expires INTEGER) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (key TEXT NOT NULL, at INTEGER NOT NULL, expires INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS events_key_at ON events (key, at);
CREATE TABLE IF NOT EXISTS decaying (
    key TEXT PRIMARY KEY, record TEXT NOT NULL, expires INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS greylist (
    client TEXT NOT NULL, sender TEXT NOT NULL, rcpt TEXT NOT NULL,
    first INTEGER NOT NULL, last INTEGER NOT NULL, passes INTEGER NOT NULL,
    expires INTEGER NOT NULL, PRIMARY KEY (client, sender, rcpt)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS greylist_clients (
    client TEXT PRIMARY KEY, passes INTEGER NOT NULL, expires INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS lists (
    list TEXT NOT NULL, entry TEXT NOT NULL, reason TEXT NOT NULL,
    created INTEGER NOT NULL, expires INTEGER, PRIMARY KEY (list, entry)) WITHOUT ROWID;
";

/// Tables with an `expires` column, swept by the writer.
const EXPIRING: [&str; 6] = [
    "kv",
    "events",
    "decaying",
    "greylist",
    "greylist_clients",
    "lists",
];

/// How often (store clock, ms) the writer deletes expired rows.
const SWEEP_EVERY_MS: i64 = 60_000;
/// Most writes committed in one transaction.
const MAX_BATCH: usize = 256;
/// Most idle read connections kept.
const READ_POOL: usize = 8;

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// `message` (a failure on `conn`) with the database file and the OS error behind it, where
/// there is one: SQLite's own "disk I/O error" names neither, and it answers a read that failed
/// with EIO "database disk image is malformed" (a failing disk can return garbage too).
fn explain(conn: &Connection, message: &str) -> String {
    let path = conn.path().unwrap_or("the store database");
    let io_errors = [ffi::SQLITE_IOERR, ffi::SQLITE_CANTOPEN].map(ffi::code_to_str);
    // SAFETY: `conn` holds the handle open; this reads the errno SQLite saved at its last I/O
    // or open error on it (0 if none), which is this failure's when `message` is of that kind.
    let errno = unsafe { ffi::sqlite3_system_errno(conn.handle()) };
    if errno != 0 && io_errors.contains(&message) {
        let os = std::io::Error::from_raw_os_error(errno);
        return format!("{path}: {message}: {os}");
    }
    if message == ffi::code_to_str(ffi::SQLITE_CORRUPT) {
        return match read_header(Path::new(path)) {
            Err(os) => format!("{path}: {os} (SQLite: {message})"),
            Ok(()) => format!("{path}: {message} (or a read error: see the kernel log)"),
        };
    }
    format!("{path}: {message}")
}

/// Why a connection to `path` did not open: the OS error when the file itself does not open,
/// else SQLite's reason ("unable to open database file: PATH").
fn open_failure(path: &Path, error: rusqlite::Error) -> StoreError {
    match std::fs::File::open(path) {
        Err(os) => StoreError::Unavailable(format!("{}: {os}", path.display())),
        Ok(_) => error.into(),
    }
}

/// Reads the database header of `path` (from the page cache, most often).
fn read_header(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    std::fs::File::open(path)?.read_exact_at(&mut [0; 100], 0)
}

/// [`explain`] for a store result.
fn explained<T>(conn: &Connection, result: Result<T>) -> Result<T> {
    result.map_err(|e| match e {
        StoreError::Unavailable(message) => StoreError::Unavailable(explain(conn, &message)),
        other => other,
    })
}

/// A write whose result waits for the batch's COMMIT.
trait Pending: Send {
    fn finish(self: Box<Self>, commit: std::result::Result<(), String>);
}

/// A queued write: runs inside the writer's transaction, or is failed without running.
trait WriteJob: Send {
    fn run(self: Box<Self>, conn: &Connection, now: i64) -> Box<dyn Pending>;
    fn fail(self: Box<Self>, error: String);
}

struct Op<T, F> {
    f: F,
    reply: oneshot::Sender<Result<T>>,
}

struct Done<T> {
    result: Result<T>,
    reply: oneshot::Sender<Result<T>>,
}

impl<T: Send + 'static, F> WriteJob for Op<T, F>
where
    F: FnOnce(&Connection, i64) -> Result<T> + Send,
{
    fn run(self: Box<Self>, conn: &Connection, now: i64) -> Box<dyn Pending> {
        let Op { f, reply } = *self;
        let result = conn
            .execute_batch("SAVEPOINT job")
            .map_err(StoreError::from)
            .and_then(|()| {
                let result = f(conn, now);
                let end = if result.is_ok() {
                    "RELEASE job"
                } else {
                    "ROLLBACK TO job; RELEASE job"
                };
                conn.execute_batch(end)?;
                result
            });
        let result = explained(conn, result);
        Box::new(Done { result, reply })
    }

    fn fail(self: Box<Self>, error: String) {
        let _ = self.reply.send(Err(StoreError::Unavailable(error)));
    }
}

impl<T: Send> Pending for Done<T> {
    fn finish(self: Box<Self>, commit: std::result::Result<(), String>) {
        let result = match commit {
            Ok(()) => self.result,
            Err(e) => Err(StoreError::Unavailable(e)),
        };
        let _ = self.reply.send(result);
    }
}

/// The writer thread: batches queued writes into transactions until the store is dropped.
fn writer_loop(conn: Connection, jobs: mpsc::Receiver<Box<dyn WriteJob>>, clock: Clock) {
    let mut last_sweep = i64::MIN;
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let now = clock();
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let e = explain(&conn, &e.to_string());
            batch.into_iter().for_each(|job| job.fail(e.clone()));
            continue;
        }
        if now.saturating_sub(last_sweep) >= SWEEP_EVERY_MS {
            let swept = EXPIRING.iter().try_for_each(|table| {
                conn.execute(&format!("DELETE FROM {table} WHERE expires <= ?1"), [now])
                    .map(drop)
            });
            match swept {
                Ok(()) => last_sweep = now,
                Err(e) => tracing::warn!("store sweep failed: {}", explain(&conn, &e.to_string())),
            }
        }
        let pending: Vec<_> = batch.into_iter().map(|job| job.run(&conn, now)).collect();
        let commit = conn.execute_batch("COMMIT").map_err(|e| {
            let e = explain(&conn, &e.to_string());
            let _ = conn.execute_batch("ROLLBACK");
            e
        });
        for p in pending {
            p.finish(commit.clone());
        }
    }
}

/// The embedded SQLite store.
pub struct SqliteStore {
    path: PathBuf,
    writer: mpsc::Sender<Box<dyn WriteJob>>,
    readers: Arc<Mutex<Vec<Connection>>>,
    timeout: Duration,
    clock: Clock,
}

impl SqliteStore {
    /// Opens (creating if needed) the store file, sets WAL and `synchronous`, creates the tables
    /// and starts the writer thread.
    pub fn open(
        path: &Path,
        synchronous: Synchronous,
        timeout: Duration,
        clock: Clock,
    ) -> Result<SqliteStore> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(timeout)?;
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))?;
        let sync = match synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync)?;
        conn.execute_batch(SCHEMA)?;
        let (tx, rx) = mpsc::channel();
        let writer_clock = clock.clone();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(conn, rx, writer_clock))
            .map_err(|e| StoreError::Unavailable(format!("cannot start writer thread: {e}")))?;
        Ok(SqliteStore {
            path: path.to_path_buf(),
            writer: tx,
            readers: Arc::default(),
            timeout,
            clock,
        })
    }

    /// Queues `f` on the writer thread and waits for its committed result.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, i64) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn WriteJob> = Box::new(Op { f, reply });
        if self.writer.send(job).is_err() {
            return Err(StoreError::Unavailable("store writer has stopped".into()));
        }
        with_timeout(self.timeout, async {
            answer
                .await
                .unwrap_or_else(|_| Err(StoreError::Unavailable("store writer has stopped".into())))
        })
        .await
    }

    /// Runs `f` on a pooled read-only connection on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, i64) -> Result<T> + Send + 'static,
    {
        let now = (self.clock)();
        let path = self.path.clone();
        let pool = self.readers.clone();
        let timeout = self.timeout;
        let task = tokio::task::spawn_blocking(move || {
            let pooled = pool.lock().ok().and_then(|mut p| p.pop());
            let conn = match pooled {
                Some(c) => c,
                None => {
                    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
                    let c = Connection::open_with_flags(&path, flags)
                        .map_err(|e| open_failure(&path, e))?;
                    c.busy_timeout(timeout)?;
                    c
                }
            };
            let result = explained(&conn, f(&conn, now));
            if let Ok(mut p) = pool.lock()
                && p.len() < READ_POOL
            {
                p.push(conn);
            }
            result
        });
        with_timeout(self.timeout, async {
            task.await
                .unwrap_or_else(|e| Err(StoreError::Unavailable(format!("store reader: {e}"))))
        })
        .await
    }
}

fn live_int(conn: &Connection, key: &str, now: i64) -> Result<Option<i64>> {
    let text: Option<String> = conn
        .query_row(
            "SELECT value FROM kv WHERE key = ?1 AND (expires IS NULL OR expires > ?2)",
            params![key, now],
            |r| r.get(0),
        )
        .optional()?;
    text.map(|t| {
        t.parse::<i64>()
            .map_err(|_| StoreError::Invalid(format!("{key} does not hold an integer")))
    })
    .transpose()
}

/// Stores the encoded value `text` at `key` until `expires` (unix ms; `None` for never).
fn put(conn: &Connection, key: &str, text: &str, expires: Option<i64>) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO kv (key, value, expires) VALUES (?1, ?2, ?3)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires = excluded.expires",
    )?
    .execute(params![key, text, expires])?;
    Ok(())
}

/// Adds `by` to the integer at `key` and returns the sum; a new key expires at `expires`, an
/// existing one keeps its expiry.
fn add(conn: &Connection, key: &str, by: i64, expires: Option<i64>, now: i64) -> Result<i64> {
    match live_int(conn, key, now)? {
        Some(old) => {
            let new = old
                .checked_add(by)
                .ok_or_else(|| StoreError::Invalid("integer overflow".into()))?;
            conn.prepare_cached("UPDATE kv SET value = ?2 WHERE key = ?1")?
                .execute(params![key, new.to_string()])?;
            Ok(new)
        }
        None => {
            put(conn, key, &by.to_string(), expires)?;
            Ok(by)
        }
    }
}

fn live_decay(conn: &Connection, key: &str, now: i64) -> Result<DecayRecord> {
    let text: Option<String> = conn
        .query_row(
            "SELECT record FROM decaying WHERE key = ?1 AND expires > ?2",
            params![key, now],
            |r| r.get(0),
        )
        .optional()?;
    text.map_or(Ok(DecayRecord::default()), |t| {
        serde_json::from_str(&t)
            .map_err(|e| StoreError::Invalid(format!("decaying record {key}: {e}")))
    })
}

fn entry_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ListEntry> {
    Ok(ListEntry {
        entry: r.get(0)?,
        reason: r.get(1)?,
        created: r.get(2)?,
        expires: r.get(3)?,
    })
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2)
}

#[async_trait]
impl super::Store for SqliteStore {
    async fn get(&self, key: &str) -> Result<Option<Value>> {
        let key = key.to_string();
        let text: Option<String> = self
            .read(move |c, now| {
                Ok(c.query_row(
                    "SELECT value FROM kv WHERE key = ?1 AND (expires IS NULL OR expires > ?2)",
                    params![key, now],
                    |r| r.get(0),
                )
                .optional()?)
            })
            .await?;
        text.map(|t| Value::decode(&t)).transpose()
    }

    async fn set(&self, key: &str, value: &Value, ttl: Option<Duration>) -> Result<()> {
        let (key, text) = (key.to_string(), value.encode()?);
        self.write(move |c, now| put(c, &key, &text, ttl.map(|t| now + ms(t))))
            .await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let key = key.to_string();
        self.write(move |c, now| {
            let n = c.execute(
                "DELETE FROM kv WHERE key = ?1 AND (expires IS NULL OR expires > ?2)",
                params![key, now],
            )?;
            c.execute("DELETE FROM kv WHERE key = ?1", params![key])?;
            Ok(n > 0)
        })
        .await
    }

    async fn incr(&self, key: &str, by: i64, ttl: Option<Duration>) -> Result<i64> {
        let key = key.to_string();
        self.write(move |c, now| add(c, &key, by, ttl.map(|t| now + ms(t)), now))
            .await
    }

    async fn set_indexed(
        &self,
        index: &str,
        entry: &Value,
        values: &[(String, Value)],
        ttl: Option<Duration>,
    ) -> Result<i64> {
        let (index, entry) = (index.to_string(), entry.encode()?);
        let values = values
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.encode()?)))
            .collect::<Result<Vec<_>>>()?;
        self.write(move |c, now| {
            let expires = ttl.map(|t| now + ms(t));
            let n = add(c, &index, 1, expires, now)?;
            put(c, &format!("{index}:{n}"), &entry, expires)?;
            for (key, text) in &values {
                put(c, key, text, expires)?;
            }
            Ok(n)
        })
        .await
    }

    async fn expire(&self, key: &str, ttl: Duration) -> Result<bool> {
        let key = key.to_string();
        self.write(move |c, now| {
            let n = c.execute(
                "UPDATE kv SET expires = ?3 WHERE key = ?1 AND (expires IS NULL OR expires > ?2)",
                params![key, now, now + ms(ttl)],
            )?;
            Ok(n > 0)
        })
        .await
    }

    async fn count(&self, key: &str, window: Duration) -> Result<i64> {
        let key = key.to_string();
        let window = ms(window);
        self.write(move |c, now| {
            c.execute(
                "DELETE FROM events WHERE key = ?1 AND at <= ?2",
                params![key, now - window],
            )?;
            c.execute(
                "INSERT INTO events (key, at, expires) VALUES (?1, ?2, ?3)",
                params![key, now, now + window],
            )?;
            Ok(c.query_row(
                "SELECT count(*) FROM events WHERE key = ?1",
                params![key],
                |r| r.get(0),
            )?)
        })
        .await
    }

    async fn decay(&self, key: &str, half_life: Duration, add: &Decayed) -> Result<Decayed> {
        let (key, add) = (key.to_string(), add.clone());
        if add.is_empty() {
            return self
                .read(move |c, now| Ok(live_decay(c, &key, now)?.step(now, half_life, &add).v))
                .await;
        }
        self.write(move |c, now| {
            let record = live_decay(c, &key, now)?.step(now, half_life, &add);
            let text = serde_json::to_string(&record)
                .map_err(|e| StoreError::Invalid(format!("decaying record {key}: {e}")))?;
            c.execute(
                "INSERT OR REPLACE INTO decaying (key, record, expires) VALUES (?1, ?2, ?3)",
                params![key, text, now + ms(decay_keep(half_life))],
            )?;
            Ok(record.v)
        })
        .await
    }

    async fn greylist_triplet(
        &self,
        triplet: &Triplet,
        opts: &GreylistOptions,
    ) -> Result<GreylistVerdict> {
        let (t, opts) = (triplet.clone(), opts.clone());
        self.write(move |c, now| {
            let record: Option<(i64, i64)> = c
                .query_row(
                    "SELECT first, passes FROM greylist
                     WHERE client = ?1 AND sender = ?2 AND rcpt = ?3 AND expires > ?4",
                    params![t.client, t.sender, t.rcpt, now],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let auto = opts.auto_pass > 0
                && c.query_row(
                    "SELECT passes FROM greylist_clients WHERE client = ?1 AND expires > ?2",
                    params![t.client, now],
                    |r| r.get::<_, i64>(0),
                )
                .optional()?
                .is_some_and(|p| p >= i64::from(opts.auto_pass));
            let step = greylist_step(record, now, auto, &opts);
            c.execute(
                "INSERT OR REPLACE INTO greylist
                 (client, sender, rcpt, first, last, passes, expires)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    t.client,
                    t.sender,
                    t.rcpt,
                    step.first,
                    now,
                    step.passes,
                    step.expires
                ],
            )?;
            if opts.auto_pass > 0 && matches!(step.verdict, GreylistVerdict::Pass { .. }) {
                c.execute(
                    "INSERT INTO greylist_clients (client, passes, expires) VALUES (?1, 1, ?2)
                     ON CONFLICT (client) DO UPDATE SET expires = excluded.expires,
                     passes = CASE WHEN greylist_clients.expires > ?3
                              THEN greylist_clients.passes + 1 ELSE 1 END",
                    params![t.client, now + ms(opts.lifetime), now],
                )?;
            }
            Ok(step.verdict)
        })
        .await
    }

    async fn greylist_entries(&self) -> Result<Vec<GreylistEntry>> {
        self.read(|c, now| {
            let mut stmt = c.prepare(
                "SELECT client, sender, rcpt, first, last, passes FROM greylist
                 WHERE expires > ?1 ORDER BY client, sender, rcpt",
            )?;
            let rows = stmt.query_map(params![now], |r| {
                Ok(GreylistEntry {
                    client: r.get(0)?,
                    sender: r.get(1)?,
                    rcpt: r.get(2)?,
                    first: r.get(3)?,
                    last: r.get(4)?,
                    passes: r.get(5)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn list_put(&self, list: List, entry: ListEntry) -> Result<()> {
        self.write(move |c, _| {
            c.execute(
                "INSERT OR REPLACE INTO lists (list, entry, reason, created, expires)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    list.name(),
                    entry.entry,
                    entry.reason,
                    entry.created,
                    entry.expires
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn list_delete(&self, list: List, entry: &str) -> Result<bool> {
        let entry = entry.to_string();
        self.write(move |c, now| {
            let n = c.execute(
                "DELETE FROM lists WHERE list = ?1 AND entry = ?2
                 AND (expires IS NULL OR expires > ?3)",
                params![list.name(), entry, now],
            )?;
            c.execute(
                "DELETE FROM lists WHERE list = ?1 AND entry = ?2",
                params![list.name(), entry],
            )?;
            Ok(n > 0)
        })
        .await
    }

    async fn list_first(&self, list: List, entries: &[String]) -> Result<Option<ListEntry>> {
        let entries = entries.to_vec();
        self.read(move |c, now| {
            let mut stmt = c.prepare_cached(
                "SELECT entry, reason, created, expires FROM lists
                 WHERE list = ?1 AND entry = ?2 AND (expires IS NULL OR expires > ?3)",
            )?;
            for e in &entries {
                let found = stmt
                    .query_row(params![list.name(), e, now], entry_from_row)
                    .optional()?;
                if found.is_some() {
                    return Ok(found);
                }
            }
            Ok(None)
        })
        .await
    }

    async fn list_all(&self, list: List) -> Result<Vec<ListEntry>> {
        self.read(move |c, now| {
            let mut stmt = c.prepare(
                "SELECT entry, reason, created, expires FROM lists
                 WHERE list = ?1 AND (expires IS NULL OR expires > ?2)",
            )?;
            let rows = stmt.query_map(params![list.name(), now], entry_from_row)?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    fn now(&self) -> i64 {
        (self.clock)()
    }
}
