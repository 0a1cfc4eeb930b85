//! Attachment defang: a message's MIME parts with a banned file extension (in any Content-Type
//! parameter, the Content-Disposition file name, or the member names of a ZIP attachment) are
//! replaced by a text notice, and `<script>` elements are cut out of HTML parts. mailparse reads
//! the message; mail-builder writes each new part; every other byte of the message stays as it
//! was (boundaries included), so untouched parts reach the reader exactly as sent.

use mail_builder::{headers::content_type::ContentType, mime::MimePart};
use mailparse::{MailHeader, MailHeaderMap, ParsedMail, parse_headers, parse_mail};
use std::io::Cursor;

/// The classic milter's default `banned_exts`: 42 Windows types.
pub const DEFAULT_BANNED_EXTS: &[&str] = &[
    "ade", "adp", "asd", "asx", "asp", "bas", "bat", "chm", "cmd", "com", "cpl", "crt", "dll",
    "exe", "hlp", "hta", "inf", "ins", "isp", "js", "jse", "lnk", "mdb", "mde", "msc", "msi",
    "msp", "mst", "ocx", "pcd", "pif", "reg", "scr", "sct", "shs", "url", "vb", "vbe", "vbs",
    "wsc", "wsf", "wsh",
];

/// What replaces a `<script>` element in an HTML part.
pub const SCRIPT_NOTICE: &str = "<!-- WARNING: embedded script removed -->";

/// Nested messages and multiparts deeper than this are not looked into.
const MAX_DEPTH: usize = 16;

/// ZIPs inside a ZIP attachment are unpacked and checked down to this many levels of nesting;
/// a ZIP deeper than that counts as bad.
pub const ZIP_MAX_DEPTH: usize = 3;
/// The most bytes one inner ZIP may unpack to; a bigger one counts as bad (a zip bomb).
pub const ZIP_MAX_INNER: u64 = 8 * 1024 * 1024;
/// The most bytes unpacked for one attachment, all its inner ZIPs together.
pub const ZIP_MAX_UNPACKED: u64 = 32 * 1024 * 1024;
/// The most members (names) looked at in one attachment, all levels together.
pub const ZIP_MAX_MEMBERS: usize = 10_000;

/// What to look for.
#[derive(Clone, Debug)]
pub struct DefangOptions {
    /// Extensions (without the dot, any case) that make a part bad.
    pub banned_exts: Vec<String>,
    /// Look into attached messages (`message/rfc822`).
    pub scan_rfc822: bool,
    /// Check the member names of ZIP attachments; a ZIP that cannot be read counts as bad.
    pub scan_zip: bool,
    /// Cut `<script>` elements out of HTML parts.
    pub scan_html: bool,
    /// The text of the part that replaces a bad one; `{name}` is the bad part's file name.
    pub notice: String,
}

/// A message that was changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Defanged {
    /// The new body (everything after the top-level header block).
    pub body: Vec<u8>,
    /// Top-level header changes, in order: `(name, Some(value))` sets the header, `(name,
    /// None)` deletes it. Empty unless the message itself (not a part of it) was replaced.
    pub headers: Vec<(String, Option<String>)>,
    /// The names of the parts that were replaced by the notice.
    pub removed: Vec<String>,
    /// How many `<script>` elements were cut out.
    pub scripts: usize,
}

/// A message that could not be read; the words match §2.18's three rules.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DefangError {
    /// The header block cannot be parsed.
    #[error("header parse error: {0}")]
    Header(String),
    /// A multipart whose boundary never occurs, or a part that cannot be decoded.
    #[error("MIME boundary error: {0}")]
    Boundary(String),
}

impl DefangError {
    /// The short stable word the Lua module returns.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Header(_) => "header",
            Self::Boundary(_) => "boundary",
        }
    }
}

/// A replacement of the bytes `start..end` of the message.
struct Splice {
    start: usize,
    end: usize,
    bytes: Vec<u8>,
}

/// The walk over one message: what it found and what it will replace.
struct Walk<'o> {
    opts: &'o DefangOptions,
    splices: Vec<Splice>,
    removed: Vec<String>,
    scripts: usize,
}

