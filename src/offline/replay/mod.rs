//! `luamilter replay CORPUS --config NEW --against OLD`: every message of a corpus through two
//! configurations, and what changed between them.
//!
//! The engine is `luamilter test`'s: each worker thread runs one in-process [`Milter`] per
//! configuration (built once, used for every message it is handed) on its own current-thread
//! runtime, and plays each message to both with [`mta::play`], as Postfix would. The corpus is
//! read lazily ([`corpus`]) by one thread and handed out over a bounded channel; results come
//! back to the main thread, which keeps counts and the first examples of each change only.
//! Memory is therefore the milters of each worker plus a few messages in flight, whatever the
//! size of the corpus.
//!
//! Stores are throwaway, one per configuration and worker (a copy of the configured SQLite file,
//! or empty): stateful policies (greylist, auto-whitelist, bans) see the messages a worker is
//! handed as a fresh MX would, and both configurations of a worker see the same messages in the
//! same order.

pub mod corpus;

use super::{
    StoreMode,
    capture::Capture,
    command::{self, Given, load_zones},
    message::Message,
    milter::Milter,
    mta::{self, StageMacros, Transcript},
    prepare_config, receiver,
    report::{Envelope, describe},
    resolver, runtime,
};
use crate::{cli::EX_CONFIG, config::Config, services::store};
use corpus::{Corpus, Item};
use serde::{Deserialize, Serialize};
use std::{
    collections::BTreeMap,
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, Mutex, mpsc},
    time::Instant,
};

/// Exit status: no message changed.
pub const EXIT_SAME: u8 = 0;
/// Exit status: some message changed (or replay could not run).
pub const EXIT_CHANGED: u8 = 1;
/// Exit status: a bad command line or corpus.
pub const EXIT_USAGE: u8 = 2;

/// Options of `luamilter replay`.
#[derive(Clone, Debug, clap::Args)]
pub struct ReplayArgs {
    /// The corpus: a directory of .eml files (recursively), a Maildir, an mbox file or one
    /// message file
    pub corpus: PathBuf,
    /// The new configuration
    #[arg(short, long, value_name = "NEW")]
    pub config: PathBuf,
    /// The configuration to compare with (the one in service)
    #[arg(long, value_name = "OLD")]
    pub against: PathBuf,
    /// Answer DNS from this zone file (or every *.zone file of a directory) and nothing else;
    /// repeatable
    #[arg(long, value_name = "FILE")]
    pub dns_zone: Vec<PathBuf>,
    /// Which store each configuration starts from: a throwaway copy of its configured one, or
    /// an empty one
    #[arg(long, value_enum, default_value = "copy")]
    pub store: StoreMode,
    /// Worker threads [default: the number of cores]
    #[arg(short, long, value_name = "N")]
    pub jobs: Option<usize>,
    /// Examples shown for each kind of change
    #[arg(long, value_name = "K", default_value_t = 3)]
    pub examples: usize,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

/// A sidecar envelope file, `NAME.env` beside `NAME.eml` (TOML).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sidecar {
    client: Option<IpAddr>,
    client_name: Option<String>,
    helo: Option<String>,
    from: Option<String>,
    #[serde(default)]
    rcpt: OneOrMany,
    auth: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl Sidecar {
    fn read(path: &Path) -> Result<Option<Given>, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: cannot read: {e}", path.display())),
        };
        let s: Sidecar = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Some(Given {
            client: s.client,
            client_name: s.client_name,
            helo: s.helo,
            from: s.from,
            rcpt: match s.rcpt {
                OneOrMany::None => Vec::new(),
                OneOrMany::One(r) => vec![r],
                OneOrMany::Many(r) => r,
            },
            auth: s.auth,
        }))
    }
}

/// What one configuration made of a message.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Outcome {
    /// accept, reject, tempfail, discard; "none" when nothing ended it.
    verdict: String,
    stage: String,
    reply: Option<String>,
    /// "reject at mail by block: 550 5.7.1 …".
    text: String,
    /// The answers to recipients that were refused or decided on their own.
    recipients: Vec<String>,
    /// The edits asked for at end of message.
    edits: Vec<String>,
}

