//! Site facts (`[site]`): who is internal, trusted or an internal MTA, the site's own domains,
//! HELO names that lie, delayed rejects and the access map. Built with each generation (so it
//! reloads with the config) and read-only for policies, which may also read list files, but
//! only from the config file's directory and the policy directories ([`Site::read_list`]).

use crate::services::{
    access::{AccessError, AccessMap, EntryError},
    net::{IpSet, IpSetError},
};
use serde::Deserialize;
use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
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
    /// The base URL of templated replies: their first line is `<errors_url>/<template>?<params>`.
    pub errors_url: Option<String>,
    /// A Maildir for the copies policies keep of messages they changed or could not read
    /// (`milter.archive.keep`, the classic `tempdir`); relative to the config file. None: off.
    pub save_dir: Option<PathBuf>,
    /// The policy directories, resolved (not a `[site]` key: [`Config::parse`] copies them
    /// from `[policies] dirs`). List files may be read there and in the config file's
    /// directory.
    ///
    /// [`Config::parse`]: crate::config::Config::parse
    #[serde(skip)]
    pub policy_dirs: Vec<PathBuf>,
}

/// A problem in `[site]`.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    /// A bad entry in `internal_networks`, `trusted_relays` or `internal_mtas`.
    #[error("[site] {key}: {source}")]
    Networks {
        /// The key.
        key: &'static str,
        /// The bad entry.
        source: IpSetError,
    },
    /// The access file cannot be read, or has bad lines.
    #[error(transparent)]
    AccessFile(#[from] AccessError),
    /// A bad entry in `[site.access]`.
    #[error("{at}: [site.access] {error}")]
    Access {
        /// The config file.
        at: String,
        /// What is wrong with the entry.
        error: EntryError,
    },
    /// `errors_url` is not an `http://` or `https://` URL without spaces, `?` or `#`.
    #[error(
        "{at}: [site] errors_url {url:?}: not an http:// or https:// URL without spaces, '?' or '#'"
    )]
    ErrorsUrl {
        /// The config file.
        at: String,
        /// The value.
        url: String,
    },
}

/// `errors_url` without its trailing `/`, if it is a plain http(s) URL.
fn errors_url(url: &str) -> Option<String> {
    let plain = (url.starts_with("http://") || url.starts_with("https://"))
        && !url.contains(|c: char| c.is_whitespace() || c.is_control() || c == '?' || c == '#');
    plain.then(|| url.trim_end_matches('/').to_string())
}

/// Every problem [`Site::build`] found.
#[derive(Debug)]
pub struct SiteErrors(pub Vec<SiteError>);

/// The engine collects load problems as text, one per line.
impl From<SiteErrors> for Vec<String> {
    fn from(errors: SiteErrors) -> Self {
        errors.0.iter().map(ToString::to_string).collect()
    }
}

/// Why [`Site::read_list`] has no entries to give. Policies see [`ListError::code`].
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// The file does not resolve into a directory lists may be read from.
    #[error(
        "{}: outside the directories list files are read from ({})",
        path.display(),
        allowed.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    Outside {
        /// The path asked for, joined to the config file's directory.
        path: PathBuf,
        /// The config file's directory and the policy directories.
        allowed: Vec<PathBuf>,
    },
    /// The file cannot be read (it does not exist, or reading fails).
    #[error("{}: cannot read: {source}", path.display())]
    Unreadable {
        /// The path asked for, joined to the config file's directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl ListError {
    /// The short stable word policies branch on: `"outside"`, `"missing"` or `"unreadable"`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Outside { .. } => "outside",
            Self::Unreadable { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                "missing"
            }
            Self::Unreadable { .. } => "unreadable",
        }
    }
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
    /// The base URL of templated replies, without a trailing `/`.
    pub errors_url: Option<String>,
    /// The access map.
    pub access: AccessMap,
    /// The directory relative list paths are resolved against: the config file's.
    pub base_dir: PathBuf,
    /// The policy directories: list files may be read there too.
    pub policy_dirs: Vec<PathBuf>,
}

fn ip_set(key: &'static str, entries: &[String], errors: &mut Vec<SiteError>) -> IpSet {
    IpSet::new(entries).unwrap_or_else(|source| {
        errors.push(SiteError::Networks { key, source });
        IpSet::default()
    })
}

