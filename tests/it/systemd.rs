//! systemd integration through the real binary: sd_notify messages read from a real
//! `NOTIFY_SOCKET` datagram socket, the watchdog pings stopping while the only worker thread is
//! wedged in a policy, a listening socket passed as systemd does (`LISTEN_FDS`, fd 3), and the
//! shipped unit files checked by `systemd-analyze verify`.

use crate::support::{Mta, write_config};
use indymilter_test::{Status, TestConnection};
use std::{
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};
use tempfile::TempDir;
use tokio::{net::UnixDatagram, process::Child};

/// The service manager's end of `NOTIFY_SOCKET`.
struct Manager {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Manager {
    fn bind(dir: &TempDir) -> Manager {
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        Manager { socket, path }
    }

    /// The next message, or None after `within`.
    async fn next(&self, within: Duration) -> Option<String> {
        let mut buf = vec![0u8; 4096];
        match tokio::time::timeout(within, self.socket.recv(&mut buf)).await {
            Ok(Ok(n)) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Ok(Err(e)) => panic!("notify socket: {e}"),
            Err(_) => None,
        }
    }

    /// The first message with line `line` within 10 s; messages before it are skipped.
    async fn expect(&self, line: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Some(m) if m.lines().any(|l| l == line) => return m,
                Some(_) => {}
                None => panic!("no {line} from the daemon within 10 s"),
            }
        }
    }

    /// Every message received during `span`, each with its arrival time.
    async fn collect(&self, span: Duration) -> Vec<(Instant, String)> {
        let end = Instant::now() + span;
        let mut got = Vec::new();
        while let Some(m) = self
            .next(end.saturating_duration_since(Instant::now()))
            .await
        {
            got.push((Instant::now(), m));
        }
        got
    }
}

fn daemon(config: &Path, notify: &Manager) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_luamilter"));
    cmd.args(["run", "--config"])
        .arg(config)
        .env("NOTIFY_SOCKET", &notify.path)
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .kill_on_drop(true);
    cmd
}

fn signal(child: &Child, sig: i32) {
    let pid = child.id().unwrap() as i32;
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(pid, sig) };
}

async fn exits(mut child: Child) {
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the daemon did not exit within 10 s")
        .unwrap();
    assert!(status.success(), "{status}");
}

const GATE: &str = "local milter = require 'milter'\nreturn { mail = function(ctx, s) if s == 'a@example.org' then return milter.reject() end end }\n";

async fn refused(mut mta: Mta) -> bool {
    mta.connect("h", std::net::Ipv4Addr::LOCALHOST)
        .await
        .unwrap();
    let refused = matches!(
        mta.mail(["<a@example.org>"]).await.unwrap(),
        Status::Reject { .. }
    );
    mta.close().await.unwrap();
    refused
}

#[tokio::test]
async fn notifies_ready_reloading_status_and_stopping() {
    let dir = TempDir::new().unwrap();
    let notify = Manager::bind(&dir);
    let sock = dir.path().join("milter.sock");
    let config = write_config(
        &dir,
        &format!("unix:{}", sock.display()),
        &[("gate", GATE)],
        "watch = false\n",
    );
    let child = daemon(&config, &notify).spawn().unwrap();

    let ready = notify.expect("READY=1").await;
    assert!(
        ready.lines().any(|l| l == "STATUS=serving generation 1"),
        "{ready}"
    );
    assert!(sock.exists(), "READY=1 comes after the socket is bound");

    signal(&child, libc::SIGHUP);
    let reloading = notify.expect("RELOADING=1").await;
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{reloading}"
    );
    let ready = notify.expect("READY=1").await;
    assert!(
        ready.lines().any(|l| l == "STATUS=serving generation 2"),
        "{ready}"
    );

    // A failed reload ends RELOADING too, and says so.
    std::fs::write(dir.path().join("gate.lua"), "return {").unwrap();
    signal(&child, libc::SIGHUP);
    notify.expect("RELOADING=1").await;
    let ready = notify.expect("READY=1").await;
    assert!(
        ready
            .lines()
            .any(|l| l == "STATUS=serving generation 2 (last reload failed)"),
        "{ready}"
    );

    signal(&child, libc::SIGTERM);
    notify.expect("STOPPING=1").await;
    exits(child).await;
}

