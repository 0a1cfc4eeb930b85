//! Messages rewritten and kept, through a real daemon and a real milter client, read back by a
//! different MIME parser than the one that wrote them (Python's `email` package): the `defang`
//! stock policy's new body, and the `archive` policy's Maildir, also on a full disk (a tiny
//! tmpfs).

use crate::support::TestDaemon;
use indymilter_test::{EomAction, EomActions, Status};
use std::{
    io::Write,
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// Runs a Python script with `input` on stdin and returns its stdout; panics with its stderr.
pub fn python(script: &str, input: &[u8]) -> String {
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A message written by Python's email package: a text part, a ZIP holding an .exe, a clean
/// PDF, an HTML part with a script, and an attached message carrying a .scr.
const BUILD: &str = r#"
import io, sys, zipfile
from email.message import EmailMessage
inner = EmailMessage()
inner["From"] = "x@example.net"
inner["Subject"] = "forwarded"
inner.set_content("inner text")
inner.add_attachment(b"MZ....", maintype="application", subtype="octet-stream", filename="screensaver.scr")
z = io.BytesIO()
with zipfile.ZipFile(z, "w") as f:
    f.writestr("readme.txt", "hello")
    f.writestr("invoice.pdf.exe", "MZ....")
msg = EmailMessage()
msg["From"] = "Sender <sender@example.com>"
msg["To"] = "user@example.org"
msg["Subject"] = "all kinds"
msg.set_content("Please see the attachments.\n")
msg.add_alternative("<p>Hi</p><script>alert('x')</script><p>bye</p>", subtype="html")
msg.make_mixed()
msg.add_attachment(z.getvalue(), maintype="application", subtype="zip", filename="invoice.zip")
msg.add_attachment(b"%PDF-1.4 fake", maintype="application", subtype="pdf", filename="report.pdf")
msg.add_attachment(inner)
sys.stdout.buffer.write(msg.as_bytes(policy=msg.policy.clone(linesep="\r\n")))
"#;

/// Reads a message from stdin and prints one line per leaf part: content type, file name,
/// the start of its decoded text (or its size), and the parser's defects.
pub const READ: &str = r#"
import sys, email
from email import policy
msg = email.message_from_bytes(sys.stdin.buffer.read(), policy=policy.default)
for part in msg.walk():  # walks into attached messages too
    if part.is_multipart():
        continue
    ct = part.get_content_type()
    if ct == "message/rfc822":
        print(ct, "-", "-", len(part.defects))
        continue
    body = part.get_content()
    text = body.replace("\r", "").replace("\n", " ")[:160] if isinstance(body, str) else "%d bytes" % len(body)
    print(ct, part.get_filename() or "-", text, len(part.defects))
print("top-defects", len(msg.defects))
"#;

/// The header fields of `message` (folded lines joined with CRLF) and its body.
pub(crate) fn split_message(message: &[u8]) -> (Vec<(String, String)>, Vec<u8>) {
    let end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    let head = String::from_utf8_lossy(&message[..end]).into_owned();
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            let last = headers.last_mut().unwrap();
            last.1.push_str("\r\n");
            last.1.push_str(line);
        } else if let Some((name, value)) = line.split_once(':') {
            headers.push((name.to_string(), value.trim_start().to_string()));
        }
    }
    (headers, message[end + 4..].to_vec())
}

/// Sends `message` from `ip` as an MTA does and returns the end-of-message answer.
pub(crate) async fn send(
    d: &TestDaemon,
    message: &[u8],
    ip: Ipv4Addr,
    sender: &str,
) -> (EomActions, Status) {
    let (headers, body) = split_message(message);
    let mut c = d.client().await;
    c.connect("client.example", ip).await.unwrap();
    c.helo("client.example").await.unwrap();
    c.mail([sender]).await.unwrap();
    c.rcpt(["<user@example.org>"]).await.unwrap();
    c.data().await.unwrap();
    for (name, value) in &headers {
        c.header(name, value).await.unwrap();
    }
    c.eoh().await.unwrap();
    c.body(body).await.unwrap();
    let answer = c.eom().await.unwrap();
    c.close().await.unwrap();
    answer
}

/// The message as the MTA has it after the edits: header changes applied, the new body.
fn edited(message: &[u8], actions: &EomActions) -> Vec<u8> {
    let (mut headers, mut body) = split_message(message);
    let mut new_body = Vec::new();
    for action in &actions.actions {
        match action {
            EomAction::ChangeHeader { name, value, .. } => {
                let name = name.to_string_lossy();
                let value = value.to_string_lossy().into_owned();
                headers.retain(|(n, _)| !n.eq_ignore_ascii_case(&name));
                if !value.is_empty() {
                    headers.push((name.into_owned(), value));
                }
            }
            EomAction::AddHeader { name, value } => headers.push((
                name.to_string_lossy().into_owned(),
                value.to_string_lossy().into_owned(),
            )),
            EomAction::ReplaceBody { chunk } => new_body.extend_from_slice(chunk),
            _ => {}
        }
    }
    if !new_body.is_empty() {
        body = new_body;
    }
    let mut out = Vec::new();
    for (name, value) in headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    out
}

