//! DKIM, ARC and DMARC against a second implementation: dkimpy (Debian's python3-dkim) signs
//! messages that luamilter verifies through a real milter client, and verifies the signatures
//! luamilter adds. Keys are generated here with the openssl CLI; public keys and DMARC records
//! are served by the test DNS server, which dkimpy queries too (through dnspython).

use crate::dns_server::TestDns;
use crate::support::{Mta, TestDaemon, process::DaemonProcess};
use hickory_server::proto::rr::{Name, RData, Record, rdata::TXT};
use indymilter_test::{EomAction, EomActions, Status};
use std::{
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};
use tempfile::TempDir;

/// The Python that has dkimpy (Debian's, not a pyenv one on PATH).
const PYTHON: &str = "/usr/bin/python3";

/// dkimpy as a second implementation. `sign SELECTOR DOMAIN KEY CANON ALGO` reads a message on
/// stdin and writes it signed; `arc SELECTOR DOMAIN KEY SRV_ID` writes it with an ARC set added
/// (sealing the Authentication-Results of SRV_ID); `arcverify PORT` validates the ARC chain of
/// the message on stdin and exits 0 when it passes; `verify PORT [LATER]` verifies the first
/// signature of the message on stdin, looking keys up at the test DNS server on 127.0.0.1:PORT,
/// as if the time were LATER seconds from now (default 0), and exits 0 on pass.
const DKIMPY: &str = r#"
import sys, dkim, dns.resolver
msg = sys.stdin.buffer.read()
if sys.argv[1] == "sign":
    selector, domain, key, canon, algo = sys.argv[2:7]
    h, b = canon.split("/")
    sig = dkim.sign(msg, selector.encode(), domain.encode(), open(key, "rb").read(),
                    canonicalize=(h.encode(), b.encode()), signature_algorithm=algo.encode(),
                    include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    sys.stdout.buffer.write(sig + msg)
elif sys.argv[1] == "arc":
    selector, domain, key, srv_id = sys.argv[2:6]
    headers = dkim.arc_sign(msg, selector.encode(), domain.encode(), open(key, "rb").read(),
                            srv_id.encode())
    sys.stdout.buffer.write(b"".join(headers) + msg)
elif sys.argv[1] == "arcverify":
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = int(sys.argv[2])
    def txt(name, timeout=5):
        answer = resolver.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
        return b"".join(answer[0].strings)
    cv, results, reason = dkim.arc_verify(msg, dnsfunc=txt)
    print(cv, reason, results, file=sys.stderr)
    sys.exit(0 if cv == b"pass" else 1)
else:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = int(sys.argv[2])
    def txt(name, timeout=5):
        answer = resolver.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
        return b"".join(answer[0].strings)
    if len(sys.argv) > 3:
        import time
        now, later = time.time, int(sys.argv[3])
        time.time = lambda: now() + later
    d = dkim.DKIM(msg, logger=__import__("logging").getLogger())
    __import__("logging").basicConfig(level="DEBUG")
    sys.exit(0 if d.verify(dnsfunc=txt) else 1)
"#;

fn run(program: &str, args: &[&str], input: &[u8]) -> (bool, Vec<u8>) {
    let (ok, out, _) = run_logged(program, args, input);
    (ok, out)
}

/// Runs `program` with `input` on stdin: success, stdout, stderr.
fn run_logged(program: &str, args: &[&str], input: &[u8]) -> (bool, Vec<u8>, String) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e} (tests/setup.sh installs it)"));
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), out.stdout, log)
}

fn openssl(args: &[&str]) -> Vec<u8> {
    let (ok, out) = run("openssl", args, b"");
    assert!(ok, "openssl {args:?} failed");
    out
}

/// A private key file, the same key as dkimpy reads it, and its DKIM public key record.
pub(crate) struct Key {
    /// The PEM file luamilter reads (`[dkim.keys]`).
    pub(crate) path: PathBuf,
    dkimpy: PathBuf,
    /// The `v=DKIM1` TXT record of the public key.
    pub(crate) record: String,
}

