//! Envelope address parsing for MAIL FROM / RCPT TO arguments: `<user@dom>`, bare `user@dom`,
//! the null address `<>`, quoted local parts (`"john doe"@dom`), and source routes
//! (`<@relay1,@relay2:user@dom>`, RFC 5321 §4.1.2, whose route is dropped). The result is split
//! into an unquoted local part and a lowercased domain.

/// An address could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// `<` without `>` or the other way round.
    #[error("unbalanced angle brackets")]
    UnbalancedBrackets,
    /// A quoted local part has no closing quote.
    #[error("unterminated quoted local part")]
    UnterminatedQuote,
    /// A source route is not `@domain,@domain:`.
    #[error("malformed source route")]
    BadSourceRoute,
    /// Nothing before the `@`.
    #[error("empty local part")]
    EmptyLocalPart,
    /// Nothing after the `@`.
    #[error("empty domain")]
    EmptyDomain,
    /// Whitespace, a control character or an SMTP special where it is not allowed.
    #[error("invalid character in address")]
    BadCharacter,
}

impl AddressError {
    /// The short stable word the Lua module returns.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnbalancedBrackets => "unbalanced-brackets",
            Self::UnterminatedQuote => "unterminated-quote",
            Self::BadSourceRoute => "bad-source-route",
            Self::EmptyLocalPart => "empty-local-part",
            Self::EmptyDomain => "empty-domain",
            Self::BadCharacter => "bad-character",
        }
    }
}

/// A parsed envelope address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// The local part without quotes or escapes; empty for the null address.
    pub local: String,
    /// The domain in lowercase; `None` for the null address and a bare local part
    /// (`<postmaster>`).
    pub domain: Option<String>,
}

impl Address {
    /// Whether this is the null reverse path `<>`.
    pub fn is_null(&self) -> bool {
        self.local.is_empty() && self.domain.is_none()
    }

    /// The address as written in an envelope, without brackets: `local@domain` with the local
    /// part quoted again when it needs quotes; `""` for the null address.
    pub fn address(&self) -> String {
        if self.is_null() {
            return String::new();
        }
        let mut text = dot_atom_or_quoted(&self.local);
        if let Some(domain) = &self.domain {
            text.push('@');
            text.push_str(domain);
        }
        text
    }
}

/// Parses a MAIL FROM or RCPT TO address (see the module documentation for the forms).
pub fn parse_address(text: &str) -> Result<Address, AddressError> {
    let text = text.trim();
    let inner = match text.strip_prefix('<') {
        Some(rest) => rest
            .strip_suffix('>')
            .ok_or(AddressError::UnbalancedBrackets)?,
        None if text.ends_with('>') => return Err(AddressError::UnbalancedBrackets),
        None => text,
    };
    if inner.is_empty() {
        return Ok(Address {
            local: String::new(),
            domain: None,
        });
    }
    parse_mailbox(strip_source_route(inner)?)
}

/// Splits `address` at its last `@` into the local part as written and the lowercased domain
/// (`None` without `@`). Unlike [`parse_address`] it never fails and does not unquote.
pub fn split(address: &str) -> (&str, Option<String>) {
    match address.rsplit_once('@') {
        Some((local, domain)) => (local, Some(domain.to_lowercase())),
        None => (address, None),
    }
}

/// Drops an RFC 5321 source route (`@a,@b:`) in front of the mailbox.
fn strip_source_route(text: &str) -> Result<&str, AddressError> {
    if !text.starts_with('@') {
        return Ok(text);
    }
    let mut rest = text;
    loop {
        rest = rest.strip_prefix('@').ok_or(AddressError::BadSourceRoute)?;
        let end = if rest.starts_with('[') {
            rest.find(']').map(|i| i + 1)
        } else {
            rest.find([',', ':'])
        }
        .ok_or(AddressError::BadSourceRoute)?;
        let (domain, after) = rest.split_at(end);
        if domain.is_empty() || domain.contains(char::is_whitespace) {
            return Err(AddressError::BadSourceRoute);
        }
        if let Some(after) = after.strip_prefix(',') {
            rest = after;
        } else if let Some(mailbox) = after.strip_prefix(':') {
            return Ok(mailbox);
        } else {
            return Err(AddressError::BadSourceRoute);
        }
    }
}

