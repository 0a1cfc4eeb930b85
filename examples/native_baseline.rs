//! The native baseline for benchmarks: a plain indymilter milter in Rust with
//! the same policies as `examples/bench.lua` (the default) and
//! `examples/bench_full.lua` (second argument `full`).
//!
//! The trivial policy rejects the sender spam@bad.example with 550 5.7.1 at
//! MAIL, adds `X-Policy: checked` at end of message and accepts. It registers
//! only the mail and eom callbacks, so every other stage is negotiated away
//! (NO_*), as a well-written native milter does. The every-stage policy also
//! classifies the client IP at connect, checks HELO and each RCPT, counts the
//! headers and body bytes, and reports the tallies in its end-of-message header.
//!
//! ```sh
//! cargo run --release --example native_baseline -- unix:/tmp/native.sock
//! cargo run --release --example native_baseline -- inet:7001@127.0.0.1 full
//! ```

use indymilter::{
    Actions, Callbacks, Config, Context, ContextActions, Listener, SetErrorReply, SocketInfo,
    Status,
};
use luamilter::listen::{BoundSocket, ListenAddr};
use luamilter_loadgen::SPAM_SENDER;
use std::{ffi::CString, future::Future, io, net::IpAddr};
use tokio::signal::unix::{SignalKind, signal};

/// The address of a MAIL or RCPT command, without its angle brackets.
fn address(args: &[CString]) -> &[u8] {
    let addr = args.first().map(|a| a.to_bytes()).unwrap_or_default();
    let addr = addr.strip_prefix(b"<").unwrap_or(addr);
    addr.strip_suffix(b">").unwrap_or(addr)
}

/// Sets a constant reply and answers with `Reject`.
fn reject<T: Send>(cx: &mut Context<T>, xcode: &str, text: &str) -> Status {
    // Constant, valid reply text: setting it cannot fail.
    let _ = cx.reply.set_error_reply("550", Some(xcode), [text]);
    Status::Reject
}

/// The trivial policy: reject the spam sender at MAIL, add a header at end of message.
pub fn callbacks() -> Callbacks<()> {
    Callbacks::new()
        .on_mail(|cx, args| {
            Box::pin(async move {
                if address(&args) == SPAM_SENDER.as_bytes() {
                    reject(cx, "5.7.1", "Sender refused")
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

/// What the every-stage policy keeps per connection.
#[derive(Default)]
pub struct Tally {
    class: &'static str,
    headers: u32,
    body: usize,
}

/// The class of a client address, as `examples/bench_full.lua` names it.
fn classify(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(v4) if v4.is_loopback() => "loopback",
        IpAddr::V4(v4) if v4.octets()[0] == 10 || v4.octets()[..2] == [192, 168] => "private",
        IpAddr::V4(v4) if v4.octets()[..3] == [192, 0, 2] => "documentation",
        _ => "public",
    }
}

/// The every-stage policy of `examples/bench_full.lua`.
pub fn full_callbacks() -> Callbacks<Tally> {
    Callbacks::new()
        .on_connect(|cx, _host, socket| {
            Box::pin(async move {
                let class = match socket {
                    SocketInfo::Inet(addr) => classify(addr.ip()),
                    _ => "public",
                };
                cx.data = Some(Tally {
                    class,
                    ..Default::default()
                });
                Status::Continue
            })
        })
        .on_helo(|cx, name| {
            Box::pin(async move {
                let name = name.to_bytes();
                if !name.contains(&b'.') || name.first() == Some(&b'[') {
                    reject(cx, "5.7.1", "Bad HELO")
                } else {
                    Status::Continue
                }
            })
        })
        .on_mail(|cx, args| {
            Box::pin(async move {
                if address(&args) == SPAM_SENDER.as_bytes() {
                    return reject(cx, "5.7.1", "Sender refused");
                }
                let tally = cx.data.get_or_insert_with(Tally::default);
                tally.headers = 0;
                tally.body = 0;
                Status::Continue
            })
        })
        .on_rcpt(|cx, args| {
            Box::pin(async move {
                if address(&args).eq_ignore_ascii_case(b"blocked@example.net") {
                    reject(cx, "5.1.1", "No such user")
                } else {
                    Status::Continue
                }
            })
        })
        .on_header(|cx, _name, _value| {
            Box::pin(async move {
                cx.data.get_or_insert_with(Tally::default).headers += 1;
                Status::Continue
            })
        })
        .on_body(|cx, chunk| {
            Box::pin(async move {
                cx.data.get_or_insert_with(Tally::default).body += chunk.len();
                Status::Continue
            })
        })
        .on_eom(|cx| {
            Box::pin(async move {
                let tally = cx.data.get_or_insert_with(Tally::default);
                let value = format!(
                    "checked; client={}; headers={}; body={}",
                    tally.class, tally.headers, tally.body
                );
                match cx.actions.add_header("X-Policy", value).await {
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

/// Serves milter connections on `listener` with the trivial policy until `shutdown` completes.
pub async fn serve(listener: impl Listener, shutdown: impl Future) -> io::Result<()> {
    indymilter::run(listener, callbacks(), config(), shutdown).await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: native_baseline unix:/path | inet:PORT@HOST [full]";
    let spec = args.next().ok_or(usage)?;
    let full = match args.next().as_deref() {
        None => false,
        Some("full") => true,
        Some(_) => return Err(usage.into()),
    };
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
    if full {
        indymilter::run(listener, full_callbacks(), config(), shutdown).await?;
    } else {
        serve(listener, shutdown).await?;
    }
    Ok(())
}