impl Key {
    /// An RSA key of `bits`.
    pub(crate) fn rsa(dir: &Path, name: &str, bits: u32) -> Key {
        let path = dir.join(format!("{name}.pem"));
        let p = path.to_str().unwrap();
        openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            &format!("rsa_keygen_bits:{bits}"),
            "-out",
            p,
        ]);
        let der = openssl(&["pkey", "-in", p, "-pubout", "-outform", "DER"]);
        Key {
            record: format!("v=DKIM1; k=rsa; p={}", base64(&der)),
            dkimpy: path.clone(),
            path,
        }
    }

    /// An Ed25519 key (RFC 8463: the record holds the raw 32-byte public key).
    fn ed25519(dir: &Path, name: &str) -> Key {
        let path = dir.join(format!("{name}.pem"));
        let p = path.to_str().unwrap();
        openssl(&["genpkey", "-algorithm", "ed25519", "-out", p]);
        let der = openssl(&["pkey", "-in", p, "-pubout", "-outform", "DER"]);
        // dkimpy reads an Ed25519 key as the base64 of its 32-byte seed, the end of the PKCS#8.
        let private = openssl(&["pkey", "-in", p, "-outform", "DER"]);
        let dkimpy = dir.join(format!("{name}.seed"));
        std::fs::write(&dkimpy, base64(&private[private.len() - 32..])).unwrap();
        Key {
            record: format!("v=DKIM1; k=ed25519; p={}", base64(&der[der.len() - 32..])),
            dkimpy,
            path,
        }
    }
}

fn base64(bytes: &[u8]) -> String {
    let (ok, out) = run("openssl", &["base64", "-A"], bytes);
    assert!(ok);
    String::from_utf8(out).unwrap().trim().to_string()
}

/// A TXT record, split into strings of at most 255 bytes.
pub(crate) fn txt(name: &str, text: &str) -> Record {
    let strings = text
        .as_bytes()
        .chunks(255)
        .map(|c| String::from_utf8(c.to_vec()).unwrap())
        .collect();
    Record::from_rdata(
        Name::from_ascii(name).unwrap(),
        300,
        RData::TXT(TXT::new(strings)),
    )
}

/// A message with CRLF line ends.
pub(crate) fn message(from: &str, subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: Ann <{from}>\r\nTo: bob@example.org\r\nSubject: {subject}\r\n\
         Date: Fri, 04 Dec 2026 07:00:00 +0000\r\nMessage-ID: <1@example.test>\r\n\r\n{body}"
    )
    .into_bytes()
}

/// Signs `msg` with dkimpy.
pub(crate) fn dkimpy_sign(
    msg: &[u8],
    selector: &str,
    domain: &str,
    key: &Key,
    canon: &str,
    algo: &str,
) -> Vec<u8> {
    let key = key.dkimpy.to_str().unwrap();
    let (ok, out) = run(
        PYTHON,
        &["-c", DKIMPY, "sign", selector, domain, key, canon, algo],
        msg,
    );
    assert!(ok, "dkimpy could not sign");
    out
}

/// Whether dkimpy verifies the first signature of `msg`, with keys from `dns`, and its log.
fn dkimpy_verifies(msg: &[u8], dns: &TestDns) -> (bool, String) {
    dkimpy_verifies_later(msg, dns, 0)
}

/// [`dkimpy_verifies`] as if the time were `later` seconds from now.
fn dkimpy_verifies_later(msg: &[u8], dns: &TestDns, later: u64) -> (bool, String) {
    let port = dns.addr.port().to_string();
    let later = later.to_string();
    let (ok, _, log) = run_logged(PYTHON, &["-c", DKIMPY, "verify", &port, &later], msg);
    (ok, log)
}

/// Splits a raw message into its headers as the MTA sends them (a folded value's lines joined
/// with LF) and the body. Header values are bytes: they need not be UTF-8.
fn split(msg: &[u8]) -> (Vec<(String, Vec<u8>)>, Vec<u8>) {
    let end = msg.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let (head, body) = (&msg[..end], &msg[end + 4..]);
    let mut headers: Vec<(String, Vec<u8>)> = Vec::new();
    for line in head.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.starts_with(b" ") || line.starts_with(b"\t") {
            let last = headers.last_mut().unwrap();
            last.1.push(b'\n');
            last.1.extend_from_slice(line);
        } else {
            let colon = line.iter().position(|b| *b == b':').unwrap();
            let name = String::from_utf8(line[..colon].to_vec()).unwrap();
            headers.push((name, line[colon + 1..].trim_ascii_start().to_vec()));
        }
    }
    (headers, body.to_vec())
}

/// Sends `msg` through the daemon from an outside client and returns the end-of-message edits.
async fn deliver(d: &TestDaemon, msg: &[u8]) -> EomActions {
    deliver_from(d, "ann@example.test", msg).await.0
}