impl Outcome {
    fn of(transcript: &Transcript) -> Outcome {
        let mail = transcript.mails.first();
        let ending = transcript
            .connection
            .as_ref()
            .or_else(|| mail.and_then(|m| m.ending.as_ref()));
        let recipients = mail
            .map(|m| {
                m.recipients
                    .iter()
                    .filter(|r| r.answer.verdict().is_some())
                    .map(|r| format!("{} {}", r.address, r.answer))
                    .collect()
            })
            .unwrap_or_default();
        let edits = mail
            .map(|m| m.edits.iter().map(|e| e.to_string()).collect())
            .unwrap_or_default();
        Outcome {
            verdict: ending.map_or("none", |e| e.verdict.name()).to_string(),
            stage: ending.map_or("", |e| e.stage.name()).to_string(),
            reply: ending.and_then(|e| e.reply.clone()),
            text: ending.map_or_else(|| "no verdict".into(), describe),
            recipients,
            edits,
        }
    }
}

/// The kinds of change, in the order the table lists them after verdict changes.
const REPLY: &str = "reply text";
const STAGE: &str = "stage";
const RECIPIENTS: &str = "recipients";
const EDITS: &str = "edits";

fn past(verdict: &str) -> &str {
    match verdict {
        "accept" => "accepted",
        "reject" => "rejected",
        "tempfail" => "tempfailed",
        "discard" => "discarded",
        "continue" => "continued",
        other => other,
    }
}

/// Lines only in `old` (`- `) and only in `new` (`+ `).
fn difference(old: &[String], new: &[String], out: &mut Vec<String>) {
    out.extend(
        old.iter()
            .filter(|l| !new.contains(l))
            .map(|l| format!("- {l}")),
    );
    out.extend(
        new.iter()
            .filter(|l| !old.contains(l))
            .map(|l| format!("+ {l}")),
    );
}

/// The kind of change from `old` to `new` (the first that applies: verdict, reply text, stage,
/// recipients, edits), and the differences in recipients (and in edits, when the verdict is the
/// same); `None` when nothing
/// changed (the deciding policy alone does not count).
fn change(old: &Outcome, new: &Outcome) -> Option<(String, Vec<String>)> {
    let kind = if old.verdict != new.verdict {
        format!("{} → {}", past(&old.verdict), past(&new.verdict))
    } else if old.reply != new.reply {
        REPLY.into()
    } else if old.stage != new.stage {
        STAGE.into()
    } else if old.recipients != new.recipients {
        RECIPIENTS.into()
    } else if old.edits != new.edits {
        EDITS.into()
    } else {
        return None;
    };
    let mut details = Vec::new();
    difference(&old.recipients, &new.recipients, &mut details);
    // Edits come with an accepted message: a message accepted on one side only has them there.
    if old.verdict == new.verdict {
        difference(&old.edits, &new.edits, &mut details);
    }
    Some((kind, details))
}

/// One changed message, as the report shows it.
#[derive(Clone, Debug, Serialize)]
struct Example {
    #[serde(skip)]
    index: usize,
    message: String,
    envelope: String,
    old: String,
    new: String,
    /// Recipient answers and edits only one side has (`- old`, `+ new`).
    details: Vec<String>,
}

/// A skipped message.
#[derive(Clone, Debug, Serialize)]
struct Skip {
    #[serde(skip)]
    index: usize,
    message: String,
    reason: String,
}

