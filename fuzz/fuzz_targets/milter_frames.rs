//! Milter frames as the server sees them: luamilter's real daemon ([`Daemon::start`]) runs
//! in-process on a unix socket, once per fuzzing process, with a policy that handles every stage
//! and reads the session's facts and macros. Each input becomes one connection: a prefix of a
//! well-formed session (so the fuzzed frames reach deep states), then frames with fuzzed command
//! bytes and payloads, well-formed frames of the session, and raw bytes ([`session_bytes`]).
//!
//! The frames are built and the replies parsed with indymilter's own message types. Findings: a
//! panic or abort in the daemon; a reply that does not parse; a connection the daemon neither
//! answers nor closes for [`HANG`] after the client has sent everything and closed its side; an
//! end of message that reaches the policy without an accepted MAIL in the same message (the
//! policy marks it with `X-Skipped`); an accept the policy's end of message did not give; and,
//! every [`PROBE_EVERY`] inputs, a well-formed session that does not get its exact answers.
#![no_main]
use bytes::Bytes;
use indymilter::{
    Actions, MacroStage, ProtoOpts, SocketInfo,
    message::{
        self, Message, PROTOCOL_VERSION,
        command::{
            Command, ConnInfoPayload, EnvAddrPayload, HeaderPayload, HeloPayload, MacroPayload,
            OptNegPayload,
        },
        reply::Reply,
    },
};
use libfuzzer_sys::fuzz_target;
use luamilter::{config::Config, daemon::Daemon};
use std::{
    ffi::CString,
    io::ErrorKind,
    path::{Path, PathBuf},
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::Duration,
};
use tokio::{io::AsyncWriteExt, net::UnixStream, runtime::Runtime};

/// Leak checks off, per input and at exit: the daemon's Lua states and their idle coroutines
/// live on its own threads for the life of the process, and LeakSanitizer reports a fixed handful
/// of their handles (15 allocations, 240 bytes, after 1,000 inputs as after 16,500), not memory
/// that grows with the inputs. Growth shows in libFuzzer's `rss:` figure and its
/// `-rss_limit_mb` (2 GiB by default) instead.
#[unsafe(no_mangle)]
pub extern "C" fn __asan_default_options() -> *const std::ffi::c_char {
    c"detect_leaks=0".as_ptr()
}

/// Every stage handled (so every stage is negotiated with a reply), the session's facts and
/// macros read at each, `bad@example.org` refused at MAIL; end of message adds `X-Checked`, and
/// `X-Skipped` when it runs without an accepted MAIL in the same message.
const POLICY: &str = r#"
local milter = require "milter"
local mime = require "milter.mime"
local net = require "milter.net"

