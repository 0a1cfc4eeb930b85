//! Milter frames as the server sees them: luamilter's real daemon ([`Daemon::start`]) runs
//! in-process on a unix socket, once per fuzzing process, with a policy that handles every stage
//! and reads the session's facts and macros. Each input becomes one connection: a prefix of a
//! well-formed session (so the fuzzed frames reach deep states), then frames with fuzzed command
//! bytes and payloads, and now and then raw bytes.
//!
//! Findings: a panic or abort in the daemon; a connection the daemon neither answers nor closes
//! within [`HANG`] after the client has closed; an end of message that reaches the policy
//! without an accepted MAIL in the same message (the policy marks it with `X-Skipped`); and,
//! every [`PROBE_EVERY`] inputs, a well-formed session that does not get its exact answers.
#![no_main]
use libfuzzer_sys::fuzz_target;
use luamilter::{config::Config, daemon::Daemon};
use std::{
    path::PathBuf,
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
    runtime::Runtime,
};

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

/// How long a reply may be awaited before the connection counts as done (the daemon answers a
/// stage of this policy in well under a millisecond).
const IDLE: Duration = Duration::from_millis(100);
/// How long the daemon may take to close a connection the client has closed before that counts
/// as a hang.
const HANG: Duration = Duration::from_secs(5);
/// A well-formed session is checked after this many inputs.
const PROBE_EVERY: u64 = 200;

/// The daemon, started once per process, and the runtime the client side runs on.
struct Harness {
    socket: PathBuf,
    client: Runtime,
    inputs: AtomicU64,
}

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

/// A milter frame: length (command byte included), command, payload.
fn frame(cmd: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
    f.push(cmd);
    f.extend_from_slice(payload);
    f
}

/// NUL-terminated strings, concatenated.
fn cstrs(parts: &[&[u8]]) -> Vec<u8> {
    parts
        .iter()
        .flat_map(|p| p.iter().copied().chain([0]))
        .collect()
}

/// A whole well-formed message from `sender`, as a list of frames, as Postfix sends it.
fn transcript(sender: &str) -> Vec<Vec<u8>> {
    let mut optneg = 6u32.to_be_bytes().to_vec();
    optneg.extend(0x1ffu32.to_be_bytes()); // every action
    optneg.extend(0x1fffffu32.to_be_bytes()); // every protocol option
    let mut connect = cstrs(&[b"client.example"]);
    connect.push(b'4');
    connect.extend(25u16.to_be_bytes());
    connect.extend(cstrs(&[b"192.0.2.7"]));
    vec![
        frame(b'O', &optneg),
        frame(
            b'D',
            &[
                &b"C"[..],
                &cstrs(&[b"j", b"mx.example", b"{daemon_name}", b"smtpd"]),
            ]
            .concat(),
        ),
        frame(b'C', &connect),
        frame(b'H', &cstrs(&[b"helo.example"])),
        frame(
            b'D',
            &[
                &b"M"[..],
                &cstrs(&[b"i", b"QID1", b"{auth_authen}", b"user"]),
            ]
            .concat(),
        ),
        frame(
            b'M',
            &cstrs(&[format!("<{sender}>").as_bytes(), b"SIZE=10"]),
        ),
        frame(
            b'D',
            &[&b"R"[..], &cstrs(&[b"{rcpt_mailer}", b"local"])].concat(),
        ),
        frame(b'R', &cstrs(&[b"<rcpt@example.org>", b"NOTIFY=NEVER"])),
        frame(b'T', b""),
        frame(b'L', &cstrs(&[b"Subject", b"=?utf-8?q?hello?="])),
        frame(
            b'L',
            &cstrs(&[b"From", b"A <a@example.org>, b@example.org"]),
        ),
        frame(b'N', b""),
        frame(b'B', b"body\r\n"),
        frame(b'E', b""),
        frame(b'Q', b""),
    ]
}

/// Takes the next byte off `rest`.
fn next(rest: &mut &[u8]) -> Option<u8> {
    let (&b, tail) = rest.split_first()?;
    *rest = tail;
    Some(b)
}

/// The commands a fuzzed frame picks from (the input can also give any byte).
const COMMANDS: &[u8] = b"ADBCEHLMNORTQKU";

