//! Milter socket addresses as Postfix and Sendmail write them.
//!
//! Accepted forms: `inet:PORT@HOST` (Sendmail), `inet:HOST:PORT` (Postfix), `inet6:` likewise,
//! `unix:/path`, `local:/path`, plain `HOST:PORT` or `[V6]:PORT`, and a bare absolute path.

use std::{
    fmt,
    net::{IpAddr, SocketAddr, ToSocketAddrs},
    path::PathBuf,
    str::FromStr,
};

/// A milter socket: where the milter listens and where an MTA (or the load generator) connects.
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
