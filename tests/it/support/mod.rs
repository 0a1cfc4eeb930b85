//! Shared test support: a daemon with policies written into a temp dir, and a private Postfix.

#![allow(dead_code)]

mod clock;
pub mod postfix;
pub mod process;

pub use clock::TestClock;
pub use process::DaemonProcess;

use indymilter_test::{TestConnection, TestConnectionBuilder};
use luamilter::{config::Config, daemon::Daemon, listen::ListenAddr};
use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::Once,
    time::Duration,
};
use tempfile::TempDir;

/// A daemon running in this test's runtime, with its policy directory.
pub struct TestDaemon {
    pub daemon: Option<Daemon>,
    pub dir: TempDir,
    /// The store's clock: it stands still unless the test advances it.
    pub clock: TestClock,
}

static LOGGING: Once = Once::new();

fn init_logging() {
    LOGGING.call_once(|| {
        let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    });
}

/// Writes `policies` (name, source) into a temp dir and a config whose chain lists them in
/// order, plus `extra` TOML appended to it. Listens on 127.0.0.1 with an ephemeral port.
pub fn write_config(
    dir: &TempDir,
    listen: &str,
    policies: &[(&str, &str)],
    extra: &str,
) -> PathBuf {
    for (name, source) in policies {
        std::fs::write(dir.path().join(format!("{name}.lua")), source).unwrap();
    }
    let chain: Vec<String> = policies.iter().map(|(n, _)| format!("{n:?}")).collect();
    let control = dir.path().join("ctl.sock");
    let text = format!(
        "[milter]\nlisten = {listen:?}\ncontrol_socket = {control:?}\n[policies]\ndirs = [\".\"]\nchain = [{}]\n{extra}\n",
        chain.join(", ")
    );
    let path = dir.path().join("luamilter.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// [`write_config`] for a chain of policies of the stock pack, by name.
pub fn write_stock_config(dir: &TempDir, listen: &str, stock: &[&str], extra: &str) -> PathBuf {
    let path = write_config(dir, listen, &[], extra);
    let chain: Vec<String> = stock.iter().map(|n| format!("{n:?}")).collect();
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("chain = []", &format!("chain = [{}]", chain.join(", ")));
    std::fs::write(&path, text).unwrap();
    path
}

impl TestDaemon {
    /// Starts a daemon on TCP loopback with these policies.
    pub async fn start(policies: &[(&str, &str)], extra: &str) -> TestDaemon {
        Self::try_start(policies, extra, "inet:0@127.0.0.1")
            .await
            .unwrap()
    }

    /// Starts a daemon on a unix socket in the temp dir.
    pub async fn start_unix(policies: &[(&str, &str)], extra: &str) -> TestDaemon {
        let dir = TempDir::new().unwrap();
        let sock = dir.path().join("milter.sock");
        Self::start_in(dir, policies, extra, &format!("unix:{}", sock.display()))
            .await
            .unwrap()
    }

    /// Starts a daemon and returns the start error as text when it fails.
    pub async fn try_start(
        policies: &[(&str, &str)],
        extra: &str,
        listen: &str,
    ) -> Result<TestDaemon, String> {
        Self::start_in(TempDir::new().unwrap(), policies, extra, listen).await
    }

    /// Starts a daemon on TCP loopback whose chain is policies of the stock pack, by name.
    pub async fn try_start_stock(stock: &[&str], extra: &str) -> Result<TestDaemon, String> {
        let dir = TempDir::new().unwrap();
        let path = write_stock_config(&dir, "inet:0@127.0.0.1", stock, extra);
        Self::start_config(dir, &path).await
    }

    /// Starts a daemon whose config and policies are written into `dir` (which may hold other
    /// files already, such as Lua modules the policies require).
    pub async fn start_in(
        dir: TempDir,
        policies: &[(&str, &str)],
        extra: &str,
        listen: &str,
    ) -> Result<TestDaemon, String> {
        let path = write_config(&dir, listen, policies, extra);
        Self::start_config(dir, &path).await
    }

    /// Starts a daemon on the config file `path`, which lives in `dir`.
    pub async fn start_config(dir: TempDir, path: &std::path::Path) -> Result<TestDaemon, String> {
        init_logging();
        let config = Config::load(path).map_err(|e| e.to_string())?;
        let clock = TestClock::new();
        let daemon = Daemon::start_with_clock(config, clock.clock())
            .await
            .map_err(|e| e.to_string())?;
        Ok(TestDaemon {
            daemon: Some(daemon),
            dir,
            clock,
        })
    }

    /// The address the daemon listens on.
    pub fn local(&self) -> &ListenAddr {
        &self.daemon.as_ref().unwrap().local
    }

    /// A client connection with the defaults (everything offered).
    pub async fn client(&self) -> Mta {
        self.client_with(TestConnection::configure()).await
    }

    /// A client connection from a configured builder.
    pub async fn client_with(&self, builder: TestConnectionBuilder) -> Mta {
        let builder = builder.read_timeout(Duration::from_secs(10));
        Mta(match self.local() {
            ListenAddr::Inet(addr) => builder.open_tcp(addr).await.unwrap(),
            ListenAddr::Unix(path) => builder.open_unix(path).await.unwrap(),
        })
    }

    /// Stops the daemon.
    pub async fn stop(mut self) {
        if let Some(d) = self.daemon.take() {
            d.stop(Duration::from_secs(5)).await;
        }
    }
}

/// Runs `luamilter COMMAND --config CONFIG ARGS...` to its end and returns its output.
pub fn luamilter_cli(command: &str, config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_luamilter"))
        .args([command, "--config"])
        .arg(config)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run luamilter {command}: {e}"))
}

/// The reply text of a reject or tempfail status.
pub fn reply_text(status: &indymilter_test::Status) -> String {
    match status {
        indymilter_test::Status::Reject { message: Some(m) }
        | indymilter_test::Status::Tempfail { message: Some(m) } => {
            m.to_string_lossy().into_owned()
        }
        other => format!("{other:?}"),
    }
}

/// The value of the first header named `name` that the milter added or inserted.
pub fn added_header(actions: &indymilter_test::EomActions, name: &str) -> Option<String> {
    actions.actions.iter().find_map(|a| match a {
        indymilter_test::EomAction::AddHeader { name: n, value }
        | indymilter_test::EomAction::InsertHeader { name: n, value, .. }
            if n.to_str() == Ok(name) =>
        {
            Some(value.to_string_lossy().into_owned())
        }
        _ => None,
    })
}

/// A milter client that behaves like an MTA about negotiation: a stage the milter asked the
/// MTA to skip is not sent, and reads as `Status::Skip`. Everything else is the
/// `indymilter_test` connection.
pub struct Mta(pub TestConnection);

impl std::ops::Deref for Mta {
    type Target = TestConnection;
    fn deref(&self) -> &TestConnection {
        &self.0
    }
}

impl std::ops::DerefMut for Mta {
    fn deref_mut(&mut self) -> &mut TestConnection {
        &mut self.0
    }
}

type TestResult<T> = Result<T, indymilter_test::TestError>;

impl Mta {
    fn skipped(&self, flag: indymilter::ProtoOpts) -> bool {
        self.0.negotiated_opts().contains(flag)
    }

    pub async fn connect(
        &mut self,
        host: &str,
        ip: impl Into<std::net::IpAddr>,
    ) -> TestResult<indymilter_test::Status> {
        if self.skipped(indymilter::ProtoOpts::NO_CONNECT) {
            return Ok(indymilter_test::Status::Skip);
        }
        self.0.connect(host, ip.into()).await
    }

    pub async fn helo(&mut self, name: &str) -> TestResult<indymilter_test::Status> {
        if self.skipped(indymilter::ProtoOpts::NO_HELO) {
            return Ok(indymilter_test::Status::Skip);
        }
        self.0.helo(name).await
    }

    pub async fn mail<I: IntoIterator<Item = T>, T: indymilter::IntoCString>(
        &mut self,
        args: I,
    ) -> TestResult<indymilter_test::Status> {
        if self.skipped(indymilter::ProtoOpts::NO_MAIL) {
            return Ok(indymilter_test::Status::Skip);
        }
        self.0.mail(args).await
    }

    pub async fn rcpt<I: IntoIterator<Item = T>, T: indymilter::IntoCString>(
        &mut self,
        args: I,
    ) -> TestResult<indymilter_test::Status> {
        if self.skipped(indymilter::ProtoOpts::NO_RCPT) {
            return Ok(indymilter_test::Status::Skip);
        }
        self.0.rcpt(args).await
    }

    pub async fn data(&mut self) -> TestResult<indymilter_test::Status> {
        if self.skipped(indymilter::ProtoOpts::NO_DATA) {
            return Ok(indymilter_test::Status::Skip);
        }
        self.0.data().await
    }

    /// Sends a header; its value may be any bytes but NUL (text, or bytes that are not UTF-8).
    pub async fn header(
        &mut self,
        name: &str,
        value: impl AsRef<[u8]>,
    ) -> TestResult<indymilter_test::Status> {
        if self.skipped(indymilter::ProtoOpts::NO_HEADER) {
            return Ok(indymilter_test::Status::Skip);
        }
        let value = std::ffi::CString::new(value.as_ref()).expect("a header value without NUL");
        self.0.header(name, value).await
    }

    pub async fn eoh(&mut self) -> TestResult<indymilter_test::Status> {
        if self.skipped(indymilter::ProtoOpts::NO_EOH) {
            return Ok(indymilter_test::Status::Skip);
        }
        self.0.eoh().await
    }

    pub async fn body(
        &mut self,
        chunk: impl Into<bytes::Bytes>,
    ) -> TestResult<indymilter_test::Status> {
        if self.skipped(indymilter::ProtoOpts::NO_BODY) {
            return Ok(indymilter_test::Status::Skip);
        }
        self.0.body(chunk).await
    }

    pub async fn unknown(&mut self, line: &str) -> TestResult<indymilter_test::Status> {
        if self.skipped(indymilter::ProtoOpts::NO_UNKNOWN) {
            return Ok(indymilter_test::Status::Skip);
        }
        self.0.unknown(line).await
    }

    pub async fn close(self) -> TestResult<()> {
        self.0.close().await
    }
}
