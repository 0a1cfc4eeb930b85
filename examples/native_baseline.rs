//! The native baseline for benchmarks: a plain indymilter milter in Rust with
//! the same trivial policy as `examples/bench.lua`. It rejects the sender
//! spam@bad.example with 550 5.7.1 at MAIL, adds `X-Policy: checked` at end of
//! message and accepts. It registers only the mail and eom callbacks, so every
//! other stage is negotiated away (NO_*), as a well-written native milter does.
//!
//! ```sh
//! cargo run --release --example native_baseline -- unix:/tmp/native.sock
//! cargo run --release --example native_baseline -- inet:7001@127.0.0.1
//! ```

use indymilter::{
    Actions, Callbacks, Config, ContextActions, EitherListener, Listener, SetErrorReply, Status,
};
use luamilter::loadgen::{Endpoint, SPAM_SENDER};
use std::{
    future::Future,
    io,
    task::{Context, Poll},
};
use tokio::{
    net::{TcpListener, TcpStream, UnixListener},
    signal::unix::{SignalKind, signal},
};

/// A TCP listener that sets `TCP_NODELAY` on every accepted connection, so the
/// milter's replies are not held back by Nagle's algorithm.
pub struct NoDelay(pub TcpListener);

impl Listener for NoDelay {
    type Io = TcpStream;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<TcpStream>> {
        self.0.poll_accept(cx).map(|accepted| {
            let (stream, _) = accepted?;
            stream.set_nodelay(true)?;
            Ok(stream)
        })
    }
}

/// The listener for a TCP or UNIX socket.
pub type BaselineListener = EitherListener<NoDelay, UnixListener>;

/// Binds the socket; a stale UNIX socket file is removed first.
pub async fn bind(endpoint: &Endpoint) -> io::Result<BaselineListener> {
    match endpoint {
        Endpoint::Inet { host, port } => {
            let listener = TcpListener::bind((host.as_str(), *port)).await?;
            Ok(EitherListener::Tcp(NoDelay(listener)))
        }
        Endpoint::Unix(path) => {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            Ok(EitherListener::Unix(UnixListener::bind(path)?))
        }
    }
}

/// The policy: reject the spam sender at MAIL, add a header at end of message.
pub fn callbacks() -> Callbacks<()> {
    Callbacks::new()
        .on_mail(|cx, args| {
            Box::pin(async move {
                let sender = args.first().map(|a| a.to_bytes()).unwrap_or_default();
                let sender = sender.strip_prefix(b"<").unwrap_or(sender);
                let sender = sender.strip_suffix(b">").unwrap_or(sender);
                if sender == SPAM_SENDER.as_bytes() {
                    // Constant, valid reply text: setting it cannot fail.
                    let _ = cx.reply.set_error_reply("550", Some("5.7.1"), ["Go away"]);
                    Status::Reject
                } else {
                    Status::Continue
                }
            })
        })
        .on_eom(|cx| {
            Box::pin(async move {
                match cx.actions.add_header("X-Policy", "checked").await {
                    Ok(()) => Status::Accept,
                    Err(_) => Status::Tempfail,
                }
            })
        })
}

/// indymilter settings: room for 2000 connections, and the one action used.
pub fn config() -> Config {
    Config {
        max_connections: 2000,
        actions: Actions::ADD_HEADER,
        ..Default::default()
    }
}

/// Serves milter connections on `listener` until `shutdown` completes.
pub async fn serve(listener: impl Listener, shutdown: impl Future) -> io::Result<()> {
    indymilter::run(listener, callbacks(), config(), shutdown).await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let spec = std::env::args()
        .nth(1)
        .ok_or("usage: native_baseline unix:/path | inet:PORT@HOST")?;
    let endpoint: Endpoint = spec.parse()?;
    let listener = bind(&endpoint).await?;
    let mut term = signal(SignalKind::terminate())?;
    let shutdown = async {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    eprintln!(
        "native_baseline: listening on {endpoint} (pid {})",
        std::process::id()
    );
    serve(listener, shutdown).await?;
    if let Endpoint::Unix(path) = &endpoint {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}
