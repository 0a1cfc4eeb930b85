//! The real `luamilter run` binary as a child process on a unix socket: for the tests that
//! watch the daemon from outside (does it stay alive, how much memory it holds, how it answers
//! signals).

use super::{Mta, write_config};
use indymilter_test::TestConnection;
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};
use tempfile::TempDir;
use tokio::process::Child;

/// A `luamilter run` child serving a unix socket in its temp dir; killed on drop.
pub struct ChildDaemon {
    pub child: Child,
    pub dir: TempDir,
    /// The milter socket.
    pub socket: PathBuf,
    /// The config file.
    pub config: PathBuf,
}

impl ChildDaemon {
    /// Writes the policies and config (as [`write_config`] does, plus `extra`) and starts the
    /// binary; returns once the milter socket accepts connections and the control socket is
    /// there.
    pub async fn start(policies: &[(&str, &str)], extra: &str) -> ChildDaemon {
        let dir = TempDir::new().unwrap();
        let socket = dir.path().join("milter.sock");
        let config = write_config(&dir, &format!("unix:{}", socket.display()), policies, extra);
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_luamilter"))
            .args(["run", "--config"])
            .arg(&config)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut process = ChildDaemon {
            child,
            dir,
            socket,
            config,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        // The control socket is bound after the milter socket.
        while tokio::net::UnixStream::connect(&process.socket)
            .await
            .is_err()
            || !process.control_socket().exists()
        {
            assert!(process.alive(), "the daemon exited at start");
            assert!(Instant::now() < deadline, "the daemon did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        process
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id().expect("the daemon has exited") as i32
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Resident memory (VmRSS) in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// Sends signal `sig`.
    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// A milter client connection (everything offered).
    pub async fn client(&self) -> Mta {
        Mta(TestConnection::configure()
            .read_timeout(Duration::from_secs(10))
            .open_unix(&self.socket)
            .await
            .unwrap())
    }

    /// The control socket path.
    pub fn control_socket(&self) -> PathBuf {
        self.dir.path().join("ctl.sock")
    }

    /// A file in the daemon's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Waits for the process to exit, at most `within`.
    pub async fn exits_within(&mut self, within: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the daemon did not exit within {within:?}"))
            .unwrap()
    }
}
