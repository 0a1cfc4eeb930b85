//! A small SMTP server for the call-back tests: one tokio listener on a loopback address,
//! replies scripted by the local part of `RCPT TO`, every connection and command counted.
//!
//! `ok…` (and anything unscripted) is accepted with 250, `unknown…` refused with 550 5.1.1,
//! `busy…` with 451 4.3.0; after `RCPT TO:<silent…>` it says nothing more, after
//! `RCPT TO:<drop…>` it closes the connection. [`TestMx::mute`] accepts connections and never
//! greets. It never speaks TLS; [`TestMx::offering_starttls`] offers STARTTLS, says 220 to it
//! and then sends bytes that are no TLS handshake.
//!
//! As a relay for DSNs it takes `DATA` and keeps each message ([`TestMx::messages`]);
//! [`TestMx::refusing_null_sender`] answers `MAIL FROM:<>` with 550 5.7.1.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Scripted,
    Mute,
    BadTls,
    RefuseNull,
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
                seen.connections.fetch_add(1, Ordering::SeqCst);
                let open = seen.open.fetch_add(1, Ordering::SeqCst) + 1;
                seen.max_open.fetch_max(open, Ordering::SeqCst);
                tokio::spawn(async move {
                    let _ = serve(stream, mode, hold, &seen).await;
                    seen.open.fetch_sub(1, Ordering::SeqCst);
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

async fn serve(stream: TcpStream, mode: Mode, hold: Duration, seen: &Seen) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    if mode == Mode::Mute {
        let mut lines = BufReader::new(read).lines();
        while lines.next_line().await?.is_some() {}
        return Ok(());
    }
    write.write_all(b"220 mx.cbv.test ESMTP test\r\n").await?;
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        seen.commands.lock().unwrap().push(line.clone());
        let upper = line.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") {
            if mode == Mode::BadTls {
                b"250-mx.cbv.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"
            } else {
                b"250-mx.cbv.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
            }
        } else if upper == "STARTTLS" {
            write.write_all(b"220 2.0.0 go ahead\r\n").await?;
            write
                .write_all(b"this is not a TLS server hello\r\n")
                .await?;
            return Ok(());
        } else if upper == "MAIL FROM:<>" && mode == Mode::RefuseNull {
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
            write.write_all(b"221 2.0.0 Bye\r\n").await?;
            return Ok(());
        } else {
            b"502 5.5.2 Error: command not recognized\r\n"
        };
        write.write_all(reply).await?;
    }
    Ok(())
}
