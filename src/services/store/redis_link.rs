//! How the Redis store reaches the master: a fixed URL or Sentinel discovery (with AUTH and TLS
//! towards the sentinels too), TLS with an optional private CA, passwords from files, a fresh
//! connection when the master moved (a `READONLY` answer, or a lost connection under Sentinel),
//! and `WAIT` for replicas.

use std::sync::Mutex;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    Client, ConnectionAddr, ConnectionInfo, ErrorKind, IntoConnectionInfo, RedisError,
    ScriptInvocation, ServerErrorKind, TlsCertificates, TlsMode,
};

use super::{Result, StoreConfig, StoreError};

/// What a call sends to the master.
pub(super) enum Request<'a> {
    Script(&'a ScriptInvocation<'a>),
    Command(&'a redis::Cmd),
}

impl Request<'_> {
    async fn send<T: redis::FromRedisValue>(
        &self,
        conn: &mut ConnectionManager,
    ) -> std::result::Result<T, RedisError> {
        match self {
            Request::Script(invocation) => invocation.invoke_async(conn).await,
            Request::Command(cmd) => cmd.query_async(conn).await,
        }
    }
}

/// Where the master is.
enum Locator {
    /// The URL's host (a name is resolved again on every fresh connection).
    Fixed(Client),
    /// Asked of the sentinels on every fresh connection.
    Sentinel {
        client: tokio::sync::Mutex<SentinelClient>,
        /// The configured sentinels, for the errors.
        names: String,
    },
}

/// The current connection to the master and the number of times it was replaced.
struct Current {
    generation: u64,
    conn: Option<ConnectionManager>,
}

/// A self-healing connection to the Redis master.
pub(super) struct Link {
    locator: Locator,
    manager_config: ConnectionManagerConfig,
    current: Mutex<Current>,
    /// Serialises replacements, so a failover costs one discovery, not one per waiting call.
    replacing: tokio::sync::Mutex<()>,
    /// `WAIT` for this many replicas after each write (0: don't).
    min_replicas: u32,
    wait_timeout: Duration,
}

/// What an error says about where the master is.
enum Moved {
    /// `READONLY` (the node is a replica now), or under Sentinel `NOREPLICAS` (a master whose
    /// replicas went to a new master): the node refused the command, so nothing was written;
    /// find the master and run the command again.
    Retry,
    /// The connection failed under Sentinel: find the master again for the next call, but do
    /// not repeat this command (it may have run before the connection broke).
    Relocate,
    /// Not a question of where the master is.
    No,
}

fn moved(e: &RedisError, sentinel: bool) -> Moved {
    if e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
        || (sentinel && e.code() == Some("NOREPLICAS"))
    {
        Moved::Retry
    } else if sentinel && (e.is_io_error() || e.is_connection_dropped() || e.is_timeout()) {
        Moved::Relocate
    } else {
        Moved::No
    }
}

/// The store's error for a Redis error.
pub(super) fn map_err(e: RedisError) -> StoreError {
    let text = e.to_string();
    if e.is_timeout() {
        StoreError::Unavailable(format!("redis timeout: {text}"))
    } else if e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly) {
        StoreError::Unavailable(format!("redis master moved and not found yet: {text}"))
    } else if text.contains("not an integer") || text.contains("overflow") {
        StoreError::Invalid(text)
    } else {
        StoreError::Unavailable(text)
    }
}

fn invalid(what: impl std::fmt::Display) -> StoreError {
    StoreError::Invalid(what.to_string())
}

fn read_file(path: &std::path::Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| invalid(format_args!("{what} {}: {e}", path.display())))
}

/// The first line of the secret file at `path`, which the config key `key` names.
fn secret_file(path: &std::path::Path, key: &str) -> Result<String> {
    let text = String::from_utf8(read_file(path, key)?)
        .map_err(|_| invalid(format_args!("{key} {}: not UTF-8", path.display())))?;
    let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if line.is_empty() {
        return Err(invalid(format_args!("{key} {}: empty", path.display())));
    }
    Ok(line.to_string())
}