/// Parses `local@domain`, `"quoted local"@domain` or a bare local part.
fn parse_mailbox(text: &str) -> Result<Address, AddressError> {
    let (local, domain) = if let Some(quoted) = text.strip_prefix('"') {
        let (local, rest) = unquote(quoted)?;
        match rest {
            "" if local.is_empty() => return Err(AddressError::EmptyLocalPart),
            "" => (local, None),
            _ => match rest.strip_prefix('@') {
                Some(domain) => (local, Some(domain)),
                None => return Err(AddressError::BadCharacter),
            },
        }
    } else {
        let (local, domain) = match text.rsplit_once('@') {
            Some((local, domain)) => (local, Some(domain)),
            None => (text, None),
        };
        if local.is_empty() {
            return Err(AddressError::EmptyLocalPart);
        }
        if local.chars().any(|c| is_forbidden(c) || c == '@') {
            return Err(AddressError::BadCharacter);
        }
        (local.to_owned(), domain)
    };
    let domain = match domain {
        None => None,
        Some("") => return Err(AddressError::EmptyDomain),
        Some(domain)
            if domain
                .chars()
                .any(|c| is_forbidden(c) && c != '[' && c != ']') =>
        {
            return Err(AddressError::BadCharacter);
        }
        Some(domain) if domain.contains('@') => return Err(AddressError::BadCharacter),
        Some(domain) => Some(domain.to_lowercase()),
    };
    Ok(Address { local, domain })
}

/// Reads a quoted string whose opening quote is already consumed; returns the unescaped
/// content and the text after the closing quote.
fn unquote(text: &str) -> Result<(String, &str), AddressError> {
    let mut content = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((content, &text[i + 1..])),
            // RFC 5321 quoted-pairSMTP: a backslash escapes a printable character only.
            '\\' => match chars.next() {
                Some((_, escaped)) if escaped.is_control() => {
                    return Err(AddressError::BadCharacter);
                }
                Some((_, escaped)) => content.push(escaped),
                None => break,
            },
            c if c.is_control() => return Err(AddressError::BadCharacter),
            c => content.push(c),
        }
    }
    Err(AddressError::UnterminatedQuote)
}

/// Characters not allowed in an unquoted local part or a domain.
fn is_forbidden(c: char) -> bool {
    c.is_whitespace() || c.is_control() || "<>()[],;:\\\"".contains(c)
}

