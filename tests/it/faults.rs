//! Policy and service faults never become silent accepts and never take the daemon down;
//! limits hold. DNS faults come from real servers on loopback that fail each way
//! (docs/failure-modes.md lists the verdicts).

use crate::{
    dns_server::TestDns,
    support::{DaemonProcess, Mta, TestDaemon, reply_text},
};
use indymilter_test::Status;
use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

/// Faults chosen by the sender's local part.
const FAULTY: &str = r#"
local milter = require "milter"
return {
  mail = function(ctx, sender)
    local kind = sender:match("^([%w_]+)@")
    if kind == "error" then error("deliberate failure") end
    if kind == "nilindex" then local t = nil; return t.x end
    if kind == "string" then return "reject" end
    if kind == "table" then return { kind = "reject" } end
    if kind == "loop" then while true do end end
    if kind == "pcall_loop" then
      while true do pcall(function() while true do end end) end
    end
    if kind == "sort_loop" then
      local t = {3, 2, 1}
      table.sort(t, function(a, b) while true do end end)
    end
    if kind == "memory" then
      local t = {}
      for i = 1, 1e9 do t[i] = string.rep("x", 1024) .. i end
    end
    if kind == "pcall_memory" then
      pcall(function()
        local t = {}
        for i = 1, 1e9 do t[i] = string.rep("x", 1024) .. i end
      end)
      return nil
    end
    if kind == "badverdict" then return milter.reject{ code = 451 } end
    if kind == "badedit" then ctx:add_header("Bad Name", "x") end
    if kind == "sleep" then milter.sleep(5) end
  end,
  eom = function(ctx) ctx:add_header("X-Reached", "eom") end,
}
"#;

const LIMITS: &str = "[engine]\ntime_limit = \"300ms\"\nmemory_limit_mib = 32\nvms = 1\n";

async fn mail_status(d: &TestDaemon, sender: &str) -> Status {
    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap();
    c.mail([format!("<{sender}>")]).await.unwrap()
}

#[tokio::test]
async fn every_fault_kind_answers_by_the_exception_policy() {
    let d = TestDaemon::start(&[("faulty", FAULTY)], LIMITS).await;
    let tempfail = "451 4.3.0 Temporary policy failure, try again later";
    for kind in [
        "error",
        "nilindex",
        "string",
        "table",
        "loop",
        "pcall_loop",
        "sort_loop",
        "memory",
        "badverdict",
        "badedit",
        "sleep",
    ] {
        let started = Instant::now();
        let status = mail_status(&d, &format!("{kind}@example.org")).await;
        assert_eq!(reply_text(&status), tempfail, "fault kind {kind}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{kind} took {:?}",
            started.elapsed()
        );
    }
    // Still serving, and a healthy message passes.
    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap();
    assert_eq!(
        c.mail(["<fine@example.org>"]).await.unwrap(),
        Status::Continue
    );
    c.rcpt(["<r@example.org>"]).await.unwrap();
    let (actions, _) = c.eom().await.unwrap();
    assert!(actions.has_add_header("X-Reached", "eom"));
    d.stop().await;
}

#[tokio::test]
async fn exception_policy_continue_and_reject() {
    let d = TestDaemon::start(
        &[("faulty", FAULTY)],
        "[engine]\nexception_policy = \"continue\"\n",
    )
    .await;
    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap();
    assert_eq!(
        c.mail(["<error@example.org>"]).await.unwrap(),
        Status::Continue
    );
    c.rcpt(["<r@example.org>"]).await.unwrap();
    let (actions, _) = c.eom().await.unwrap();
    assert!(actions.has_add_header("X-Reached", "eom"));
    d.stop().await;

    let d = TestDaemon::start(
        &[("faulty", FAULTY)],
        "[engine]\nexception_policy = \"reject\"\n",
    )
    .await;
    assert_eq!(
        reply_text(&mail_status(&d, "string@example.org").await),
        "550 5.3.0 Policy failure"
    );
    d.stop().await;
}

#[tokio::test]
async fn a_broken_policy_is_refused_at_start_with_file_and_line() {
    let err = TestDaemon::try_start(
        &[(
            "broken",
            "return {\n  mail = function(ctx)\n    if then\n  end,\n}\n",
        )],
        "",
        "inet:0@127.0.0.1",
    )
    .await
    .err()
    .unwrap();
    assert!(err.contains("broken.lua:3:"), "{err}");
    let err = TestDaemon::try_start(
        &[("typo", "return { conect = function() end }")],
        "",
        "inet:0@127.0.0.1",
    )
    .await
    .err()
    .unwrap();
    assert!(
        err.contains(
            "typo.lua: unknown key 'conect' in the policy table (did you mean 'connect'?)"
        ),
        "{err}"
    );
    let err = TestDaemon::try_start(
        &[("toplevel", "local x = nil\nreturn x.y")],
        "",
        "inet:0@127.0.0.1",
    )
    .await
    .err()
    .unwrap();
    assert!(err.contains("toplevel.lua:2:"), "{err}");
}

