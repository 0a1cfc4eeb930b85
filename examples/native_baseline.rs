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

use indymilter::{Actions, Callbacks, Config, ContextActions, Listener, SetErrorReply, Status};
use luamilter::listen::{BoundSocket, ListenAddr};
use luamilter_loadgen::SPAM_SENDER;
use std::{future::Future, io};
use tokio::signal::unix::{SignalKind, signal};

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
                    let _ = cx
                        .reply
                        .set_error_reply("550", Some("5.7.1"), ["Sender refused"]);
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
    let addr: ListenAddr = spec.parse()?;
    // The same listener luamilter uses: TCP_NODELAY, stale unix socket replaced, removed at exit.
    let bound = BoundSocket::bind(&addr, 0o660).await?;
    let local = bound.local.clone();
    let (listener, _socket_file) = bound.into_parts()?;
    let mut term = signal(SignalKind::terminate())?;
    let shutdown = async {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    eprintln!(
        "native_baseline: listening on {local} (pid {})",
        std::process::id()
    );
    serve(listener, shutdown).await?;
    Ok(())
}
