//! The TOML configuration: parsed and validated up front, every error naming file, line and key.
//!
//! With no file the daemon runs on [`Config::default`]: a loopback TCP socket and the example
//! policies in `examples/`.

use crate::{duration::serde_duration, listen::ListenAddr};
use serde::Deserialize;
use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The milter socket.
    #[serde(default)]
    pub milter: MilterConfig,
    /// How policies are executed.
    #[serde(default)]
    pub engine: EngineConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Where policies come from and which run.
    #[serde(default)]
    pub policies: PoliciesConfig,
    /// The DNS resolver policies use.
    #[serde(default)]
    pub dns: crate::services::dns::DnsConfig,
    /// SPF evaluation.
    #[serde(default)]
    pub spf: crate::services::spf::SpfConfig,
    /// Persistent state: embedded SQLite or shared Redis.
    #[serde(default)]
    pub store: crate::services::store::StoreConfig,
    /// Outbound SMTP call-backs (`milter.smtp`).
    #[serde(default)]
    pub smtp: crate::services::smtp::SmtpConfig,
    /// DKIM verification and signing keys.
    #[serde(default)]
    pub dkim: crate::services::dkim::DkimConfig,
    /// The Maildir archive of accepted messages.
    #[serde(default)]
    pub archive: crate::services::archive::ArchiveConfig,
    /// The site's SRS/BATV secrets (signed DSN tokens; the srs policy's default).
    #[serde(default)]
    pub srs: crate::services::srs::SrsConfig,
    /// Facts about the site: internal networks, trusted relays, own domains, access map.
    #[serde(default)]
    pub site: crate::services::site::SiteConfig,
    /// How long message histories are kept for `luamilter why`.
    #[serde(default)]
    pub trace: crate::session::history::TraceConfig,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: crate::metrics::MetricsConfig,
    /// Option overrides per policy: `[policy.NAME]` tables.
    #[serde(default)]
    pub policy: BTreeMap<String, BTreeMap<String, toml::Spanned<toml::Value>>>,
    /// Where the configuration came from, for error messages (not a TOML key).
    #[serde(skip)]
    pub source: ConfigSource,
}

/// The file the configuration was read from and its text, to turn byte spans into lines.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// The file, or `None` for the built-in default.
    pub path: Option<PathBuf>,
    text: String,
}

impl ConfigSource {
    /// `file:line` for a byte offset into the configuration text.
    pub fn locate(&self, offset: usize) -> String {
        let line = self.text[..offset.min(self.text.len())]
            .matches('\n')
            .count()
            + 1;
        format!("{}:{line}", self.name())
    }

    /// The file name as shown in messages.
    pub fn name(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => "<built-in config>".to_string(),
        }
    }

    /// The directory relative paths in the configuration are resolved against.
    pub fn base_dir(&self) -> PathBuf {
        match self.path.as_ref().and_then(|p| p.parent()) {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }
}

/// `[milter]`: the socket the MTA connects to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MilterConfig {
    /// `inet:PORT@HOST`, `unix:/path` or `HOST:PORT`.
    pub listen: ListenAddr,
    /// Permissions of a unix socket, octal as a string ("0660").
    #[serde(deserialize_with = "octal_mode")]
    pub socket_mode: u32,
    /// Most connections served at once; more wait in the kernel backlog.
    pub max_connections: usize,
    /// Idle time after which a silent MTA connection is closed.
    #[serde(deserialize_with = "serde_duration::deserialize")]
    pub connection_timeout: Duration,
    /// The control socket for `luamilter ctl` (owner-only). Default: the milter socket path
    /// plus `.ctl` for a unix socket, `/run/luamilter/luamilter.ctl` for TCP.
    pub control_socket: Option<PathBuf>,
    /// Serve the socket systemd passed (`LISTEN_FDS`, a `.socket` unit) instead of binding
    /// `listen`; `listen` then only names the control socket's default.
    pub socket_activation: bool,
    /// A file to write the daemon's pid to once the sockets are bound (removed at exit).
    pub pid_file: Option<PathBuf>,
    /// Run as this user after binding the sockets and opening the store (start as root).
    pub user: Option<String>,
    /// With `user`: run as this group (default: the user's primary group); the unix socket
    /// gets it too, so a group the MTA is in lets it connect.
    pub group: Option<String>,
}

