//! The listeners bound to milter socket addresses. The addresses themselves ([`ListenAddr`]
//! and its parsing) are shared with the load generator and live in `luamilter-vocab`.

pub use luamilter_vocab::listen::ListenAddr;

use crate::throttle::Throttle;
use indymilter::{EitherListener, Listener};
use std::{
    future::Future,
    io,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};
use tokio::{
    net::{TcpListener, TcpStream, UnixListener},
    time::Sleep,
};

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
pub type MilterListener = SteadyListener<EitherListener<NoDelayListener, UnixListener>>;

/// How long a listener waits after a failed accept before it tries again.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// At most one warning about failed accepts per listener in this interval.
const ACCEPT_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// A listener that outlives failed accepts. indymilter ends its server at the first accept
/// error, so one moment out of file descriptors (`EMFILE`) would leave the daemon running but
/// serving nothing. Here a failed accept is logged (at most once per 10 s, with the count) and
/// retried after 100 ms, while the waiting connections stay in the socket's backlog; a
/// connection the client aborted before it was accepted is skipped at once.
pub struct SteadyListener<L> {
    inner: L,
    /// Set after a failed accept: no accept until it fires.
    pause: Option<Pin<Box<Sleep>>>,
    warnings: Throttle,
    /// Failed accepts since the last warning.
    failures: u64,
}

impl<L> SteadyListener<L> {
    fn new(inner: L) -> Self {
        SteadyListener {
            inner,
            pause: None,
            warnings: Throttle::new(ACCEPT_WARNING_INTERVAL),
            failures: 0,
        }
    }

    fn failed(&mut self, error: &io::Error) {
        self.failures += 1;
        if self.warnings.due() {
            tracing::warn!(
                %error,
                failures = self.failures,
                "cannot accept milter connections; retrying every 100 ms (they wait in the \
                 socket's backlog; for `Too many open files`, raise LimitNOFILE or lower \
                 [milter] max_connections)"
            );
            self.failures = 0;
        }
        self.pause = Some(Box::pin(tokio::time::sleep(ACCEPT_PAUSE)));
    }
}

impl<L: Listener> Listener for SteadyListener<L> {
    type Io = L::Io;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<L::Io>> {
        loop {
            if let Some(pause) = &mut self.pause {
                ready!(pause.as_mut().poll(cx));
                self.pause = None;
            }
            match ready!(self.inner.poll_accept(cx)) {
                Ok(stream) => return Poll::Ready(Ok(stream)),
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => self.failed(&e),
            }
        }
    }
}

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

    /// A socket bound by someone else (systemd socket activation): a TCP or unix stream
    /// listener. Its socket file, if any, belongs to whoever bound it and is left in place.
    pub fn from_listener(fd: std::os::fd::OwnedFd) -> io::Result<BoundSocket> {
        let tcp = std::net::TcpListener::from(fd);
        let (socket, local) = match tcp.local_addr() {
            Ok(addr) => (StdSocket::Tcp(tcp), ListenAddr::Inet(addr)),
            Err(_) => {
                let unix = std::os::unix::net::UnixListener::from(std::os::fd::OwnedFd::from(tcp));
                let path = unix.local_addr()?.as_pathname().map(Path::to_path_buf);
                let path = path.ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "the passed socket is neither TCP nor a unix socket with a path",
                    )
                })?;
                (StdSocket::Unix(unix), ListenAddr::Unix(path))
            }
        };
        match &socket {
            StdSocket::Tcp(s) => s.set_nonblocking(true)?,
            StdSocket::Unix(s) => s.set_nonblocking(true)?,
        }
        Ok(BoundSocket {
            socket,
            local,
            unix_path: None,
        })
    }

    /// A listener on this socket for the current tokio runtime (call it inside the runtime
    /// that will accept on it). Several runtimes may each adopt one: the kernel hands every
    /// new connection to one of them.
    pub fn adopt(&self) -> io::Result<MilterListener> {
        Ok(SteadyListener::new(match &self.socket {
            StdSocket::Tcp(tcp) => {
                EitherListener::Tcp(NoDelayListener(TcpListener::from_std(tcp.try_clone()?)?))
            }
            StdSocket::Unix(unix) => {
                EitherListener::Unix(UnixListener::from_std(unix.try_clone()?)?)
            }
        }))
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
