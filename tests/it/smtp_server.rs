//! A small SMTP server for the call-back tests: one tokio listener on a loopback address,
//! replies scripted by the local part of `RCPT TO`, every connection and command counted.
//!
//! `ok…` (and anything unscripted) is accepted with 250, `unknown…` refused with 550 5.1.1,
//! `busy…` with 451 4.3.0; after `RCPT TO:<silent…>` it says nothing more, after
//! `RCPT TO:<drop…>` it closes the connection. [`TestMx::mute`] accepts connections and never
//! greets. [`TestMx::offering_starttls`] offers STARTTLS, says 220 to it and then sends bytes
//! that are no TLS handshake; [`TestMx::with_tls`] offers it and speaks TLS (a self-signed
//! certificate made with `rcgen` for the test), then goes on as the scripted MX, recording
//! `<TLS>` among the commands when the handshake is done.
//!
//! As a relay for DSNs it takes `DATA` and keeps each message ([`TestMx::messages`]);
//! [`TestMx::refusing_null_sender`] answers `MAIL FROM:<>` with 550 5.7.1.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, pki_types::PrivateKeyDer};

#[derive(Clone)]
enum Mode {
    Scripted,
    Mute,
    BadTls,
    Tls(Arc<rustls::ServerConfig>),
    RefuseNull,
}

/// A TLS server configuration with a fresh self-signed certificate for `mx.cbv.test`.
fn tls_config() -> Arc<rustls::ServerConfig> {
    let cert = rcgen::generate_simple_self_signed(vec!["mx.cbv.test".to_string()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    Arc::new(config)
}

#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    open: AtomicUsize,
    max_open: AtomicUsize,
    commands: Mutex<Vec<String>>,
    messages: Mutex<Vec<String>>,
}

/// A running test MX; it stops when dropped.
pub struct TestMx {
    /// Where it listens.
    pub addr: SocketAddr,
    seen: Arc<Seen>,
    task: JoinHandle<()>,
}

impl TestMx {
    /// A scripted MX on 127.0.0.1, an ephemeral port.
    pub async fn start() -> TestMx {
        Self::bind(
            "127.0.0.1:0".parse().unwrap(),
            Mode::Scripted,
            Duration::ZERO,
        )
        .await
    }

    /// A scripted MX on 127.0.0.1 that waits `hold` before answering RCPT (so call-backs
    /// overlap).
    pub async fn holding(hold: Duration) -> TestMx {
        Self::bind("127.0.0.1:0".parse().unwrap(), Mode::Scripted, hold).await
    }

    /// A scripted MX that offers STARTTLS and then botches the handshake.
    pub async fn offering_starttls() -> TestMx {
        Self::bind("127.0.0.1:0".parse().unwrap(), Mode::BadTls, Duration::ZERO).await
    }

    /// A scripted MX on 127.0.0.1 that offers STARTTLS and speaks TLS after it.
    pub async fn with_tls() -> TestMx {
        Self::bind(
            "127.0.0.1:0".parse().unwrap(),
            Mode::Tls(tls_config()),
            Duration::ZERO,
        )
        .await
    }

    /// A scripted relay on 127.0.0.1 that refuses the null sender (`MAIL FROM:<>`) with 550.
    pub async fn refusing_null_sender() -> TestMx {
        Self::bind(
            "127.0.0.1:0".parse().unwrap(),
            Mode::RefuseNull,
            Duration::ZERO,
        )
        .await
    }

    /// An MX on `ip:port` that accepts connections and never says a word.
    pub async fn mute(ip: IpAddr, port: u16) -> TestMx {
        Self::bind(SocketAddr::new(ip, port), Mode::Mute, Duration::ZERO).await
    }

    async fn bind(addr: SocketAddr, mode: Mode, hold: Duration) -> TestMx {
        let listener = TcpListener::bind(addr).await.expect("bind the test MX");
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let shared = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = Arc::clone(&shared);
                let mode = mode.clone();
                seen.connections.fetch_add(1, Ordering::SeqCst);
                let open = seen.open.fetch_add(1, Ordering::SeqCst) + 1;
                seen.max_open.fetch_max(open, Ordering::SeqCst);
                tokio::spawn(async move {
                    let closed = AtomicBool::new(false);
                    let _ = serve(Box::new(stream), mode, hold, &seen, &closed, true).await;
                    close(&seen, &closed);
                });
            }
        });
        TestMx { addr, seen, task }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.seen.connections.load(Ordering::SeqCst)
    }

    /// The most connections that were open at once.
    pub fn max_open(&self) -> usize {
        self.seen.max_open.load(Ordering::SeqCst)
    }

    /// Every command line received, in order.
    pub fn commands(&self) -> Vec<String> {
        self.seen.commands.lock().unwrap().clone()
    }

    /// Every message received with `DATA`, dot-unstuffed, lines ending in CRLF.
    pub fn messages(&self) -> Vec<String> {
        self.seen.messages.lock().unwrap().clone()
    }
}