impl MilterConfig {
    /// The control socket path in effect.
    pub fn control_socket_path(&self) -> PathBuf {
        match (&self.control_socket, &self.listen) {
            (Some(path), _) => path.clone(),
            (None, ListenAddr::Unix(sock)) => {
                let mut path = sock.clone().into_os_string();
                path.push(".ctl");
                PathBuf::from(path)
            }
            (None, ListenAddr::Inet(_)) => PathBuf::from("/run/luamilter/luamilter.ctl"),
        }
    }
}

impl Default for MilterConfig {
    fn default() -> Self {
        MilterConfig {
            listen: ListenAddr::Inet(([127, 0, 0, 1], 8894).into()),
            socket_mode: 0o660,
            max_connections: 4096,
            connection_timeout: Duration::from_secs(7210),
            control_socket: None,
            socket_activation: false,
            pid_file: None,
            user: None,
            group: None,
        }
    }
}

/// What the MTA is told when a policy fails (runtime error, bad verdict, time or memory limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExceptionPolicy {
    /// 451 4.3.0: the MTA retries later (the default: no mail lost, none let through).
    Tempfail,
    /// Skip the failing handler and go on with the next policy.
    Continue,
    /// 550 5.3.0: refuse.
    Reject,
}

/// `[engine]`: Lua execution.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Lua states per generation; 0 means one per worker thread.
    pub vms: usize,
    /// Tokio worker threads; 0 means one per CPU.
    pub worker_threads: usize,
    /// Wall-clock limit for one stage (every policy's handler together), I/O waits included.
    #[serde(deserialize_with = "serde_duration::deserialize")]
    pub time_limit: Duration,
    /// Memory limit per Lua state in MiB.
    pub memory_limit_mib: usize,
    /// Answer when a policy fails.
    pub exception_policy: ExceptionPolicy,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            vms: 0,
            worker_threads: 0,
            time_limit: Duration::from_secs(20),
            memory_limit_mib: 256,
            exception_policy: ExceptionPolicy::Tempfail,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// logfmt: `key=value` fields, values quoted when they hold spaces (`logfmt` is accepted
    /// as another name).
    #[serde(alias = "logfmt")]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A level (`info`) or a tracing filter (`info,luamilter::engine=debug`).
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// `[policies]`: where policy files are found and which run, in order.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoliciesConfig {
    /// Directories searched in order for `NAME.lua`; relative to the config file's directory.
    pub dirs: Vec<PathBuf>,
    /// The enabled policies, run in this order at every stage.
    pub chain: Vec<String>,
    /// Reload automatically when a policy file or the config file changes.
    pub watch: bool,
}

impl Default for PoliciesConfig {
    fn default() -> Self {
        PoliciesConfig {
            dirs: vec![PathBuf::from("examples")],
            chain: vec!["trivial".into()],
            watch: true,
        }
    }
}

/// A configuration error with its location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read: {e}", path.display())))?;
        Config::parse(&text, Some(path.to_path_buf()))
    }

    /// Parses and validates configuration text; `path` is used for messages and relative paths.
    pub fn parse(text: &str, path: Option<PathBuf>) -> Result<Config, ConfigError> {
        let source = ConfigSource {
            path,
            text: text.to_string(),
        };
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| source.locate(s.start))
                .unwrap_or_else(|| source.name());
            ConfigError(format!("{at}: {}", e.message()))
        })?;
        config.source = source;
        config.site.policy_dirs = config.policy_dirs();
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let at = self.source.name();
        if self.milter.max_connections == 0 {
            return Err(ConfigError(format!(
                "{at}: milter.max_connections must be at least 1"
            )));
        }
        if self.milter.group.is_some() && self.milter.user.is_none() {
            return Err(ConfigError(format!(
                "{at}: milter.group needs milter.user (the group to run as with that user)"
            )));
        }
        if self.engine.time_limit.is_zero() {
            return Err(ConfigError(format!(
                "{at}: engine.time_limit must be longer than 0"
            )));
        }
        if self.engine.memory_limit_mib < 4 {
            return Err(ConfigError(format!(
                "{at}: engine.memory_limit_mib must be at least 4"
            )));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| {
            ConfigError(format!(
                "{at}: log.level {:?} is not a valid filter: {e}",
                self.log.level
            ))
        })?;
        let mut seen = std::collections::HashSet::new();
        for name in &self.policies.chain {
            if !seen.insert(name) {
                return Err(ConfigError(format!(
                    "{at}: policies.chain lists {name:?} twice"
                )));
            }
        }
        for (name, options) in &self.policy {
            if !self.policies.chain.contains(name) {
                let line = options
                    .values()
                    .next()
                    .map(|v| self.source.locate(v.span().start))
                    .unwrap_or_else(|| at.clone());
                return Err(ConfigError(format!(
                    "{line}: [policy.{name}] configures a policy that is not in policies.chain"
                )));
            }
        }
        Ok(())
    }

    /// The policy directories with relative entries resolved against the config file's directory.
    pub fn policy_dirs(&self) -> Vec<PathBuf> {
        let base = self.source.base_dir();
        self.policies
            .dirs
            .iter()
            .map(|d| {
                if d.is_absolute() {
                    d.clone()
                } else {
                    base.join(d)
                }
            })
            .collect()
    }
}