#[tokio::test]
async fn sessions_on_one_vm_overlap_while_handlers_await() {
    let policy = r#"
local milter = require "milter"
return { connect = function(ctx) milter.sleep(0.2) end }
"#;
    let d = TestDaemon::start(&[("sleepy", policy)], "[engine]\nvms = 1\n").await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let client = d.client().await;
        tasks.push(tokio::spawn(async move {
            let mut c = client;
            c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), Status::Continue);
    }
    let elapsed = started.elapsed();
    // Serially this would take 50 x 200 ms = 10 s.
    assert!(
        elapsed < Duration::from_secs(3),
        "50 sleeping sessions took {elapsed:?}"
    );
    d.stop().await;
}

#[tokio::test]
async fn the_time_limit_covers_the_whole_stage_not_each_policy() {
    let slow = r#"
local milter = require "milter"
return { mail = function(ctx) milter.sleep(0.2) end }
"#;
    let d = TestDaemon::start(
        &[("slow1", slow), ("slow2", slow)],
        "[engine]\ntime_limit = \"300ms\"\n",
    )
    .await;
    let started = Instant::now();
    let status = mail_status(&d, "a@example.org").await;
    assert_eq!(
        reply_text(&status),
        "451 4.3.0 Temporary policy failure, try again later"
    );
    // A limit per handler would have let both 200 ms sleeps finish and the stage pass; the
    // bound below only guards against a hang.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    d.stop().await;
}

#[tokio::test]
async fn a_top_level_that_never_returns_is_stopped() {
    let err = TestDaemon::try_start(
        &[("spin", "while true do end\nreturn {}")],
        "[engine]\ntime_limit = \"300ms\"\n",
        "inet:0@127.0.0.1",
    )
    .await
    .err()
    .unwrap();
    assert!(
        err.contains("spin.lua: the top level ran longer than engine.time_limit"),
        "{err}"
    );
}

/// The stock dnsbl and spf policies asking `nameserver` (one attempt, 300 ms).
async fn stock_dns_daemon(nameserver: SocketAddr) -> TestDaemon {
    let extra = format!(
        "[dns]\nnameservers = [\"{nameserver}\"]\ntimeout = \"300ms\"\nattempts = 1\n\
         [engine]\ntime_limit = \"5s\"\n[policy.dnsbl]\ndnsbl = [{{ zone = \"bl.example\" }}]\n"
    );
    TestDaemon::try_start_stock(&["dnsbl", "spf"], &extra)
        .await
        .unwrap()
}

