//! Static DNS answers from zone files: the resolver of `luamilter test` and of case files, so a
//! test gives the same answers every time and needs no network (see docs/testing.md).
//!
//! A zone file is in BIND master-file syntax (`name [TTL] [IN] TYPE data`, `;` comments, `@`,
//! `$ORIGIN`, `$TTL`, `$INCLUDE`, parentheses), parsed by hickory's zone parser. Names without a
//! trailing dot are relative to `$ORIGIN`, or to the root when the file sets none, so
//! `mail.example.com IN A 192.0.2.25` means what it says; records need no TTL (300 when the
//! file sets no `$TTL`). Two directives of luamilter's own make lookups fail:
//! `$SERVFAIL NAME` (every lookup of NAME and the names under it answers SERVFAIL, as a list
//! that is down) and `$TIMEOUT NAME` (they time out, at once).
//!
//! Answers follow the usual rules closely enough for mail policies: the records of the asked
//! type; a CNAME followed (up to 8 links); a `*` wildcard answering for names that do not exist
//! below its parent; NODATA for a name that exists (it owns records, or names exist below it)
//! without records of that type; NXDOMAIN for every other name.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::proto::serialize::txt::Parser;

use super::dns::DnsError;

/// CNAME links followed at most.
const MAX_CNAME_LINKS: usize = 8;

/// A zone file that could not be read or parsed.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {message}")]
pub struct ZoneError {
    /// The file (or "inline zone").
    pub source_name: String,
    /// What is wrong.
    pub message: String,
}

/// How lookups under a `$SERVFAIL` or `$TIMEOUT` name fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    ServFail,
    Timeout,
}

/// Records loaded from zone files, answered without any network.
#[derive(Debug, Default)]
pub struct Zones {
    records: HashMap<(String, RecordType), Vec<RData>>,
    /// Every owner name and every name above one (empty non-terminals exist too).
    names: HashSet<String>,
    failures: Vec<(String, Failure)>,
}

/// A name as a lookup key: lowercase, no trailing dot.
fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// `name` and the names above it: `a.b.c` → `a.b.c`, `b.c`, `c`.
fn self_and_parents(name: &str) -> impl Iterator<Item = &str> {
    std::iter::successors(Some(name), |n| n.split_once('.').map(|(_, parent)| parent))
}

impl Zones {
    /// No records: every name is NXDOMAIN.
    pub fn new() -> Zones {
        Zones::default()
    }

