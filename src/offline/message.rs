//! A message file as an MTA would pass it on: the header fields and the body of an `.eml` file
//! (CRLF or LF line ends, 8-bit, an mbox `From ` line first), and the envelope the message's
//! own headers suggest (Return-Path, the first Received, the recipient headers).
//!
//! Reading never fails: a file that is no message becomes what an MTA would make of it. Lines
//! up to the first empty line are header fields; a line that is no header field (no `name:`)
//! ends the header there and starts the body, as Postfix's cleanup does; a file of binary
//! garbage is all body. What was odd is said in [`Message::notes`].

use regex::Regex;
use std::{net::IpAddr, sync::LazyLock};

/// A parsed message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message {
    /// Header fields in order: the name, and the value as the MTA passes it (the text after the
    /// colon with its leading blanks, continuation lines joined by `\n`, no CR).
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body with CRLF line ends, as MTAs send it to milters.
    pub body: Vec<u8>,
    /// The file's line ends: "CRLF", "LF", "mixed" or "none".
    pub line_ends: &'static str,
    /// What was odd about the file.
    pub notes: Vec<String>,
}

/// Whether `line` starts a header field: a name of printable ASCII without blanks or colon,
/// then a colon.
fn header_name(line: &[u8]) -> Option<&[u8]> {
    let colon = line.iter().position(|&b| b == b':')?;
    let name = &line[..colon];
    let printable = |b: &u8| (33..=126).contains(b) && *b != b':';
    (!name.is_empty() && name.iter().all(printable)).then_some(name)
}

/// Splits `bytes` into lines without their line ends; tells what line ends were seen.
fn lines(bytes: &[u8]) -> (Vec<&[u8]>, &'static str) {
    let (mut crlf, mut lf) = (false, false);
    for (i, _) in bytes.iter().enumerate().filter(|(_, b)| **b == b'\n') {
        if i > 0 && bytes[i - 1] == b'\r' {
            crlf = true;
        } else {
            lf = true;
        }
    }
    let mut out: Vec<&[u8]> = bytes
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .collect();
    if bytes.is_empty() || bytes.ends_with(b"\n") {
        out.pop();
    }
    let ends = match (crlf, lf) {
        (true, false) => "CRLF",
        (false, true) => "LF",
        (true, true) => "mixed",
        (false, false) => "none",
    };
    (out, ends)
}

impl Message {
    /// Reads a message file's bytes.
    pub fn parse(bytes: &[u8]) -> Message {
        let mut notes = Vec::new();
        if bytes.is_empty() {
            notes.push("the file is empty: no header, no body".into());
        }
        let (all, line_ends) = lines(bytes);
        let mut rest: &[&[u8]] = &all;
        // Lines of the file before `rest` (an mbox "From " line), for line numbers in notes.
        let mut skipped = 0;
        // Whether the last line kept has no line end (the file's last line, unterminated).
        let mut unterminated = !bytes.is_empty() && !bytes.ends_with(b"\n");
        if rest.first().is_some_and(|l| l.starts_with(b"From ")) {
            notes.push("mbox \"From \" line skipped".into());
            rest = &rest[1..];
            skipped = 1;
            // Another "From " line after an empty line starts the next message of the mbox.
            if let Some(at) =
                (1..rest.len()).find(|&i| rest[i].starts_with(b"From ") && rest[i - 1].is_empty())
            {
                notes.push(format!(
                    "mbox with more than one message: only the first ({} lines) is tested",
                    at
                ));
                rest = &rest[..at - 1];
                unterminated = false;
            }
        }
        let mut headers: Vec<(String, Vec<u8>)> = Vec::new();
        let mut index = 0;
        while index < rest.len() {
            let line = rest[index];
            if line.is_empty() {
                index += 1;
                break;
            }
            if line[0] == b' ' || line[0] == b'\t' {
                if let Some((_, value)) = headers.last_mut() {
                    value.push(b'\n');
                    value.extend_from_slice(line);
                    index += 1;
                    continue;
                }
            } else if let Some(name) = header_name(line) {
                let value = line[name.len() + 1..].to_vec();
                headers.push((String::from_utf8_lossy(name).into_owned(), value));
                index += 1;
                continue;
            }
            notes.push(format!(
                "line {} is not a header field: the body starts there (no empty line after the header)",
                index + skipped + 1
            ));
            break;
        }
        if headers.is_empty() && !bytes.is_empty() {
            notes.push("no header fields".into());
        }
        let mut body = Vec::new();
        for line in &rest[index..] {
            body.extend_from_slice(line);
            body.extend_from_slice(b"\r\n");
        }
        if unterminated && index < rest.len() {
            body.truncate(body.len() - 2);
        }
        let nul = headers.iter().any(|(_, v)| v.contains(&0));
        if nul {
            notes.push(
                "NUL bytes in header values are dropped (a milter cannot receive them)".into(),
            );
            for (_, value) in &mut headers {
                value.retain(|&b| b != 0);
            }
        }
        if headers.iter().any(|(_, v)| std::str::from_utf8(v).is_err()) {
            notes.push("8-bit header values that are not UTF-8 are passed as they are".into());
        }
        Message {
            headers,
            body,
            line_ends,
            notes,
        }
    }