/// Connect, HELO and MAIL (where dnsbl and spf ask): the MAIL answer and the time the whole
/// session took.
async fn dns_session(d: &TestDaemon, client: u8) -> (Status, Status, Duration) {
    let started = Instant::now();
    let mut c = d.client().await;
    let connect = c
        .connect("mail.example.test", Ipv4Addr::new(192, 0, 2, client))
        .await
        .unwrap();
    c.helo("mail.example.test").await.unwrap();
    let mail = c.mail(["<a@example.test>"]).await.unwrap();
    (connect, mail, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_failures_answer_by_the_documented_verdicts_within_the_timeout() {
    let silent = TestDns::silent().await;
    let servfail = TestDns::servfail().await;
    let garbage = TestDns::garbage().await;
    let servers = [
        ("unreachable", TestDns::unreachable().await),
        ("silent", silent.addr),
        ("servfail", servfail.addr),
        ("garbage", garbage.addr),
    ];
    for (kind, addr) in servers {
        let d = stock_dns_daemon(addr).await;
        let (connect, mail, took) = dns_session(&d, 1).await;
        // At MAIL, dnsbl: a failed lookup never rejects; spf: temperror, 451 4.4.3 at once.
        assert_eq!(connect, Status::Noreply, "{kind}");
        let text = reply_text(&mail);
        assert!(
            matches!(mail, Status::Tempfail { .. }) && text.contains("451 4.4.3 is operational"),
            "{kind}: {text}"
        );
        // A few lookups of 300 ms at most, one after the other.
        assert!(took < Duration::from_secs(3), "{kind}: {took:?}");

        // Concurrent sessions wait for their own lookups, not for each other's.
        let started = Instant::now();
        let sessions: Vec<_> = (0..40u8)
            .map(|i| {
                let d = &d;
                async move { dns_session(d, 10 + i).await }
            })
            .collect();
        for (connect, mail, _) in futures_util::future::join_all(sessions).await {
            assert_eq!(connect, Status::Noreply, "{kind}");
            assert!(matches!(mail, Status::Tempfail { .. }), "{kind}");
        }
        let all = started.elapsed();
        println!("dns {kind}: one session {took:?}, 40 concurrent sessions {all:?}");
        assert!(
            all < Duration::from_secs(5),
            "{kind}: 40 sessions took {all:?}"
        );
        d.stop().await;
    }
}

const GATE: &str = "return { mail = function(ctx) end }";

#[tokio::test]
async fn a_second_daemon_on_the_same_socket_or_database_is_refused() {
    let first = TestDaemon::start_unix(&[("gate", GATE)], "").await;
    let luamilter::listen::ListenAddr::Unix(socket) = first.local().clone() else {
        unreachable!()
    };
    let database = first.dir.path().join("luamilter.db");
    assert!(database.exists());

    let err = TestDaemon::try_start(&[("gate", GATE)], "", &format!("unix:{}", socket.display()))
        .await
        .err()
        .expect("a second daemon on a live unix socket");
    assert!(err.contains("another process is listening on"), "{err}");

    let same_db = format!("[store]\npath = {:?}\n", database.display().to_string());
    let err = TestDaemon::try_start(&[("gate", GATE)], &same_db, "inet:0@127.0.0.1")
        .await
        .err()
        .expect("a second daemon on the same database");
    assert!(
        err.contains("another luamilter daemon is using the database")
            && err.contains(&database.display().to_string()),
        "{err}"
    );

    let tcp = TestDaemon::start(&[("gate", GATE)], "").await;
    let err = TestDaemon::try_start(&[("gate", GATE)], "", &tcp.local().to_string())
        .await
        .err()
        .expect("a second daemon on a TCP port in use");
    assert!(
        err.contains("cannot listen on") && err.contains("in use"),
        "{err}"
    );
    tcp.stop().await;

    // The first daemon kept serving, and once it is gone the database is free again.
    let mut c = first.client().await;
    c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap();
    assert_eq!(c.mail(["<a@example.org>"]).await.unwrap(), Status::Continue);
    let mut first = first;
    let daemon = first.daemon.take().unwrap();
    daemon.stop(Duration::from_secs(5)).await;
    let again = TestDaemon::try_start(&[("gate", GATE)], &same_db, "inet:0@127.0.0.1").await;
    again
        .expect("the database is free after the first daemon stopped")
        .stop()
        .await;
}

/// A small file system for the store, mounted on a temp dir and unmounted (lazily) on drop:
/// a tmpfs, or ext4 on a loop device that can die like a disk. `None` (after saying why) where
/// mounting is not permitted.
struct TestDisk {
    dir: tempfile::TempDir,
    /// The loop device and the dir holding its image file, for ext4.
    device: Option<(String, tempfile::TempDir)>,
}

impl TestDisk {
    /// A tmpfs of 256 KiB.
    fn tmpfs() -> Option<TestDisk> {
        Self::mount(&["-t", "tmpfs", "-o", "size=256k", "tmpfs"], None)
    }

    /// A 16 MiB ext4 file system in an image file on a loop device, mounted to turn read-only on
    /// an error (as Debian mounts its root file system).
    fn ext4() -> Option<TestDisk> {
        let images = tempfile::TempDir::new().unwrap();
        let image = images.path().join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let made = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&image)
            .status();
        if !matches!(made, Ok(s) if s.success()) {
            println!("SKIPPED: mkfs.ext4 failed ({made:?}); tests/setup.sh installs e2fsprogs");
            return None;
        }
        let attached = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&image)
            .output();
        let device = match attached {
            Ok(out) if out.status.success() => String::from_utf8(out.stdout).unwrap(),
            other => {
                println!("SKIPPED: cannot attach a loop device ({other:?}); run the tests as root");
                return None;
            }
        };
        let device = device.trim().to_string();
        // A loop device keeps a read-only flag an earlier user set (`blockdev --setro`).
        let _ = std::process::Command::new("blockdev")
            .args(["--setrw", &device])
            .status();
        let options = ["-o", "errors=remount-ro", &device];
        Self::mount(&options, Some((device.clone(), images)))
    }

    fn mount(args: &[&str], device: Option<(String, tempfile::TempDir)>) -> Option<TestDisk> {
        let dir = tempfile::TempDir::new().unwrap();
        let status = std::process::Command::new("mount")
            .args(args)
            .arg(dir.path())
            .status();
        // Built before the check so that its drop detaches the loop device either way.
        let disk = TestDisk { dir, device };
        match status {
            Ok(s) if s.success() => Some(disk),
            other => {
                println!("SKIPPED: cannot mount {args:?} ({other:?}); run the tests as root");
                None
            }
        }
    }

    /// A file on the disk.
    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// Remounts with `mode`, retrying for a few seconds while the file system is busy (a
    /// stopped daemon's store thread may still be closing the database).
    fn remount(&self, mode: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let status = std::process::Command::new("mount")
                .args(["-o", &format!("remount,{mode}")])
                .arg(self.dir.path())
                .status()
                .unwrap();
            if status.success() {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "remount {mode}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Fills the disk with a file; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.path("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        while file.write_all(&[0u8; 4096]).is_ok() {}
        path
    }

    /// Makes the ext4 disk fail `how`, while open files stay open. It is written back first,
    /// as the kernel does within 30 s on an idle store: the failure finds the databases' pages
    /// (the mapped WAL index too) clean, not only dirty in the cache.
    fn fail(&self, how: DiskFailure) {
        use std::os::fd::AsRawFd;
        let root = std::fs::File::open(self.dir.path()).unwrap();
        // SAFETY: syncfs on an fd we own.
        assert_eq!(unsafe { libc::syncfs(root.as_raw_fd()) }, 0);
        match how {
            DiskFailure::Dies => {
                /// `_IOR('X', 125, __u32)`.
                const FS_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587D;
                const GOING_FLAGS_NOLOGFLUSH: u32 = 2;
                let flags = GOING_FLAGS_NOLOGFLUSH;
                // SAFETY: the ioctl reads one u32 through a pointer to a live local.
                let rc = unsafe { libc::ioctl(root.as_raw_fd(), FS_IOC_SHUTDOWN as _, &flags) };
                let error = std::io::Error::last_os_error();
                assert_eq!(rc, 0, "FS_IOC_SHUTDOWN: {error}");
            }
            DiskFailure::TurnsReadOnly => {
                let (device, _) = self.device.as_ref().expect("an ext4 disk");
                let name = device.trim_start_matches("/dev/");
                let trigger = format!("/sys/fs/ext4/{name}/trigger_fs_error");
                std::fs::write(&trigger, "luamilter test").expect(&trigger);
            }
        }
    }
}

/// How [`TestDisk::fail`] fails the disk.
#[derive(Clone, Copy, Debug)]
enum DiskFailure {
    /// Shut down (`FS_IOC_SHUTDOWN`, without flushing the journal) as a dying disk: every write,
    /// and every read that misses the cache, fails with EIO.
    Dies,
    /// A file system error (`trigger_fs_error`) remounts it read-only: every write fails with
    /// EROFS (one caught by the journal's abort with EIO); reads go on.
    TurnsReadOnly,
}

impl DiskFailure {
    /// The OS errors a write gets.
    fn os_errors(self) -> &'static [&'static str] {
        const EIO: &str = "Input/output error (os error 5)";
        match self {
            DiskFailure::Dies => &[EIO],
            DiskFailure::TurnsReadOnly => &["Read-only file system (os error 30)", EIO],
        }
    }
}

