//! Site facts (`[site]`): who is internal, trusted or an internal MTA, the site's own domains,
//! HELO names that lie, delayed rejects and the access map. Built with each generation (so it
//! reloads with the config) and read-only for policies.

use crate::services::{access::AccessMap, net::IpSet};
use serde::Deserialize;
use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    path::PathBuf,
};

/// `[site]` in the config file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SiteConfig {
    /// This receiver's host name; default: the MTA's `j` macro, else the system host name.
    pub hostname: Option<String>,
    /// Networks whose clients are the site's own (IPs and CIDRs, IPv4 and IPv6).
    pub internal_networks: Vec<String>,
    /// Relays whose mail is trusted (never banned, not SPF-checked, not greylisted).
    pub trusted_relays: Vec<String>,
    /// Internal hosts that are MTAs (allowed to send DSNs).
    pub internal_mtas: Vec<String>,
    /// The site's own mail domains: `example.com` or `*.example.com` (subdomains).
    pub internal_domains: Vec<String>,
    /// HELO names that only liars use (the site's own names, big providers').
    pub hello_blacklist: Vec<String>,
    /// Hold rejects decided at connect, HELO or MAIL until DATA (so recipients are logged).
    pub delay_reject: bool,
    /// An access file in sendmail access-map format.
    pub access_file: Option<PathBuf>,
    /// Access-map entries: `"SPF-Neutral:aol.com" = "REJECT"`.
    pub access: BTreeMap<String, String>,
}

/// The site facts of one generation.
#[derive(Debug, Default)]
pub struct Site {
    /// The configured receiver name, if any.
    pub hostname: Option<String>,
    internal: IpSet,
    trusted: IpSet,
    mtas: IpSet,
    internal_domains: Vec<String>,
    hello_blacklist: HashSet<String>,
    /// Whether rejects at connect, HELO and MAIL wait for DATA.
    pub delay_reject: bool,
    /// The access map.
    pub access: AccessMap,
    /// The directory relative list paths are resolved against: the config file's.
    pub base_dir: PathBuf,
}

fn ip_set(what: &str, entries: &[String], errors: &mut Vec<String>) -> IpSet {
    IpSet::new(entries).unwrap_or_else(|e| {
        errors.push(format!("[site] {what}: {e}"));
        IpSet::default()
    })
}

impl Site {
    /// Builds the site facts; relative paths are relative to `base`. Returns every problem.
    pub fn build(
        config: &SiteConfig,
        base: &std::path::Path,
        at: &str,
    ) -> Result<Site, Vec<String>> {
        let mut errors = Vec::new();
        let mut access = AccessMap::default();
        if let Some(path) = &config.access_file {
            let path = if path.is_absolute() {
                path.clone()
            } else {
                base.join(path)
            };
            if let Err(mut es) = access.add_file(&path) {
                errors.append(&mut es);
            }
        }
        for (key, value) in &config.access {
            if let Err(e) = access.insert(key, value) {
                errors.push(format!("{at}: [site.access] {e}"));
            }
        }
        let site = Site {
            hostname: config.hostname.clone().filter(|h| !h.is_empty()),
            internal: ip_set("internal_networks", &config.internal_networks, &mut errors),
            trusted: ip_set("trusted_relays", &config.trusted_relays, &mut errors),
            mtas: ip_set("internal_mtas", &config.internal_mtas, &mut errors),
            internal_domains: config
                .internal_domains
                .iter()
                .map(|d| d.to_ascii_lowercase())
                .collect(),
            hello_blacklist: config
                .hello_blacklist
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            delay_reject: config.delay_reject,
            access,
            base_dir: base.to_path_buf(),
        };
        if errors.is_empty() {
            Ok(site)
        } else {
            Err(errors)
        }
    }

    /// Whether `ip` is in `internal_networks`.
    pub fn internal(&self, ip: IpAddr) -> bool {
        self.internal.contains(ip)
    }

    /// Whether `ip` is a trusted relay.
    pub fn trusted(&self, ip: IpAddr) -> bool {
        self.trusted.contains(ip)
    }

    /// Whether `ip` is one of the internal MTAs.
    pub fn internal_mta(&self, ip: IpAddr) -> bool {
        self.mtas.contains(ip)
    }