/// [`deliver`] with the MAIL FROM `sender`; also the end-of-message status.
async fn deliver_from(d: &TestDaemon, sender: &str, msg: &[u8]) -> (EomActions, Status) {
    deliver_on(d.client().await, sender, None, msg).await
}

/// Sends `msg` over the connection `c` from an outside client with the MAIL FROM `sender` and
/// the queue id (macro `i`) `queue_id`; the end-of-message edits and status.
async fn deliver_on(
    mut c: Mta,
    sender: &str,
    queue_id: Option<&str>,
    msg: &[u8],
) -> (EomActions, Status) {
    let (headers, body) = split(msg);
    c.connect("mail.example.test", Ipv4Addr::new(192, 0, 2, 25))
        .await
        .unwrap();
    c.helo("mail.example.test").await.unwrap();
    if let Some(id) = queue_id {
        c.0.macros(indymilter::MacroStage::Mail, [("i", id)])
            .await
            .unwrap();
    }
    c.mail([format!("<{sender}>")]).await.unwrap();
    c.rcpt(["<bob@example.org>"]).await.unwrap();
    c.data().await.unwrap();
    for (name, value) in &headers {
        c.header(name, value).await.unwrap();
    }
    c.eoh().await.unwrap();
    for chunk in body.chunks(4000) {
        c.body(chunk.to_vec()).await.unwrap();
    }
    c.eom().await.unwrap()
}

/// Values of every header named `name` the milter added, in order.
fn added(actions: &EomActions, name: &str) -> Vec<String> {
    actions
        .actions
        .iter()
        .filter_map(|a| match a {
            EomAction::AddHeader { name: n, value }
            | EomAction::InsertHeader { name: n, value, .. }
                if n.to_str() == Ok(name) =>
            {
                Some(value.to_string_lossy().into_owned())
            }
            _ => None,
        })
        .collect()
}

/// Reports every signature's verification as an X-Dkim header.
const REPORT: &str = r#"
local dkim = require "milter.dkim"
return {
  eom = function(ctx)
    for _, r in ipairs(dkim.verify(ctx)) do
      ctx:add_header("X-Dkim", table.concat({ r.result, r.domain, r.selector, r.algorithm,
        r.identity, r.reason or "-" }, " "))
    end
  end,
}
"#;

fn dns_config(dns: &TestDns) -> String {
    format!(
        "[dns]\nnameservers = [\"{}\"]\ntimeout = \"1s\"\nattempts = 1\n",
        dns.addr
    )
}

/// Keys for example.test: `rsa` (2048 bits), `ed` (Ed25519), `short` (512 bits), `revoked`.
struct Setup {
    _dir: TempDir,
    rsa: Key,
    ed: Key,
    short: Key,
    dns: TestDns,
}

async fn setup() -> Setup {
    let dir = TempDir::new().unwrap();
    let rsa = Key::rsa(dir.path(), "rsa", 2048);
    let ed = Key::ed25519(dir.path(), "ed");
    let short = Key::rsa(dir.path(), "short", 512);
    let dns = TestDns::with_records(vec![
        txt("rsa._domainkey.example.test.", &rsa.record),
        txt("ed._domainkey.example.test.", &ed.record),
        txt("short._domainkey.example.test.", &short.record),
        txt("revoked._domainkey.example.test.", "v=DKIM1; k=rsa; p="),
    ])
    .await;
    Setup {
        _dir: dir,
        rsa,
        ed,
        short,
        dns,
    }
}

#[tokio::test]
async fn signatures_made_by_dkimpy_are_verified() {
    let s = setup().await;
    let d = TestDaemon::start(&[("report", REPORT)], &dns_config(&s.dns)).await;
    // The whitespace-only last line checks relaxed body canonicalization (vendor/mail-auth).
    let body = "Hello Bob,\r\n\r\nsee you.\r\n \t\r\n";
    let plain = message("ann@example.test", "lunch", body);

    let cases = [
        ("rsa", &s.rsa, "relaxed/simple", "rsa-sha256"),
        ("rsa", &s.rsa, "simple/simple", "rsa-sha256"),
        ("rsa", &s.rsa, "relaxed/relaxed", "rsa-sha256"),
        ("ed", &s.ed, "relaxed/relaxed", "ed25519-sha256"),
    ];
    for (selector, key, canon, algo) in cases {
        let signed = dkimpy_sign(&plain, selector, "example.test", key, canon, algo);
        let got = added(&deliver(&d, &signed).await, "X-Dkim");
        assert_eq!(
            got,
            [format!(
                "pass example.test {selector} {algo} @example.test -"
            )],
            "{selector} {canon}"
        );
    }

    // Two signatures: one result each, in header order.
    let once = dkimpy_sign(
        &plain,
        "ed",
        "example.test",
        &s.ed,
        "relaxed/relaxed",
        "ed25519-sha256",
    );
    let twice = dkimpy_sign(
        &once,
        "rsa",
        "example.test",
        &s.rsa,
        "relaxed/simple",
        "rsa-sha256",
    );
    let got = added(&deliver(&d, &twice).await, "X-Dkim");
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got[0].starts_with("pass example.test rsa "), "{got:?}");
    assert!(got[1].starts_with("pass example.test ed "), "{got:?}");

    // No signature: no result.
    assert!(added(&deliver(&d, &plain).await, "X-Dkim").is_empty());
    d.stop().await;
}