    /// The value of the first header `name` (any case) as text, unfolded and trimmed.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers_named(name).next()
    }

    /// The values of every header `name` (any case), unfolded and trimmed.
    pub fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = String> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| unfold(&String::from_utf8_lossy(v)))
    }

    /// What the headers suggest for the envelope.
    pub fn envelope_hints(&self) -> Hints {
        let sender = self
            .header("Return-Path")
            .and_then(|v| addresses(&v).into_iter().next().or_else(|| null_sender(&v)))
            .map(|a| (a, "Return-Path"))
            .or_else(|| {
                self.header("From")
                    .and_then(|v| addresses(&v).into_iter().next())
                    .map(|a| (a, "From"))
            });
        let recipients = ["X-Original-To", "Delivered-To", "Envelope-To"]
            .iter()
            .chain(&["To", "Cc"])
            .find_map(|name| {
                let found: Vec<String> = self
                    .headers_named(name)
                    .flat_map(|v| addresses(&v))
                    .collect();
                (!found.is_empty()).then_some((found, *name))
            });
        let received = self.header("Received").and_then(|v| Received::parse(&v));
        Hints {
            sender,
            recipients,
            received,
        }
    }
}

/// `<>` in Return-Path: the null sender.
fn null_sender(value: &str) -> Option<String> {
    (value.trim() == "<>").then(String::new)
}

/// Folded text on one line.
fn unfold(value: &str) -> String {
    value
        .split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The mail addresses in a header value.
fn addresses(value: &str) -> Vec<String> {
    let Ok(list) = mailparse::addrparse(value) else {
        return Vec::new();
    };
    list.iter()
        .flat_map(|addr| match addr {
            mailparse::MailAddr::Single(s) => vec![s.addr.clone()],
            mailparse::MailAddr::Group(g) => g.addrs.iter().map(|s| s.addr.clone()).collect(),
        })
        .filter(|a| a.contains('@'))
        .collect()
}

/// The envelope the message's headers suggest, each value with the header it came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hints {
    /// MAIL FROM (without angle brackets; "" for the null sender).
    pub sender: Option<(String, &'static str)>,
    /// RCPT TO addresses.
    pub recipients: Option<(Vec<String>, &'static str)>,
    /// The client as the first Received header records it.
    pub received: Option<Received>,
}

/// What a Received header says about the client: `from HELO (NAME [IP])`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// The client's IP address.
    pub ip: IpAddr,
    /// Its host name as the receiving MTA verified it ("unknown" when it had none).
    pub name: Option<String>,
    /// The HELO name.
    pub helo: Option<String>,
}

static RECEIVED_FROM: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)^\s*from\s+(\S+)(?:\s+\(([^()\[\]\s]*)\s*\[(?:ipv6:)?([0-9a-f:.]+)\])?")
        .expect("valid regex")
});
static BRACKETED_IP: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)\[(?:ipv6:)?([0-9a-f:.]+)\]").expect("valid regex"));