/// What a worker sends back for a message.
enum Done {
    Same,
    Changed(String, Example),
    Skipped(&'static str, Skip),
    /// A configuration could not start: nothing can run.
    Fatal(String),
}

/// The first `k` (by corpus order) of what is offered.
fn keep_first<T>(list: &mut Vec<T>, item: T, k: usize, index: impl Fn(&T) -> usize) {
    let at = list.partition_point(|e| index(e) < index(&item));
    if at < k {
        list.insert(at, item);
        list.truncate(k);
    }
}

/// One kind of change: how many, and the first examples.
#[derive(Debug, Default, Serialize)]
struct Kind {
    kind: String,
    count: usize,
    examples: Vec<Example>,
}

/// The result of a replay.
#[derive(Debug, Default, Serialize)]
struct Summary {
    corpus: String,
    old: String,
    new: String,
    workers: usize,
    messages: usize,
    changed: usize,
    skipped: usize,
    seconds: f64,
    messages_per_second: f64,
    changes: Vec<Kind>,
    /// Skipped messages per reason.
    skip_reasons: BTreeMap<String, usize>,
    skip_examples: Vec<Skip>,
}

/// Rank of a change kind in the table: verdict changes, then the others in a fixed order.
fn rank(kind: &str) -> (usize, &str) {
    let at = [REPLY, STAGE, RECIPIENTS, EDITS]
        .iter()
        .position(|k| *k == kind)
        .map_or(0, |p| p + 1);
    (at, kind)
}

impl Summary {
    fn write_text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(out, "corpus   {}", self.corpus)?;
        writeln!(out, "old      {}", self.old)?;
        writeln!(out, "new      {}", self.new)?;
        if self.changes.is_empty() {
            writeln!(out, "\nno change")?;
        } else {
            let width = self
                .changes
                .iter()
                .map(|k| k.kind.chars().count())
                .max()
                .unwrap_or(0)
                .max(6);
            writeln!(out, "\n{:<width$}  messages", "change")?;
            for kind in &self.changes {
                writeln!(out, "{:<width$}  {:>8}", kind.kind, kind.count)?;
            }
            for kind in &self.changes {
                writeln!(out, "\n{} ({}):", kind.kind, kind.count)?;
                for e in &kind.examples {
                    writeln!(out, "  {}  {}", e.message, e.envelope)?;
                    writeln!(out, "    old: {}", e.old)?;
                    writeln!(out, "    new: {}", e.new)?;
                    for line in &e.details {
                        writeln!(out, "    {line}")?;
                    }
                }
            }
        }
        if self.skipped > 0 {
            let reasons: Vec<String> = self
                .skip_reasons
                .iter()
                .map(|(r, n)| format!("{r}: {n}"))
                .collect();
            writeln!(out, "\nskipped ({}):", reasons.join(", "))?;
            for s in &self.skip_examples {
                writeln!(out, "  {}: {}", s.message, s.reason)?;
            }
        }
        writeln!(
            out,
            "\n{} messages, {} changed, {} skipped, {:.1} s, {:.0} msg/s",
            self.messages, self.changed, self.skipped, self.seconds, self.messages_per_second
        )
    }
}

/// What every worker needs.
struct Setup {
    old: Config,
    new: Config,
    zones: Vec<PathBuf>,
    store: StoreMode,
    examples: usize,
}

