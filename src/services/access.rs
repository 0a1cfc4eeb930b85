//! The access map: sendmail-style per-identity policy (`SPF-Neutral:aol.com REJECT`), read from
//! a text file the admins of the classic milter already keep and/or from `[site.access]`.
//!
//! Lookup order for `lookup(tag, identity)` (the first hit wins): `tag:identity` as given,
//! `tag:domain` (the part after the last `@`, lowercased), `tag:.parent` for each shorter
//! parent of the domain (a leading dot matches subdomains only), `tag:` (the tag's default),
//! then the bare `tag`. Tags and domains match case-insensitively; a local part keeps its case.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

/// The values the stock policies understand. `CBV` and `DSN` ask for a call-back
/// verification of the sender at end of message (the `cbv` stock policy).
const VALUES: &[&str] = &["OK", "WHITELIST", "REJECT", "BAN", "TEMPFAIL", "CBV", "DSN"];

/// Tags whose values luamilter's stock policies act on, and so are checked at load. Other tags
/// (sendmail's own `Connect:`, `From:`, `To:` with `RELAY` and the like, or a site policy's own
/// tags) are kept as written: an access file shared with sendmail loads as it is.
fn checked_tag(key: &str) -> bool {
    let tag = key.split(':').next().unwrap_or("").to_ascii_lowercase();
    tag.starts_with("spf-")
        || tag.starts_with("helo-")
        || tag.starts_with("dkim-")
        || tag == "smtp-auth"
}

/// The `DKIM-<result>` tags the dkim stock policy looks up (RFC 8601 results; `None`: no passing
/// signature of the From domain).
const DKIM_TAGS: &[&str] = &[
    "dkim-pass",
    "dkim-fail",
    "dkim-policy",
    "dkim-neutral",
    "dkim-permerror",
    "dkim-temperror",
    "dkim-none",
];

/// An access-map entry is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// The key is empty.
    #[error("an entry needs a key")]
    NoKey,
    /// The value is empty.
    #[error("{key:?} has no value (use one of {})", VALUES.join(", "))]
    NoValue {
        /// The entry's key.
        key: String,
    },
    /// A `DKIM-` tag that names no DKIM result.
    #[error(
        "{key:?}: unknown tag (DKIM tags: DKIM-Pass, DKIM-Fail, DKIM-Policy, DKIM-Neutral, DKIM-PermError, DKIM-TempError, DKIM-None)"
    )]
    UnknownTag {
        /// The entry's key.
        key: String,
    },
    /// `CBV` or `DSN` for a tag other than `SPF-*` and `HELO-*`.
    #[error("{key:?}: {value} (a call-back) applies to SPF-* and HELO-* entries only")]
    CallBackTag {
        /// The entry's key.
        key: String,
        /// The value given.
        value: String,
    },
    /// A value the stock policies do not know, for a tag they act on.
    #[error("{key:?}: unknown value {value:?} (values: {}; case matters)", VALUES.join(", "))]
    UnknownValue {
        /// The entry's key.
        key: String,
        /// The value given.
        value: String,
    },
}

/// An access file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// A line holds an entry that is refused.
    #[error("{origin}:{line}: {error}")]
    Line {
        /// The file (or other text) the line is from.
        origin: String,
        /// The line number, from 1.
        line: usize,
        /// What is wrong with the entry.
        error: EntryError,
    },
    /// The file could not be read.
    #[error("{}: cannot read the access file: {source}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// A loaded access map.
#[derive(Debug, Default, Clone)]
pub struct AccessMap {
    entries: HashMap<String, String>,
}