impl Received {
    /// Reads a Received value in Postfix's or Sendmail's form, or at least an IP literal in
    /// the `from` part.
    pub fn parse(value: &str) -> Option<Received> {
        let from_part = value.split(" by ").next().unwrap_or(value);
        let captures = RECEIVED_FROM.captures(from_part);
        let helo = captures
            .as_ref()
            .and_then(|c| c.get(1))
            .map(|m| m.as_str().trim_end_matches(';').to_string())
            .filter(|h| !h.starts_with('('));
        let name = captures
            .as_ref()
            .and_then(|c| c.get(2))
            .map(|m| m.as_str().to_string())
            .filter(|n| !n.is_empty());
        let ip = captures
            .as_ref()
            .and_then(|c| c.get(3))
            .or_else(|| BRACKETED_IP.captures(from_part).and_then(|c| c.get(1)))
            .and_then(|m| m.as_str().parse().ok())?;
        Some(Received { ip, name, helo })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crlf_and_lf_give_the_same_message() {
        let lf = Message::parse(b"Subject: hi\nX-Long: a\n\tb\n\nline 1\nline 2\n");
        let crlf = Message::parse(b"Subject: hi\r\nX-Long: a\r\n\tb\r\n\r\nline 1\r\nline 2\r\n");
        assert_eq!(lf.headers, crlf.headers);
        assert_eq!(lf.body, crlf.body);
        assert_eq!(lf.body, b"line 1\r\nline 2\r\n");
        assert_eq!(lf.headers[1], ("X-Long".to_string(), b" a\n\tb".to_vec()));
        assert_eq!((lf.line_ends, crlf.line_ends), ("LF", "CRLF"));
    }

    #[test]
    fn odd_files_still_give_a_message() {
        let mbox = Message::parse(b"From a@b Mon Jan 1 00:00:00 2024\nSubject: x\n\nbody\n\nFrom c@d Tue\nSubject: y\n\nz\n");
        assert_eq!(mbox.headers.len(), 1);
        assert_eq!(mbox.body, b"body\r\n");
        assert_eq!(mbox.notes.len(), 2, "{:?}", mbox.notes);

        let no_separator = Message::parse(b"Subject: x\nthis is body text\n");
        assert_eq!(no_separator.headers.len(), 1);
        assert_eq!(no_separator.body, b"this is body text\r\n");

        let garbage = Message::parse(&[0xff, 0x00, 0x13, b'\n', 0x80]);
        assert!(garbage.headers.is_empty());
        assert_eq!(garbage.body, [0xff, 0x00, 0x13, b'\r', b'\n', 0x80]);

        let empty = Message::parse(b"");
        assert!(empty.headers.is_empty() && empty.body.is_empty());
        assert!(!empty.notes.is_empty());
    }

    #[test]
    fn the_envelope_comes_from_the_headers() {
        let m = Message::parse(
            b"Received: from mail.example.com (mail.example.com [192.0.2.25])\n\tby mx.example.org (Postfix) with ESMTP id 1; Mon, 1 Jan 2024\n\
              Received: from inner (localhost [127.0.0.1])\n\
              Return-Path: <alice@example.com>\n\
              From: Alice <alice@example.com>\n\
              To: Bob <bob@example.org>, carol@example.org\n\n",
        );
        let hints = m.envelope_hints();
        assert_eq!(
            hints.sender,
            Some(("alice@example.com".into(), "Return-Path"))
        );
        assert_eq!(
            hints.recipients,
            Some((
                vec!["bob@example.org".into(), "carol@example.org".into()],
                "To"
            ))
        );
        assert_eq!(
            hints.received,
            Some(Received {
                ip: "192.0.2.25".parse().unwrap(),
                name: Some("mail.example.com".into()),
                helo: Some("mail.example.com".into()),
            })
        );
        let bounce = Message::parse(b"Return-Path: <>\nDelivered-To: x@example.org\n\n");
        let hints = bounce.envelope_hints();
        assert_eq!(hints.sender, Some((String::new(), "Return-Path")));
        assert_eq!(
            hints.recipients,
            Some((vec!["x@example.org".into()], "Delivered-To"))
        );
        let exim = Received::parse("from [203.0.113.5] (helo=laptop) by mx with esmtp").unwrap();
        assert_eq!(exim.ip, "203.0.113.5".parse::<IpAddr>().unwrap());
    }
}
