//! `[milter] pid_file`, `user` and `group` for supervisors other than systemd: the daemon as a
//! process started as root, checked through /proc, its socket and its pid file.

use crate::support::process::DaemonProcess;
use indymilter_test::Status;
use std::{net::Ipv4Addr, os::unix::fs::MetadataExt};

/// Uses the store (a write and a read) so the test shows it still works after the switch.
const POLICY: &str = r#"
local milter = require "milter"
local store = require "milter.store"
return {
  mail = function(ctx, sender)
    local n = assert(store.incr("senders:" .. sender, 1))
    assert(store.get("senders:" .. sender) == n)
    if n > 1 then return milter.tempfail{ text = "seen " .. n } end
  end,
}"#;

/// `Uid:` or `Gid:` of a /proc status file: real, effective, saved and filesystem ids.
fn ids(status: &std::path::Path, field: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(status).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in {status}"));
    line.split_whitespace()
        .skip(1)
        .map(|n| n.parse().unwrap())
        .collect()
}

/// The uid of `nobody` and the gid of `daemon` (both in every Debian base system).
fn nobody_and_daemon() -> (u32, u32) {
    let nobody = luamilter::privileges::Identity::lookup("nobody", Some("daemon")).unwrap();
    (nobody.uid, nobody.gid)
}

async fn mail(daemon: &DaemonProcess, sender: &str) -> Status {
    let mut mta = daemon.client().await;
    mta.connect("client.test", Ipv4Addr::new(192, 0, 2, 9))
        .await
        .unwrap();
    let status = mta.mail([format!("<{sender}>")]).await.unwrap();
    mta.close().await.unwrap();
    status
}

#[tokio::test]
async fn runs_as_the_configured_user_and_group_with_a_pid_file() {
    // SAFETY: geteuid cannot fail.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test must run as root");
    let (uid, gid) = nobody_and_daemon();
    let dir = tempfile::TempDir::new().unwrap();
    // The pid file's directory belongs to the user, so it can be removed at exit.
    std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
    let pid_path = dir.path().join("luamilter.pid");
    let milter = format!("pid_file = {pid_path:?}\nuser = \"nobody\"\ngroup = \"daemon\"");
    let daemon = DaemonProcess::start(&[("gate", POLICY)], &milter, "").unwrap();
    // The socket dir too: the socket file is removed at exit.
    std::os::unix::fs::chown(daemon.dir.path(), Some(uid), Some(gid)).unwrap();
    daemon.wait_for_log("dropped privileges");
    let pid = daemon.pid();
    // Every thread (workers, runtime, store writer, log writer), not only the main one.
    let mut threads = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = task.unwrap().path().join("status");
        assert_eq!(ids(&status, "Uid"), [uid; 4], "{}", status.display());
        assert_eq!(ids(&status, "Gid"), [gid; 4], "{}", status.display());
        threads += 1;
    }
    assert!(threads > 2, "{threads} threads");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().eq(["Groups:", &gid.to_string()])),
        "{status}"
    );
    assert_eq!(
        std::fs::read_to_string(&pid_path).unwrap(),
        format!("{pid}\n")
    );
    let socket = std::fs::metadata(&daemon.socket).unwrap();
    assert_eq!((socket.uid(), socket.gid()), (uid, gid));
    assert_eq!(socket.mode() & 0o777, 0o660);

    // Mail flows, and the store (opened as root) is written and read as the user.
    assert_eq!(mail(&daemon, "a@example.org").await, Status::Continue);
    assert!(matches!(
        mail(&daemon, "a@example.org").await,
        Status::Tempfail { .. }
    ));

    // A second daemon on the same pid file is refused while the first runs.
    let err = DaemonProcess::start(&[("gate", POLICY)], &milter, "")
        .err()
        .expect("a second daemon started on a live pid file");
    assert!(err.contains(&format!("process {pid} is running")), "{err}");

    // A reload reads the config and policies as the user.
    daemon.signal(libc::SIGHUP);
    daemon.wait_for_log("reloaded");

    let socket = daemon.socket.clone();
    let (exit, log) = daemon.stop();
    assert!(exit.success(), "{exit}\n{log}");
    assert!(!pid_path.exists(), "the pid file was not removed:\n{log}");
    assert!(!socket.exists(), "the socket was not removed:\n{log}");
    assert!(!log.contains("ERROR"), "{log}");
}

#[test]
fn an_unknown_user_stops_the_start_with_its_name() {
    let err = DaemonProcess::start(&[("p", "return {}")], "user = \"no-such-user-4711\"", "")
        .err()
        .expect("started with an unknown user");
    assert!(err.contains("no user \"no-such-user-4711\""), "{err}");
}
