//! Who may talk to the daemon: the socket permissions, and what an unprivileged local user
//! (`nobody`, through `setpriv`) can do with the milter and control sockets and `luamilter ctl`.

use crate::support::DaemonProcess;
use std::{os::unix::fs::PermissionsExt, path::Path, process::Output};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// `luamilter ARGS` run as `nobody` (uid and gid 65534, no supplementary groups).
fn as_nobody(args: &[&str]) -> Output {
    std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_luamilter"))
        .args(args)
        .output()
        .expect("setpriv (util-linux) runs luamilter as nobody")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unprivileged_user_can_neither_filter_nor_control() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED: needs root to run commands as nobody");
        return;
    }
    // No file watcher: the chmod below must not count as an edit.
    // Only the sockets' own modes stand in the way: the daemon's directory is open to everyone.
    let d = DaemonProcess::start(
        &[("gate", "return { mail = function() end }")],
        "",
        "watch = false\n",
    )
    .unwrap();
    let ctl_socket = d.control_socket();
    assert_eq!(
        mode(&d.socket),
        0o660,
        "milter socket: socket_mode's default"
    );
    assert_eq!(mode(&ctl_socket), 0o600, "control socket: its owner only");
    let (milter, ctl, config) = (
        d.socket.to_str().unwrap(),
        ctl_socket.to_str().unwrap(),
        d.config.to_str().unwrap(),
    );

    // The milter socket: no connection for others.
    let out = as_nobody(&["ctl", "--socket", milter, "stats"]);
    assert!(
        !out.status.success() && text(&out).contains("Permission denied"),
        "{}",
        text(&out)
    );
    // The control socket: no connection either, for every command.
    for command in ["stats", "reload"] {
        let out = as_nobody(&["ctl", "--config", config, command]);
        assert!(
            !out.status.success() && text(&out).contains("Permission denied"),
            "{command}: {}",
            text(&out)
        );
    }
    // An admin who loosens the control socket's mode still keeps nobody out.
    std::fs::set_permissions(&ctl_socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    for command in ["stats", "reload"] {
        let out = as_nobody(&["ctl", "--socket", ctl, command]);
        assert!(
            !out.status.success()
                && text(&out).contains("permission denied: uid 65534 may not control this daemon"),
            "{command}: {}",
            text(&out)
        );
    }
    let stats = luamilter::control::request(&ctl_socket, "stats")
        .await
        .unwrap();
    assert!(
        stats.contains("reloads_ok 0\n"),
        "nobody's reload did not happen: {stats}"
    );
}