fn octal_mode<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let text = String::deserialize(d)?;
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid socket mode {text:?}: expected octal like \"0660\""
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Some("test.toml".into())).map_err(|e| e.0)
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.milter.listen.to_string(), "inet:8894@127.0.0.1");
        assert_eq!(c.engine.exception_policy, ExceptionPolicy::Tempfail);
        assert_eq!(c.policies.chain, vec!["trivial"]);
    }

    #[test]
    fn full_file_parses() {
        let c = parse(
            r#"
[milter]
listen = "unix:/tmp/x.sock"
socket_mode = "0600"
max_connections = 10
connection_timeout = "5m"
[engine]
vms = 2
time_limit = "500ms"
exception_policy = "continue"
[log]
level = "debug"
format = "json"
[policies]
dirs = ["/etc/luamilter/policies"]
chain = ["a", "b"]
[policy.a]
delay = "10m"
"#,
        )
        .unwrap();
        assert_eq!(c.milter.socket_mode, 0o600);
        assert_eq!(c.milter.connection_timeout, Duration::from_secs(300));
        assert_eq!(c.engine.time_limit, Duration::from_millis(500));
        assert_eq!(c.engine.exception_policy, ExceptionPolicy::Continue);
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.policy["a"]["delay"].get_ref().as_str(), Some("10m"));
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = parse("[milter]\nlisten = \"inet:1@127.0.0.1\"\nlistne = 3\n").unwrap_err();
        assert!(err.starts_with("test.toml:3:"), "{err}");
        assert!(err.contains("listne"), "{err}");
    }

    #[test]
    fn bad_values_name_line_and_reason() {
        let err = parse("[milter]\n\nlisten = \"inet:x@1.2.3.4\"\n").unwrap_err();
        assert!(err.starts_with("test.toml:3:"), "{err}");
        assert!(err.contains("port is not a number"), "{err}");
        let err = parse("[engine]\nexception_policy = \"explode\"\n").unwrap_err();
        assert!(err.starts_with("test.toml:2:"), "{err}");
        let err = parse("[engine]\ntime_limit = \"5 parsecs\"\n").unwrap_err();
        assert!(err.contains("invalid duration"), "{err}");
        let err = parse("[milter]\nsocket_mode = \"999\"\n").unwrap_err();
        assert!(err.contains("socket mode"), "{err}");
        let keys = "[dkim.keys.\"example.org\"]\nselector = \"s\"\nkey = \"k.pem\"\n";
        let err = parse(&format!("{keys}expire_after = \"0s\"\n")).unwrap_err();
        assert!(err.starts_with("test.toml:4:"), "{err}");
        assert!(err.contains("at least 1s"), "{err}");
        let c = parse(&format!("{keys}expire_after = \"30d\"\n")).unwrap();
        assert_eq!(
            c.dkim.keys["example.org"].expire_after,
            Some(std::time::Duration::from_secs(30 * 86400))
        );
    }

    #[test]
    fn policy_options_for_a_disabled_policy_are_an_error() {
        let err = parse("[policies]\nchain = [\"a\"]\n[policy.b]\nx = 1\n").unwrap_err();
        assert!(err.starts_with("test.toml:4:"), "{err}");
        assert!(err.contains("policy.b"), "{err}");
    }

    #[test]
    fn duplicate_chain_entries_are_an_error() {
        assert!(
            parse("[policies]\nchain = [\"a\", \"a\"]\n")
                .unwrap_err()
                .contains("twice")
        );
    }
}