/// `text` as is when it is a dot-atom (RFC 5322 §3.2.3, with the UTF-8 of RFC 6531/6532),
/// otherwise as a quoted string (`"` and `\` escaped, control characters turned into spaces).
/// Used for local parts and for `key=value` header fields.
pub(crate) fn dot_atom_or_quoted(text: &str) -> String {
    // Non-ASCII is atext (RFC 6531), except Unicode whitespace such as U+00A0, which the
    // parser refuses unquoted.
    let atext = |c: char| {
        c.is_ascii_alphanumeric()
            || "!#$%&'*+-/=?^_`{|}~".contains(c)
            || (!c.is_ascii() && !c.is_whitespace())
    };
    let dot_atom = !text.is_empty()
        && text
            .split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(|c| atext(c) && !c.is_control()));
    if dot_atom {
        return text.to_owned();
    }
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                quoted.push('\\');
                quoted.push(c);
            }
            c if c.is_control() => quoted.push(' '),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> (String, Option<String>, String) {
        let a = parse_address(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let address = a.address();
        (a.local, a.domain, address)
    }

    fn parts(local: &str, domain: Option<&str>, address: &str) -> (String, Option<String>, String) {
        (local.into(), domain.map(Into::into), address.into())
    }

    #[test]
    fn common_forms() {
        let expected = parts("User", Some("example.com"), "User@example.com");
        assert_eq!(ok("<User@Example.COM>"), expected);
        assert_eq!(ok("User@Example.COM"), expected);
        assert_eq!(ok("  <User@example.com>  "), expected);
        assert_eq!(ok("<postmaster>"), parts("postmaster", None, "postmaster"));
        assert_eq!(
            ok("user@[192.0.2.1]"),
            parts("user", Some("[192.0.2.1]"), "user@[192.0.2.1]")
        );
    }

    #[test]
    fn null_address() {
        for text in ["<>", "", "  "] {
            let a = parse_address(text).unwrap();
            assert!(a.is_null(), "{text:?}");
            assert_eq!(a.address(), "");
        }
        assert!(!parse_address("<a@b>").unwrap().is_null());
    }

    #[test]
    fn quoted_local_parts() {
        assert_eq!(
            ok(r#"<"john doe"@Example.com>"#),
            parts("john doe", Some("example.com"), r#""john doe"@example.com"#)
        );
        assert_eq!(
            ok(r#""user@bar"@example.com"#),
            parts("user@bar", Some("example.com"), r#""user@bar"@example.com"#)
        );
        assert_eq!(
            ok(r#""a\"b\\c"@x.org"#),
            parts(r#"a"b\c"#, Some("x.org"), r#""a\"b\\c"@x.org"#)
        );
        assert_eq!(
            ok(r#""plain"@x.org"#),
            parts("plain", Some("x.org"), "plain@x.org")
        );
        assert_eq!(
            ok(r#""only quoted""#),
            parts("only quoted", None, r#""only quoted""#)
        );
        // Found by the cargo-fuzz target `address`: a no-break space went out unquoted and did
        // not parse back.
        assert_eq!(
            ok("<\"a\u{a0}b\"@x.org>"),
            parts("a\u{a0}b", Some("x.org"), "\"a\u{a0}b\"@x.org")
        );
    }

    #[test]
    fn source_routes_are_dropped() {
        assert_eq!(
            ok("<@relay1.example,@relay2.example:jeff@Spec.org>"),
            parts("jeff", Some("spec.org"), "jeff@spec.org")
        );
        assert_eq!(
            ok("<@[192.0.2.1]:u@d.org>"),
            parts("u", Some("d.org"), "u@d.org")
        );
        assert_eq!(
            ok("@r.example:u@d.org"),
            parts("u", Some("d.org"), "u@d.org")
        );
    }

    #[test]
    fn errors() {
        for (text, error) in [
            ("<user@example.com", AddressError::UnbalancedBrackets),
            ("user@example.com>", AddressError::UnbalancedBrackets),
            (
                r#""unterminated@example.com"#,
                AddressError::UnterminatedQuote,
            ),
            (
                "<@relay1.example,jeff@spec.org>",
                AddressError::BadSourceRoute,
            ),
            ("<@:jeff@spec.org>", AddressError::BadSourceRoute),
            ("<@relay.example>", AddressError::BadSourceRoute),
            ("<@example.com>", AddressError::BadSourceRoute),
            ("<user@>", AddressError::EmptyDomain),
            ("<@>", AddressError::BadSourceRoute),
            ("<\"\">", AddressError::EmptyLocalPart),
            ("<a b@example.com>", AddressError::BadCharacter),
            ("<user@exa mple.com>", AddressError::BadCharacter),
            (r#""q"x@example.com"#, AddressError::BadCharacter),
            // Found by tests/it/fuzz.rs: an escaped control character read back differently.
            ("<\"a\\\0b\"@example.com>", AddressError::BadCharacter),
            ("<\"a\\\r\nb\"@example.com>", AddressError::BadCharacter),
            ("a<b@example.com", AddressError::BadCharacter),
        ] {
            assert_eq!(parse_address(text), Err(error), "{text}");
        }
        assert_eq!(AddressError::EmptyDomain.code(), "empty-domain");
    }

    #[test]
    fn split_at_last_at_sign() {
        assert_eq!(
            split("User@Example.COM"),
            ("User", Some("example.com".to_owned()))
        );
        assert_eq!(
            split(r#""a@b"@X.org"#),
            (r#""a@b""#, Some("x.org".to_owned()))
        );
        assert_eq!(split("postmaster"), ("postmaster", None));
    }
}
