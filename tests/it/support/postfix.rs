//! A private Postfix instance on loopback for end-to-end tests, and `swaks` to talk to it.
//!
//! [`Postfix::start`] writes its own `main.cf`/`master.cf` into a temporary directory that also
//! holds the queue, the data directory, the mail log and the delivered mail, starts it with
//! `postfix -c DIR start`, and stops it on drop. The system instance in `/etc/postfix` is never
//! read, changed or started. Mail for [`TEST_DOMAIN`] is delivered by the `virtual` transport into
//! one maildir (every recipient of that domain lands there); every other transport is `error:`,
//! so nothing leaves the machine: smtpd refuses other domains at RCPT (`550 5.1.1 ... outside
//! delivery is disabled in tests`), and a recipient a milter adds elsewhere is bounced.
//!
//! The API is blocking (it runs `postfix`, `postqueue` and `swaks` as child processes, each with a
//! time limit). Run the milter under test on another thread or runtime: from a
//! `#[tokio::test(flavor = "multi_thread")]` the calls block one worker while the others serve
//! the milter.
//!
//! Postfix needs root: `postfix start` refuses otherwise. Its daemons run as the `postfix` user,
//! so the temporary directory (under `$TMPDIR`, default `/tmp`) must be reachable by that user,
//! and so must a `unix:` milter socket: a searchable directory and a socket with mode 0666 (a
//! socket inside a mode-0700 temporary directory fails with "Permission denied" in the mail log).

