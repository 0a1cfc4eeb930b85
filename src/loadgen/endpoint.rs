//! Milter socket addresses as MTAs write them (`unix:/path`, `inet:PORT@HOST`,
//! `inet:HOST:PORT`), and opening a client stream to one.

use indymilter::EitherStream;
use std::{fmt, io, path::PathBuf, str::FromStr};
use tokio::net::{TcpStream, UnixStream};

/// A stream to a milter over TCP or a UNIX socket.
pub type MilterStream = EitherStream<TcpStream, UnixStream>;

/// Where a milter listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A UNIX domain socket path.
    Unix(PathBuf),
    /// A TCP host and port.
    Inet { host: String, port: u16 },
}

/// A socket specification that is neither `unix:PATH` nor `inet:PORT@HOST` / `inet:HOST:PORT`.
#[derive(Debug, thiserror::Error)]
#[error("bad milter socket {0:?}: expected unix:/path, inet:PORT@HOST or inet:HOST:PORT")]
pub struct EndpointError(String);

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || EndpointError(s.to_owned());
        if let Some(path) = s.strip_prefix("unix:").or_else(|| s.strip_prefix("local:")) {
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(Self::Unix(path.into()));
        }
        let rest = s
            .strip_prefix("inet:")
            .or_else(|| s.strip_prefix("inet6:"))
            .ok_or_else(bad)?;
        // Sendmail writes `inet:PORT@HOST`, Postfix `inet:HOST:PORT`.
        let (host, port) = match rest.split_once('@') {
            Some((port, host)) => (host, port),
            None => rest.rsplit_once(':').ok_or_else(bad)?,
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = port.parse().map_err(|_| bad())?;
        if host.is_empty() {
            return Err(bad());
        }
        Ok(Self::Inet {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Inet { host, port } => write!(f, "inet:{port}@{host}"),
        }
    }
}

impl Endpoint {
    /// Opens a stream to the milter; TCP streams get `TCP_NODELAY`, as an MTA
    /// that wants low latency sets it.
    pub async fn connect(&self) -> io::Result<MilterStream> {
        match self {
            Self::Unix(path) => UnixStream::connect(path).await.map(EitherStream::Unix),
            Self::Inet { host, port } => {
                let stream = TcpStream::connect((host.as_str(), *port)).await?;
                stream.set_nodelay(true)?;
                Ok(EitherStream::Tcp(stream))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mta_spellings() {
        let inet = |host: &str, port| Endpoint::Inet {
            host: host.into(),
            port,
        };
        assert_eq!(
            "inet:8890@127.0.0.1".parse::<Endpoint>().unwrap(),
            inet("127.0.0.1", 8890)
        );
        assert_eq!(
            "inet:localhost:25".parse::<Endpoint>().unwrap(),
            inet("localhost", 25)
        );
        assert_eq!(
            "inet6:[::1]:99".parse::<Endpoint>().unwrap(),
            inet("::1", 99)
        );
        assert_eq!(
            "unix:/run/m.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/run/m.sock".into())
        );
        for bad in ["unix:", "inet:x@h", "inet:@", "tcp:1@h", "inet:host"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn displays_as_sendmail_spelling() {
        let e: Endpoint = "inet:localhost:25".parse().unwrap();
        assert_eq!(e.to_string(), "inet:25@localhost");
    }
}