#[tokio::test]
async fn watchdog_pings_stop_while_the_worker_is_wedged() {
    let dir = TempDir::new().unwrap();
    let notify = Manager::bind(&dir);
    let sock = dir.path().join("milter.sock");
    // One worker thread; a sender that makes its handler spin until the 6 s time limit (long
    // enough that the checks below end well before it, even on a loaded machine).
    let wedge = "return { mail = function(ctx, s) if s == 'wedge@example.org' then while true do end end end }\n";
    let config = write_config(
        &dir,
        &format!("unix:{}", sock.display()),
        &[("wedge", wedge)],
        "watch = false\n[engine]\nworker_threads = 1\ntime_limit = \"6s\"\n",
    );
    let child = daemon(&config, &notify)
        .env("WATCHDOG_USEC", "500000")
        .spawn()
        .unwrap();
    notify.expect("READY=1").await;

    // Serving: a ping about every 250 ms (half of WATCHDOG_USEC).
    let pings: Vec<Instant> = notify
        .collect(Duration::from_millis(2000))
        .await
        .into_iter()
        .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(at, _)| at)
        .collect();
    assert!(
        (3..=14).contains(&pings.len()),
        "{} pings in 2 s",
        pings.len()
    );
    let mean = (*pings.last().unwrap() - pings[0]) / (pings.len() as u32 - 1);
    assert!(
        mean >= Duration::from_millis(150) && mean <= Duration::from_millis(700),
        "pings every {mean:?}"
    );

    // Wedge the only worker thread.
    let wedged_at = Instant::now();
    let sock2 = sock.clone();
    let client = tokio::spawn(async move {
        let mut mta = Mta(TestConnection::configure().open_unix(&sock2).await.unwrap());
        mta.connect("h", std::net::Ipv4Addr::LOCALHOST)
            .await
            .unwrap();
        mta.mail(["<wedge@example.org>"]).await.unwrap()
    });
    // Pings already on their way may still arrive; after 800 ms the heartbeat is stale.
    notify.collect(Duration::from_millis(800)).await;
    let during = notify.collect(Duration::from_millis(1700)).await;
    assert!(
        wedged_at.elapsed() < Duration::from_millis(5500),
        "the window must end before the time limit frees the worker"
    );
    assert!(
        !during
            .iter()
            .any(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1")),
        "the watchdog was fed while the worker was wedged: {during:?}"
    );

    // The time limit ends the handler; the worker serves again and the pings resume.
    let answer = tokio::time::timeout(Duration::from_secs(10), client)
        .await
        .unwrap()
        .unwrap();
    assert!(
        !matches!(answer, Status::Continue),
        "the time limit answers with exception_policy: {answer:?}"
    );
    notify.expect("WATCHDOG=1").await;

    signal(&child, libc::SIGTERM);
    exits(child).await;
}

/// A listening socket passed to the real binary as systemd passes it: at fd 3, with
/// `LISTEN_FDS=1` and `LISTEN_PID` naming the process (the shell's pid, kept by `exec`).
fn activated(config: &Path, notify: &Manager, listener: &impl AsRawFd) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.args([
        "-c",
        "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" run --config \"$1\"",
        env!("CARGO_BIN_EXE_luamilter"),
    ])
    .arg(config)
    .env("NOTIFY_SOCKET", &notify.path)
    .env_remove("WATCHDOG_USEC")
    .env_remove("WATCHDOG_PID")
    .kill_on_drop(true);
    let fd = listener.as_raw_fd();
    // SAFETY: dup2 and fcntl are async-signal-safe; only the child's descriptor table changes.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                let flags = libc::fcntl(3, libc::F_GETFD);
                if libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

fn activation_config(dir: &TempDir) -> (PathBuf, PathBuf) {
    // `listen` names a path nobody binds: the passed socket is served instead.
    let unused = dir.path().join("not-bound.sock");
    let config = write_config(
        dir,
        &format!("unix:{}", unused.display()),
        &[("gate", GATE)],
        "watch = false\n",
    );
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[milter]\n", "[milter]\nsocket_activation = true\n");
    std::fs::write(&config, text).unwrap();
    (config, unused)
}

#[tokio::test]
async fn serves_a_passed_tcp_socket() {
    let dir = TempDir::new().unwrap();
    let notify = Manager::bind(&dir);
    let (config, unused) = activation_config(&dir);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let child = activated(&config, &notify, &listener).spawn().unwrap();
    notify.expect("READY=1").await;
    assert!(!unused.exists(), "`listen` is not bound under activation");
    let mta = Mta(TestConnection::configure().open_tcp(addr).await.unwrap());
    assert!(
        refused(mta).await,
        "the policy answers on the passed socket"
    );
    signal(&child, libc::SIGTERM);
    exits(child).await;
}

#[tokio::test]
async fn serves_a_passed_unix_socket_and_leaves_its_file() {
    let dir = TempDir::new().unwrap();
    let notify = Manager::bind(&dir);
    let (config, unused) = activation_config(&dir);
    let path = dir.path().join("activated.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let child = activated(&config, &notify, &listener).spawn().unwrap();
    notify.expect("READY=1").await;
    assert!(!unused.exists(), "`listen` is not bound under activation");
    let mta = Mta(TestConnection::configure().open_unix(&path).await.unwrap());
    assert!(
        refused(mta).await,
        "the policy answers on the passed socket"
    );
    signal(&child, libc::SIGTERM);
    exits(child).await;
    assert!(path.exists(), "the socket file belongs to systemd");
}

#[test]
fn socket_activation_without_a_passed_socket_fails_to_start() {
    let dir = TempDir::new().unwrap();
    let (config, _) = activation_config(&dir);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_luamilter"))
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("systemd passed no socket"), "{stderr}");
}

#[test]
fn shipped_unit_files_pass_systemd_analyze_verify() {
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/systemd");
    let analyze = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(analyze) = analyze else {
        eprintln!(
            "SKIPPED shipped_unit_files_pass_systemd_analyze_verify: systemd-analyze is not \
             installed (apt-get install systemd)"
        );
        return;
    };
    let dir = TempDir::new().unwrap();
    // verify checks that ExecStart's binary exists: point it at the one just built.
    for name in ["luamilter.service", "luamilter.socket"] {
        let text = std::fs::read_to_string(units.join(name))
            .unwrap()
            .replace("/usr/bin/luamilter", env!("CARGO_BIN_EXE_luamilter"));
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let out = std::process::Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(dir.path().join("luamilter.service"))
        .arg(dir.path().join("luamilter.socket"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("luamilter."), "{stderr}");
}
