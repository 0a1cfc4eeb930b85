//! Header values as people read them: RFC 2047 encoded words decoded to UTF-8 ([`decode`]) and
//! address-list headers such as From or Sender split into mailboxes ([`addresses`]). Parsing is
//! mailparse's; nothing here does I/O.

use crate::services::net::{dot_atom_or_quoted, parse_address, split};
use mailparse::{MailAddr, MailParseError, SingleInfo, addrparse_header, parse_header};

/// A header value could not be read as asked.
#[derive(Debug, thiserror::Error)]
pub enum MimeError {
    /// The value is not an address list (mailparse's reason).
    #[error("not an address list: {0}")]
    NotAnAddressList(MailParseError),
}

impl MimeError {
    /// The short stable word the Lua module returns.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotAnAddressList(_) => "invalid",
        }
    }
}

/// One mailbox of an address-list header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    /// The display name, decoded (`None` when there is none).
    pub name: Option<String>,
    /// `local@domain`, the local part quoted again when it needs quotes, the domain lowercased.
    pub address: String,
    /// The local part without quotes.
    pub local: String,
    /// The domain, lowercased (`None` when the address has none).
    pub domain: Option<String>,
    /// The name of the group (`team: a@x, b@y;`) the mailbox was listed in.
    pub group: Option<String>,
}

/// The header line mailparse reads: `name: value`, every line break inside `value` turned into
/// a fold so that a bare newline cannot cut the value short.
fn header_line(name: &str, value: &[u8]) -> Vec<u8> {
    let mut line = Vec::with_capacity(name.len() + 2 + value.len());
    line.extend_from_slice(name.as_bytes());
    line.extend_from_slice(b": ");
    let mut i = 0;
    while i < value.len() {
        match value[i] {
            b'\r' | b'\n' => {
                while i < value.len() && matches!(value[i], b'\r' | b'\n') {
                    i += 1;
                }
                line.extend_from_slice(b"\r\n ");
                while i < value.len() && matches!(value[i], b' ' | b'\t') {
                    i += 1;
                }
            }
            byte => {
                line.push(byte);
                i += 1;
            }
        }
    }
    line
}

/// Decodes a header value for reading: RFC 2047 encoded words (`=?UTF-8?B?…?=`,
/// `=?iso-8859-1?Q?…?=`) become text, folded lines are joined, and bytes that are not UTF-8 are
/// read as Latin-1. Text that is not encoded comes back unchanged.
pub fn decode(value: &[u8]) -> String {
    match parse_header(&header_line("X", value)) {
        Ok((header, _)) => header.get_value(),
        Err(_) => String::from_utf8_lossy(value).into_owned(),
    }
}

fn mailbox(info: SingleInfo, group: Option<&str>) -> Mailbox {
    let (local, domain) = match parse_address(&info.addr) {
        Ok(parsed) => (parsed.local, parsed.domain),
        Err(_) => {
            let (local, domain) = split(&info.addr);
            (local.to_string(), domain)
        }
    };
    let address = match &domain {
        Some(domain) => format!("{}@{domain}", dot_atom_or_quoted(&local)),
        None => info.addr.clone(),
    };
    Mailbox {
        name: info.display_name.filter(|n| !n.trim().is_empty()),
        address,
        local,
        domain,
        group: group.map(str::to_string),
    }
}

/// Splits an address-list header value (`From`, `Sender`, `To`, `Reply-To`) into mailboxes in
/// order, display names decoded; members of a group are listed with the group's name. An empty
/// value is an empty list.
pub fn addresses(value: &[u8]) -> Result<Vec<Mailbox>, MimeError> {
    let line = header_line("From", value);
    let (header, _) = parse_header(&line).map_err(MimeError::NotAnAddressList)?;
    let list = addrparse_header(&header).map_err(MimeError::NotAnAddressList)?;
    let mut out = Vec::new();
    for item in list.into_inner() {
        match item {
            MailAddr::Single(info) => out.push(mailbox(info, None)),
            MailAddr::Group(group) => out.extend(
                group
                    .addrs
                    .into_iter()
                    .map(|info| mailbox(info, Some(&group.group_name))),
            ),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn single(value: &str) -> Mailbox {
        let mut list = addresses(value.as_bytes()).unwrap();
        assert_eq!(list.len(), 1, "{list:?}");
        list.remove(0)
    }

    #[test]
    fn decodes_encoded_words_like_pymilter() {
        // pymilter's testutils parse_header cases.
        assert_eq!(
            decode(b"=?UTF-8?B?TGFzdCBGZXcgQ29sZHBsYXkgQWxidW0gQXJ0d29ya3MgQXZhaWxhYmxlAA==?="),
            "Last Few Coldplay Album Artworks Available\0"
        );
        assert_eq!(
            decode(b"=?iso-8859-1?Q?Peter_=D8rum?= <orum@ditas.dk>"),
            "Peter \u{d8}rum <orum@ditas.dk>"
        );
    }

    #[test]
    fn decode_joins_folds_and_keeps_plain_text() {
        assert_eq!(decode(b"plain $$$ text"), "plain $$$ text");
        assert_eq!(decode(b"first\r\n\tsecond"), "first second");
        assert_eq!(decode(b"first\nsecond"), "first second");
        assert_eq!(
            decode(b"=?utf-8?q?De?= =?utf-8?q?tox?= now"),
            "Detox now",
            "whitespace between adjacent encoded words is dropped"
        );
        assert_eq!(
            decode(b"caf\xe9"),
            "caf\u{e9}",
            "bytes that are not UTF-8 are Latin-1"
        );
        assert_eq!(decode(b""), "");
    }

    #[test]
    fn splits_address_lists() {
        let m = single("\"Stuart D. Gathman\" <Stuart@BMSI.com>");
        assert_eq!(m.name.as_deref(), Some("Stuart D. Gathman"));
        assert_eq!(m.address, "Stuart@bmsi.com");
        assert_eq!(m.local, "Stuart");
        assert_eq!(m.domain.as_deref(), Some("bmsi.com"));

        let m = single("=?iso-8859-1?Q?Peter_=D8rum?= <orum@ditas.dk>");
        assert_eq!(m.name.as_deref(), Some("Peter \u{d8}rum"));
        assert_eq!(m.address, "orum@ditas.dk");

        let m = single("bare@example.com");
        assert_eq!(m.name, None);
        assert_eq!(m.address, "bare@example.com");

        let m = single("God@heaven <@hop1.org,@hop2.net:jeff@spec.org>");
        assert_eq!(m.name.as_deref(), Some("God@heaven"));
        assert_eq!(m.address, "jeff@spec.org", "the source route is dropped");

        let list = addresses(b"a@x.test, d@w.test, Team: b@y.test, \"C\" <c@z.test>;").unwrap();
        let got: Vec<(&str, Option<&str>)> = list
            .iter()
            .map(|m| (m.address.as_str(), m.group.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("a@x.test", None),
                ("d@w.test", None),
                ("b@y.test", Some("Team")),
                ("c@z.test", Some("Team"))
            ]
        );
        assert!(addresses(b"").unwrap().is_empty());
        assert!(addresses(b"undisclosed-recipients:;").unwrap().is_empty());
    }

    #[test]
    fn refuses_what_is_not_an_address_list() {
        assert!(addresses(b"no address here").is_err());
        assert!(addresses(b"<unterminated@example.com").is_err());
    }
}