/// Defangs `message` (header block, blank line, body). `Ok(None)`: nothing to change.
pub fn defang(message: &[u8], opts: &DefangOptions) -> Result<Option<Defanged>, DefangError> {
    let (_, body_start) = parse_headers(message).map_err(|e| DefangError::Header(e.to_string()))?;
    let mail = parse_mail(message).map_err(|e| DefangError::Header(e.to_string()))?;
    let mut walk = Walk {
        opts,
        splices: Vec::new(),
        removed: Vec::new(),
        scripts: 0,
    };
    if mail.subparts.is_empty() && !is_multipart(&mail) && !is_rfc822(&mail) {
        // A single-part message: the new part's headers become top-level header changes.
        return Ok(walk.leaf(&mail)?.map(|part| {
            let (headers, body) = split_part(&part);
            Defanged {
                body,
                headers,
                removed: walk.removed,
                scripts: walk.scripts,
            }
        }));
    }
    walk.part(&mail, message, 0)?;
    if walk.splices.is_empty() {
        return Ok(None);
    }
    Ok(Some(Defanged {
        body: apply(message, walk.splices)[body_start..].to_vec(),
        headers: Vec::new(),
        removed: walk.removed,
        scripts: walk.scripts,
    }))
}

fn is_multipart(part: &ParsedMail) -> bool {
    part.ctype.mimetype.starts_with("multipart/")
}

fn is_rfc822(part: &ParsedMail) -> bool {
    part.ctype.mimetype == "message/rfc822"
}

/// Where `slice` starts inside `base` (it is a sub-slice of it).
fn offset(base: &[u8], slice: &[u8]) -> usize {
    slice.as_ptr() as usize - base.as_ptr() as usize
}

/// `message` with the splices applied (they do not overlap).
fn apply(message: &[u8], mut splices: Vec<Splice>) -> Vec<u8> {
    splices.sort_by_key(|s| s.start);
    let mut out = Vec::with_capacity(message.len());
    let mut at = 0;
    for splice in splices {
        out.extend_from_slice(&message[at..splice.start]);
        out.extend_from_slice(&splice.bytes);
        at = splice.end;
    }
    out.extend_from_slice(&message[at..]);
    out
}

/// A part written by mail-builder, split into header changes and body.
fn split_part(part: &[u8]) -> (Vec<(String, Option<String>)>, Vec<u8>) {
    let (headers, start) = parse_headers(part).unwrap_or_default();
    let mut changes: Vec<(String, Option<String>)> = headers
        .iter()
        .map(|h| (h.get_key(), Some(h.get_value())))
        .collect();
    for name in [
        "Content-Type",
        "Content-Transfer-Encoding",
        "Content-Disposition",
    ] {
        if !changes.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
            changes.push((name.to_string(), None));
        }
    }
    (changes, part[start..].to_vec())
}