impl Site {
    /// Builds the site facts; relative paths are relative to `base`. Returns every problem.
    pub fn build(config: &SiteConfig, base: &Path, at: &str) -> Result<Site, SiteErrors> {
        let mut errors = Vec::new();
        let mut access = AccessMap::default();
        if let Some(path) = &config.access_file {
            let path = if path.is_absolute() {
                path.clone()
            } else {
                base.join(path)
            };
            if let Err(es) = access.add_file(&path) {
                errors.extend(es.into_iter().map(SiteError::from));
            }
        }
        for (key, value) in &config.access {
            if let Err(error) = access.insert(key, value) {
                errors.push(SiteError::Access {
                    at: at.to_string(),
                    error,
                });
            }
        }
        let errors_url = config.errors_url.as_deref().and_then(|url| {
            let valid = errors_url(url);
            if valid.is_none() {
                errors.push(SiteError::ErrorsUrl {
                    at: at.to_string(),
                    url: url.to_string(),
                });
            }
            valid
        });
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
            errors_url,
            access,
            base_dir: base.to_path_buf(),
            policy_dirs: config.policy_dirs.clone(),
        };
        if errors.is_empty() {
            Ok(site)
        } else {
            Err(SiteErrors(errors))
        }
    }

    /// The entries of list file `path` (see [`list_entries`]), for a policy. A relative `path`
    /// is relative to the config file's directory. With every symlink resolved, the file must
    /// lie in that directory or in a policy directory: policies have no other file access.
    pub fn read_list(&self, path: &str) -> Result<Vec<String>, ListError> {
        let path = self.base_dir.join(path);
        let inside = real_path(&path).filter(|real| {
            self.list_dirs()
                .filter_map(|dir| dir.canonicalize().ok())
                .any(|dir| real.starts_with(dir))
        });
        let Some(real) = inside else {
            return Err(ListError::Outside {
                path,
                allowed: self.list_dirs().map(Path::to_path_buf).collect(),
            });
        };
        match std::fs::read(&real) {
            Ok(bytes) => Ok(list_entries(&bytes)),
            Err(source) => Err(ListError::Unreadable { path, source }),
        }
    }

    /// The text of message template `name` (a file name without `.txt`: letters, digits, `_`,
    /// `-`): `templates/<name>.txt` in the first policy directory that has it, else the stock
    /// pack's; `None` when neither has it (or `name` is not such a name). A file that exists but
    /// cannot be read is logged and skipped.
    pub fn template(&self, name: &str) -> Option<String> {
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return None;
        }
        let relative = format!("templates/{name}.txt");
        for dir in &self.policy_dirs {
            let path = dir.join(&relative);
            match std::fs::read_to_string(&path) {
                Ok(text) => return Some(text),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => tracing::warn!("template {}: cannot read: {error}", path.display()),
            }
        }
        crate::stock::template(name).map(str::to_string)
    }

    /// The directories list files may be read from: the config file's, then the policy ones.
    fn list_dirs(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.base_dir.as_path())
            .chain(self.policy_dirs.iter().map(PathBuf::as_path))
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

    /// The `internal_domains` entries as configured (lowercased; `*.` covers subdomains).
    pub fn internal_domains(&self) -> &[String] {
        &self.internal_domains
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

/// `path` with every symlink resolved, as far as it exists: the canonical form of its longest
/// existing ancestor, followed by the names after it (so a missing file still has a place to
/// check). `None` when no ancestor exists or a `..` follows a missing part.
fn real_path(path: &Path) -> Option<PathBuf> {
    let mut missing = Vec::new();
    let mut current = path;
    loop {
        if let Ok(real) = current.canonicalize() {
            return Some(
                missing
                    .iter()
                    .rev()
                    .fold(real, |real, name| real.join(name)),
            );
        }
        missing.push(current.file_name()?);
        current = current.parent()?;
    }
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
        Site::build(&config, Path::new("."), "c.toml").map_err(Vec::from)
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
    fn errors_url_is_a_plain_http_url() {
        let s = site(r#"errors_url = "https://www.example.org/errors/""#).unwrap();
        assert_eq!(
            s.errors_url.as_deref(),
            Some("https://www.example.org/errors")
        );
        assert_eq!(site("").unwrap().errors_url, None);
        for bad in [
            "ftp://x.example",
            "https://x.example/a b",
            "http://x.example/?t=",
        ] {
            let errors = site(&format!("errors_url = {bad:?}")).unwrap_err();
            assert_eq!(errors.len(), 1, "{bad}");
            assert!(
                errors[0].starts_with("c.toml: [site] errors_url"),
                "{errors:?}"
            );
        }
    }

    #[test]
    fn a_template_in_a_policy_dir_shadows_the_stock_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("templates")).unwrap();
        std::fs::write(dir.path().join("templates/neutral.txt"), "ours\n").unwrap();
        let mut s = site("").unwrap();
        let stock = s.template("neutral").unwrap();
        assert!(stock.contains("THIS IS A WARNING MESSAGE ONLY."), "{stock}");
        s.policy_dirs = vec![dir.path().join("absent"), dir.path().to_path_buf()];
        assert_eq!(s.template("neutral").as_deref(), Some("ours\n"));
        assert!(s.template("strike3").unwrap().contains("PTR"));
        for missing in ["nothing", "../neutral", "", "templates/neutral"] {
            assert_eq!(s.template(missing), None, "{missing:?}");
        }
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
        let errs = site(
            "internal_networks = [\"10.0.0.0/33\"]\n[access]\n\"SPF-Fail:x.com\" = \"MAYBE\"\n",
        )
        .unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs.iter().any(|e| e.contains("internal_networks")),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.contains("unknown value \"MAYBE\"")),
            "{errs:?}"
        );
    }

    /// A config dir and a policy dir side by side, a file in each, and one outside both.
    struct Dirs {
        root: tempfile::TempDir,
        site: Site,
    }

    fn dirs() -> Dirs {
        let root = tempfile::TempDir::new().unwrap();
        for dir in ["etc", "policies", "outside"] {
            std::fs::create_dir(root.path().join(dir)).unwrap();
        }
        std::fs::write(root.path().join("etc/words"), "from the config dir\n").unwrap();
        std::fs::write(root.path().join("policies/words"), "from a policy dir\n").unwrap();
        std::fs::write(root.path().join("outside/secret"), "secret\n").unwrap();
        let site = Site {
            base_dir: root.path().join("etc"),
            policy_dirs: vec![root.path().join("policies")],
            ..Site::default()
        };
        Dirs { root, site }
    }

    #[test]
    fn read_list_reads_in_the_config_and_policy_dirs() {
        let Dirs { root, site } = dirs();
        assert_eq!(site.read_list("words").unwrap(), ["from the config dir"]);
        assert_eq!(
            site.read_list("../policies/words").unwrap(),
            ["from a policy dir"]
        );
        let absolute = root.path().join("policies/words");
        assert_eq!(
            site.read_list(absolute.to_str().unwrap()).unwrap(),
            ["from a policy dir"]
        );
        std::os::unix::fs::symlink("../policies/words", root.path().join("etc/link")).unwrap();
        assert_eq!(site.read_list("link").unwrap(), ["from a policy dir"]);
        assert_eq!(site.read_list("absent").unwrap_err().code(), "missing");
        assert_eq!(site.read_list(".").unwrap_err().code(), "unreadable");
    }

    #[test]
    fn read_list_refuses_what_resolves_elsewhere() {
        let Dirs { root, site } = dirs();
        std::os::unix::fs::symlink("../outside/secret", root.path().join("etc/link")).unwrap();
        std::os::unix::fs::symlink("../outside", root.path().join("policies/out")).unwrap();
        for path in [
            "/etc/passwd",
            "../outside/secret",
            "../outside/absent",
            "../../../../../../etc/passwd",
            "link",
            "../policies/out/secret",
            "absent/../../outside/secret",
        ] {
            let error = site.read_list(path).unwrap_err();
            assert_eq!(error.code(), "outside", "{path}: {error}");
        }
        let text = site.read_list("link").unwrap_err().to_string();
        let expected = format!(
            "{}: outside the directories list files are read from ({}, {})",
            root.path().join("etc/link").display(),
            root.path().join("etc").display(),
            root.path().join("policies").display()
        );
        assert_eq!(text, expected);
    }
}