/// Reports the first signature's result and the Subject as policies read it.
const REPORT_SUBJECT: &str = r#"
local dkim = require "milter.dkim"
return {
  eom = function(ctx)
    local first = dkim.verify(ctx)[1]
    ctx:add_header("X-Dkim", first.result .. " " .. (first.reason or "-"))
    ctx:add_header("X-Subject", ctx:header("Subject"))
  end,
}
"#;

/// A Subject in Latin-1, not UTF-8, as old mailers still send it: the MTA passes the bytes on,
/// luamilter verifies the signature over those bytes (policies read the text with U+FFFD).
#[tokio::test]
async fn signatures_over_header_bytes_that_are_not_utf8_verify() {
    let s = setup().await;
    let d = TestDaemon::start(&[("report", REPORT_SUBJECT)], &dns_config(&s.dns)).await;
    let utf8 = message("ann@example.test", "SUBJECT", "Bonjour.\r\n");
    let at = utf8.windows(7).position(|w| w == b"SUBJECT").unwrap();
    let latin1 = [&utf8[..at], b"Caf\xe9 cr\xe8me", &utf8[at + 7..]].concat();
    assert!(String::from_utf8(latin1.clone()).is_err());
    for canon in ["relaxed/relaxed", "simple/simple"] {
        let signed = dkimpy_sign(&latin1, "rsa", "example.test", &s.rsa, canon, "rsa-sha256");
        let actions = deliver(&d, &signed).await;
        assert_eq!(added(&actions, "X-Dkim"), ["pass -"], "{canon}");
        assert_eq!(added(&actions, "X-Subject"), ["Caf\u{fffd} cr\u{fffd}me"]);
        let at = signed.windows(3).position(|w| w == b"cr\xe8").unwrap();
        let tampered = [&signed[..at], b"cr\xe9", &signed[at + 3..]].concat();
        let got = added(&deliver(&d, &tampered).await, "X-Dkim");
        assert!(got[0].starts_with("fail "), "{canon}: {got:?}");
    }
    d.stop().await;
}

#[tokio::test]
async fn tampering_revoked_and_short_keys_and_dns_timeouts_do_not_pass() {
    let s = setup().await;
    let d = TestDaemon::start(&[("report", REPORT)], &dns_config(&s.dns)).await;
    let plain = message("ann@example.test", "lunch", "Pay 10 EUR.\r\n");
    let sign = |selector: &str, key: &Key| {
        dkimpy_sign(
            &plain,
            selector,
            "example.test",
            key,
            "relaxed/simple",
            "rsa-sha256",
        )
    };
    let signed = sign("rsa", &s.rsa);
    let edit = |from: &str, to: &str| {
        let text = String::from_utf8(signed.clone()).unwrap();
        text.replace(from, to).into_bytes()
    };
    // (what, message, expected "result d= s=" start, a word of the reason)
    let cases = [
        // As Gmail and mail-auth report it: "neutral (body hash did not verify)".
        (
            "changed body",
            edit("10 EUR", "99 EUR"),
            "neutral",
            "body hash",
        ),
        (
            "changed header",
            edit("Subject: lunch", "Subject: dinner"),
            "fail",
            "ignature",
        ),
        (
            "revoked key",
            sign("revoked", &s.rsa),
            "permerror",
            "evoked",
        ),
        (
            "512-bit key",
            sign("short", &s.short),
            "fail",
            "verification failed",
        ),
        (
            "no key record",
            sign("missing", &s.rsa),
            "permerror",
            "not found",
        ),
    ];
    for (what, msg, result, reason) in cases {
        let got = added(&deliver(&d, &msg).await, "X-Dkim");
        assert_eq!(got.len(), 1, "{what}: {got:?}");
        assert!(
            got[0].starts_with(&format!("{result} example.test ")),
            "{what}: {got:?}"
        );
        assert!(got[0].contains(reason), "{what}: {got:?}");
    }
    d.stop().await;

    let silent = TestDns::silent().await;
    let d = TestDaemon::start(&[("report", REPORT)], &dns_config(&silent)).await;
    let got = added(&deliver(&d, &signed).await, "X-Dkim");
    assert!(
        got[0].starts_with("temperror example.test rsa "),
        "DNS timeout: {got:?}"
    );
    d.stop().await;
}