    /// Loads a zone file, or every `*.zone` file of a directory (in name order).
    pub fn load(&mut self, path: &Path) -> Result<(), ZoneError> {
        let error = |message: String| ZoneError {
            source_name: path.display().to_string(),
            message,
        };
        if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| error(format!("cannot read the directory: {e}")))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|ext| ext == "zone"))
                .collect();
            files.sort();
            return files.iter().try_for_each(|file| self.load(file));
        }
        let text = std::fs::read_to_string(path).map_err(|e| error(format!("cannot read: {e}")))?;
        self.add_text(&text, Some(path))
    }

    /// Adds the records of zone text; `path` names it in errors and anchors `$INCLUDE`.
    pub fn add_text(&mut self, text: &str, path: Option<&Path>) -> Result<(), ZoneError> {
        let source_name =
            path.map_or_else(|| "inline zone".to_string(), |p| p.display().to_string());
        let error = |message: String| ZoneError {
            source_name: source_name.clone(),
            message,
        };
        // luamilter's directives become empty lines, so hickory's parser never sees them.
        let mut kept = String::with_capacity(text.len() + 16);
        if !text
            .lines()
            .any(|l| l.trim_start().to_ascii_uppercase().starts_with("$TTL"))
        {
            kept.push_str("$TTL 300\n");
        }
        for (number, line) in text.lines().enumerate() {
            let mut words = line.split_whitespace();
            let failure = match words.next().map(str::to_ascii_uppercase).as_deref() {
                Some("$SERVFAIL") => Some(Failure::ServFail),
                Some("$TIMEOUT") => Some(Failure::Timeout),
                _ => None,
            };
            match (failure, words.next()) {
                (None, _) => kept.push_str(line),
                (Some(failure), Some(name)) if !name.starts_with(';') => {
                    self.failures.push((key(name), failure));
                }
                (Some(_), _) => {
                    return Err(error(format!(
                        "line {}: the directive needs a name",
                        number + 1
                    )));
                }
            }
            kept.push('\n');
        }
        let (_, records) = Parser::new(kept, path.map(Path::to_path_buf), Some(Name::root()))
            .parse()
            .map_err(|e| error(e.to_string()))?;
        for (rr_key, set) in records {
            let owner = key(&rr_key.name.to_string());
            for parent in self_and_parents(&owner) {
                self.names.insert(parent.to_string());
            }
            let data = self.records.entry((owner, rr_key.record_type)).or_default();
            data.extend(set.records_without_rrsigs().map(|r| r.data.clone()));
        }
        Ok(())
    }

    /// Whether no record and no failure was loaded.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.failures.is_empty()
    }

    /// The answer to a query: the data of type `rtype` at `name` (never empty), or why none.
    pub fn answer(&self, name: &str, rtype: RecordType) -> Result<Vec<RData>, DnsError> {
        let mut name = key(name);
        for _ in 0..=MAX_CNAME_LINKS {
            if let Some(failure) = self.failure(&name) {
                return Err(match failure {
                    Failure::ServFail => DnsError::ServFail,
                    Failure::Timeout => DnsError::Timeout,
                });
            }
            let owner = self.owner(&name).ok_or(DnsError::NxDomain)?;
            if let Some(data) = self.records.get(&(owner.clone(), rtype)) {
                return Ok(data.clone());
            }
            match self.records.get(&(owner, RecordType::CNAME)) {
                Some(cname) if rtype != RecordType::CNAME => {
                    let Some(RData::CNAME(target)) = cname.first() else {
                        return Err(DnsError::NoData);
                    };
                    name = key(&target.0.to_ascii());
                }
                _ => return Err(DnsError::NoData),
            }
        }
        Err(DnsError::ServFail)
    }

    /// The failure configured for `name` or a name above it.
    fn failure(&self, name: &str) -> Option<Failure> {
        self.failures
            .iter()
            .find(|(at, _)| self_and_parents(name).any(|n| n == at))
            .map(|(_, failure)| *failure)
    }

    /// Where the records of `name` are kept: the name itself when it exists, else the wildcard
    /// of its closest existing parent, if there is one.
    fn owner(&self, name: &str) -> Option<String> {
        if self.names.contains(name) {
            return Some(name.to_string());
        }
        let encloser = self_and_parents(name)
            .skip(1)
            .find(|parent| self.names.contains(*parent))
            .unwrap_or("");
        let wildcard = if encloser.is_empty() {
            "*".to_string()
        } else {
            format!("*.{encloser}")
        };
        self.names.contains(&wildcard).then_some(wildcard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZONE: &str = r#"
; a test zone
$ORIGIN example.test.
@        IN A     192.0.2.10
@        IN TXT   "v=spf1 ip4:192.0.2.0/24 " "-all"
mail     300 IN A 192.0.2.25
www      IN CNAME example.test.
a.b      IN A     192.0.2.30
*.wild   IN TXT   "wildcard"
$SERVFAIL down.example.test.
25.2.0.192.in-addr.arpa. IN PTR mail.example.test.
"#;

    fn zones() -> Zones {
        let mut zones = Zones::new();
        zones.add_text(ZONE, None).unwrap();
        zones
            .add_text("other.test IN MX 10 mx.other.test", None)
            .unwrap();
        zones
    }

    fn a(zones: &Zones, name: &str) -> Result<Vec<String>, DnsError> {
        zones
            .answer(name, RecordType::A)
            .map(|d| d.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn answers_records_cnames_wildcards_and_failures() {
        let z = zones();
        assert_eq!(a(&z, "Mail.Example.Test.").unwrap(), ["192.0.2.25"]);
        assert_eq!(a(&z, "www.example.test").unwrap(), ["192.0.2.10"]);
        assert_eq!(a(&z, "b.example.test"), Err(DnsError::NoData));
        assert_eq!(a(&z, "mail.example.test.other"), Err(DnsError::NxDomain));
        assert_eq!(a(&z, "nope.example.test"), Err(DnsError::NxDomain));
        assert_eq!(a(&z, "x.y.down.example.test"), Err(DnsError::ServFail));
        let txt = z
            .answer("anything.wild.example.test", RecordType::TXT)
            .unwrap();
        assert_eq!(txt.len(), 1);
        assert_eq!(
            z.answer("wild.example.test", RecordType::TXT),
            Err(DnsError::NoData)
        );
        assert_eq!(z.answer("other.test", RecordType::MX).unwrap().len(), 1);
        assert_eq!(
            z.answer("25.2.0.192.in-addr.arpa.", RecordType::PTR)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn errors_name_the_source() {
        let mut z = Zones::new();
        let e = z.add_text("x IN BOGUS 1", None).unwrap_err();
        assert!(e.to_string().starts_with("inline zone: "), "{e}");
        let e = z.add_text("$SERVFAIL\n", None).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        let e = z.load(Path::new("/nonexistent/x.zone")).unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
    }
}