/// Runs `luamilter replay`.
pub fn run(args: ReplayArgs) -> ExitCode {
    let load = |path: &Path| Config::load(path).map_err(|e| e.to_string());
    let (old, new) = match (load(&args.against), load(&args.config)) {
        (Ok(old), Ok(new)) => (old, new),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("luamilter replay: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    if args.store == StoreMode::Real {
        eprintln!(
            "luamilter replay: --store real is not offered: replay writes the store twice per message"
        );
        return ExitCode::from(EXIT_USAGE);
    }
    if let Err(e) = load_zones(&args.dns_zone) {
        eprintln!("luamilter replay: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let corpus = match Corpus::open(&args.corpus) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("luamilter replay: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let workers = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let setup = Arc::new(Setup {
        old,
        new,
        zones: args.dns_zone.clone(),
        store: args.store,
        examples: args.examples,
    });
    let mut summary = Summary {
        corpus: format!("{} ({})", corpus.path.display(), corpus.describe()),
        old: args.against.display().to_string(),
        new: args.config.display().to_string(),
        workers,
        ..Summary::default()
    };
    let started = Instant::now();
    let fatal = replay(corpus, &setup, workers, &mut summary);
    if let Some(e) = fatal {
        eprintln!("luamilter replay: {e}");
        return ExitCode::from(EX_CONFIG);
    }
    summary.seconds = started.elapsed().as_secs_f64();
    summary.messages_per_second = summary.messages as f64 / summary.seconds.max(1e-9);
    let mut out = std::io::stdout().lock();
    let written = if args.json {
        serde_json::to_writer_pretty(&mut out, &summary)
            .map_err(std::io::Error::other)
            .and_then(|()| writeln!(out))
    } else {
        summary.write_text(&mut out)
    };
    if written.is_err() {
        return ExitCode::from(EXIT_CHANGED);
    }
    ExitCode::from(if summary.changed > 0 {
        EXIT_CHANGED
    } else {
        EXIT_SAME
    })
}

/// Reads the corpus on one thread, replays on `workers`, and counts here; says why nothing
/// could run, if so.
fn replay(
    corpus: Corpus,
    setup: &Arc<Setup>,
    workers: usize,
    summary: &mut Summary,
) -> Option<String> {
    let (items, queue) = mpsc::sync_channel::<Item>(workers * 2);
    let queue = Arc::new(Mutex::new(queue));
    let (results, done) = mpsc::sync_channel::<Done>(workers * 4);
    let reader = std::thread::spawn(move || {
        for item in corpus.items() {
            if items.send(item).is_err() {
                break;
            }
        }
    });
    let mut threads = Vec::new();
    for n in 0..workers {
        let (setup, queue, results) = (Arc::clone(setup), Arc::clone(&queue), results.clone());
        let thread = std::thread::Builder::new()
            .name(format!("replay-{n}"))
            .spawn(move || worker(&setup, &queue, &results));
        match thread {
            Ok(t) => threads.push(t),
            Err(e) => return Some(format!("cannot start a worker thread: {e}")),
        }
    }
    drop(results);
    drop(queue);
    let k = setup.examples;
    let mut kinds: BTreeMap<String, Kind> = BTreeMap::new();
    let mut fatal = None;
    for result in done {
        match result {
            Done::Same => summary.messages += 1,
            Done::Changed(kind, example) => {
                summary.messages += 1;
                summary.changed += 1;
                let entry = kinds.entry(kind.clone()).or_insert_with(|| Kind {
                    kind,
                    ..Kind::default()
                });
                entry.count += 1;
                keep_first(&mut entry.examples, example, k, |e| e.index);
            }
            Done::Skipped(reason, skip) => {
                summary.messages += 1;
                summary.skipped += 1;
                *summary.skip_reasons.entry(reason.into()).or_default() += 1;
                keep_first(&mut summary.skip_examples, skip, k, |s| s.index);
            }
            Done::Fatal(e) => {
                fatal.get_or_insert(e);
            }
        }
    }
    let _ = reader.join();
    for t in threads {
        let _ = t.join();
    }
    let mut changes: Vec<Kind> = kinds.into_values().collect();
    changes.sort_by(|a, b| rank(&a.kind).cmp(&rank(&b.kind)));
    summary.changes = changes;
    fatal
}

/// One configuration on a worker: its milter and the name the MTA calls itself.
struct Side {
    milter: Milter,
    receiver: String,
}

impl Side {
    async fn start(config: &Config, setup: &Setup, scratch: &Path) -> Result<Side, String> {
        let mut config = config.clone();
        prepare_config(&mut config, setup.store, scratch)?;
        let name = config.source.name();
        let zones = load_zones(&setup.zones)?;
        let (resolver, _) = resolver(&config, zones)?;
        let receiver = receiver(&config);
        let milter = Milter::start(config, resolver, store::system_clock())
            .map_err(|e| format!("{name}: {e}"))?;
        Ok(Side { milter, receiver })
    }

    async fn play(
        &self,
        capture: &Capture,
        envelope: &Envelope,
        message: &Message,
        queue_id: &str,
    ) -> Result<Outcome, String> {
        let smtp = command::smtp(
            envelope,
            message,
            self.receiver.clone(),
            StageMacros::new(),
            queue_id,
        )?;
        let conn = self.milter.connect().await.map_err(|e| e.to_string())?;
        let transcript = mta::play(conn, capture, &smtp)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Outcome::of(&transcript))
    }
}

/// A worker: both milters, then messages until the queue is empty.
fn worker(setup: &Setup, queue: &Mutex<mpsc::Receiver<Item>>, results: &mpsc::SyncSender<Done>) {
    let fatal = |e: String| {
        let _ = results.send(Done::Fatal(e));
    };
    let (Ok(old_scratch), Ok(new_scratch)) = (tempfile::TempDir::new(), tempfile::TempDir::new())
    else {
        return fatal("cannot make a temporary directory".into());
    };
    let runtime = match runtime() {
        Ok(r) => r,
        Err(e) => return fatal(format!("cannot start the runtime: {e}")),
    };
    let capture = Capture::default();
    let _caught = capture.install();
    runtime.block_on(async {
        let old = match Side::start(&setup.old, setup, old_scratch.path()).await {
            Ok(side) => side,
            Err(e) => return fatal(e),
        };
        let new = match Side::start(&setup.new, setup, new_scratch.path()).await {
            Ok(side) => side,
            Err(e) => {
                old.milter.stop().await;
                return fatal(e);
            }
        };
        loop {
            let item = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
            let Ok(item) = item else { break };
            let done = one(&old, &new, &capture, item).await;
            if results.send(done).is_err() {
                break;
            }
        }
        old.milter.stop().await;
        new.milter.stop().await;
    });
}

/// "192.0.2.1 <a@example.com> → <b@example.org>".
fn envelope_line(e: &Envelope) -> String {
    let rcpts: Vec<String> = e.recipients.iter().map(|r| format!("<{r}>")).collect();
    format!("{} <{}> → {}", e.client, e.sender, rcpts.join(" "))
}

/// One message through both configurations.
async fn one(old: &Side, new: &Side, capture: &Capture, item: Item) -> Done {
    let skip = |reason: &'static str, why: String| {
        Done::Skipped(
            reason,
            Skip {
                index: item.index,
                message: item.name.clone(),
                reason: why,
            },
        )
    };
    let bytes = match &item.bytes {
        Ok(bytes) => bytes,
        Err(e) => return skip("unreadable", e.clone()),
    };
    let given = match item.sidecar.as_deref().map(Sidecar::read) {
        Some(Err(e)) => return skip("bad sidecar", e),
        Some(Ok(given)) => given.unwrap_or_default(),
        None => Given::default(),
    };
    let message = Message::parse(bytes);
    let envelope = match command::envelope(&given, &message) {
        Ok(e) => e,
        Err(e) => {
            // The hints name `luamilter test`'s options; here a sidecar gives them.
            let e = e
                .replace("give --client IP", "give client in a sidecar file")
                .replace("give --from ADDR", "give from in a sidecar file")
                .replace("give --rcpt ADDR", "give rcpt in a sidecar file");
            return skip("no envelope", e);
        }
    };
    let queue_id = format!("RPL{:07}", item.index + 1);
    let (before, after) = match (
        old.play(capture, &envelope, &message, &queue_id).await,
        new.play(capture, &envelope, &message, &queue_id).await,
    ) {
        (Ok(b), Ok(a)) => (b, a),
        (Err(e), _) => return skip("milter failed", format!("old: {e}")),
        (_, Err(e)) => return skip("milter failed", format!("new: {e}")),
    };
    match change(&before, &after) {
        None => Done::Same,
        Some((kind, details)) => Done::Changed(
            kind,
            Example {
                index: item.index,
                message: item.name,
                envelope: envelope_line(&envelope),
                old: before.text,
                new: after.text,
                details,
            },
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(verdict: &str, reply: Option<&str>, edits: &[&str]) -> Outcome {
        Outcome {
            verdict: verdict.into(),
            stage: "eom".into(),
            reply: reply.map(str::to_string),
            text: String::new(),
            recipients: Vec::new(),
            edits: edits.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn the_first_difference_names_the_change() {
        let a = outcome("accept", None, &["add header X: 1"]);
        assert_eq!(change(&a, &a), None);
        let r = outcome("reject", Some("550 no"), &[]);
        assert_eq!(change(&a, &r).unwrap().0, "accepted → rejected");
        let r2 = outcome("reject", Some("550 never"), &[]);
        assert_eq!(change(&r, &r2).unwrap().0, REPLY);
        let b = outcome("accept", None, &["add header X: 2"]);
        assert_eq!(
            change(&a, &b).unwrap(),
            (
                EDITS.to_string(),
                vec!["- add header X: 1".into(), "+ add header X: 2".into()]
            )
        );
    }

    #[test]
    fn only_the_first_examples_are_kept() {
        let mut kept = Vec::new();
        for i in [5, 2, 9, 1, 3] {
            keep_first(&mut kept, i, 3, |x| *x);
        }
        assert_eq!(kept, [1, 2, 3]);
    }
}