impl Walk<'_> {
    /// Walks `part`, a slice of `base`, queueing splices of `base`.
    fn part(&mut self, part: &ParsedMail, base: &[u8], depth: usize) -> Result<(), DefangError> {
        if depth > MAX_DEPTH {
            return Ok(());
        }
        if is_multipart(part) {
            if part.subparts.is_empty() && part.ctype.params.contains_key("boundary") {
                let body = &part.raw_bytes[header_len(part.raw_bytes)..];
                if !body.iter().all(u8::is_ascii_whitespace) {
                    return Err(DefangError::Boundary(format!(
                        "no boundary {:?} in the {}",
                        part.ctype.params["boundary"], part.ctype.mimetype
                    )));
                }
            }
            for sub in &part.subparts {
                self.part(sub, base, depth + 1)?;
            }
            return Ok(());
        }
        if is_rfc822(part) && self.opts.scan_rfc822 {
            return self.attached_message(part, base, depth);
        }
        if let Some(bytes) = self.leaf(part)? {
            let start = offset(base, part.raw_bytes);
            self.splices.push(Splice {
                start,
                end: start + part.raw_bytes.len(),
                bytes,
            });
        }
        Ok(())
    }

    /// An attached message: walked in place when it is not transfer-encoded, else decoded and
    /// defanged on its own; written back as `7bit` (what RFC 2046 wants for message/rfc822)
    /// when the result is 7-bit text, else in base64 again, so a 7-bit clean message stays so.
    fn attached_message(
        &mut self,
        part: &ParsedMail,
        base: &[u8],
        depth: usize,
    ) -> Result<(), DefangError> {
        let start = header_len(part.raw_bytes);
        let encoding = part
            .headers
            .get_first_value("Content-Transfer-Encoding")
            .unwrap_or_default()
            .to_ascii_lowercase();
        if !matches!(encoding.trim(), "quoted-printable" | "base64") {
            let inner_raw = &part.raw_bytes[start..];
            let Ok(inner) = parse_mail(inner_raw) else {
                return Ok(());
            };
            return self.part(&inner, base, depth + 1);
        }
        let decoded = part
            .get_body_raw()
            .map_err(|e| DefangError::Boundary(e.to_string()))?;
        let Ok(Some(inner)) = defang(&decoded, self.opts) else {
            return Ok(());
        };
        self.removed.extend(inner.removed);
        self.scripts += inner.scripts;
        let inner_head = &decoded[..header_len(&decoded)];
        let mut bytes = Vec::new();
        let kept = part.headers.iter().filter(|h| {
            !h.get_key_ref()
                .eq_ignore_ascii_case("Content-Transfer-Encoding")
        });
        write_raw_headers(&mut bytes, kept);
        let mut message = rewrite_headers(inner_head, &inner.headers);
        message.extend_from_slice(&inner.body);
        if is_7bit(&message) {
            bytes.extend_from_slice(b"Content-Transfer-Encoding: 7bit\r\n\r\n");
            bytes.extend_from_slice(&message);
        } else {
            bytes.extend_from_slice(b"Content-Transfer-Encoding: base64\r\n\r\n");
            bytes.extend_from_slice(&base64_lines(&message));
        }
        let at = offset(base, part.raw_bytes);
        self.splices.push(Splice {
            start: at,
            end: at + part.raw_bytes.len(),
            bytes,
        });
        Ok(())
    }

    /// The new bytes (headers and body) of a leaf part, or `None` when it stays.
    fn leaf(&mut self, part: &ParsedMail) -> Result<Option<Vec<u8>>, DefangError> {
        if let Some(name) = self.bad_name(part) {
            self.removed.push(name.clone());
            return Ok(Some(self.notice_part(&name)));
        }
        if self.opts.scan_html && is_html(part) {
            let text = part
                .get_body()
                .map_err(|e| DefangError::Boundary(e.to_string()))?;
            let (clean, cut) = strip_scripts(&text);
            if cut > 0 {
                self.scripts += cut;
                let mut out = Vec::new();
                MimePart::new(
                    ContentType::new("text/html").attribute("charset", "utf-8"),
                    clean,
                )
                .write_part(&mut out);
                return Ok(Some(out));
            }
        }
        Ok(None)
    }

    /// The name that makes this part bad: a banned extension in a Content-Type parameter or
    /// the Content-Disposition file name, or a ZIP that holds such a member (or is corrupt).
    fn bad_name(&self, part: &ParsedMail) -> Option<String> {
        let names = part_names(part);
        if let Some(name) = names.iter().find(|n| self.banned(n)) {
            return Some(name.clone());
        }
        if self.opts.scan_zip && is_zip(part, &names) {
            let zip_name = names
                .first()
                .cloned()
                .unwrap_or_else(|| "attachment.zip".into());
            let Ok(bytes) = part.get_body_raw() else {
                return Some(zip_name);
            };
            let mut spent = ZipBudget::default();
            return self
                .bad_in_zip(&bytes, 0, &mut spent)
                .map(|inside| match inside.as_str() {
                    "" => zip_name,
                    inside => format!("{zip_name}/{inside}"),
                });
        }
        None
    }

    /// What makes the ZIP `bytes` bad: the path of a member with a banned name (through the
    /// inner ZIPs, `inner.zip/setup.exe`), or `""` when the ZIP itself cannot be read or passes
    /// a bound (`ZIP_MAX_*`). Inner ZIPs (members named `*.zip`) are unpacked and checked too.
    fn bad_in_zip(&self, bytes: &[u8], depth: usize, spent: &mut ZipBudget) -> Option<String> {
        let Ok(mut archive) = zip::ZipArchive::new(Cursor::new(bytes)) else {
            return Some(String::new());
        };
        spent.members += archive.len();
        if spent.members > ZIP_MAX_MEMBERS {
            return Some(String::new());
        }
        let mut inner = Vec::new();
        for index in 0..archive.len() {
            let Some(Ok(member)) = archive.name_for_index(index) else {
                return Some(String::new());
            };
            if self.banned(&member) {
                return Some(member.into_owned());
            }
            if member.to_ascii_lowercase().ends_with(".zip") {
                inner.push((index, member.into_owned()));
            }
        }
        for (index, member) in inner {
            let bad_here = Some(member.clone());
            if depth + 1 > ZIP_MAX_DEPTH {
                return bad_here;
            }
            let Some(unpacked) = unpack(&mut archive, index, spent) else {
                return bad_here;
            };
            if let Some(inside) = self.bad_in_zip(&unpacked, depth + 1, spent) {
                return Some(match inside.as_str() {
                    "" => member,
                    inside => format!("{member}/{inside}"),
                });
            }
        }
        None
    }

    fn banned(&self, name: &str) -> bool {
        let Some((_, ext)) = name.trim().trim_end_matches(['"', '\'']).rsplit_once('.') else {
            return false;
        };
        self.opts
            .banned_exts
            .iter()
            .any(|b| b.trim_start_matches('.').eq_ignore_ascii_case(ext))
    }

    fn notice_part(&self, name: &str) -> Vec<u8> {
        let text = self.opts.notice.replace("{name}", name);
        let mut out = Vec::new();
        MimePart::new(
            ContentType::new("text/plain")
                .attribute("charset", "utf-8")
                .attribute("name", "WARNING.TXT"),
            text,
        )
        .write_part(&mut out);
        out
    }
}