impl Drop for TestDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
        if let Some((device, _)) = &self.device {
            // Detaches now, or (still busy after a lazy unmount) once the last user is gone.
            let _ = std::process::Command::new("losetup")
                .args(["-d", device])
                .status();
        }
    }
}

/// The start of the stock greylist's answer to a new triplet.
const GREYLISTED: &str = "451-4.7.1 Greylisted";
/// The stock greylist's answer when the store fails and `fail_closed` is on.
const UNAVAILABLE: &str = "451 4.3.0 Greylisting is unavailable, try again later";

/// Config for the stock greylist policy on the database `db`, with a 2 s store timeout.
fn greylist_config(db: &std::path::Path, fail_closed: bool) -> String {
    format!(
        "[store]\npath = {:?}\ntimeout = \"2s\"\n[policy.greylist]\nfail_closed = {fail_closed}\n",
        db.display().to_string()
    )
}

/// The stock greylist policy, failing closed, on a database on `disk`.
async fn greylist_daemon(disk: &TestDisk) -> Result<TestDaemon, String> {
    let extra = greylist_config(&disk.path("luamilter.db"), true);
    TestDaemon::try_start_stock(&["greylist"], &extra).await
}

/// The RCPT answer of the connection `c` for a new triplet (sender `n`), and how long it took.
async fn greylist_rcpt(mut c: Mta, n: u32) -> (String, Duration) {
    c.connect("client.example", Ipv4Addr::new(192, 0, 2, 1))
        .await
        .unwrap();
    c.mail([format!("<s{n}@example.net>")]).await.unwrap();
    let started = Instant::now();
    let status = c.rcpt(["<r@example.org>"]).await.unwrap();
    (reply_text(&status), started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_on_a_full_or_read_only_disk() {
    let Some(disk) = TestDisk::tmpfs() else {
        return;
    };
    let d = greylist_daemon(&disk).await.unwrap();
    let first = greylist_rcpt(d.client().await, 0).await.0;
    assert!(first.starts_with(GREYLISTED), "{first}");

    // Disk full: the store refuses the write, the policy answers as documented, at once.
    let filler = disk.fill();
    for n in 1..=3 {
        let (answer, took) = greylist_rcpt(d.client().await, n).await;
        assert_eq!(answer, UNAVAILABLE, "disk full");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }
    // Space again: served normally without a restart.
    std::fs::remove_file(filler).unwrap();
    assert!(
        greylist_rcpt(d.client().await, 4)
            .await
            .0
            .starts_with(GREYLISTED)
    );

    d.stop().await;

    // A daemon cannot start on a read-only database, and says so.
    disk.remount("ro");
    let err = greylist_daemon(&disk)
        .await
        .err()
        .expect("start on a read-only disk");
    assert!(
        err.contains("[store]") && err.contains("luamilter.db"),
        "{err}"
    );
    println!("start on a read-only database: {err}");
}

/// A daemon process with the stock policies `chain` (greylist configured as in
/// [`greylist_config`]) on the database `name` on `disk`, with metrics on (so `luamilter ctl
/// stats` has the store's counters).
fn stock_process(
    disk: &TestDisk,
    name: &str,
    chain: &[&str],
    fail_closed: bool,
) -> Result<DaemonProcess, String> {
    let port = crate::support::postfix::free_port().unwrap();
    let extra = format!(
        "{}[metrics]\nlisten = \"127.0.0.1:{port}\"\n",
        greylist_config(&disk.path(name), fail_closed)
    );
    DaemonProcess::start_stock(chain, &extra)
}

/// The stock policies that use the store on every message.
const STORE_PACK: [&str; 4] = ["bans", "whitelist", "reputation", "greylist"];

/// The answers to each stage of a whole message from localhost, which greylisting exempts: the
/// store is never asked.
async fn local_message(d: &DaemonProcess) -> Vec<Status> {
    let mut c = d.client().await;
    let mut statuses = vec![c.connect("localhost", Ipv4Addr::LOCALHOST).await.unwrap()];
    statuses.push(c.helo("localhost").await.unwrap());
    statuses.push(c.mail(["<a@example.net>"]).await.unwrap());
    statuses.push(c.rcpt(["<b@example.org>"]).await.unwrap());
    statuses.push(c.data().await.unwrap());
    statuses.push(c.header("Subject", "hi").await.unwrap());
    statuses.push(c.eoh().await.unwrap());
    statuses.push(c.body("hello\r\n").await.unwrap());
    statuses.push(c.0.eom().await.unwrap().1);
    statuses
}

/// The value of the store's `greylist` counter with `result` in `luamilter ctl stats`.
fn greylist_calls(d: &DaemonProcess, result: &str) -> f64 {
    let out = crate::support::luamilter_cli("ctl", &d.config, &["stats"]);
    let stats = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stats}");
    let labels = [
        ("backend", "sqlite"),
        ("op", "greylist"),
        ("result", result),
    ];
    crate::metrics::sample(&stats, "luamilter_store_operations_total", &labels).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_disk_dies_under_traffic() {
    store_disk_fails_under_traffic(DiskFailure::Dies).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_disk_turns_read_only_under_traffic() {
    store_disk_fails_under_traffic(DiskFailure::TurnsReadOnly).await;
}

/// The disk under the SQLite database fails `how` while two daemons, failing closed and open,
/// have their databases on it under traffic: no recipient is accepted silently by the one
/// failing closed, both answer by the documented verdicts within the store timeout, the log
/// names the file and the OS error without flooding, sessions that do not use the store are
/// served as before, the counters show the failures, SIGTERM stops both at once, a daemon does
/// not start on the failed disk, and one on a healthy disk works again.
async fn store_disk_fails_under_traffic(how: DiskFailure) {
    let Some(disk) = TestDisk::ext4() else {
        return;
    };
    let closed =
        std::sync::Arc::new(stock_process(&disk, "closed.db", &["greylist"], true).unwrap());
    let open = stock_process(&disk, "open.db", &["greylist"], false).unwrap();
    let pack = stock_process(&disk, "pack.db", &STORE_PACK, false).unwrap();
    assert!(
        greylist_rcpt(open.client().await, 0)
            .await
            .0
            .starts_with(GREYLISTED)
    );
    let (closed_before, open_before) = (local_message(&closed).await, local_message(&open).await);
    assert!(
        closed_before.contains(&Status::Continue),
        "{closed_before:?}"
    );

    // Traffic on the daemon failing closed, while the disk fails under it.
    let failed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let senders: Vec<_> = (0..4)
        .map(|t| {
            let (closed, failed) = (closed.clone(), failed.clone());
            tokio::spawn(async move {
                let (mut answers, mut after) = (Vec::new(), 0);
                for n in 0..1000 {
                    answers.push(greylist_rcpt(closed.client().await, t * 1000 + n).await);
                    if failed.load(std::sync::atomic::Ordering::SeqCst) {
                        after += 1;
                        if after == 20 {
                            break;
                        }
                    }
                }
                answers
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    disk.fail(how);
    let failed_at = Instant::now();
    failed.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut answers = Vec::new();
    for s in senders {
        answers.extend(s.await.unwrap());
    }
    for (answer, took) in &answers {
        assert!(
            answer.starts_with(GREYLISTED) || answer == UNAVAILABLE,
            "{answer}"
        );
        assert!(*took < Duration::from_secs(3), "{took:?}");
    }
    let refused = answers.iter().filter(|(a, _)| a == UNAVAILABLE).count();
    println!(
        "{} recipients under traffic, {refused} refused as unavailable, the slowest in {:?}, all done {:?} after the failure",
        answers.len(),
        answers.iter().map(|(_, took)| *took).max().unwrap(),
        failed_at.elapsed()
    );
    assert!(refused > 0, "no answer came after the disk failed");

    // From now on: the documented verdicts, within the store timeout.
    for n in 1..=5 {
        let (answer, took) = greylist_rcpt(closed.client().await, 9000 + n).await;
        assert_eq!(answer, UNAVAILABLE, "fail_closed");
        assert!(took < Duration::from_secs(3), "{took:?}");
        for d in [&open, &pack] {
            let (answer, took) = greylist_rcpt(d.client().await, n).await;
            assert_eq!(answer, "Continue", "fail_closed = false");
            assert!(took < Duration::from_secs(3), "{took:?}");
        }
    }
    // Sessions that do not use the store are served as before.
    for (d, before) in [(&*closed, &closed_before), (&open, &open_before)] {
        assert_eq!(&local_message(d).await, before);
    }
    assert!(greylist_calls(&closed, "unavailable") >= refused as f64 + 5.0);
    assert!(greylist_calls(&open, "unavailable") >= 5.0);

    // The log names the file and the OS error in one warning, then one every 10 s at most,
    // with every stock policy that uses the store on each message; each failed recipient has
    // its message line, as any message has.
    let allowed = 1 + failed_at.elapsed().as_secs() / 10;
    for (d, db) in [
        (&*closed, "closed.db"),
        (&open, "open.db"),
        (&pack, "pack.db"),
    ] {
        let log = d.log();
        let warnings: Vec<_> = log.lines().filter(|l| !l.contains("level=INFO")).collect();
        println!("{db}: {warnings:#?}");
        assert!((1..=allowed).contains(&(warnings.len() as u64)), "{log}");
        let file = format!("{}: ", disk.path(db).display());
        assert!(warnings[0].contains(&file), "{log}");
        let os_errors = how.os_errors();
        assert!(os_errors.iter().any(|e| warnings[0].contains(e)), "{log}");
    }

    // SIGTERM stops them promptly, cleanly, on the failed disk.
    let closed = std::sync::Arc::into_inner(closed).unwrap();
    for d in [closed, open, pack] {
        let mut idle = d.client().await;
        idle.connect("client.example", Ipv4Addr::new(192, 0, 2, 1))
            .await
            .unwrap();
        let started = Instant::now();
        let (status, log) = d.stop();
        println!("stopped in {:?} ({status})", started.elapsed());
        assert!(status.success(), "{status}\n{log}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!log.contains("panicked"), "{log}");
    }

    // A daemon does not start on the failed disk, and says why; on a fresh healthy disk it serves.
    let err = stock_process(&disk, "closed.db", &["greylist"], true)
        .err()
        .expect("start on a failed disk");
    println!("start on the failed disk: {err}");
    assert!(
        err.contains("[store]") && err.contains("closed.db"),
        "{err}"
    );
    drop(disk);
    let healthy = TestDisk::ext4().unwrap();
    let again = stock_process(&healthy, "closed.db", &["greylist"], true).unwrap();
    assert!(
        greylist_rcpt(again.client().await, 0)
            .await
            .0
            .starts_with(GREYLISTED)
    );
    again.stop();
}

/// Looks each recipient up and stores it when new: accepts a new one only once stored.
const RECORDER: &str = r#"
local milter = require "milter"
local store = require "milter.store"
return {
  rcpt = function(ctx, rcpt)
    local seen, err = store.get(rcpt)
    if err then return milter.tempfail{ text = "lookup: " .. err } end
    if seen then return end
    local ok, err = store.set(rcpt, rcpt)
    if not ok then return milter.tempfail{ text = "record: " .. err } end
  end,
}
"#;

/// kill -9 of the real daemon while eight MTA connections have their recipients stored: every
/// recipient the daemon had accepted (so stored, `synchronous = "full"`) is in the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_milter_load_loses_no_acknowledged_write() {
    let mut d = crate::support::DaemonProcess::start(&[("recorder", RECORDER)], "", "").unwrap();
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..8)
        .map(|t| {
            let socket = d.socket.clone();
            let acked = acked.clone();
            tokio::spawn(async move {
                let connection = indymilter_test::TestConnection::configure()
                    .read_timeout(Duration::from_secs(10))
                    .open_unix(&socket)
                    .await;
                let Ok(mut c) = connection else { return };
                if c.connect("h", Ipv4Addr::new(192, 0, 2, 1)).await.is_err()
                    || c.mail(["<s@example.net>"]).await.is_err()
                {
                    return;
                }
                for i in 0.. {
                    let rcpt = format!("r{t}-{i}@example.org");
                    match c.rcpt([format!("<{rcpt}>")]).await {
                        Ok(Status::Continue) => acked.lock().unwrap().push(rcpt),
                        Ok(other) => panic!("{rcpt}: {other:?}"),
                        Err(_) => return, // the daemon is gone
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked.lock().unwrap().len() < 400 {
        assert!(Instant::now() < deadline, "too few writes");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    d.signal(libc::SIGKILL);
    d.exits_within(Duration::from_secs(5)).await;
    for c in clients {
        c.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    println!("kill -9 after {} acknowledged writes", acked.len());
    let database = d.path("luamilter.db");
    let missing =
        tokio::task::spawn_blocking(move || crate::store::missing_after_reopen(&database, &acked))
            .await
            .unwrap();
    assert!(
        missing.is_empty(),
        "lost {} acknowledged writes: {missing:?}",
        missing.len()
    );
}

/// The stock greylist on a Redis store that dies and comes back under traffic: while it is
/// down recipients pass (`fail_closed = false`, the default) within the store timeout; once it
/// is back, greylisting resumes without a luamilter restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_mid_traffic() {
    let mut redis = crate::redis_server::RedisServer::start();
    let extra = format!(
        "[store]\nbackend = \"redis\"\nurl = {:?}\ntimeout = \"500ms\"\nconnect_timeout = \"500ms\"\n",
        redis.url
    );
    let d = TestDaemon::try_start_stock(&["greylist"], &extra)
        .await
        .unwrap();
    let mut senders = 0..;
    for _ in 0..5 {
        assert!(
            greylist_rcpt(d.client().await, senders.next().unwrap())
                .await
                .0
                .starts_with(GREYLISTED)
        );
    }
    redis.stop();
    for _ in 0..5 {
        let (answer, took) = greylist_rcpt(d.client().await, senders.next().unwrap()).await;
        assert_eq!(answer, "Continue", "redis down");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
    redis.restart();
    let back = Instant::now();
    loop {
        let (answer, _) = greylist_rcpt(d.client().await, senders.next().unwrap()).await;
        if answer.starts_with(GREYLISTED) {
            break;
        }
        assert_eq!(answer, "Continue");
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "greylisting did not resume"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "greylisting resumed {:?} after redis came back",
        back.elapsed()
    );
    d.stop().await;
}

#[tokio::test]
async fn a_reused_coroutine_runs_under_its_own_deadline() {
    // One Lua state: after the first call, handlers run on coroutines an earlier one returned
    // from, whose deadline is long past by the time they run again.
    let counting = r#"
return {
  mail = function(ctx, sender)
    if sender:match("^loop@") then while true do end end
    local n = 0
    for i = 1, 200000 do n = n + i end
  end,
}
"#;
    let d = TestDaemon::start(
        &[("counting", counting)],
        "[engine]\ntime_limit = \"500ms\"\nvms = 1\n",
    )
    .await;
    for _ in 0..2 {
        assert_eq!(mail_status(&d, "a@example.org").await, Status::Continue);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(mail_status(&d, "b@example.org").await, Status::Continue);
        assert_eq!(
            reply_text(&mail_status(&d, "loop@example.org").await),
            "451 4.3.0 Temporary policy failure, try again later"
        );
    }
    d.stop().await;
}

/// A lookup on the dead disk: SQLite answers a read that fails with EIO "database disk image
/// is malformed" (on purpose: a read error may be a damaged file system); the log says the
/// I/O error too, so that nobody takes the disk's death for a corrupt database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_reads_on_a_dead_disk_name_the_io_error() {
    let Some(disk) = TestDisk::ext4() else {
        return;
    };
    let db = disk.path("lookup.db");
    let extra = format!(
        "[store]\npath = {:?}\ntimeout = \"2s\"\n",
        db.display().to_string()
    );
    let d = DaemonProcess::start(&[("recorder", RECORDER)], "", &extra).unwrap();
    let mut c = d.client().await;
    c.connect("client.example", Ipv4Addr::new(192, 0, 2, 1))
        .await
        .unwrap();
    c.mail(["<s@example.net>"]).await.unwrap();
    for n in 0..20 {
        let status = c.rcpt([format!("<r{n}@example.org>")]).await.unwrap();
        assert_eq!(status, Status::Continue);
    }
    // The last write changed the database after the last lookup: the next lookup reads it.
    disk.fail(DiskFailure::Dies);
    let died = Instant::now();
    for n in 0..20 {
        let started = Instant::now();
        let status = c.rcpt([format!("<r{n}@example.org>")]).await.unwrap();
        assert_eq!(reply_text(&status), "451 4.7.1 lookup: unavailable");
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    let (status, log) = d.stop();
    assert!(status.success(), "{status}\n{log}");
    let warnings: Vec<_> = log.lines().filter(|l| !l.contains("level=INFO")).collect();
    println!("{warnings:#?}");
    let allowed = 1 + died.elapsed().as_secs() / 10;
    assert!((1..=allowed).contains(&(warnings.len() as u64)), "{log}");
    let error = format!("{}: {}", db.display(), DiskFailure::Dies.os_errors()[0]);
    assert!(
        warnings[0].contains("store.get failed") && warnings[0].contains(&error),
        "{log}"
    );
}

/// The number of files process `pid` has open.
fn open_files(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64
}

/// Sets the open files limit (soft and hard) of process `pid`.
fn limit_open_files(pid: u32, limit: u64) {
    let new = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: prlimit reads `new` and, with a null old limit, writes nothing.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &new,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// Whether a new session of `daemon`, from 192.0.2.`client`, gets its MAIL answered
/// `continue`.
async fn served(daemon: &DaemonProcess, client: u8) -> bool {
    let mut mta = daemon.client().await;
    mta.connect("client.test", Ipv4Addr::new(192, 0, 2, client))
        .await
        .is_ok()
        && matches!(mta.mail(["<a@example.org>"]).await, Ok(Status::Continue))
}

/// Out of file descriptors (`EMFILE`) under a flood of connections: the daemon says so once,
/// keeps the sessions it has, and serves new connections again once descriptors are free.
/// (indymilter alone ends its server at the first failed accept.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_daemon_keeps_serving() {
    let daemon = DaemonProcess::start(&[("gate", GATE)], "", "").unwrap();
    let mut session = daemon.client().await;
    session
        .connect("client.test", Ipv4Addr::new(192, 0, 2, 1))
        .await
        .unwrap();
    limit_open_files(daemon.pid(), open_files(daemon.pid()) + 10);
    let flood: Vec<_> = (0..40)
        .map(|_| std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap())
        .collect();
    let log = daemon.wait_for_log("cannot accept milter connections");
    assert!(log.contains("Too many open files"), "{log}");
    // The session open before the flood goes on.
    let status = session.mail(["<a@example.org>"]).await.unwrap();
    assert_eq!(status, Status::Continue);
    drop(flood);
    // Descriptors free again: a new connection is served.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if served(&daemon, 2).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not served again:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = daemon.log();
    assert!(!log.contains("ended with an error"), "{log}");
    let warnings = log.matches("cannot accept milter connections").count();
    assert!(warnings <= 2, "one warning per 10 s and listener:\n{log}");
}

/// The soft open files limit of process `pid`, from /proc.
fn soft_open_files_limit(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// The daemon raises its soft open files limit to the hard one, and says when even that is
/// short of `[milter] max_connections` (4096 by default).
#[test]
fn the_daemon_raises_its_open_files_limit_and_warns_when_short() {
    let daemon = DaemonProcess::start_with_open_files(&[("gate", GATE)], 256, 3000).unwrap();
    assert_eq!(soft_open_files_limit(daemon.pid()), 3000);
    let log = daemon.wait_for_log("open files limit is below");
    assert!(log.contains("open_files=3000"), "{log}");
    let daemon = DaemonProcess::start_with_open_files(&[("gate", GATE)], 256, 8192).unwrap();
    assert_eq!(soft_open_files_limit(daemon.pid()), 8192);
    assert!(
        !daemon.log().contains("open files limit"),
        "{}",
        daemon.log()
    );
}

/// At `[milter] max_connections` a further connection waits in the socket's backlog, and is
/// served once an open one closes; the daemon says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_a_new_one_waits_and_the_daemon_says_why() {
    let daemon = DaemonProcess::start(
        &[("gate", GATE)],
        "max_connections = 2",
        "[engine]\nworker_threads = 1\n",
    )
    .unwrap();
    let mut open = Vec::new();
    for n in 1..=2 {
        let mut mta = daemon.client().await;
        mta.connect("client.test", Ipv4Addr::new(192, 0, 2, n))
            .await
            .unwrap();
        open.push(mta);
    }
    let log = daemon.wait_for_log("max_connections allows");
    assert!(log.contains("max_connections=2"), "{log}");
    let waiting = indymilter_test::TestConnection::configure()
        .read_timeout(Duration::from_millis(500))
        .open_unix(&daemon.socket)
        .await;
    assert!(
        waiting.is_err(),
        "a third connection was served at the limit"
    );
    open.pop().unwrap().close().await.unwrap();
    assert!(
        served(&daemon, 3).await,
        "not served once a connection closed"
    );
    assert_eq!(
        daemon.log().matches("max_connections allows").count(),
        1,
        "at most one warning a minute:\n{}",
        daemon.log()
    );
}

/// A connection that stays silent for `[milter] connection_timeout` is closed, and frees its
/// place under `max_connections`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_after_the_connection_timeout() {
    use tokio::io::AsyncReadExt;
    let daemon = DaemonProcess::start(
        &[("gate", GATE)],
        "connection_timeout = \"1s\"\nmax_connections = 1",
        "[engine]\nworker_threads = 1\n",
    )
    .unwrap();
    let mut silent = tokio::net::UnixStream::connect(&daemon.socket)
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
        .await
        .expect("still open after 10 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // Its place is free again: a session is served.
    assert!(
        served(&daemon, 1).await,
        "not served after the silent one was closed"
    );
}