impl AccessMap {
    /// Parses access-file text (`Key<whitespace>Value` lines, `#` comments, blank lines; a
    /// trailing NUL on keys or values, as `postmap -N` writes, is ignored) named `origin` for
    /// messages, and adds it. Returns every problem (`origin:line: message`).
    pub fn add_text(&mut self, origin: &str, text: &str) -> Result<(), Vec<AccessError>> {
        let mut errors = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.splitn(2, char::is_whitespace);
            let key = parts.next().unwrap_or("").trim_end_matches('\0');
            let value = parts
                .next()
                .map(str::trim)
                .unwrap_or("")
                .trim_end_matches('\0');
            if let Err(error) = self.insert(key, value) {
                errors.push(AccessError::Line {
                    origin: origin.to_string(),
                    line: n + 1,
                    error,
                });
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Reads and adds an access file.
    pub fn add_file(&mut self, path: &Path) -> Result<(), Vec<AccessError>> {
        let text = std::fs::read_to_string(path).map_err(|source| {
            vec![AccessError::Unreadable {
                path: path.to_path_buf(),
                source,
            }]
        })?;
        self.add_text(&path.display().to_string(), &text)
    }

    /// Adds one entry, checking its value.
    pub fn insert(&mut self, key: &str, value: &str) -> Result<(), EntryError> {
        if key.is_empty() {
            return Err(EntryError::NoKey);
        }
        if value.is_empty() {
            return Err(EntryError::NoValue { key: key.into() });
        }
        if checked_tag(key) {
            let tag = key.split(':').next().unwrap_or("").to_ascii_lowercase();
            if tag.starts_with("dkim-") && !DKIM_TAGS.contains(&tag.as_str()) {
                return Err(EntryError::UnknownTag { key: key.into() });
            }
            if matches!(value, "CBV" | "DSN") && (tag == "smtp-auth" || tag.starts_with("dkim-")) {
                return Err(EntryError::CallBackTag {
                    key: key.into(),
                    value: value.into(),
                });
            }
            if !VALUES.contains(&value) {
                return Err(EntryError::UnknownValue {
                    key: key.into(),
                    value: value.into(),
                });
            }
        }
        self.entries.insert(normalise_key(key), value.to_string());
        Ok(())
    }

    /// The entry for `tag` and `identity` by the lookup order of the module docs, if any.
    pub fn lookup(&self, tag: &str, identity: &str) -> Option<&str> {
        let tag = tag.trim_end_matches(':').to_ascii_lowercase();
        let domain = identity
            .rsplit_once('@')
            .map_or(identity, |(_, d)| d)
            .to_ascii_lowercase();
        let get = |suffix: &str| {
            self.entries
                .get(&format!("{tag}:{suffix}"))
                .map(String::as_str)
        };
        if let Some(v) = get(&normalise_identity(identity)) {
            return Some(v);
        }
        if let Some(v) = get(&domain) {
            return Some(v);
        }
        let mut rest = domain.as_str();
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(v) = get(&format!(".{parent}")) {
                return Some(v);
            }
            rest = parent;
        }
        get("").or_else(|| self.entries.get(&tag).map(String::as_str))
    }
}

/// Keys compare with a lowercase tag and domain; a local part keeps its case.
fn normalise_key(key: &str) -> String {
    match key.split_once(':') {
        Some((tag, suffix)) => format!(
            "{}:{}",
            tag.to_ascii_lowercase(),
            normalise_identity(suffix)
        ),
        None => key.to_ascii_lowercase(),
    }
}

fn normalise_identity(identity: &str) -> String {
    match identity.rsplit_once('@') {
        Some((local, domain)) => format!("{local}@{}", domain.to_ascii_lowercase()),
        None => identity.to_ascii_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The classic milter's test access file (milter-app.md 4.2).
    const ACCESS: &str = "\
# test access file
SPF-Pass:example.com\tOK
SPF-Neutral:example.com\tREJECT
HELO-Neutral:example.com        OK
SPF-Permerror:foo@bad.example.com\tOK
SPF-Permerror:\tREJECT
SMTP-Auth:good@example.com      OK
SMTP-Auth:example.com      REJECT
SMTP-Auth:bad@localhost.localdomain     REJECT
SMTP-Test:      REJECT\0
SMTP-Test:.baz.com      WHITELIST
";

    fn map() -> AccessMap {
        let mut m = AccessMap::default();
        m.add_text("access", ACCESS).unwrap();
        m
    }

    #[test]
    fn the_documented_lookup_table_holds() {
        let m = map();
        assert_eq!(m.lookup("smtp-auth", "good@example.com"), Some("OK"));
        assert_eq!(m.lookup("smtp-auth", "bad@example.com"), Some("REJECT"));
        assert_eq!(
            m.lookup("smtp-auth", "bad@bad.example.com"),
            None,
            "no subdomain fallback without a dot"
        );
        assert_eq!(m.lookup("smtp-test", "any@random.com"), Some("REJECT"));
        assert_eq!(m.lookup("smtp-test", "good@example.com"), Some("REJECT"));
        assert_eq!(m.lookup("smtp-test", "foo@bar.baz.com"), Some("WHITELIST"));
        assert_eq!(
            m.lookup("SMTP-Test", "foo@baz.com"),
            Some("REJECT"),
            ".baz.com is for subdomains only"
        );
        assert_eq!(m.lookup("SPF-Permerror", "foo@bad.example.com"), Some("OK"));
        assert_eq!(
            m.lookup("SPF-Permerror", "bar@bad.example.com"),
            Some("REJECT")
        );
        assert_eq!(m.lookup("SPF-Neutral", "x@EXAMPLE.com"), Some("REJECT"));
        assert_eq!(m.lookup("SPF-Fail", "x@example.com"), None);
        assert_eq!(
            m.lookup("smtp-auth", "bad@localhost.localdomain"),
            Some("REJECT")
        );
        assert_eq!(m.lookup("HELO-Neutral", "example.com"), Some("OK"));
    }

    #[test]
    fn sendmail_entries_load_as_written() {
        let mut m = AccessMap::default();
        m.add_text(
            "access",
            "Connect:localhost RELAY\nFrom:spammer@example.com REJECT\nSMTP-Test: WILDCARD\n",
        )
        .unwrap();
        assert_eq!(m.lookup("connect", "localhost"), Some("RELAY"));
        assert_eq!(m.lookup("SMTP-Test", "x@y.z"), Some("WILDCARD"));
    }

    #[test]
    fn local_parts_keep_their_case() {
        let mut m = AccessMap::default();
        m.insert("SPF-Fail:Abeb@Adelphia.net", "OK").unwrap();
        assert_eq!(m.lookup("spf-fail", "Abeb@adelphia.NET"), Some("OK"));
        assert_eq!(m.lookup("spf-fail", "abeb@adelphia.net"), None);
    }

    #[test]
    fn dkim_tags_are_checked() {
        let mut map = AccessMap::default();
        assert!(map.insert("DKIM-None:paypal.com", "REJECT").is_ok());
        assert!(map.insert("DKIM-Pass:example.org", "WHITELIST").is_ok());
        assert!(matches!(
            map.insert("DKIM-Bogus:example.org", "REJECT"),
            Err(EntryError::UnknownTag { .. })
        ));
        assert!(matches!(
            map.insert("DKIM-Fail:example.org", "DSN"),
            Err(EntryError::CallBackTag { .. })
        ));
        assert!(matches!(
            map.insert("DKIM-Fail:example.org", "reject"),
            Err(EntryError::UnknownValue { .. })
        ));
        assert_eq!(map.lookup("DKIM-None", "paypal.com"), Some("REJECT"));
    }

    #[test]
    fn call_back_values_load_for_spf_and_helo_tags() {
        let mut m = AccessMap::default();
        m.add_text(
            "access",
            "SPF-Neutral:\tCBV\nSPF-Softfail: DSN\nSPF-Fail:abeb@adelphia.net DSN\nHELO-Fail:.example.net CBV\n",
        )
        .unwrap();
        assert_eq!(m.lookup("SPF-Neutral", "x@aol.com"), Some("CBV"));
        assert_eq!(m.lookup("spf-softfail", "x@ebay.com"), Some("DSN"));
        assert_eq!(m.lookup("SPF-Fail", "abeb@adelphia.net"), Some("DSN"));
        assert_eq!(m.lookup("SPF-Fail", "other@adelphia.net"), None);
        assert_eq!(m.lookup("HELO-Fail", "mx.example.net"), Some("CBV"));
        assert_eq!(
            m.insert("SMTP-Auth:x@y.z", "DSN").unwrap_err().to_string(),
            "\"SMTP-Auth:x@y.z\": DSN (a call-back) applies to SPF-* and HELO-* entries only"
        );
    }

    #[test]
    fn an_unreadable_file_is_named() {
        let errs = AccessMap::default()
            .add_file(Path::new("/nonexistent/access"))
            .unwrap_err();
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0]
                .to_string()
                .starts_with("/nonexistent/access: cannot read the access file: "),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn bad_lines_are_reported_with_their_line() {
        let mut m = AccessMap::default();
        let errs = m
            .add_text(
                "access",
                "SPF-Pass:a.com OK\nSPF-Neutral:b.com\nSPF-Fail:c.com cbv\nHELO-Fail:y reject\n",
            )
            .unwrap_err();
        assert!(matches!(
            errs[1],
            AccessError::Line {
                line: 3,
                error: EntryError::UnknownValue { .. },
                ..
            }
        ));
        let errs: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(
            errs[0].starts_with("access:2: ") && errs[0].contains("no value"),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("access:3: ") && errs[1].contains("unknown value \"cbv\""),
            "{errs:?}"
        );
        assert!(
            errs[2].starts_with("access:4: ") && errs[2].contains("unknown value"),
            "{errs:?}"
        );
    }
}
