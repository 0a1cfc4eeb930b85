//! Milter socket addresses as Postfix and Sendmail write them, and the listeners bound to them.
//!
//! Accepted forms: `inet:PORT@HOST` (Sendmail), `inet:HOST:PORT` (Postfix), `inet6:` likewise,
//! `unix:/path`, `local:/path`, plain `HOST:PORT` or `[V6]:PORT`, and a bare absolute path.

use indymilter::{EitherListener, Listener};
use std::{
    fmt, io,
    net::{IpAddr, SocketAddr, ToSocketAddrs},
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    pin::Pin,
    str::FromStr,
    task::{Context, Poll},
};
use tokio::net::{TcpListener, TcpStream, UnixListener};

/// Where the milter listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP socket.
    Inet(SocketAddr),
    /// A unix domain socket at this path.
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let bad = |why: &str| format!("invalid listen address {text:?}: {why}");
        if let Some(path) = text
            .strip_prefix("unix:")
            .or_else(|| text.strip_prefix("local:"))
        {
            if path.is_empty() {
                return Err(bad("empty socket path"));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if text.starts_with('/') {
            return Ok(ListenAddr::Unix(PathBuf::from(text)));
        }
        if let Some(rest) = text
            .strip_prefix("inet:")
            .or_else(|| text.strip_prefix("inet6:"))
        {
            // Sendmail writes inet:PORT@HOST, Postfix inet:HOST:PORT.
            let (port, host) = match rest.split_once('@') {
                Some(split) => split,
                None => rest
                    .rsplit_once(':')
                    .map(|(host, port)| (port, host))
                    .ok_or_else(|| bad("expected inet:PORT@HOST or inet:HOST:PORT"))?,
            };
            let port: u16 = port.parse().map_err(|_| bad("port is not a number"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            return resolve(host, port)
                .map(ListenAddr::Inet)
                .map_err(|e| bad(&e));
        }
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(ListenAddr::Inet(addr));
        }
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| bad("expected inet:PORT@HOST, unix:/path or HOST:PORT"))?;
        let port: u16 = port.parse().map_err(|_| bad("port is not a number"))?;
        resolve(host, port)
            .map(ListenAddr::Inet)
            .map_err(|e| bad(&e))
    }
}

fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host:?} has no address"))
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Inet(addr) => write!(f, "inet:{}@{}", addr.port(), addr.ip()),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl<'de> serde::Deserialize<'de> for ListenAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A TCP listener that turns Nagle's algorithm off on every accepted socket: without
/// `TCP_NODELAY` Nagle plus delayed ACK stall each milter reply by about 40 ms.
pub struct NoDelayListener(TcpListener);

impl Listener for NoDelayListener {
    type Io = TcpStream;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<TcpStream>> {
        Pin::new(&mut self.0).poll_accept(cx).map_ok(|(stream, _)| {
            // A socket that refuses the option still works, only slower.
            let _ = stream.set_nodelay(true);
            stream
        })
    }
}

/// The listener type the server runs on.
pub type MilterListener = EitherListener<NoDelayListener, UnixListener>;

/// A bound milter socket, not yet tied to a runtime: every worker thread adopts a clone of it
/// in its own runtime. A unix socket file is removed again when the guard from
/// [`BoundSocket::into_parts`] or [`BoundSocket::guard`] is dropped.
pub struct BoundSocket {
    socket: StdSocket,
    /// The address actually bound (port 0 resolved to the real port).
    pub local: ListenAddr,
    unix_path: Option<PathBuf>,
}