/// Signs every message whose From domain has a key.
const SIGN: &str = r#"
local dkim = require "milter.dkim"
return {
  eom = function(ctx)
    local ok, err = dkim.sign(ctx)
    ctx:add_header("X-Signed", ok and "yes" or err)
  end,
}
"#;

/// The message as the MTA delivers it after the milter inserted `header` at the top.
fn with_signature(msg: &[u8], value: &str) -> Vec<u8> {
    let mut out = format!("DKIM-Signature: {}\r\n", value.replace('\n', "\r\n")).into_bytes();
    out.extend_from_slice(msg);
    out
}

/// The index and value of the DKIM-Signature header the milter inserted.
fn inserted_signature(actions: &EomActions) -> (i32, String) {
    let inserted = actions.actions.iter().find_map(|a| match a {
        EomAction::InsertHeader { index, name, value } if name.to_str() == Ok("DKIM-Signature") => {
            Some((*index, value.to_string_lossy().into_owned()))
        }
        _ => None,
    });
    inserted.expect("a DKIM-Signature inserted")
}

// Multi-threaded: dkimpy blocks this thread while it queries the test DNS server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn luamilter_signatures_are_verified_by_dkimpy_and_by_luamilter() {
    let s = setup().await;
    let keys = format!(
        "[dkim.keys.\"example.test\"]\nselector = \"rsa\"\nkey = {:?}\n\
         [dkim.keys.\"ed.example.test\"]\nselector = \"ed\"\nkey = {:?}\n",
        s.rsa.path, s.ed.path
    );
    let dns = TestDns::with_records(vec![
        txt("rsa._domainkey.example.test.", &s.rsa.record),
        txt("ed._domainkey.ed.example.test.", &s.ed.record),
    ])
    .await;
    let config = format!("{}{keys}", dns_config(&dns));
    let d = TestDaemon::start(&[("sign", SIGN), ("report", REPORT)], &config).await;
    for from in ["ann@example.test", "ann@ed.example.test"] {
        let plain = message(from, "report", "Figures attached.\r\n  \r\n\r\n");
        let actions = deliver(&d, &plain).await;
        assert_eq!(added(&actions, "X-Signed"), ["yes"], "{from}");
        let (index, value) = inserted_signature(&actions);
        assert_eq!(index, 0, "at the top");
        assert!(value.contains("c=relaxed/relaxed"), "{value}");
        let signed = with_signature(&plain, &value);
        let (ok, log) = dkimpy_verifies(&signed, &dns);
        assert!(ok, "dkimpy rejects {from}: {value}\n{log}");
        let tampered = String::from_utf8(signed.clone())
            .unwrap()
            .replace("Figures", "Numbers");
        assert!(
            !dkimpy_verifies(tampered.as_bytes(), &dns).0,
            "tampered passes for {from}"
        );
        let got = added(&deliver(&d, &signed).await, "X-Dkim");
        assert!(
            got.first().is_some_and(|r| r.starts_with("pass ")),
            "{from}: {got:?}"
        );
    }
    let other = message("ann@example.org", "x", "y\r\n");
    assert_eq!(
        added(&deliver(&d, &other).await, "X-Signed"),
        ["no [dkim] key for example.org"]
    );
    d.stop().await;
}

#[tokio::test]
async fn a_missing_key_file_is_a_start_error_naming_file_and_line() {
    let err = TestDaemon::try_start(
        &[("sign", SIGN)],
        "[dkim.keys.\"example.test\"]\nselector = \"s\"\nkey = \"/nonexistent/s.pem\"\n",
        "inet:0@127.0.0.1",
    )
    .await
    .err()
    .expect("the daemon must not start");
    assert!(err.contains("luamilter.toml:"), "{err}");
    assert!(err.contains("/nonexistent/s.pem"), "{err}");
}

