//! The mail archive: whole messages written to a Maildir by one writer thread behind a bounded
//! queue. The writer takes every message waiting (up to [`MAX_BATCH`]), writes each to `tmp/`,
//! makes them durable with one `syncfs`, renames them into `new/` and fsyncs that directory
//! once: a reader never sees half a message, and a message is counted archived only once it is
//! durable in `new/`.
//! Handing a message over never waits: when the queue is full, or the disk refuses a write,
//! the message is counted as lost and a warning is logged at most once per interval.

use crate::throttle::Throttle;
use serde::Deserialize;
use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// Most messages the writer makes durable with one fsync of `new/`.
pub const MAX_BATCH: usize = 64;

/// `[archive]`: where accepted messages are kept.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveConfig {
    /// The Maildir (created with its `tmp`, `new` and `cur` if missing); relative to the config
    /// file's directory. None: no archive.
    pub maildir: Option<PathBuf>,
    /// Messages waiting for the writer; more are lost (and counted).
    pub queue: usize,
    /// The least time between two warnings about lost messages.
    #[serde(deserialize_with = "crate::duration::serde_duration::deserialize")]
    pub warn_interval: Duration,
}

impl Default for ArchiveConfig {
    fn default() -> ArchiveConfig {
        ArchiveConfig {
            maildir: None,
            queue: 256,
            warn_interval: Duration::from_secs(60),
        }
    }
}

/// Why a message was not taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArchiveError {
    /// No `[archive] maildir` is configured.
    #[error("no [archive] maildir is configured")]
    Off,
    /// The writer's queue is full; the message is lost.
    #[error("the archive queue is full")]
    Full,
}

impl ArchiveError {
    /// The short stable word the Lua module returns.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Full => "full",
        }
    }
}

/// Counters shared by the hand-over side and the writer, also exported as metrics.
#[derive(Debug)]
struct Tally {
    archived: AtomicU64,
    lost: AtomicU64,
    archived_series: metrics::Counter,
    lost_series: metrics::Counter,
    warnings: Throttle,
}

impl Tally {
    fn new(interval: Duration) -> Tally {
        let (archived_series, lost_series) = crate::metrics::archive_messages();
        Tally {
            archived: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            archived_series,
            lost_series,
            warnings: Throttle::new(interval),
        }
    }

    /// Counts `n` messages made durable in `new/`.
    fn archived(&self, n: u64) {
        self.archived.fetch_add(n, Ordering::Relaxed);
        self.archived_series.increment(n);
    }

    /// Counts one lost message and warns unless a warning was logged within the interval.
    fn lose(&self, why: &str) {
        let lost = self.lost.fetch_add(1, Ordering::Relaxed) + 1;
        self.lost_series.increment(1);
        if self.warnings.due() {
            tracing::warn!(lost, reason = why, "archive: message not archived");
        }
    }
}

/// The archive of one daemon: a queue to the writer thread, or nothing when off.
#[derive(Debug)]
pub struct Archive {
    queue: Option<SyncSender<Vec<u8>>>,
    tally: Arc<Tally>,
}

impl Archive {
    /// Opens the archive of `config` (relative paths from `base_dir`): creates the Maildir and
    /// starts the writer. No maildir: an archive that takes nothing.
    pub fn start(config: &ArchiveConfig, base_dir: &Path) -> io::Result<Archive> {
        let tally = Arc::new(Tally::new(config.warn_interval));
        let Some(dir) = &config.maildir else {
            return Ok(Archive { queue: None, tally });
        };
        let dir = base_dir.join(dir);
        for sub in ["tmp", "new", "cur"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let (queue, messages) = sync_channel(config.queue.max(1));
        let writer = Writer {
            dir,
            tally: Arc::clone(&tally),
            seq: 0,
            host: crate::services::site::system_hostname().replace(['/', ':'], "_"),
        };
        std::thread::Builder::new()
            .name("archive".into())
            .spawn(move || writer.run(messages))?;
        Ok(Archive {
            queue: Some(queue),
            tally,
        })
    }

    /// Hands `message` to the writer without waiting.
    pub fn save(&self, message: Vec<u8>) -> Result<(), ArchiveError> {
        let queue = self.queue.as_ref().ok_or(ArchiveError::Off)?;
        match queue.try_send(message) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.tally.lose("queue full");
                Err(ArchiveError::Full)
            }
        }
    }

    /// Messages lost so far (queue full or write failed).
    pub fn lost(&self) -> u64 {
        self.tally.lost.load(Ordering::Relaxed)
    }

    /// Messages durable in the Maildir's `new/` so far.
    pub fn archived(&self) -> u64 {
        self.tally.archived.load(Ordering::Relaxed)
    }
}

/// The writer thread's state.
struct Writer {
    dir: PathBuf,
    tally: Arc<Tally>,
    seq: u64,
    host: String,
}