enum StdSocket {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl BoundSocket {
    /// Binds `addr`. A stale unix socket file (nobody listening) is removed first; a live one
    /// or a non-socket file at that path is an error. `mode` sets the unix socket permissions.
    pub async fn bind(addr: &ListenAddr, mode: u32) -> io::Result<BoundSocket> {
        match addr {
            ListenAddr::Inet(sa) => {
                let tcp = std::net::TcpListener::bind(sa)?;
                tcp.set_nonblocking(true)?;
                let local = ListenAddr::Inet(tcp.local_addr()?);
                Ok(BoundSocket {
                    socket: StdSocket::Tcp(tcp),
                    local,
                    unix_path: None,
                })
            }
            ListenAddr::Unix(path) => {
                remove_stale_socket(path).await?;
                let unix = std::os::unix::net::UnixListener::bind(path)?;
                unix.set_nonblocking(true)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
                Ok(BoundSocket {
                    socket: StdSocket::Unix(unix),
                    local: addr.clone(),
                    unix_path: Some(path.clone()),
                })
            }
        }
    }

    /// A listener on this socket for the current tokio runtime (call it inside the runtime
    /// that will accept on it). Several runtimes may each adopt one: the kernel hands every
    /// new connection to one of them.
    pub fn adopt(&self) -> io::Result<MilterListener> {
        Ok(match &self.socket {
            StdSocket::Tcp(tcp) => {
                EitherListener::Tcp(NoDelayListener(TcpListener::from_std(tcp.try_clone()?)?))
            }
            StdSocket::Unix(unix) => {
                EitherListener::Unix(UnixListener::from_std(unix.try_clone()?)?)
            }
        })
    }

    /// The guard that removes the socket file when dropped.
    pub fn guard(&self) -> SocketFileGuard {
        SocketFileGuard(self.unix_path.clone())
    }

    /// A listener for the current runtime and the socket-file guard.
    pub fn into_parts(self) -> io::Result<(MilterListener, SocketFileGuard)> {
        Ok((self.adopt()?, self.guard()))
    }
}

/// Removes a unix socket file when dropped.
pub struct SocketFileGuard(Option<PathBuf>);

impl Drop for SocketFileGuard {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

async fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another process is listening on {}", path.display()),
        ));
    }
    std::fs::remove_file(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inet(s: &str) -> ListenAddr {
        ListenAddr::Inet(s.parse().unwrap())
    }

    #[test]
    fn parses_postfix_and_sendmail_forms() {
        assert_eq!("inet:8894@127.0.0.1".parse(), Ok(inet("127.0.0.1:8894")));
        assert_eq!("inet6:8894@[::1]".parse(), Ok(inet("[::1]:8894")));
        assert_eq!("inet:127.0.0.1:8894".parse(), Ok(inet("127.0.0.1:8894")));
        assert_eq!("inet6:[::1]:8894".parse(), Ok(inet("[::1]:8894")));
        assert_eq!(
            "inet:25@localhost"
                .parse::<ListenAddr>()
                .map(|a| matches!(a, ListenAddr::Inet(_))),
            Ok(true)
        );
        assert_eq!("127.0.0.1:9000".parse(), Ok(inet("127.0.0.1:9000")));
        assert_eq!("[::1]:9000".parse(), Ok(inet("[::1]:9000")));
        assert_eq!(
            "unix:/run/m.sock".parse(),
            Ok(ListenAddr::Unix("/run/m.sock".into()))
        );
        assert_eq!(
            "local:/run/m.sock".parse(),
            Ok(ListenAddr::Unix("/run/m.sock".into()))
        );
        assert_eq!(
            "/run/m.sock".parse(),
            Ok(ListenAddr::Unix("/run/m.sock".into()))
        );
    }

    #[test]
    fn rejects_bad_addresses_with_the_reason() {
        let err = "inet:port@127.0.0.1".parse::<ListenAddr>().unwrap_err();
        assert!(err.contains("port is not a number"), "{err}");
        assert!(
            "inet:25"
                .parse::<ListenAddr>()
                .unwrap_err()
                .contains("PORT@HOST")
        );
        assert!("unix:".parse::<ListenAddr>().is_err());
        assert!("nonsense".parse::<ListenAddr>().is_err());
    }

    #[test]
    fn display_uses_postfix_form() {
        assert_eq!(inet("127.0.0.1:8894").to_string(), "inet:8894@127.0.0.1");
    }
}