fn stock(name: &str) -> (&str, &'static str) {
    (name, luamilter::stock::get(name).unwrap())
}

/// Starts a daemon with the defang policy (and `extra` config), sends it `original` from an
/// external client; the daemon and the end-of-message actions of a message that went through.
async fn defanged(original: &[u8], extra: &str) -> (TestDaemon, EomActions) {
    let d = TestDaemon::start(&[stock("defang")], extra).await;
    let (actions, status) = send(
        &d,
        original,
        Ipv4Addr::new(192, 0, 2, 9),
        "<sender@example.com>",
    )
    .await;
    assert_eq!(status, Status::Continue);
    (d, actions)
}

#[tokio::test]
async fn defang_rewrites_what_python_reads_as_valid_mime() {
    let original = python(BUILD, b"").into_bytes();
    let before = python(READ, &original);
    assert!(
        before.contains("invoice.zip") && before.contains("alert"),
        "{before}"
    );
    let (d, actions) = defanged(&original, "[site]\nsave_dir = \"saved\"").await;
    // The original is kept in [site] save_dir, marked with its kind.
    let kept = maildir_new(&d.dir.path().join("saved"), 1);
    assert_eq!(kept.len(), 1, "{kept:?}");
    let copy = std::fs::read(&kept[0]).unwrap();
    let copy = copy
        .strip_prefix(b"X-Luamilter-Kept: defang\r\n".as_slice())
        .expect("marked as a defang copy");
    assert_eq!(python(READ, copy), before);
    assert!(
        actions
            .actions
            .iter()
            .any(|a| matches!(a, EomAction::ReplaceBody { .. })),
        "{:?}",
        actions.actions
    );
    let after = python(READ, &edited(&original, &actions));
    let lines: Vec<&str> = after.lines().collect();
    let line = |needle: &str| {
        lines
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no part with {needle:?}:\n{after}"))
    };
    // The other parts are intact.
    assert!(
        line("Please see").starts_with("text/plain - Please see the attachments."),
        "{after}"
    );
    assert!(
        line("report.pdf").starts_with("application/pdf report.pdf 13 bytes 0"),
        "{after}"
    );
    // The ZIP with an .exe member and the attached message's .scr became notices.
    let zip = line("invoice.zip/invoice.pdf.exe");
    assert!(
        zip.starts_with("text/plain WARNING.TXT This message appeared to contain a virus."),
        "{zip}"
    );
    let scr = line("'screensaver.scr'");
    assert!(scr.starts_with("text/plain WARNING.TXT"), "{scr}");
    assert!(
        line("inner text").starts_with("text/plain - inner text"),
        "{after}"
    );
    // The script is gone from the HTML part, its text kept.
    let html = line("text/html");
    assert!(
        !html.contains("alert")
            && html.contains("<p>Hi</p><!-- WARNING: embedded script removed --><p>bye</p>"),
        "{html}"
    );
    // No part has defects.
    assert!(lines.iter().all(|l| l.ends_with(" 0")), "{after}");
    assert!(
        !after.contains("invoice.zip -") && !after.contains("application/zip"),
        "{after}"
    );
    d.stop().await;
}

/// A message written by Python's email package whose ZIP attachments (Python's zipfile,
/// deflated) hold ZIPs: an .exe two levels down, a clean nested ZIP, a zip bomb (an inner ZIP
/// that unpacks past 8 MiB) and ZIPs nested four deep.
const NESTED_ZIPS: &str = r#"
import io, sys, zipfile
from email.message import EmailMessage
def zipped(members, method=zipfile.ZIP_DEFLATED):
    z = io.BytesIO()
    with zipfile.ZipFile(z, "w", compression=method) as f:
        for name, data in members:
            f.writestr(name, data)
    return z.getvalue()
msg = EmailMessage()
msg["From"] = "Sender <sender@example.com>"
msg["To"] = "user@example.org"
msg["Subject"] = "zips in zips"
msg.set_content("See the archives.\n")
bad = zipped([("notes.txt", "x"), ("docs.zip", zipped([("readme.txt", "hi"), ("run.exe", "MZ")]))])
clean = zipped([("docs.zip", zipped([("readme.txt", "hi")]))])
bomb = zipped([("inner.zip", zipped([("zeros.bin", bytes(9 * 1024 * 1024))], zipfile.ZIP_STORED))])
deep = zipped([("readme.txt", "bottom")])
for level in (4, 3, 2, 1):
    deep = zipped([("l%d.zip" % level, deep)])