/// What the look into one ZIP attachment has used up of the `ZIP_MAX_*` bounds.
#[derive(Default)]
struct ZipBudget {
    unpacked: u64,
    members: usize,
}

/// Member `index` of `archive`, unpacked within [`ZIP_MAX_INNER`] and what is left of
/// [`ZIP_MAX_UNPACKED`]; `None` when it cannot be unpacked (encrypted, an unknown method,
/// corrupt) or is too big.
fn unpack(
    archive: &mut zip::ZipArchive<Cursor<&[u8]>>,
    index: usize,
    spent: &mut ZipBudget,
) -> Option<Vec<u8>> {
    use std::io::Read;
    let limit = ZIP_MAX_INNER.min(ZIP_MAX_UNPACKED.saturating_sub(spent.unpacked));
    let file = archive.by_index(index).ok()?;
    let mut out = Vec::new();
    // The declared size may lie: read one byte past the limit to see whether it is passed.
    file.take(limit + 1).read_to_end(&mut out).ok()?;
    let read = out.len() as u64;
    spent.unpacked += read;
    (read <= limit).then_some(out)
}

/// Whether `bytes` can be sent as `7bit` (RFC 2045): ASCII without NUL and bare CR or LF,
/// lines of at most 998 characters.
fn is_7bit(bytes: &[u8]) -> bool {
    let mut line = 0;
    let mut previous = 0u8;
    for &b in bytes {
        match b {
            b'\n' if previous == b'\r' => line = 0,
            b'\r' => {}
            b'\n' | 0 | 0x80.. => return false,
            _ => line += 1,
        }
        if previous == b'\r' && b != b'\n' {
            return false;
        }
        if line > 998 {
            return false;
        }
        previous = b;
    }
    previous != b'\r'
}

