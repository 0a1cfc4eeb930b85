//! Policy and service faults never become silent accepts and never take the daemon down;
//! limits hold. DNS faults come from real servers on loopback that fail each way
//! (docs/failure-modes.md lists the verdicts).

use crate::{
    dns_server::TestDns,
    support::{TestDaemon, reply_text},
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

/// A tmpfs of 256 KiB mounted on a temp dir, unmounted on drop; `None` (after saying why)
/// where mounting is not permitted.
struct TinyDisk {
    dir: tempfile::TempDir,
}

impl TinyDisk {
    fn mount() -> Option<TinyDisk> {
        let dir = tempfile::TempDir::new().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
            .arg(dir.path())
            .status();
        match status {
            Ok(s) if s.success() => Some(TinyDisk { dir }),
            other => {
                println!("SKIPPED: cannot mount a tmpfs ({other:?}); run the tests as root");
                None
            }
        }
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
        let path = self.dir.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        while file.write_all(&[0u8; 4096]).is_ok() {}
        path
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// The stock greylist policy, failing closed, on a database on `disk`.
async fn greylist_daemon(disk: &TinyDisk) -> Result<TestDaemon, String> {
    let extra = format!(
        "[store]\npath = {:?}\ntimeout = \"2s\"\n[policy.greylist]\nfail_closed = true\n",
        disk.dir.path().join("luamilter.db").display().to_string()
    );
    TestDaemon::try_start_stock(&["greylist"], &extra).await
}

/// The RCPT answer for a new triplet (sender `n`), and how long it took.
async fn greylist_rcpt(d: &TestDaemon, n: u32) -> (String, Duration) {
    let mut c = d.client().await;
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
    let Some(disk) = TinyDisk::mount() else {
        return;
    };
    let greylisted = "451-4.7.1 Greylisted";
    let unavailable = "451 4.3.0 Greylisting is unavailable, try again later";
    let d = greylist_daemon(&disk).await.unwrap();
    let first = greylist_rcpt(&d, 0).await.0;
    assert!(first.starts_with(greylisted), "{first}");

    // Disk full: the store refuses the write, the policy answers as documented, at once.
    let filler = disk.fill();
    for n in 1..=3 {
        let (answer, took) = greylist_rcpt(&d, n).await;
        assert_eq!(answer, unavailable, "disk full");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }
    // Space again: served normally without a restart.
    std::fs::remove_file(filler).unwrap();
    assert!(greylist_rcpt(&d, 4).await.0.starts_with(greylisted));

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

/// Stores every accepted recipient, and accepts it only once stored.
const RECORDER: &str = r#"
local milter = require "milter"
local store = require "milter.store"
return {
  rcpt = function(ctx, rcpt)
    local ok, err = store.set(rcpt, rcpt)
    if not ok then return milter.tempfail{ text = "store: " .. err } end
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
    let greylisted = "451-4.7.1 Greylisted";
    let mut senders = 0..;
    for _ in 0..5 {
        assert!(
            greylist_rcpt(&d, senders.next().unwrap())
                .await
                .0
                .starts_with(greylisted)
        );
    }
    redis.stop();
    for _ in 0..5 {
        let (answer, took) = greylist_rcpt(&d, senders.next().unwrap()).await;
        assert_eq!(answer, "Continue", "redis down");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
    redis.restart();
    let back = Instant::now();
    loop {
        let (answer, _) = greylist_rcpt(&d, senders.next().unwrap()).await;
        if answer.starts_with(greylisted) {
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
