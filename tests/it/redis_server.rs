//! A private `redis-server` on a loopback port for the tests: no persistence, killed on drop,
//! and stop/restart on the same port for the failure tests; extra arguments make replicas, TLS
//! or password servers, and [`RedisSentinel`] watches a master.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    /// `redis://127.0.0.1:PORT/`
    pub url: String,
    /// The loopback port it listens on.
    pub port: u16,
    dir: tempfile::TempDir,
    /// Arguments after the defaults; `{port}` and `{dir}` are replaced.
    extra: Vec<String>,
    /// Run as `redis-server CONFIG --sentinel` (the config file is written into `dir`).
    sentinel_config: Option<String>,
    child: Option<Child>,
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("no free loopback port")
        .port()
}

impl RedisServer {
    /// Starts a server on a free loopback port and waits until it accepts connections.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments (`{port}` and `{dir}` are replaced by
    /// its port and data directory), e.g. `["--replicaof", "127.0.0.1", "6379"]`.
    pub fn start_with(extra: &[&str]) -> RedisServer {
        RedisServer::spawn(free_port(), extra, None)
    }

    fn spawn(port: u16, extra: &[&str], sentinel_config: Option<String>) -> RedisServer {
        let mut server = RedisServer {
            url: format!("redis://127.0.0.1:{port}/"),
            port,
            dir: tempfile::tempdir().expect("temp dir"),
            extra: extra.iter().map(|a| a.to_string()).collect(),
            sentinel_config,
            child: None,
        };
        server.restart();
        server
    }

    /// Runs `redis-cli` against it and returns its output (for `INFO`, `CONFIG SET`...).
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (after [`RedisServer::stop`]).
    pub fn restart(&mut self) {
        self.stop();
        let dir = self
            .dir
            .path()
            .to_str()
            .expect("UTF-8 temp dir")
            .to_string();
        let mut command = Command::new("redis-server");
        if let Some(config) = &self.sentinel_config {
            let file = self.dir.path().join("sentinel.conf");
            std::fs::write(&file, config).expect("sentinel.conf");
            command.arg(file).arg("--sentinel");
        }
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--daemonize", "no", "--dir", &dir]);
        if self.sentinel_config.is_none() {
            command.args(["--save", "", "--appendonly", "no"]);
        }
        let port = self.port.to_string();
        let child = command
            .args(
                self.extra
                    .iter()
                    .map(|a| a.replace("{port}", &port).replace("{dir}", &dir)),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run redis-server ({e}): the store tests need it; install it with \
                     `apt-get install -y redis-server`"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A `redis-server --sentinel` watching one master under the name `mymaster`, with short
/// failure detection (`down-after-milliseconds`) for the tests.
pub struct RedisSentinel(RedisServer);

impl RedisSentinel {
    /// Starts a sentinel for the master on `master_port`; `quorum` sentinels must agree.
    pub fn start(master_port: u16, quorum: u32) -> RedisSentinel {
        RedisSentinel::start_with(master_port, quorum, &[])
    }

    /// [`RedisSentinel::start`] with extra arguments, as [`RedisServer::start_with`] takes them
    /// (`--requirepass`, `--tls-port`, `--sentinel auth-pass mymaster PASSWORD`...).
    pub fn start_with(master_port: u16, quorum: u32, extra: &[&str]) -> RedisSentinel {
        let config = format!(
            "sentinel monitor mymaster 127.0.0.1 {master_port} {quorum}\n\
             sentinel down-after-milliseconds mymaster 500\n\
             sentinel failover-timeout mymaster 5000\n\
             sentinel parallel-syncs mymaster 1\n"
        );
        RedisSentinel(RedisServer::spawn(free_port(), extra, Some(config)))
    }

    /// `127.0.0.1:PORT`, as `[store] sentinels` takes it.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.0.port)
    }

    /// A numeric field of `SENTINEL MASTER mymaster` ("num-slaves", "num-other-sentinels").
    pub fn master_field(&self, name: &str) -> Option<usize> {
        let out = self.0.cli(&["SENTINEL", "MASTER", "mymaster"]);
        let mut lines = out.lines();
        lines.find(|l| l.trim() == name)?;
        lines.next()?.trim().parse().ok()
    }

    /// Asks for a failover now (`SENTINEL FAILOVER`), as for maintenance of the master.
    pub fn failover(&self) {
        let out = self.0.cli(&["SENTINEL", "FAILOVER", "mymaster"]);
        assert!(out.contains("OK"), "SENTINEL FAILOVER: {out}");
    }

    /// The master's port as this sentinel sees it.
    pub fn master_port(&self) -> Option<u16> {
        let out = self
            .0
            .cli(&["SENTINEL", "get-master-addr-by-name", "mymaster"]);
        out.lines().nth(1)?.trim().parse().ok()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