/// `bytes` in base64, in lines of 76 characters (RFC 2045), each ending in CRLF.
fn base64_lines(bytes: &[u8]) -> Vec<u8> {
    use base64::Engine;
    let mut out = Vec::with_capacity(bytes.len() * 4 / 3 + bytes.len() / 28 + 4);
    for chunk in bytes.chunks(57) {
        out.extend_from_slice(
            base64::engine::general_purpose::STANDARD
                .encode(chunk)
                .as_bytes(),
        );
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The length of a part's header block, blank line included.
fn header_len(raw: &[u8]) -> usize {
    parse_headers(raw).map_or(0, |(_, n)| n)
}

/// Every Content-Type parameter value and the Content-Disposition file name of a part.
fn part_names(part: &ParsedMail) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    if let Some(name) = part.ctype.params.get("name") {
        names.push(name.clone());
    }
    let disposition = part.get_content_disposition();
    if let Some(name) = disposition.params.get("filename") {
        names.push(name.clone());
    }
    for (key, value) in &part.ctype.params {
        if key != "name" && key != "charset" && key != "boundary" {
            names.push(value.clone());
        }
    }
    names
}

fn is_zip(part: &ParsedMail, names: &[String]) -> bool {
    matches!(
        part.ctype.mimetype.as_str(),
        "application/zip" | "application/x-zip-compressed" | "application/x-zip"
    ) || names
        .iter()
        .any(|n| n.to_ascii_lowercase().ends_with(".zip"))
}

fn is_html(part: &ParsedMail) -> bool {
    part.ctype.mimetype == "text/html"
        || (part.ctype.mimetype == "application/octet-stream"
            && part_names(part).iter().any(|n| {
                let n = n.to_ascii_lowercase();
                n.ends_with(".htm") || n.ends_with(".html")
            }))
}

/// `html` with each `<script …>…</script>` element (any case; an unclosed one runs to the end)
/// replaced by [`SCRIPT_NOTICE`], and how many were cut.
pub fn strip_scripts(html: &str) -> (String, usize) {
    let lower = html.to_ascii_lowercase();
    let mut out = String::with_capacity(html.len());
    let mut at = 0;
    let mut cut = 0;
    while let Some(found) = lower[at..].find("<script") {
        let start = at + found;
        let after = lower.as_bytes().get(start + 7).copied();
        if !matches!(
            after,
            Some(b'>' | b' ' | b'\t' | b'\r' | b'\n' | b'/') | None
        ) {
            out.push_str(&html[at..start + 7]);
            at = start + 7;
            continue;
        }
        out.push_str(&html[at..start]);
        out.push_str(SCRIPT_NOTICE);
        cut += 1;
        at = match lower[start..].find("</script") {
            Some(end) => {
                let close = start + end;
                lower[close..]
                    .find('>')
                    .map_or(html.len(), |g| close + g + 1)
            }
            None => html.len(),
        };
    }
    out.push_str(&html[at..]);
    (out, cut)
}

/// A header block with `changes` applied (set or delete by name); the blank line kept.
fn rewrite_headers(head: &[u8], changes: &[(String, Option<String>)]) -> Vec<u8> {
    if changes.is_empty() {
        return head.to_vec();
    }
    let (headers, _) = parse_headers(head).unwrap_or_default();
    let mut out = Vec::new();
    let kept = headers.iter().filter(|h| {
        !changes
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(&h.get_key_ref()))
    });
    write_raw_headers(&mut out, kept);
    for (name, value) in changes {
        if let Some(value) = value {
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Writes headers as they were sent (name, raw value, CRLF).
fn write_raw_headers<'h>(out: &mut Vec<u8>, headers: impl Iterator<Item = &'h MailHeader<'h>>) {
    for header in headers {
        out.extend_from_slice(header.get_key_raw());
        out.extend_from_slice(b": ");
        out.extend_from_slice(header.get_value_raw());
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn opts() -> DefangOptions {
        DefangOptions {
            banned_exts: DEFAULT_BANNED_EXTS.iter().map(|e| e.to_string()).collect(),
            scan_rfc822: true,
            scan_zip: true,
            scan_html: true,
            notice: "It was originally named '{name}', and has been removed.".into(),
        }
    }

    fn multipart(attachment: &str) -> String {
        format!(
            "From: a@example.test\r\nMIME-Version: 1.0\r\n\
             Content-Type: multipart/mixed; boundary=\"XX\"\r\n\r\n\
             preamble\r\n--XX\r\nContent-Type: text/plain\r\n\r\nHello there.\r\n\
             --XX\r\n{attachment}\r\n--XX--\r\n"
        )
    }

    #[test]
    fn replaces_a_banned_attachment_and_keeps_the_rest_byte_for_byte() {
        let msg = multipart(
            "Content-Type: application/octet-stream; name=\"LOVE-LETTER.TXT.vbs\"\r\n\
             Content-Transfer-Encoding: base64\r\n\r\nQUJD",
        );
        let out = defang(msg.as_bytes(), &opts()).unwrap().unwrap();
        assert_eq!(out.removed, ["LOVE-LETTER.TXT.vbs"]);
        assert!(out.headers.is_empty());
        let body = String::from_utf8(out.body).unwrap();
        assert!(
            body.starts_with(
                "preamble\r\n--XX\r\nContent-Type: text/plain\r\n\r\nHello there.\r\n--XX\r\n"
            ),
            "{body}"
        );
        assert!(
            body.contains("WARNING.TXT") && body.contains("LOVE-LETTER.TXT.vbs"),
            "{body}"
        );
        assert!(!body.contains("QUJD"), "{body}");
        assert!(body.ends_with("\r\n--XX--\r\n"), "{body}");
    }

    #[test]
    fn any_content_type_parameter_counts_and_clean_mail_is_untouched() {
        // Klez (virus13): the extension hides in an unquoted extra parameter.
        let msg = multipart("Content-Type: audio/x-wav; name=hom1;tile=1;ord=7[1].scr\r\n\r\nxx");
        let out = defang(msg.as_bytes(), &opts()).unwrap().unwrap();
        assert_eq!(out.removed, ["7[1].scr"]);
        let clean = multipart("Content-Type: image/png; name=\"cat.png\"\r\n\r\nxx");
        assert_eq!(defang(clean.as_bytes(), &opts()).unwrap(), None);
    }

    #[test]
    fn a_single_part_message_gets_new_top_level_headers() {
        let msg = "From: a@example.test\r\nContent-Type: application/octet-stream; name=FAX20.exe\r\n\
                   Content-Transfer-Encoding: base64\r\n\r\nQUJD\r\n";
        let out = defang(msg.as_bytes(), &opts()).unwrap().unwrap();
        let ctype = out
            .headers
            .iter()
            .find(|(n, _)| n == "Content-Type")
            .unwrap();
        assert!(
            ctype.1.as_deref().unwrap().starts_with("text/plain"),
            "{:?}",
            out.headers
        );
        assert!(
            out.headers
                .contains(&("Content-Transfer-Encoding".to_string(), None))
                || out
                    .headers
                    .iter()
                    .any(|(n, v)| n == "Content-Transfer-Encoding" && v.is_some())
        );
        assert!(String::from_utf8_lossy(&out.body).contains("FAX20.exe"));
    }

    #[test]
    fn cuts_scripts_out_of_html() {
        let (clean, cut) =
            strip_scripts("<p>a</p><SCRIPT type=x>evil()</Script><p>b</p><scripted>");
        assert_eq!(cut, 1);
        assert_eq!(clean, format!("<p>a</p>{SCRIPT_NOTICE}<p>b</p><scripted>"));
        assert_eq!(strip_scripts("<![if !vml]>x<![endif]>").1, 0);
        let msg = multipart("Content-Type: text/html\r\n\r\n<p>hi</p><script>alert(1)</script>");
        let out = defang(msg.as_bytes(), &opts()).unwrap().unwrap();
        assert_eq!((out.scripts, out.removed.len()), (1, 0));
        let body = String::from_utf8(out.body).unwrap();
        assert!(!body.contains("alert"), "{body}");
    }

    fn zip_with(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (name, data) in members {
            zip.start_file(*name, options).unwrap();
            zip.write_all(data).unwrap();
        }
        zip.finish().unwrap().into_inner()
    }

    fn zip_of(names: &[&str]) -> Vec<u8> {
        let members: Vec<(&str, &[u8])> = names.iter().map(|n| (*n, b"data".as_slice())).collect();
        zip_with(&members)
    }

    fn zip_part(bytes: &[u8]) -> String {
        let mut out = Vec::new();
        MimePart::new("application/zip", bytes.to_vec())
            .attachment("files.zip")
            .write_part(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn reads_zip_member_names() {
        let bad = multipart(&zip_part(&zip_of(&["readme.txt", "setup.exe"])));
        let out = defang(bad.as_bytes(), &opts()).unwrap().unwrap();
        assert_eq!(out.removed, ["files.zip/setup.exe"]);
        let good = multipart(&zip_part(&zip_of(&["readme.txt"])));
        assert_eq!(defang(good.as_bytes(), &opts()).unwrap(), None);
        let corrupt = multipart(&zip_part(b"PK\x03\x04 not really"));
        assert_eq!(
            defang(corrupt.as_bytes(), &opts())
                .unwrap()
                .unwrap()
                .removed,
            ["files.zip"]
        );
        let mut no_zip = opts();
        no_zip.scan_zip = false;
        assert_eq!(defang(bad.as_bytes(), &no_zip).unwrap(), None);
    }

    #[test]
    fn looks_into_attached_messages() {
        let inner =
            multipart("Content-Type: application/octet-stream; name=application.pif\r\n\r\nMZ")
                .replace("XX", "YY");
        let msg = multipart(&format!("Content-Type: message/rfc822\r\n\r\n{inner}"));
        let out = defang(msg.as_bytes(), &opts()).unwrap().unwrap();
        assert_eq!(out.removed, ["application.pif"]);
        let mut flat = opts();
        flat.scan_rfc822 = false;
        assert_eq!(defang(msg.as_bytes(), &flat).unwrap(), None);
    }

    #[test]
    fn a_missing_end_boundary_still_defangs() {
        // virus4 of the classic tests: the last part runs to the end of the message.
        let msg = multipart("Content-Type: audio/x-wav; name=\"readme.exe\"\r\n\r\nMZ")
            .replace("\r\n--XX--\r\n", "\r\n");
        let out = defang(msg.as_bytes(), &opts()).unwrap().unwrap();
        assert_eq!(out.removed, ["readme.exe"]);
        assert!(
            String::from_utf8(out.body)
                .unwrap()
                .contains("Hello there.")
        );
    }

    #[test]
    fn reports_a_missing_boundary() {
        let msg = "From: a@example.test\r\nContent-Type: multipart/mixed; boundary=\"XX\"\r\n\r\nno parts\r\n";
        assert_eq!(
            defang(msg.as_bytes(), &opts()).unwrap_err().code(),
            "boundary"
        );
    }

    #[test]
    fn unpacks_zips_inside_a_zip_within_bounds() {
        let removed = |zip: &[u8]| {
            defang(multipart(&zip_part(zip)).as_bytes(), &opts())
                .unwrap()
                .map(|out| out.removed)
        };
        let inner = zip_with(&[("readme.txt", b"hi"), ("setup.exe", b"MZ")]);
        let nested = zip_with(&[("notes.txt", b"x"), ("inner.zip", &inner)]);
        assert_eq!(removed(&nested).unwrap(), ["files.zip/inner.zip/setup.exe"]);
        let clean = zip_with(&[("inner.zip", &zip_of(&["readme.txt"]))]);
        assert_eq!(removed(&clean), None);
        let corrupt = zip_with(&[("inner.zip", b"PK\x03\x04 not really")]);
        assert_eq!(removed(&corrupt).unwrap(), ["files.zip/inner.zip"]);
        let mut deep = zip_of(&["readme.txt"]);
        for level in (1..=ZIP_MAX_DEPTH + 1).rev() {
            deep = zip_with(&[(&format!("l{level}.zip"), &deep)]);
        }
        assert_eq!(
            removed(&deep).unwrap(),
            ["files.zip/l1.zip/l2.zip/l3.zip/l4.zip"]
        );
        let names: Vec<String> = (0..=ZIP_MAX_MEMBERS).map(|i| format!("f{i}.txt")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        assert_eq!(removed(&zip_of(&names)).unwrap(), ["files.zip"]);
    }

    #[test]
    fn seven_bit_text_and_base64_lines() {
        assert!(is_7bit(b"Subject: x\r\n\r\nplain\r\n"));
        assert!(!is_7bit("Grüße\r\n".as_bytes()));
        assert!(!is_7bit(b"bare\nline feed"));
        assert!(!is_7bit(b"bare\rreturn"));
        assert!(!is_7bit(b"nul\x00\r\n"));
        assert!(!is_7bit(&[b'a'; 999]));
        assert!(is_7bit(&[b'a'; 998]));
        let encoded = base64_lines(&[0u8; 100]);
        let lines: Vec<&[u8]> = encoded.split(|b| *b == b'\n').collect();
        assert_eq!(lines[0].len(), 77, "76 characters and CR");
        assert!(encoded.ends_with(b"\r\n"));
    }
}