/// Reports the ARC chain's validation as an X-Arc header.
const ARC: &str = r#"
local dkim = require "milter.dkim"
return {
  eom = function(ctx)
    local chain = dkim.arc(ctx)
    ctx:add_header("X-Arc", chain.result .. " " .. chain.sets)
  end,
}
"#;

#[tokio::test]
async fn arc_chains_sealed_by_dkimpy_are_validated() {
    let s = setup().await;
    let d = TestDaemon::start(&[("arc", ARC)], &dns_config(&s.dns)).await;
    let mut msg =
        b"Authentication-Results: fwd.example.test; spf=pass smtp.mailfrom=ann@example.test\r\n"
            .to_vec();
    msg.extend_from_slice(&message("ann@example.test", "forwarded", "Hi.\r\n"));
    let key = s.rsa.dkimpy.to_str().unwrap();
    let (ok, sealed) = run(
        PYTHON,
        &[
            "-c",
            DKIMPY,
            "arc",
            "rsa",
            "example.test",
            key,
            "fwd.example.test",
        ],
        &msg,
    );
    assert!(ok, "dkimpy could not seal");
    assert_eq!(added(&deliver(&d, &sealed).await, "X-Arc"), ["pass 1"]);

    let tampered = String::from_utf8(sealed).unwrap().replace("Hi.", "Bye.");
    assert_eq!(
        added(&deliver(&d, tampered.as_bytes()).await, "X-Arc"),
        ["fail 1"]
    );

    assert_eq!(added(&deliver(&d, &msg).await, "X-Arc"), ["none 0"]);
    d.stop().await;
}