impl Writer {
    /// Writes messages, every one waiting at a time, until every sender is gone.
    fn run(mut self, messages: Receiver<Vec<u8>>) {
        while let Ok(first) = messages.recv() {
            let mut batch = vec![first];
            batch.extend(messages.try_iter().take(MAX_BATCH - 1));
            self.write_batch(&batch);
        }
    }

    /// A Maildir file name: unique per host, process and message.
    fn file_name(&mut self) -> String {
        self.seq += 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        format!(
            "{}.M{}P{}Q{}.{}",
            now.as_secs(),
            now.subsec_micros(),
            std::process::id(),
            self.seq,
            self.host
        )
    }

    /// Writes each message to `tmp/`, makes them all durable with one `syncfs`, renames them
    /// into `new/`, then fsyncs `new/` once; a message that failed on the way is lost and
    /// leaves nothing in `tmp/`.
    fn write_batch(&mut self, batch: &[Vec<u8>]) {
        let tmp = self.dir.join("tmp");
        let mut written = Vec::with_capacity(batch.len());
        for message in batch {
            let name = self.file_name();
            match write_new(&tmp.join(&name), message) {
                Ok(()) => written.push(name),
                Err(e) => {
                    let _ = fs::remove_file(tmp.join(&name));
                    self.tally.lose(&e.to_string());
                }
            }
        }
        if written.is_empty() {
            return;
        }
        if let Err(e) = sync_filesystem(&tmp) {
            for name in &written {
                let _ = fs::remove_file(tmp.join(name));
                self.tally.lose(&e.to_string());
            }
            return;
        }
        let mut renamed = 0;
        for name in &written {
            match fs::rename(tmp.join(name), self.dir.join("new").join(name)) {
                Ok(()) => renamed += 1,
                Err(e) => {
                    let _ = fs::remove_file(tmp.join(name));
                    self.tally.lose(&e.to_string());
                }
            }
        }
        if renamed == 0 {
            return;
        }
        match File::open(self.dir.join("new")).and_then(|dir| dir.sync_all()) {
            Ok(()) => self.tally.archived(renamed),
            Err(e) => (0..renamed).for_each(|_| self.tally.lose(&e.to_string())),
        }
    }
}

/// Creates `path` with `content` (not yet durable).
fn write_new(path: &Path, content: &[u8]) -> io::Result<()> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?
        .write_all(content)
}

/// Flushes everything written to the filesystem holding `dir` to stable storage: one call for
/// a whole batch instead of an fsync per file.
fn sync_filesystem(dir: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let dir = File::open(dir)?;
    // SAFETY: syncfs only reads the descriptor, which stays open for the call.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files of `new/` once the archive counts `n` messages archived.
    fn wait_for(archive: &Archive, dir: &Path, n: u64) -> Vec<PathBuf> {
        for _ in 0..200 {
            if archive.archived() >= n {
                return fs::read_dir(dir.join("new"))
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .collect();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("no {n} messages archived in {}", dir.display());
    }

    #[test]
    fn writes_whole_messages_into_new() {
        let base = tempfile::tempdir().unwrap();
        let config = ArchiveConfig {
            maildir: Some("Maildir".into()),
            ..ArchiveConfig::default()
        };
        let archive = Archive::start(&config, base.path()).unwrap();
        archive
            .save(b"Subject: one\r\n\r\nbody 1\r\n".to_vec())
            .unwrap();
        archive
            .save(b"Subject: two\r\n\r\nbody 2\r\n".to_vec())
            .unwrap();
        let dir = base.path().join("Maildir");
        let files = wait_for(&archive, &dir, 2);
        let mut bodies: Vec<String> = files
            .iter()
            .map(|f| fs::read_to_string(f).unwrap())
            .collect();
        bodies.sort();
        assert_eq!(
            bodies,
            [
                "Subject: one\r\n\r\nbody 1\r\n",
                "Subject: two\r\n\r\nbody 2\r\n"
            ]
        );
        assert_eq!(fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
        assert_eq!((archive.archived(), archive.lost()), (2, 0));
    }

    #[test]
    fn a_full_queue_loses_the_copy_without_waiting() {
        // A queue of one with no writer draining it: the second message finds it full.
        let (queue, _messages) = sync_channel(1);
        let archive = Archive {
            queue: Some(queue),
            tally: Arc::new(Tally::new(Duration::from_secs(3600))),
        };
        assert_eq!(archive.save(b"one".to_vec()), Ok(()));
        assert_eq!(archive.save(b"two".to_vec()), Err(ArchiveError::Full));
        assert_eq!(archive.save(b"three".to_vec()), Err(ArchiveError::Full));
        assert_eq!(archive.lost(), 2);
    }

    #[test]
    fn off_without_a_maildir() {
        let base = tempfile::tempdir().unwrap();
        let archive = Archive::start(&ArchiveConfig::default(), base.path()).unwrap();
        assert_eq!(archive.save(b"x".to_vec()), Err(ArchiveError::Off));
    }
}