impl Drop for TestMx {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A connection, plain or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Counts a connection as closed once (`closed` says whether it was).
fn close(seen: &Seen, closed: &AtomicBool) {
    if !closed.swap(true, Ordering::SeqCst) {
        seen.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One SMTP session on `stream`; `greet`: say 220 first (not after STARTTLS). The session counts
/// as closed (`closed`) when it ends, or at QUIT before the 221 (a client that waits for the
/// 221 before it starts its next session then never overlaps two in the count).
async fn serve(
    stream: Box<dyn Io>,
    mode: Mode,
    hold: Duration,
    seen: &Seen,
    closed: &AtomicBool,
    greet: bool,
) -> std::io::Result<()> {
    let (read, mut write) = tokio::io::split(stream);
    if matches!(mode, Mode::Mute) {
        let mut lines = BufReader::new(read).lines();
        while lines.next_line().await?.is_some() {}
        return Ok(());
    }
    if greet {
        write.write_all(b"220 mx.cbv.test ESMTP test\r\n").await?;
    }
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        seen.commands.lock().unwrap().push(line.clone());
        let upper = line.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") {
            if matches!(mode, Mode::BadTls | Mode::Tls(_)) {
                b"250-mx.cbv.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"
            } else {
                b"250-mx.cbv.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
            }
        } else if let (true, Mode::Tls(config)) = (upper == "STARTTLS", &mode) {
            write.write_all(b"220 2.0.0 go ahead\r\n").await?;
            let stream = lines.into_inner().into_inner().unsplit(write);
            let tls = TlsAcceptor::from(Arc::clone(config)).accept(stream).await?;
            seen.commands.lock().unwrap().push("<TLS>".into());
            return Box::pin(serve(
                Box::new(tls),
                Mode::Scripted,
                hold,
                seen,
                closed,
                false,
            ))
            .await;
        } else if upper == "STARTTLS" {
            write.write_all(b"220 2.0.0 go ahead\r\n").await?;
            write
                .write_all(b"this is not a TLS server hello\r\n")
                .await?;
            return Ok(());
        } else if upper == "MAIL FROM:<>" && matches!(mode, Mode::RefuseNull) {
            b"550 5.7.1 Null sender not accepted here\r\n"
        } else if upper.starts_with("MAIL FROM:") {
            b"250 2.1.0 Ok\r\n"
        } else if upper == "DATA" {
            write
                .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                .await?;
            let mut message = String::new();
            while let Some(line) = lines.next_line().await? {
                if line == "." {
                    break;
                }
                message.push_str(line.strip_prefix('.').unwrap_or(&line));
                message.push_str("\r\n");
            }
            seen.messages.lock().unwrap().push(message);
            b"250 2.0.0 Ok: queued\r\n"
        } else if let Some(rest) = upper.strip_prefix("RCPT TO:<") {
            tokio::time::sleep(hold).await;
            if rest.starts_with("UNKNOWN") {
                b"550 5.1.1 <recipient> User unknown\r\n"
            } else if rest.starts_with("BUSY") {
                b"451 4.3.0 Try again later\r\n"
            } else if rest.starts_with("SILENT") {
                std::future::pending::<()>().await;
                unreachable!()
            } else if rest.starts_with("DROP") {
                return Ok(());
            } else {
                b"250 2.1.5 Ok\r\n"
            }
        } else if upper == "QUIT" {
            close(seen, closed);
            write.write_all(b"221 2.0.0 Bye\r\n").await?;
            return Ok(());
        } else {
            b"502 5.5.2 Error: command not recognized\r\n"
        };
        write.write_all(reply).await?;
    }
    Ok(())
}