/// `msg` with the headers the milter inserted applied, as the MTA does.
fn with_inserted(msg: &[u8], actions: &EomActions) -> Vec<u8> {
    let (mut headers, body) = split(msg);
    for action in &actions.actions {
        if let EomAction::InsertHeader { index, name, value } = action {
            let header = (
                name.to_string_lossy().into_owned(),
                value.to_bytes().to_vec(),
            );
            headers.insert(*index as usize, header);
        }
    }
    let mut out = Vec::new();
    for (name, value) in headers {
        out.extend_from_slice(format!("{name}: ").as_bytes());
        for (i, line) in value.split(|b| *b == b'\n').enumerate() {
            if i > 0 {
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(line);
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    out
}

// Multi-threaded: dkimpy blocks this thread while it queries the test DNS server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authres_policy_arc_seals_when_asked_and_dkimpy_validates_the_chain() {
    let s = setup().await;
    let stock = |name: &'static str| (name, luamilter::stock::get(name).unwrap());
    let keys = format!(
        "[dkim.keys.\"example.test\"]\nselector = \"rsa\"\nkey = {:?}\n",
        s.rsa.path
    );
    let config = |options: &str| {
        format!(
            "[site]\nhostname = \"mx.test\"\n{options}{}{keys}",
            dns_config(&s.dns)
        )
    };
    let arc_verifies = |msg: &[u8]| {
        let port = s.dns.addr.port().to_string();
        run_logged(PYTHON, &["-c", DKIMPY, "arcverify", &port], msg)
    };
    let plain = message("ann@example.org", "forwarded", "Hi.\r\n");
    let mut upstream =
        b"Authentication-Results: fwd.example.test; spf=pass smtp.mailfrom=ann@example.org\r\n"
            .to_vec();
    upstream.extend_from_slice(&plain);
    let key = s.rsa.dkimpy.to_str().unwrap();
    let (ok, chained) = run(
        PYTHON,
        &[
            "-c",
            DKIMPY,
            "arc",
            "rsa",
            "example.test",
            key,
            "fwd.example.test",
        ],
        &upstream,
    );
    assert!(ok, "dkimpy could not seal");

    let sealing = config("[policy.authres]\narc_seal = \"example.test\"\n");
    let d = TestDaemon::start(&[stock("dkim"), stock("authres")], &sealing).await;
    for (msg, instance, cv) in [(&plain, "i=1", "cv=none"), (&chained, "i=2", "cv=pass")] {
        let actions = deliver(&d, msg).await;
        let seal = added(&actions, "ARC-Seal");
        assert_eq!(seal.len(), 1, "{actions:?}");
        assert!(
            seal[0].contains(instance) && seal[0].contains(cv),
            "{seal:?}"
        );
        let results = added(&actions, "ARC-Authentication-Results");
        assert!(
            results[0].starts_with(&format!("{instance}; mx.test; ")),
            "{results:?}"
        );
        assert_eq!(added(&actions, "ARC-Message-Signature").len(), 1);
        let delivered = with_inserted(msg, &actions);
        let (ok, _, log) = arc_verifies(&delivered);
        assert!(ok, "dkimpy rejects the chain: {log}");
        let tampered = String::from_utf8(delivered).unwrap().replace("Hi.", "Bye.");
        assert!(!arc_verifies(tampered.as_bytes()).0, "tampered passes");
    }
    d.stop().await;

    // A domain without a key is refused at load, not found out message by message.
    let err =
        TestDaemon::try_start_stock(&["authres"], "[policy.authres]\narc_seal = \"x.test\"\n")
            .await
            .err()
            .expect("arc_seal without a key must not load");
    assert!(
        err.contains("authres.lua: setup: arc_seal: no [dkim.keys] entry for x.test"),
        "{err}"
    );

    let d = TestDaemon::start(&[stock("dkim"), stock("authres")], &config("")).await;
    let actions = deliver(&d, &plain).await;
    assert_eq!(
        added(&actions, "Authentication-Results").len(),
        1,
        "{actions:?}"
    );
    for name in [
        "ARC-Seal",
        "ARC-Message-Signature",
        "ARC-Authentication-Results",
    ] {
        assert!(added(&actions, name).is_empty(), "{name}: {actions:?}");
    }
    d.stop().await;
}

#[test]
fn luamilter_check_names_the_line_of_an_unreadable_key() {
    let dir = TempDir::new().unwrap();
    let config = dir.path().join("luamilter.toml");
    std::fs::write(
        &config,
        "[policies]\nchain = [\"dkim\"]\n\n[dkim.keys.\"example.org\"]\nselector = \"s1\"\nkey = \"missing.pem\"\n",
    )
    .unwrap();
    let out = crate::support::luamilter_cli("check", &config, &[]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("luamilter.toml:6"), "{text}");
    assert!(text.contains("missing.pem"), "{text}");
}

/// The stock spf, dkim and dmarc policies (their stock text, as files), with `options` TOML.
async fn stock_dmarc(dns: &TestDns, options: &str) -> TestDaemon {
    let stock = |name: &'static str| (name, luamilter::stock::get(name).unwrap());
    let config = format!(
        "[site]\nhostname = \"mx.test\"\n{options}{}",
        dns_config(dns)
    );
    TestDaemon::start(&[stock("spf"), stock("dkim"), stock("dmarc")], &config).await
}

#[tokio::test]
async fn the_dmarc_policy_quarantines_rejects_or_only_reports() {
    let dns = TestDns::start().await;
    // SPF passes for other.co.uk, which aligns with neither From domain; nothing is signed.
    let quarantined = message("a@quar.dkim.test", "q", "x\r\n");
    let rejected = message("a@example.co.uk", "r", "x\r\n");

    let d = stock_dmarc(&dns, "").await;
    let (actions, status) = deliver_from(&d, "u@other.co.uk", &quarantined).await;
    assert_eq!(status, Status::Continue, "{actions:?}");
    assert!(
        actions
            .actions
            .iter()
            .any(|a| matches!(a, EomAction::Quarantine { reason }
            if reason.to_str() == Ok("DMARC policy of quar.dkim.test: quarantine"))),
        "{actions:?}"
    );
    let (_, status) = deliver_from(&d, "u@other.co.uk", &rejected).await;
    assert!(
        crate::support::reply_text(&status).starts_with("550 5.7.1 DMARC policy of example.co.uk"),
        "{status:?}"
    );
    d.stop().await;

    let d = stock_dmarc(&dns, "[policy.dmarc]\nreport_only = true\n").await;
    for msg in [&quarantined, &rejected] {
        let (actions, status) = deliver_from(&d, "u@other.co.uk", msg).await;
        assert_eq!(status, Status::Continue, "report only: {actions:?}");
        assert!(
            !actions
                .actions
                .iter()
                .any(|a| matches!(a, EomAction::Quarantine { .. })),
            "report only: {actions:?}"
        );
    }
    d.stop().await;
}

/// RFC 7489 §6.6.4: half.co.uk publishes p=reject with pct=50. A failing message whose queue id
/// falls in the sample is refused; one outside it gets the next lower policy, quarantine, and
/// its report line says so (`reason=sampled_out`, the published `p=` and `pct=`).
#[tokio::test]
async fn dmarc_pct_samples_failing_messages_by_queue_id_and_the_report_line_says_so() {
    let dns = TestDns::start().await;
    let stock = |name: &'static str| (name, luamilter::stock::get(name).unwrap());
    let config = format!(
        "[site]\nhostname = \"mx.test\"\n[policy.dmarc]\nreport_log = true\n{}",
        dns_config(&dns)
    );
    let d =
        DaemonProcess::start(&[stock("spf"), stock("dkim"), stock("dmarc")], "", &config).unwrap();
    let queue_id = |inside: bool| {
        (0..)
            .map(|i| format!("4Q{i}"))
            .find(|id| (luamilter::services::dmarc::sample_of(id) < 50.0) == inside)
            .unwrap()
    };
    let (inside, outside) = (queue_id(true), queue_id(false));
    let msg = message("a@half.co.uk", "half", "x\r\n");

    let (_, status) = deliver_on(d.client().await, "u@other.co.uk", Some(&inside), &msg).await;
    assert!(
        crate::support::reply_text(&status).starts_with("550 5.7.1 DMARC policy of half.co.uk"),
        "{inside}: {status:?}"
    );
    let (actions, status) =
        deliver_on(d.client().await, "u@other.co.uk", Some(&outside), &msg).await;
    assert_eq!(status, Status::Continue, "{outside}: {actions:?}");
    assert!(
        actions
            .actions
            .iter()
            .any(|a| matches!(a, EomAction::Quarantine { reason }
            if reason.to_str() == Ok("DMARC policy of half.co.uk: quarantine"))),
        "{actions:?}"
    );
    let log = d.wait_for_log("reason=sampled_out");
    let line = |id: &str| {
        log.lines()
            .find(|l| l.contains("dmarc-report:") && l.contains(id))
            .unwrap_or_else(|| panic!("no report line for {id}: {log}"))
            .to_string()
    };
    let refused = line(&inside);
    assert!(
        refused.contains("p=reject pct=50 disposition=reject") && refused.contains("reason=-"),
        "{refused}"
    );
    let sampled_out = line(&outside);
    assert!(
        sampled_out.contains("p=reject pct=50 disposition=quarantine")
            && sampled_out.contains("reason=sampled_out"),
        "{sampled_out}"
    );
}

/// The number in tag `tag=` of a DKIM-Signature value.
fn tag_number(value: &str, tag: &str) -> u64 {
    value
        .split(';')
        .find_map(|t| t.trim().strip_prefix(&format!("{tag}=")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {tag}= in {value}"))
}

/// RFC 6376 §3.5: a key with `expire_after` signs with `x=` that long after `t=`. dkimpy checks
/// `x=` (allowing 10 hours of clock skew): it accepts the signature now and refuses it a day
/// later; luamilter, verifying once `x=` is past, reports `policy` with the reason.
// Multi-threaded: dkimpy blocks this thread while it queries the test DNS server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_past_their_expiry_fail_in_dkimpy_and_are_policy_in_luamilter() {
    let s = setup().await;
    let keys = format!(
        "[dkim.keys.\"example.test\"]\nselector = \"rsa\"\nkey = {:?}\nexpire_after = \"1s\"\n",
        s.rsa.path
    );
    let config = format!("{}{keys}", dns_config(&s.dns));
    let d = TestDaemon::start(&[("sign", SIGN), ("report", REPORT)], &config).await;
    let plain = message("ann@example.test", "today only", "Read me today.\r\n");
    let (_, value) = inserted_signature(&deliver(&d, &plain).await);
    let (t, x) = (tag_number(&value, "t"), tag_number(&value, "x"));
    assert_eq!(x, t + 1, "{value}");
    let signed = with_signature(&plain, &value);
    let (ok, log) = dkimpy_verifies(&signed, &s.dns);
    assert!(ok, "dkimpy, within its clock leeway: {log}");
    let (ok, log) = dkimpy_verifies_later(&signed, &s.dns, 86_400);
    assert!(
        !ok && log.contains("x= value is past"),
        "dkimpy a day later: {log}"
    );

    // Until x= is past, luamilter accepts it too.
    while std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        <= x
    {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let got = added(&deliver(&d, &signed).await, "X-Dkim");
    assert_eq!(
        got.first().map(String::as_str),
        Some("policy example.test rsa rsa-sha256 @example.test signature expired (x= is past)"),
        "{got:?}"
    );
    d.stop().await;
}