    /// Whether `domain` is one of the site's own: an exact entry, or under a `*.` entry.
    pub fn internal_domain(&self, domain: &str) -> bool {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        self.internal_domains
            .iter()
            .any(|entry| match entry.strip_prefix("*.") {
                Some(parent) => domain.ends_with(&format!(".{parent}")),
                None => *entry == domain,
            })
    }

    /// Whether `helo` is in `hello_blacklist` (case-insensitive).
    pub fn hello_blacklisted(&self, helo: &str) -> bool {
        self.hello_blacklist
            .contains(&helo.trim_end_matches('.').to_ascii_lowercase())
    }
}

/// Whether `ip` is this host: 127.0.0.0/8 or ::1 (IPv4-mapped forms included).
pub fn is_localhost(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// The verified client name from the MTA's connect host name: `None` for `unknown`, an empty
/// name, or a bracketed address literal (Sendmail's way of saying "no PTR").
pub fn verified_ptr(hostname: &str) -> Option<String> {
    let name = hostname.trim();
    if name.is_empty() || name.eq_ignore_ascii_case("unknown") || name.starts_with('[') {
        None
    } else {
        Some(name.trim_end_matches('.').to_string())
    }
}

/// The entries of a list file: one per line, trimmed, without empty lines and `#` comment
/// lines. A file that is not UTF-8 is read as Latin-1 (older keyword lists often are).
pub fn list_entries(bytes: &[u8]) -> Vec<String> {
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text.to_string(),
        Err(_) => bytes.iter().map(|&b| char::from(b)).collect(),
    };
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// The system's host name.
pub fn system_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into the buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(text: &str) -> Result<Site, Vec<String>> {
        let config: SiteConfig = toml::from_str(text).unwrap();
        Site::build(&config, std::path::Path::new("."), "c.toml")
    }

    #[test]
    fn classifies_clients_and_domains() {
        let s = site(
            r#"internal_networks = ["192.168.0.0/16", "2001:db8::/32"]
trusted_relays = ["198.51.100.7"]
internal_domains = ["example.org", "*.example.net"]
hello_blacklist = ["Mail.Example.org"]"#,
        )
        .unwrap();
        assert!(s.internal("192.168.4.5".parse().unwrap()));
        assert!(s.internal("::ffff:192.168.4.5".parse().unwrap()));
        assert!(s.internal("2001:db8::1".parse().unwrap()));
        assert!(!s.internal("10.0.0.1".parse().unwrap()));
        assert!(s.trusted("198.51.100.7".parse().unwrap()));
        assert!(s.internal_domain("EXAMPLE.org"));
        assert!(!s.internal_domain("sub.example.org"));
        assert!(s.internal_domain("a.b.example.net"));
        assert!(!s.internal_domain("example.net"));
        assert!(s.hello_blacklisted("mail.example.org."));
        assert!(is_localhost("127.0.0.2".parse().unwrap()));
        assert!(is_localhost("::1".parse().unwrap()));
        assert!(is_localhost("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_localhost("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn verified_ptr_ignores_placeholders() {
        assert_eq!(verified_ptr("unknown"), None);
        assert_eq!(verified_ptr("[192.0.2.1]"), None);
        assert_eq!(verified_ptr(""), None);
        assert_eq!(
            verified_ptr("mail.example.com."),
            Some("mail.example.com".into())
        );
    }

    #[test]
    fn list_entries_skip_blanks_and_comments() {
        assert_eq!(
            list_entries(b"# words\n  Detox \r\n\n\tWhite Teeth\n#x\n"),
            ["Detox", "White Teeth"]
        );
        assert_eq!(list_entries(b"caf\xe9\n"), ["caf\u{e9}"]);
        assert!(list_entries(b"").is_empty());
    }

    #[test]
    fn bad_entries_are_reported() {
        let errs =
            site("internal_networks = [\"10.0.0.0/33\"]\n[access]\n\"SPF-Fail:x.com\" = \"CBV\"\n")
                .unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs.iter().any(|e| e.contains("internal_networks")),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.contains("call-back verification")),
            "{errs:?}"
        );
    }
}