local function look(ctx)
  local seen = {
    ctx.stage, ctx.helo, ctx.sender, ctx.queue_id, ctx.auth, ctx.receiver, ctx.demerits,
    ctx:macro("j"), ctx:macro("i"), ctx:macro("{auth_authen}"), ctx:macro("{daemon_name}"),
    ctx:macro("{rcpt_mailer}"), ctx:macro("_"),
  }
  local c = ctx.client
  seen[#seen + 1] = tostring(c.hostname) .. tostring(c.ip) .. tostring(c.port) .. c.family
  seen[#seen + 1] = tostring(c.path) .. tostring(c.ptr) .. tostring(c.dynamic)
  seen[#seen + 1] = tostring(c.internal) .. tostring(c.trusted) .. tostring(c.localhost)
  for _, a in ipairs(ctx.sender_args) do seen[#seen + 1] = a end
  for i, r in ipairs(ctx.recipients) do
    seen[#seen + 1] = r
    for _, a in ipairs(ctx.recipient_args[i]) do seen[#seen + 1] = a end
  end
  return #seen
end

return {
  connect = function(ctx, host, ip) look(ctx) end,
  helo = function(ctx, name) look(ctx) end,
  mail = function(ctx, sender)
    look(ctx)
    net.parse_address(sender)
    if sender == "bad@example.org" then return milter.reject{ text = "sender refused" } end
    ctx.msg.mail_ok = true
  end,
  rcpt = function(ctx, rcpt) look(ctx); net.parse_address(rcpt) end,
  data = function(ctx) look(ctx) end,
  header = function(ctx, name, value)
    look(ctx)
    mime.decode(value)
    ctx:header(name)
  end,
  eoh = function(ctx)
    look(ctx)
    for _, h in ipairs(ctx.headers) do mime.addresses(h.value) end
  end,
  body = function(ctx, chunk) look(ctx) end,
  unknown = function(ctx, line) look(ctx) end,
  abort = function(ctx) look(ctx) end,
  close = function(ctx) look(ctx) end,
  eom = function(ctx)
    look(ctx)
    if not ctx.msg.mail_ok then ctx:add_header("X-Skipped", "yes") end
    ctx:add_header("X-Checked", "yes")
    return milter.accept()
  end,
}
"#;

/// How long the daemon may go quiet without closing, once the client has sent everything and
/// closed its side, before that counts as a hang (it answers a stage of this policy in well under
/// a millisecond, and closes as soon as it has read the client's end).
const HANG: Duration = Duration::from_secs(5);
/// A well-formed session is checked after this many inputs.
const PROBE_EVERY: u64 = 200;

/// The daemon, started once per process, and the runtime the client side runs on.
struct Harness {
    socket: PathBuf,
    client: Runtime,
    inputs: AtomicU64,
}

/// The harness, started on the first input.
fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        // The daemon's own runtime (control socket, reload) lives on a thread of its own for the
        // life of the process; its milter workers are threads it starts.
        std::thread::spawn(move || {
            let dir = tempfile::tempdir().expect("a temp dir");
            std::fs::write(dir.path().join("frames.lua"), POLICY).unwrap();
            let socket = dir.path().join("milter.sock");
            let text = format!(
                "[milter]\nlisten = \"unix:{}\"\n[policies]\ndirs = [\".\"]\nchain = [\"frames\"]\n\
                 [engine]\nworker_threads = 1\n",
                socket.display()
            );
            let path = dir.path().join("luamilter.toml");
            std::fs::write(&path, text).unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                // Kept for the life of the process, like the daemon.
                let _dir = dir;
                let config = Config::load(&path).expect("the config");
                let _daemon = Daemon::start(config).await.expect("the daemon starts");
                tx.send(socket).unwrap();
                std::future::pending::<()>().await;
            });
        });
        let socket = rx.recv().expect("the daemon started");
        let client = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Harness {
            socket,
            client,
            inputs: AtomicU64::new(0),
        }
    })
}

/// A whole well-formed message from `sender`, as Postfix sends it (macros included), ending
/// with QUIT.
fn transcript(sender: &str) -> Vec<Command> {
    let c = |s: &str| CString::new(s).unwrap();
    let macros = |stage, pairs: &[&str]| {
        Command::DefMacros(MacroPayload {
            stage,
            macros: pairs.iter().map(|s| c(s)).collect(),
        })
    };
    vec![
        Command::OptNeg(OptNegPayload {
            version: PROTOCOL_VERSION,
            actions: Actions::all(),
            opts: ProtoOpts::all(),
        }),
        macros(
            MacroStage::Connect,
            &["j", "mx.example", "{daemon_name}", "smtpd"],
        ),
        Command::ConnInfo(ConnInfoPayload {
            hostname: c("client.example"),
            socket_info: SocketInfo::Inet("192.0.2.7:25".parse().unwrap()),
        }),
        Command::Helo(HeloPayload {
            hostname: c("helo.example"),
        }),
        macros(MacroStage::Mail, &["i", "QID1", "{auth_authen}", "user"]),
        Command::Mail(EnvAddrPayload {
            args: vec![c(&format!("<{sender}>")), c("SIZE=10")],
        }),
        macros(MacroStage::Rcpt, &["{rcpt_mailer}", "local"]),
        Command::Rcpt(EnvAddrPayload {
            args: vec![c("<rcpt@example.org>"), c("NOTIFY=NEVER")],
        }),
        Command::Data,
        Command::Header(HeaderPayload {
            name: c("Subject"),
            value: c("=?utf-8?q?hello?="),
        }),
        Command::Header(HeaderPayload {
            name: c("From"),
            value: c("A <a@example.org>, b@example.org"),
        }),
        Command::Eoh,
        Command::BodyChunk(Bytes::from_static(b"body\r\n")),
        Command::BodyEnd(Bytes::new()),
        Command::Quit,
    ]
}

/// `messages` as the bytes on the wire.
async fn encode(messages: impl IntoIterator<Item = Message>) -> Vec<u8> {
    let mut bytes = Vec::new();
    for msg in messages {
        message::write(&mut bytes, msg)
            .await
            .expect("a message within the frame limit");
    }
    bytes
}

/// Takes the next byte off `rest`.
fn next(rest: &mut &[u8]) -> Option<u8> {
    let (&b, tail) = rest.split_first()?;
    *rest = tail;
    Some(b)
}

/// The commands a fuzzed frame picks from by the low nibble of its control byte (15: the next
/// byte is the command, any byte).
const COMMANDS: &[u8] = b"ADBCEHLMNORTQKU";

/// The bytes one input sends. The first byte chooses how many frames of a well-formed session
/// come first (and its sender: its top bit); the rest is a list of pieces, each led by a control
/// byte whose high nibble says what follows:
/// - 0 to 11: a frame of command [`COMMANDS`]`[low nibble]`, a length byte and that many payload
///   bytes, NUL-terminated from 6 on (most payloads are C strings);
/// - 12 and 13: the well-formed frame number `low nibble` of the session (nothing follows);
/// - 14 and 15: raw bytes: a length byte and that many bytes, as they are.
async fn session_bytes(input: &[u8]) -> Vec<u8> {
    let Some((&first, mut rest)) = input.split_first() else {
        return Vec::new();
    };
    let sender = if first & 0x80 == 0 {
        "good@example.org"
    } else {
        "bad@example.org"
    };
    let session: Vec<Message> = transcript(sender)
        .into_iter()
        .map(Command::into_message)
        .collect();
    // Never the final QUIT: the fuzzed frames follow.
    let take = usize::from(first & 0x7f) % session.len();
    let mut bytes = encode(session[..take].iter().cloned()).await;
    while let Some(control) = next(&mut rest) {
        let (high, low) = (control >> 4, usize::from(control & 0x0f));
        if high == 12 || high == 13 {
            bytes.extend(encode([session[low % session.len()].clone()]).await);
            continue;
        }
        let kind = match (high, COMMANDS.get(low)) {
            (14.., _) => None,
            (_, Some(&kind)) => Some(kind),
            (_, None) => match next(&mut rest) {
                Some(kind) => Some(kind),
                None => break,
            },
        };
        let Some(len) = next(&mut rest) else { break };
        let len = usize::from(len).min(rest.len());
        let (payload, tail) = rest.split_at(len);
        rest = tail;
        let Some(kind) = kind else {
            bytes.extend_from_slice(payload);
            continue;
        };
        let mut payload = payload.to_vec();
        if high >= 6 {
            payload.push(0);
        }
        bytes.extend(encode([Message::new(kind, payload)]).await);
    }
    bytes
}

/// Sends `bytes` on a new connection, closes the sending side, and reads the replies until the
/// daemon closes. Panics on a reply that does not parse, and when the daemon goes quiet for
/// [`HANG`] without closing.
async fn exchange(socket: &Path, bytes: Vec<u8>) -> Vec<Reply> {
    let stream = UnixStream::connect(socket).await.expect("the daemon is up");
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        // The daemon may close first (a frame too long); the rest is not needed then.
        let _ = write.write_all(&bytes).await;
        let _ = write.shutdown().await;
        write
    });
    let mut replies = Vec::new();
    loop {
        let msg = match tokio::time::timeout(HANG, message::read(&mut read)).await {
            Err(_) => panic!(
                "the daemon neither answered nor closed for {HANG:?}: replies so far {:?}",
                letters(&replies)
            ),
            Ok(Err(e)) if e.kind() == ErrorKind::InvalidData => {
                panic!("a reply frame over the frame limit")
            }
            Ok(Err(_)) => break,
            Ok(Ok(msg)) => msg,
        };
        match Reply::parse_reply(msg.clone()) {
            Ok(reply) => replies.push(reply),
            Err(e) => panic!("a reply that does not parse ({e}): {msg:?}"),
        }
    }
    drop(writer.await);
    replies
}