/// The bytes one input sends: the first byte chooses how many frames of a well-formed session
/// come first (and its sender), the rest is read as frames: a control byte (command, or raw
/// bytes when its top two bits are set), a length byte and that many payload bytes.
fn session_bytes(input: &[u8]) -> Vec<u8> {
    let Some((&first, mut rest)) = input.split_first() else {
        return Vec::new();
    };
    let sender = if first & 0x80 == 0 {
        "good@example.org"
    } else {
        "bad@example.org"
    };
    let prefix = transcript(sender);
    // Never the final QUIT: the fuzzed frames follow.
    let take = usize::from(first & 0x7f) % prefix.len();
    let mut bytes = prefix[..take].concat();
    while let Some(control) = next(&mut rest) {
        let Some(len) = next(&mut rest) else { break };
        let len = usize::from(len).min(rest.len());
        let (payload, tail) = rest.split_at(len);
        rest = tail;
        if control & 0xc0 == 0xc0 {
            bytes.extend_from_slice(payload);
            continue;
        }
        let index = usize::from(control & 0x1f);
        let cmd = match COMMANDS.get(index) {
            Some(&cmd) => cmd,
            None => match next(&mut rest) {
                Some(cmd) => cmd,
                None => break,
            },
        };
        bytes.extend(frame(cmd, payload));
    }
    bytes
}

/// One reply frame: its command letter and payload.
struct Reply {
    cmd: u8,
    payload: Vec<u8>,
}

/// Sends `bytes` on a new connection, closes the sending side, and reads the replies until the
/// daemon closes. Panics when it does not close within [`HANG`] of going quiet.
async fn exchange(socket: &PathBuf, bytes: Vec<u8>) -> Vec<Reply> {
    let stream = UnixStream::connect(socket).await.expect("the daemon is up");
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        // The daemon may close first (a frame too long); the rest is not needed then.
        let _ = write.write_all(&bytes).await;
        let _ = write.shutdown().await;
        write
    });
    let mut replies = Vec::new();
    let mut quiet_since: Option<Instant> = None;
    loop {
        let mut len = [0u8; 4];
        match tokio::time::timeout(IDLE, read.read_exact(&mut len)).await {
            Err(_) => {
                let since = *quiet_since.get_or_insert_with(Instant::now);
                assert!(
                    since.elapsed() < HANG,
                    "the daemon neither answered nor closed for {HANG:?} after the client closed"
                );
                continue;
            }
            Ok(Err(_)) => break,
            Ok(Ok(_)) => quiet_since = None,
        }
        let len = u32::from_be_bytes(len) as usize;
        assert!(len > 0 && len <= 1 << 20, "a reply frame of {len} bytes");
        let mut body = vec![0u8; len];
        match tokio::time::timeout(HANG, read.read_exact(&mut body)).await {
            Ok(Ok(_)) => replies.push(Reply {
                cmd: body[0],
                payload: body[1..].to_vec(),
            }),
            Ok(Err(_)) => break,
            Err(_) => panic!("a reply frame cut short for {HANG:?}"),
        }
    }
    drop(writer.await);
    replies
}

/// The command letters of `replies`.
fn letters(replies: &[Reply]) -> String {
    replies.iter().map(|r| r.cmd as char).collect()
}

/// A well-formed session must get its exact answers: a refused sender at MAIL, an accepted
/// one through to end of message with its header.
async fn probe(socket: &PathBuf) {
    let good = exchange(socket, transcript("good@example.org").concat()).await;
    assert_eq!(letters(&good), "Occcccccccha", "a well-formed session");
    check(&good);
    let bad = transcript("bad@example.org");
    let refused = exchange(socket, [&bad[..6], &bad[14..]].concat().concat()).await;
    assert_eq!(letters(&refused), "Occy", "a refused sender");
}

/// What the daemon answered one input: no end of message ran the policy without an accepted
/// MAIL in its message, and every accept is the policy's end of message (which adds `X-Checked`
/// just before it): nothing else in the policy accepts.
fn check(replies: &[Reply]) {
    let added = |r: &Reply, name: &[u8]| r.cmd == b'h' && r.payload.starts_with(name);
    for (i, r) in replies.iter().enumerate() {
        assert!(
            !added(r, b"X-Skipped\0"),
            "an end of message reached the policy without an accepted MAIL: replies {:?}",
            letters(replies)
        );
        assert!(
            r.cmd != b'a' || i > 0 && added(&replies[i - 1], b"X-Checked\0"),
            "an accept the policy's end of message did not give: replies {:?}",
            letters(replies)
        );
    }
}

fuzz_target!(|input: &[u8]| {
    let h = harness();
    h.client.block_on(async {
        let n = h.inputs.fetch_add(1, Ordering::Relaxed);
        if n % PROBE_EVERY == 0 {
            probe(&h.socket).await;
        }
        let replies = exchange(&h.socket, session_bytes(input)).await;
        check(&replies);
    });
});