for name, data in (("nested-bad.zip", bad), ("nested-clean.zip", clean), ("bomb.zip", bomb), ("deep.zip", deep)):
    msg.add_attachment(data, maintype="application", subtype="zip", filename=name)
sys.stdout.buffer.write(msg.as_bytes(policy=msg.policy.clone(linesep="\r\n")))
"#;

#[tokio::test]
async fn defang_unpacks_zips_inside_zips_within_bounds() {
    let original = python(NESTED_ZIPS, b"").into_bytes();
    assert!(original.len() < 200_000, "the bomb is deflated");
    let (d, actions) = defanged(&original, "").await;
    let after = python(READ, &edited(&original, &actions));
    let notice = |name: &str| {
        let needle = format!("originally named '{name}'");
        assert!(
            after
                .lines()
                .any(|l| l.starts_with("text/plain WARNING.TXT") && l.contains(&needle)),
            "no notice for {name}:\n{after}"
        );
    };
    notice("nested-bad.zip/docs.zip/run.exe");
    notice("bomb.zip/inner.zip");
    notice("deep.zip/l1.zip/l2.zip/l3.zip/l4.zip");
    assert!(
        after.contains("application/zip nested-clean.zip"),
        "the clean nested ZIP stays:\n{after}"
    );
    assert_eq!(after.matches("WARNING.TXT").count(), 3, "{after}");
    d.stop().await;
}

/// A message (Python's email package) with two attached messages sent base64-encoded, each
/// carrying a .scr: one all ASCII, one with a UTF-8 text part sent 8bit. The whole is 7-bit.
const ENCODED_RFC822: &str = r#"
import base64, sys
from email.message import EmailMessage
from email.mime.base import MIMEBase
def inner(text, cte):
    m = EmailMessage()
    m["From"] = "x@example.net"
    m["Subject"] = "forwarded"
    m.set_content(text, cte=cte)
    m.add_attachment(b"MZ....", maintype="application", subtype="octet-stream", filename="screensaver.scr")
    return m.as_bytes(policy=m.policy.clone(linesep="\r\n"))
msg = EmailMessage()
msg["From"] = "Sender <sender@example.com>"
msg["To"] = "user@example.org"
msg["Subject"] = "encoded forwards"
msg.set_content("Two forwards.\n")
msg.make_mixed()
for text, cte in (("plain inner text\n", "7bit"), ("Grüße aus Köln\n", "8bit")):
    part = MIMEBase("message", "rfc822")
    part["Content-Transfer-Encoding"] = "base64"
    part.set_payload(base64.encodebytes(inner(text, cte)).decode())
    msg.attach(part)
sys.stdout.buffer.write(msg.as_bytes(policy=msg.policy.clone(linesep="\r\n")))
"#;

/// Reads a message from stdin and prints, for each attached message (decoding its transfer
/// encoding), its transfer encoding, then READ's line per leaf part of it.
const READ_ATTACHED: &str = r#"
import base64, sys, email
from email import policy
from email.parser import BytesParser
raw = sys.stdin.buffer.read()
# Python parses a message/rfc822 part as a message without undoing its transfer encoding, so
# the top-level parts are split at the boundary and each is read header-only (body kept raw).
top = BytesParser(policy=policy.default).parsebytes(raw, headersonly=True)
body = top.get_payload().encode("ascii", "surrogateescape")
for chunk in body.split(b"--" + top.get_boundary().encode())[1:-1]:
    part = BytesParser(policy=policy.default).parsebytes(chunk.lstrip(b"\r\n"), headersonly=True)
    if part.get_content_type() != "message/rfc822":
        continue
    cte = part.get("Content-Transfer-Encoding", "7bit").strip().lower()
    payload = part.get_payload().encode("ascii", "surrogateescape")
    if cte == "base64":
        payload = base64.b64decode(payload, validate=False)
    inner = email.message_from_bytes(payload, policy=policy.default)
    print("attached", cte, len(inner.defects))
    for leaf in inner.walk():
        if leaf.is_multipart():
            continue
        text = leaf.get_content()
        text = text.replace("\r", "").replace("\n", " ")[:120] if isinstance(text, str) else "%d bytes" % len(text)
        print(" ", leaf.get_content_type(), leaf.get_filename() or "-", text, len(leaf.defects))
"#;