/// The command letters of `replies`.
fn letters(replies: &[Reply]) -> String {
    replies
        .iter()
        .map(|r| r.clone().into_message().kind as char)
        .collect()
}

/// Whether `reply` adds a header named `name`.
fn adds(reply: &Reply, name: &str) -> bool {
    matches!(reply, Reply::AddHeader { name: n, .. } if n.as_bytes() == name.as_bytes())
}

/// A well-formed session must get its exact answers: a refused sender at MAIL, an accepted
/// one through to end of message with its header.
async fn probe(socket: &Path) {
    let wire = |commands: Vec<Command>| encode(commands.into_iter().map(Command::into_message));
    let good = exchange(socket, wire(transcript("good@example.org")).await).await;
    assert_eq!(letters(&good), "Occcccccccha", "a well-formed session");
    check(&good);
    let mut refused = transcript("bad@example.org");
    // Up to MAIL, then QUIT.
    refused.drain(6..refused.len() - 1);
    let refused = exchange(socket, wire(refused).await).await;
    assert_eq!(letters(&refused), "Occy", "a refused sender");
}

/// What the daemon answered one input: no end of message ran the policy without an accepted
/// MAIL in its message, and every accept is the policy's end of message (which adds `X-Checked`
/// just before it): nothing else in the policy accepts.
fn check(replies: &[Reply]) {
    for (i, r) in replies.iter().enumerate() {
        assert!(
            !adds(r, "X-Skipped"),
            "an end of message reached the policy without an accepted MAIL: replies {:?}",
            letters(replies)
        );
        assert!(
            *r != Reply::Accept || i > 0 && adds(&replies[i - 1], "X-Checked"),
            "an accept the policy's end of message did not give: replies {:?}",
            letters(replies)
        );
    }
}

fuzz_target!(|input: &[u8]| {
    let h = harness();
    h.client.block_on(async {
        let n = h.inputs.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(PROBE_EVERY) {
            probe(&h.socket).await;
        }
        let replies = exchange(&h.socket, session_bytes(input).await).await;
        check(&replies);
    });
});
