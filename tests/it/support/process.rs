//! The daemon as a separate process (`luamilter run`), for what a process owns alone: the
//! global metrics recorder, its log output, its pid, privileges, memory and signals, whether
//! it stays alive. Its standard error is collected while it runs; it is killed if the test
//! drops it still running.

use super::{Mta, write_config, write_stock_config};
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tempfile::TempDir;

/// A `luamilter run` process serving a unix socket in its temp dir.
pub struct DaemonProcess {
    child: Child,
    /// The temp dir holding the config, the policies, the socket and the store.
    pub dir: TempDir,
    /// The config file.
    pub config: PathBuf,
    /// The milter socket.
    pub socket: PathBuf,
    log: Arc<Mutex<String>>,
}

impl DaemonProcess {
    /// Writes `policies` and a config into a new temp dir (see [`DaemonProcess::new_dir`]) and
    /// starts the daemon on it: `milter` is added to the `[milter]` table, `extra` TOML at the
    /// end.
    pub fn start(
        policies: &[(&str, &str)],
        milter: &str,
        extra: &str,
    ) -> Result<DaemonProcess, String> {
        let (dir, socket) = Self::new_dir();
        let config = write_config(&dir, &format!("unix:{}", socket.display()), policies, extra);
        let text = std::fs::read_to_string(&config).unwrap().replacen(
            "[milter]\n",
            &format!("[milter]\n{milter}\n"),
            1,
        );
        std::fs::write(&config, text).unwrap();
        Self::start_config(dir, config, socket)
    }

    /// [`DaemonProcess::start`] for a chain of policies of the stock pack, by name.
    pub fn start_stock(stock: &[&str], extra: &str) -> Result<DaemonProcess, String> {
        let (dir, socket) = Self::new_dir();
        let listen = format!("unix:{}", socket.display());
        let config = write_stock_config(&dir, &listen, stock, extra);
        Self::start_config(dir, config, socket)
    }

    /// A new temp dir (mode 0755, so Postfix and an unprivileged daemon can reach the socket)
    /// and the path of the milter socket in it.
    fn new_dir() -> (TempDir, PathBuf) {
        let dir = TempDir::new().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let socket = dir.path().join("milter.sock");
        (dir, socket)
    }

    /// Starts the daemon on the config file `config` (in `dir`), whose `[milter] listen` is
    /// `unix:SOCKET`; returns once the milter socket accepts connections and the control socket
    /// (bound after it) is there.
    pub fn start_config(
        dir: TempDir,
        config: PathBuf,
        socket: PathBuf,
    ) -> Result<DaemonProcess, String> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_luamilter"));
        command.args(["run", "--config"]).arg(&config);
        Self::spawn(dir, config, socket, command)
    }

    /// [`DaemonProcess::start`], run by `prlimit` with an open files limit of `soft` (and
    /// `hard`).
    pub fn start_with_open_files(
        policies: &[(&str, &str)],
        soft: u64,
        hard: u64,
    ) -> Result<DaemonProcess, String> {
        let (dir, socket) = Self::new_dir();
        let config = write_config(&dir, &format!("unix:{}", socket.display()), policies, "");
        let mut command = Command::new("prlimit");
        command
            .arg(format!("--nofile={soft}:{hard}"))
            .args(["--", env!("CARGO_BIN_EXE_luamilter"), "run", "--config"])
            .arg(&config);
        Self::spawn(dir, config, socket, command)
    }

    /// Runs `command` (the daemon on `config`) as [`DaemonProcess::start_config`] does.
    fn spawn(
        dir: TempDir,
        config: PathBuf,
        socket: PathBuf,
        mut command: Command,
    ) -> Result<DaemonProcess, String> {
        let mut child = command
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run luamilter: {e}"))?;
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let collected = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = collected.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut daemon = DaemonProcess {
            child,
            dir,
            config,
            socket,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&daemon.socket).is_err()
            || !daemon.control_socket().exists()
        {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                return Err(format!("luamilter exited ({status}):\n{}", daemon.log()));
            }
            if Instant::now() > deadline {
                return Err(format!("luamilter did not start:\n{}", daemon.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
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

    /// The control socket path.
    pub fn control_socket(&self) -> PathBuf {
        self.dir.path().join("ctl.sock")
    }

    /// A file in the daemon's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Everything it wrote to standard error so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log has a line containing `text` (at most 10 s) and returns the log.
    pub fn wait_for_log(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if log.contains(text) {
                return log;
            }
            assert!(Instant::now() < deadline, "no {text:?} in the log:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A milter client connection to its socket.
    pub async fn client(&self) -> Mta {
        Mta(indymilter_test::TestConnection::configure()
            .read_timeout(Duration::from_secs(10))
            .open_unix(&self.socket)
            .await
            .unwrap())
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// Waits for the process to exit, at most `within`.
    pub async fn exits_within(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then waits (at most 10 s) for it to exit; returns its status and its log.
    pub fn stop(mut self) -> (ExitStatus, String) {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "luamilter did not exit on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // Let the reader thread take the last lines.
        std::thread::sleep(Duration::from_millis(100));
        (status, self.log())
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `GET path` over plain HTTP/1.0 (one response, then the server closes: no chunking);
/// returns the status line and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {response}"));
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, body.to_string())
}