#[tokio::test]
async fn a_defanged_encoded_attached_message_stays_7bit() {
    let original = python(ENCODED_RFC822, b"").into_bytes();
    assert!(original.is_ascii());
    let (d, actions) = defanged(&original, "").await;
    let edited = edited(&original, &actions);
    assert!(edited.is_ascii(), "the result is 7-bit clean");
    let after = python(READ_ATTACHED, &edited);
    let lines: Vec<&str> = after.lines().map(str::trim).collect();
    assert_eq!(lines.len(), 6, "two messages of two leaves each:\n{after}");
    // The ASCII forward is now 7bit (RFC 2046), the one with 8-bit text base64 again.
    assert_eq!(lines[0], "attached 7bit 0", "{after}");
    assert!(
        lines[1].starts_with("text/plain - plain inner text"),
        "{after}"
    );
    assert!(lines[2].starts_with("text/plain WARNING.TXT"), "{after}");
    assert_eq!(lines[3], "attached base64 0", "{after}");
    assert!(
        lines[4].starts_with("text/plain - Grüße aus Köln"),
        "{after}"
    );
    assert!(lines[5].starts_with("text/plain WARNING.TXT"), "{after}");
    assert!(after.contains("'screensaver.scr'"), "{after}");
    d.stop().await;
}

/// Sends `message` `n` times through the daemon; each must go through.
async fn send_all(d: &TestDaemon, message: &[u8], n: usize) {
    for _ in 0..n {
        let (_, status) = send(d, message, Ipv4Addr::new(192, 0, 2, 10), "<a@example.com>").await;
        assert_eq!(status, Status::Continue);
    }
}

/// Lists the files of the Maildir's `new/`, waiting up to 5 s for `n` of them.
pub(crate) fn maildir_new(dir: &Path, n: usize) -> Vec<std::path::PathBuf> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let files: Vec<_> = std::fs::read_dir(dir.join("new"))
            .map(|r| r.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        if files.len() >= n || Instant::now() > deadline {
            return files;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn archive_keeps_accepted_messages_in_a_maildir() {
    let maildir = tempfile::TempDir::new().unwrap();
    let config = format!(
        "[archive]\nmaildir = {:?}\n",
        maildir.path().join("Maildir")
    );
    let d = TestDaemon::start(&[stock("archive")], &config).await;
    let original = python(BUILD, b"").into_bytes();
    send_all(&d, &original, 3).await;
    let dir = maildir.path().join("Maildir");
    let files = maildir_new(&dir, 3);
    assert_eq!(files.len(), 3, "{files:?}");
    assert_eq!(std::fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
    let want = python(READ, &original);
    for file in files {
        let kept = std::fs::read(&file).unwrap();
        assert_eq!(python(READ, &kept), want, "{}", file.display());
        assert!(
            kept.starts_with(b"Content-Type: multipart/mixed")
                || kept.windows(9).any(|w| w == b"Subject: ")
        );
    }
    d.stop().await;
}

/// Mounts a 64 KiB tmpfs on `dir`; false (with the reason printed) when this host does not let us.
fn mount_tiny_tmpfs(dir: &Path) -> bool {
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(dir)
        .output();
    match out {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            eprintln!(
                "SKIPPED archive full-disk test: cannot mount a tmpfs: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            false
        }
        Err(e) => {
            eprintln!("SKIPPED archive full-disk test: no mount command: {e}");
            false
        }
    }
}

#[tokio::test]
async fn a_full_archive_disk_never_costs_the_milter_answer() {
    let base = tempfile::TempDir::new().unwrap();
    let disk = base.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    if !mount_tiny_tmpfs(&disk) {
        return;
    }
    let config = format!(
        "[archive]\nmaildir = {:?}\nwarn_interval = \"1h\"\n",
        disk.join("Maildir")
    );
    let d = TestDaemon::start(&[stock("archive")], &config).await;
    let mut message = b"From: a@example.com\r\nSubject: big\r\n\r\n".to_vec();
    message.extend(
        std::iter::repeat_n(
            b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\r\n".as_slice(),
            400,
        )
        .flatten(),
    );
    let started = Instant::now();
    send_all(&d, &message, 8).await;
    let answered_in = started.elapsed();
    let kept = maildir_new(&disk.join("Maildir"), 8);
    let tmp_left = std::fs::read_dir(disk.join("Maildir/tmp")).unwrap().count();
    let whole = kept
        .iter()
        .all(|file| std::fs::read(file).unwrap() == message);
    d.stop().await;
    let _ = Command::new("umount").arg(&disk).status();
    assert!(answered_in < Duration::from_secs(5), "{answered_in:?}");
    assert!(
        !kept.is_empty() && kept.len() < 8,
        "a 64 KiB disk holds some of eight 25 KiB messages: {}",
        kept.len()
    );
    assert_eq!(tmp_left, 0, "failed writes leave nothing behind in tmp/");
    assert!(whole, "what was kept is whole");
}