/// The URL with the password from the file.
fn connection_info(config: &StoreConfig) -> Result<ConnectionInfo> {
    let info = config
        .url
        .as_str()
        .into_connection_info()
        .map_err(|e| invalid(format_args!("redis url {:?}: {e}", config.url)))?;
    let password = config
        .password_file
        .as_deref()
        .map(|path| secret_file(path, "store.password_file"))
        .transpose()?;
    Ok(match password {
        Some(password) => {
            let settings = info.redis_settings().clone().set_password(password);
            info.set_redis_settings(settings)
        }
        None => info,
    })
}

fn certificates(config: &StoreConfig) -> Result<Option<TlsCertificates>> {
    let Some(path) = &config.tls_ca_file else {
        return Ok(None);
    };
    Ok(Some(TlsCertificates {
        client_tls: None,
        root_cert: Some(read_file(path, "store.tls_ca_file")?),
    }))
}

fn fixed_client(config: &StoreConfig, info: ConnectionInfo) -> Result<Client> {
    let client = match certificates(config)? {
        Some(certs) => Client::build_with_tls(info, certs),
        None => Client::open(info),
    };
    client.map_err(|e| invalid(format_args!("redis url {:?}: {e}", config.url)))
}

/// A sentinel's address: "host:port" or "redis://host:port" in clear, "rediss://host:port" over
/// TLS.
fn sentinel_addr(sentinel: &str) -> Result<ConnectionAddr> {
    let url = if sentinel.contains("://") {
        sentinel.to_string()
    } else {
        format!("redis://{sentinel}")
    };
    url.into_connection_info()
        .map(|i| i.addr().clone())
        .map_err(|e| invalid(format_args!("store.sentinels {sentinel:?}: {e}")))
}

/// The client that asks the sentinels for the master: AUTH and TLS towards the sentinels from
/// the `sentinel_*` keys and the addresses' scheme, towards the master from the URL.
fn sentinel_client(config: &StoreConfig, info: &ConnectionInfo) -> Result<SentinelClient> {
    if config.sentinel_master.is_empty() {
        return Err(invalid("store.sentinel_master is empty"));
    }
    let sentinels = config
        .sentinels
        .iter()
        .map(|s| sentinel_addr(s))
        .collect::<Result<Vec<ConnectionAddr>>>()?;
    let tls = sentinels
        .iter()
        .filter(|a| matches!(a, ConnectionAddr::TcpTls { .. }))
        .count();
    if tls != 0 && tls != sentinels.len() {
        return Err(invalid(
            "store.sentinels: either every sentinel is rediss:// or none is",
        ));
    }
    let settings = info.redis_settings();
    let mut builder = SentinelClientBuilder::new(
        sentinels,
        &config.sentinel_master,
        SentinelServerType::Master,
    )
    .map_err(|e| invalid(format_args!("store.sentinels: {e}")))?
    .set_client_to_redis_db(settings.db());
    if let Some(user) = settings.username() {
        builder = builder.set_client_to_redis_username(user);
    }
    if let Some(password) = settings.password() {
        builder = builder.set_client_to_redis_password(password);
    }
    if matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
        builder = builder.set_client_to_redis_tls_mode(TlsMode::Secure);
        if let Some(certs) = certificates(config)? {
            builder = builder.set_client_to_redis_certificates(certs);
        }
    }
    if let Some(path) = &config.sentinel_password_file {
        let password = secret_file(path, "store.sentinel_password_file")?;
        builder = builder.set_client_to_sentinel_password(password);
    }
    match &config.sentinel_user {
        Some(_) if config.sentinel_password_file.is_none() => {
            return Err(invalid(
                "store.sentinel_user needs store.sentinel_password_file",
            ));
        }
        Some(user) => builder = builder.set_client_to_sentinel_username(user),
        None => {}
    }
    if tls > 0
        && let Some(certs) = certificates(config)?
    {
        builder = builder.set_client_to_sentinel_certificates(certs);
    }
    builder
        .build()
        .map_err(|e| invalid(format_args!("store.sentinels: {e}")))
}