use std::{
    fs,
    io::{BufRead, BufReader, Read, Seek, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::fs::{PermissionsExt, chown},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use tempfile::TempDir;

/// The domain the private instance accepts and delivers locally.
pub const TEST_DOMAIN: &str = "test.example";

/// Time limit for every child process and for start-up.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Owner of the maildir: `virtual` refuses to deliver as root, so mail is stored as `nobody`.
const MAILDIR_OWNER: u32 = 65534;

/// Postfix's `mail_owner`, who must own the data directory (its uid differs between machines).
const MAIL_OWNER: &str = "postfix";

/// How to get the tools, shown when they are missing.
const INSTALL_HINT: &str = "install them as root with:\n  \
    echo \"postfix postfix/main_mailer_type select No configuration\" | debconf-set-selections\n  \
    DEBIAN_FRONTEND=noninteractive apt-get install -y postfix swaks";

/// Whether end-to-end tests can run here.
///
/// Returns `true` when `postfix`, `postqueue` and `swaks` are installed and the tests run as root.
/// Otherwise panics with installation instructions, unless the environment variable
/// `LUAMILTER_E2E=skip` is set: then it prints a loud skip notice and returns `false`.
pub fn e2e_ready() -> bool {
    let missing: Vec<&str> = ["postfix", "postqueue", "swaks"]
        .into_iter()
        .filter(|tool| find_tool(tool).is_none())
        .collect();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if missing.is_empty() && root {
        return true;
    }
    let problem = if missing.is_empty() {
        "the end-to-end tests must run as root (postfix start needs it)".to_owned()
    } else {
        format!("missing {}; {INSTALL_HINT}", missing.join(", "))
    };
    if std::env::var("LUAMILTER_E2E").as_deref() == Ok("skip") {
        // Straight to the stderr handle: the test harness captures eprintln! of passing tests.
        let notice = format!("\n!!!!! SKIPPED END-TO-END TEST (LUAMILTER_E2E=skip): {problem}\n\n");
        let _ = std::io::stderr().write_all(notice.as_bytes());
        return false;
    }
    panic!("end-to-end test cannot run: {problem}\nor set LUAMILTER_E2E=skip to skip these tests");
}

/// A running private Postfix instance; stopped when dropped.
pub struct Postfix {
    dir: TempDir,
    port: u16,
}

impl Postfix {
    /// Starts an instance whose smtpd listens on `127.0.0.1:<free port>` and uses the milter at
    /// `milter` (`inet:127.0.0.1:PORT` or `unix:/path`) with `milter_default_action = tempfail`.
    /// Returns once the SMTP port answers with its 220 banner.
    pub fn start(milter: &str) -> anyhow::Result<Postfix> {
        let dir = tempfile::Builder::new()
            .prefix("luamilter-postfix-")
            .tempdir()?;
        // The Postfix daemons run as the `postfix` user and must reach the queue inside.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        let port = free_port()?;
        let postfix = Postfix { dir, port };
        postfix.write_config(milter)?;
        postfix
            .postfix_command("start")
            .with_context(|| format!("postfix start failed; mail log:\n{}", postfix.maillog()))?;
        postfix
            .wait_for_banner()
            .with_context(|| format!("smtpd never answered; mail log:\n{}", postfix.maillog()))?;
        Ok(postfix)
    }

    /// Sends one message with swaks (EHLO, MAIL, RCPT, DATA, QUIT) and returns what happened.
    /// `to` may list several recipients separated by commas. An SMTP rejection is not an error:
    /// it shows in the result.
    pub fn send(
        &self,
        from: &str,
        to: &str,
        extra_headers: &[(&str, &str)],
        body: &str,
    ) -> anyhow::Result<SwaksResult> {
        let body_file = tempfile::NamedTempFile::new_in(self.dir.path())?;
        fs::write(body_file.path(), body)?;
        let mut cmd = Command::new(find_tool("swaks").context("swaks is not installed")?);
        // A bare --config (no argument) makes swaks ignore any ~/.swaksrc.
        cmd.arg("--config")
            .args(["--server", &format!("127.0.0.1:{}", self.port)])
            .args(["--helo", &format!("client.{TEST_DOMAIN}")])
            .args(["--from", from, "--to", to])
            .args(["--timeout", &format!("{}s", COMMAND_TIMEOUT.as_secs())])
            .arg("--body")
            .arg(format!("@{}", body_file.path().display()));
        for (name, value) in extra_headers {
            cmd.args(["--header", &format!("{name}: {value}")]);
        }
        let (status, transcript) = run(&mut cmd)?;
        let exit_code = status
            .code()
            .with_context(|| format!("swaks killed by a signal:\n{transcript}"))?;
        let replies = parse_transcript(&transcript);
        Ok(SwaksResult {
            exit_code,
            transcript,
            replies,
        })
    }

    /// Waits up to `timeout` for a delivered message whose full text (headers as stored by
    /// Postfix, then the body) satisfies `predicate`, and returns that text.
    pub fn wait_delivered(
        &self,
        predicate: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.delivered().into_iter().find(|m| predicate(m)) {
                return Some(found);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The messages in the hold queue (where a milter's quarantine puts them), read with
    /// `postqueue -c DIR -p`.
    pub fn hold_queue(&self) -> anyhow::Result<Vec<QueuedMessage>> {
        let mut cmd = Command::new(find_tool("postqueue").context("postqueue is not installed")?);
        cmd.arg("-c").arg(self.config_dir()).arg("-p");
        let (status, listing) = run(&mut cmd)?;
        if !status.success() {
            bail!("postqueue -p failed ({status}):\n{listing}");
        }
        Ok(parse_queue(&listing)
            .into_iter()
            .filter(|m| m.held)
            .collect())
    }

    /// The instance's mail log so far (for failure messages).
    /// The loopback port the instance's smtpd listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn maillog(&self) -> String {
        fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    fn config_dir(&self) -> PathBuf {
        self.dir.path().join("conf")
    }

    fn maildir(&self) -> PathBuf {
        self.dir.path().join("mail")
    }

    fn write_config(&self, milter: &str) -> anyhow::Result<()> {
        let root = self.dir.path();
        let conf = self.config_dir();
        let data = root.join("data");
        let mail = self.maildir();
        for d in [&conf, &root.join("queue"), &data, &mail] {
            fs::create_dir(d)?;
        }
        chown(&data, Some(user_id(MAIL_OWNER)?), None)?;
        chown(&mail, Some(MAILDIR_OWNER), Some(MAILDIR_OWNER))?;
        let root = root.display();
        let main_cf = format!(
            "compatibility_level = 3.6\n\
             queue_directory = {root}/queue\n\
             data_directory = {root}/data\n\
             maillog_file = {root}/maillog\n\
             maillog_file_prefixes = {root}\n\
             myhostname = mx.{TEST_DOMAIN}\n\
             mydomain = {TEST_DOMAIN}\n\
             myorigin = {TEST_DOMAIN}\n\
             mydestination =\n\
             inet_interfaces = loopback-only\n\
             inet_protocols = ipv4\n\
             mynetworks = 127.0.0.0/8\n\
             smtpd_banner = $myhostname ESMTP\n\
             alias_maps =\n\
             alias_database =\n\
             biff = no\n\
             virtual_mailbox_domains = {TEST_DOMAIN}\n\
             virtual_mailbox_base = {root}/mail\n\
             virtual_mailbox_maps = static:Maildir/\n\
             virtual_uid_maps = static:{MAILDIR_OWNER}\n\
             virtual_gid_maps = static:{MAILDIR_OWNER}\n\
             local_transport = error:local delivery is disabled in tests\n\
             relay_transport = error:relaying is disabled in tests\n\
             default_transport = error:outside delivery is disabled in tests\n\
             smtpd_milters = {milter}\n\
             milter_protocol = 6\n\
             milter_default_action = tempfail\n"
        );
        // No chroot anywhere (5th column "n"); only the services this configuration can reach.
        let master_cf = format!(
            "127.0.0.1:{port} inet n - n - - smtpd\n\
             pickup     unix n - n 60 1 pickup\n\
             cleanup    unix n - n - 0 cleanup\n\
             qmgr       unix n - n 300 1 qmgr\n\
             rewrite    unix - - n - - trivial-rewrite\n\
             bounce     unix - - n - 0 bounce\n\
             defer      unix - - n - 0 bounce\n\
             trace      unix - - n - 0 bounce\n\
             verify     unix - - n - 1 verify\n\
             flush      unix n - n 1000? 0 flush\n\
             proxymap   unix - - n - - proxymap\n\
             showq      unix n - n - - showq\n\
             error      unix - - n - - error\n\
             retry      unix - - n - - error\n\
             virtual    unix - n n - - virtual\n\
             anvil      unix - - n - 1 anvil\n\
             scache     unix - - n - 1 scache\n\
             postlog    unix-dgram n - n - 1 postlogd\n",
            port = self.port
        );
        for (name, text) in [("main.cf", main_cf), ("master.cf", master_cf)] {
            let path = conf.join(name);
            fs::write(&path, text)?;
            // Postfix re-reads a configuration file until it is over a second old (it may still
            // be being edited); backdating it saves that wait on every start.
            fs::File::options()
                .write(true)
                .open(&path)?
                .set_modified(SystemTime::now() - Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// Runs `postfix -c DIR <action>` and fails unless it succeeds.
    fn postfix_command(&self, action: &str) -> anyhow::Result<()> {
        let mut cmd = Command::new(find_tool("postfix").context("postfix is not installed")?);
        cmd.arg("-c").arg(self.config_dir()).arg(action);
        let (status, output) = run(&mut cmd)?;
        if !status.success() {
            bail!("postfix {action} failed ({status}):\n{output}");
        }
        Ok(())
    }

    /// Connects until smtpd sends its 220 banner, then says QUIT.
    fn wait_for_banner(&self) -> anyhow::Result<()> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(stream) => {
                    stream.set_read_timeout(Some(COMMAND_TIMEOUT))?;
                    let mut banner = String::new();
                    BufReader::new(&stream).read_line(&mut banner)?;
                    if !banner.starts_with("220 ") {
                        bail!("unexpected SMTP banner {banner:?}");
                    }
                    (&stream).write_all(b"QUIT\r\n")?;
                    return Ok(());
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(e).context(format!("connecting to {addr}"));
                }
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The text of every message delivered so far.
    fn delivered(&self) -> Vec<String> {
        let maildir = self.maildir().join("Maildir");
        ["new", "cur"]
            .iter()
            .filter_map(|sub| fs::read_dir(maildir.join(sub)).ok())
            .flatten()
            .filter_map(|entry| fs::read_to_string(entry.ok()?.path()).ok())
            .collect()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        if let Err(stop) = self.postfix_command("stop") {
            eprintln!("{stop:#}; aborting the instance");
            if let Err(abort) = self.postfix_command("abort") {
                eprintln!("{abort:#}");
            }
        }
    }
}

/// What one swaks run saw.
#[derive(Debug)]
pub struct SwaksResult {
    /// swaks' exit code: 0 delivered, 23 MAIL rejected, 24 no RCPT accepted, 26 refused after DATA
    /// (see swaks(1), EXIT CODES).
    pub exit_code: i32,
    /// Everything swaks printed, stdout and stderr interleaved as written.
    pub transcript: String,
    /// The server's replies, in order, each tagged with the command it answered.
    pub replies: Vec<SmtpReply>,
}

impl SwaksResult {
    /// The first reply to `stage`, if the transaction got that far.
    pub fn reply(&self, stage: Stage) -> Option<&SmtpReply> {
        self.replies.iter().find(|r| r.stage == stage)
    }

    /// The Postfix queue id from the end-of-data reply (`250 2.0.0 Ok: queued as ID`).
    pub fn queue_id(&self) -> Option<&str> {
        let line = self.reply(Stage::Dot)?.lines.last()?;
        Some(line.split_once("queued as ")?.1.trim())
    }
}

/// An SMTP command stage, as swaks reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The greeting after connect.
    Banner,
    /// EHLO or HELO.
    Helo,
    /// MAIL FROM.
    Mail,
    /// RCPT TO (one reply per recipient).
    Rcpt,
    /// The DATA command itself (354 when accepted).
    Data,
    /// The final "." ending the message.
    Dot,
    /// QUIT.
    Quit,
    /// Anything else (STARTTLS, AUTH, ...).
    Other,
}

/// One (possibly multi-line) SMTP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpReply {
    /// The command this reply answered.
    pub stage: Stage,
    /// The reply lines as sent, e.g. `550-5.7.1 first line`, `550 5.7.1 last line`.
    pub lines: Vec<String>,
}

impl SmtpReply {
    /// The three-digit reply code (0 if the server sent garbage).
    pub fn code(&self) -> u16 {
        self.lines
            .first()
            .and_then(|l| l.get(..3))
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }
}

/// One message in the queue listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    /// Postfix queue id (without the `!`/`*` status mark).
    pub id: String,
    /// Whether it is in the hold queue (marked `!`).
    pub held: bool,
    /// Envelope sender (`MAILER-DAEMON` for the null sender).
    pub sender: String,
    /// Envelope recipients still to deliver.
    pub recipients: Vec<String>,
}

/// Splits a swaks transcript into server replies tagged with the command they answer.
///
/// swaks marks client lines ` -> ` and server lines `<-  ` (expected) or `<** ` (unexpected);
/// message content between the 354 reply and the final `.` is sent with ` -> ` too.
fn parse_transcript(transcript: &str) -> Vec<SmtpReply> {
    let mut replies: Vec<SmtpReply> = Vec::new();
    let mut stage = Stage::Banner;
    let mut in_message = false;
    let mut reply_open = false;
    for line in transcript.lines() {
        if let Some(cmd) = line.strip_prefix(" -> ") {
            reply_open = false;
            if in_message {
                if cmd == "." {
                    in_message = false;
                    stage = Stage::Dot;
                }
                continue;
            }
            let verb = cmd
                .split([' ', ':'])
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            stage = match verb.as_str() {
                "EHLO" | "HELO" => Stage::Helo,
                "MAIL" => Stage::Mail,
                "RCPT" => Stage::Rcpt,
                "DATA" => Stage::Data,
                "QUIT" => Stage::Quit,
                _ => Stage::Other,
            };
        } else if let Some(text) = line
            .strip_prefix("<-  ")
            .or_else(|| line.strip_prefix("<** "))
        {
            if stage == Stage::Data && text.starts_with("354") {
                in_message = true;
            }
            match replies.last_mut() {
                Some(last) if reply_open => last.lines.push(text.to_owned()),
                _ => replies.push(SmtpReply {
                    stage,
                    lines: vec![text.to_owned()],
                }),
            }
            reply_open = true;
        }
    }
    replies
}

/// Parses `postqueue -p` output.
fn parse_queue(listing: &str) -> Vec<QueuedMessage> {
    let mut messages: Vec<QueuedMessage> = Vec::new();
    for line in listing.lines() {
        let first = line.chars().next();
        if first.is_some_and(|c| c.is_ascii_alphanumeric()) {
            // "ID[!*]  SIZE Day Mon DD HH:MM:SS  SENDER"
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 7 {
                continue; // "Mail queue is empty"
            }
            let raw_id = fields[0];
            messages.push(QueuedMessage {
                id: raw_id.trim_end_matches(['!', '*']).to_owned(),
                held: raw_id.ends_with('!'),
                sender: fields[6..].join(" "),
                recipients: Vec::new(),
            });
        } else if first == Some(' ') {
            let text = line.trim();
            // Indented "(reason)" lines explain deferrals; the rest are recipients.
            if let (Some(message), false) = (messages.last_mut(), text.starts_with('(')) {
                message.recipients.push(text.to_owned());
            }
        }
    }
    messages
}

/// Runs a command to completion within [`COMMAND_TIMEOUT`], returning its status and its stdout
/// and stderr interleaved. Output goes to an unnamed file, not a pipe: `postfix start` leaves a
/// daemon behind that may inherit the descriptors.
fn run(cmd: &mut Command) -> anyhow::Result<(ExitStatus, String)> {
    let mut out = tempfile::tempfile()?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out.try_clone()?);
    let mut child = cmd.spawn().with_context(|| format!("cannot run {cmd:?}"))?;
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            // Best effort: the command is reported as timed out either way.
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {COMMAND_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    out.rewind()?;
    let mut output = String::new();
    out.read_to_string(&mut output)?;
    Ok((status, output))
}

/// Finds an executable in `PATH` or the sbin directories a non-login root shell may lack.
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A loopback TCP port that was free a moment ago.
/// A loopback port free at the time of the call.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// The uid of a system user, from /etc/passwd.
fn user_id(name: &str) -> anyhow::Result<u32> {
    let passwd = fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&name))
        .and_then(|fields| fields.get(2)?.parse().ok())
        .with_context(|| format!("no user {name:?} in /etc/passwd (is postfix installed?)"))
}

#[test]
fn queue_listing_parses_held_active_and_deferred_entries() {
    let listing = "\
-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------
3F1A21A0B2!     512 Tue Nov 25 12:00:00  quarantine@test.example
                                         user@test.example

4C2B31A0C3*     300 Tue Nov 25 12:00:01  MAILER-DAEMON
                                         a@test.example
                                         b@test.example

5D3C41A0D4      301 Tue Nov 25 12:00:02  good@test.example
                                                   (connect to x[1.2.3.4]:25: Connection refused)
                                         far@elsewhere.example

-- 3 Kbytes in 3 Requests.
";
    let ids = |q: &[QueuedMessage]| q.iter().map(|m| m.id.clone()).collect::<Vec<_>>();
    let queue = parse_queue(listing);
    assert_eq!(ids(&queue), ["3F1A21A0B2", "4C2B31A0C3", "5D3C41A0D4"]);
    assert_eq!(
        queue.iter().map(|m| m.held).collect::<Vec<_>>(),
        [true, false, false]
    );
    assert_eq!(queue[0].sender, "quarantine@test.example");
    assert_eq!(queue[1].recipients, ["a@test.example", "b@test.example"]);
    assert_eq!(queue[2].recipients, ["far@elsewhere.example"]);
    assert!(parse_queue("Mail queue is empty\n").is_empty());
}