impl Link {
    /// Prepares the link; nothing connects before the first call.
    pub fn new(config: &StoreConfig) -> Result<Link> {
        let info = connection_info(config)?;
        let locator = if config.sentinels.is_empty() {
            if config.sentinel_password_file.is_some() || config.sentinel_user.is_some() {
                return Err(invalid(
                    "store.sentinel_password_file and store.sentinel_user need store.sentinels",
                ));
            }
            Locator::Fixed(fixed_client(config, info)?)
        } else {
            Locator::Sentinel {
                client: tokio::sync::Mutex::new(sentinel_client(config, &info)?),
                names: config.sentinels.join(", "),
            }
        };
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        Ok(Link {
            locator,
            manager_config,
            current: Mutex::new(Current {
                generation: 0,
                conn: None,
            }),
            replacing: tokio::sync::Mutex::new(()),
            min_replicas: config.min_replicas,
            wait_timeout: config.timeout / 2,
        })
    }

    fn snapshot(&self) -> (u64, Option<ConnectionManager>) {
        let current = self.current.lock().unwrap();
        (current.generation, current.conn.clone())
    }

    /// A new connection manager to wherever the master is now.
    async fn locate(&self) -> Result<ConnectionManager> {
        let client = match &self.locator {
            Locator::Fixed(client) => client.clone(),
            Locator::Sentinel { client, names } => {
                let client = client.lock().await.async_get_client().await.map_err(|e| {
                    StoreError::Unavailable(format!("redis sentinels {names}: {e}"))
                })?;
                let master = client.get_connection_info().addr();
                tracing::info!(%master, "redis: the sentinels name the master");
                client
            }
        };
        ConnectionManager::new_lazy_with_config(client, self.manager_config.clone())
            .map_err(map_err)
    }

    /// Replaces the connection of `generation` (unless another call already did).
    async fn replace(&self, generation: u64) -> Result<()> {
        let _one_at_a_time = self.replacing.lock().await;
        if self.snapshot().0 != generation {
            return Ok(());
        }
        let conn = self.locate().await?;
        let mut current = self.current.lock().unwrap();
        current.generation += 1;
        current.conn = Some(conn);
        Ok(())
    }

    /// The current connection, located first if there is none yet.
    async fn connection(&self) -> Result<(u64, ConnectionManager)> {
        loop {
            match self.snapshot() {
                (generation, Some(conn)) => return Ok((generation, conn)),
                (generation, None) => self.replace(generation).await?,
            }
        }
    }

    /// Sends `request` to the master. When the answer says the master moved, finds it again and
    /// sends it once more. After a successful `write`, waits for `min_replicas` replicas.
    pub async fn call<T: redis::FromRedisValue>(
        &self,
        write: bool,
        request: Request<'_>,
    ) -> Result<T> {
        let sentinel = matches!(self.locator, Locator::Sentinel { .. });
        let (generation, mut conn) = self.connection().await?;
        let value = match request.send(&mut conn).await {
            Ok(value) => value,
            Err(e) => match moved(&e, sentinel) {
                Moved::Retry => {
                    tracing::debug!(error = %e, "redis master moved; finding it again");
                    self.replace(generation).await?;
                    conn = self.connection().await?.1;
                    request.send(&mut conn).await.map_err(map_err)?
                }
                Moved::Relocate => {
                    // The error that matters is the call's; a failed discovery is retried by
                    // the next call.
                    let _ = self.replace(generation).await;
                    return Err(map_err(e));
                }
                Moved::No => return Err(map_err(e)),
            },
        };
        if write && self.min_replicas > 0 {
            self.wait_for_replicas(&mut conn).await?;
        }
        Ok(value)
    }

    /// `WAIT`: the writes made on `conn` so far are on `min_replicas` replicas.
    async fn wait_for_replicas(&self, conn: &mut ConnectionManager) -> Result<()> {
        let timeout_ms = u64::try_from(self.wait_timeout.as_millis()).unwrap_or(u64::MAX);
        let acked: u32 = redis::cmd("WAIT")
            .arg(self.min_replicas)
            .arg(timeout_ms.max(1))
            .query_async(conn)
            .await
            .map_err(map_err)?;
        if acked < self.min_replicas {
            return Err(StoreError::Unavailable(format!(
                "redis write reached {acked} of {} replicas within {:?}",
                self.min_replicas, self.wait_timeout
            )));
        }
        Ok(())
    }
}
