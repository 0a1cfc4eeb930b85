//! Signed envelope senders: SRS (the Sender Rewriting Scheme, for mail the site forwards) in the
//! format of libsrs2 and postsrsd, and BATV `prvs=` tags (Bounce Address Tag Validation, for the
//! site's own users), both keyed by a list of secrets: the first signs, every one verifies, so
//! secrets rotate by putting the new one first.
//!
//! SRS0 `SRS0=HHHH=TT=orig.domain=orig.local@alias.domain`: `HHHH` is the start of the base64
//! HMAC-SHA1 of the lowercased `TT`, host and local part; `TT` the day number in two base32
//! characters (1024 days around). Forwarding an SRS0 address of another forwarder makes an SRS1
//! address (`SRS1=HHHH=first.hop==HHHH=TT=...@alias.domain`). BATV
//! `prvs=KDDDSSSSSS=local@domain`: `K` the key digit, `DDD` the last three digits of the expiry
//! day, `SSSSSS` the first three bytes (hex) of the HMAC-SHA1 of `KDDD` and the lowercased address.

use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha1::Sha1;
use std::{path::Path, time::Duration};

/// Seconds in the SRS day.
const DAY: i64 = 86_400;
/// The base32 alphabet of SRS timestamps.
const TIME_CHARS: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
/// Days an SRS timestamp can tell apart (two base32 characters).
const TIME_SLOTS: i64 = 1024;
/// Separators allowed after `SRS0`/`SRS1`; the rest of the address uses `=`.
const SEPARATORS: &[u8] = b"=-+";

/// Why an address could not be signed or verified. Policies see [`SrsError::code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SrsError {
    /// No secret configured.
    #[error("no SRS secrets")]
    NoSecrets,
    /// The address is not SRS (or BATV) at all.
    #[error("not a signed address")]
    NotSigned,
    /// The sender has no `@domain`.
    #[error("no domain in the sender address")]
    NoDomain,
    /// A signed address lacks one of its parts (named).
    #[error("no {0} in the signed address")]
    Missing(&'static str),
    /// The timestamp is not base32, or the BATV day not digits.
    #[error("bad timestamp")]
    BadTimestamp,
    /// The signature is older than the maximum age (or from the future).
    #[error("timestamp out of date")]
    Expired,
    /// The hash does not match any secret.
    #[error("hash invalid")]
    BadHash,
}

impl SrsError {
    /// A short word for the error, as policies see it.
    pub fn code(&self) -> &'static str {
        match self {
            SrsError::NoSecrets => "no-secrets",
            SrsError::NotSigned => "not-signed",
            SrsError::NoDomain => "no-domain",
            SrsError::Missing(_) => "malformed",
            SrsError::BadTimestamp => "bad-timestamp",
            SrsError::Expired => "expired",
            SrsError::BadHash => "bad-hash",
        }
    }
}

/// `[srs]`: the site's signing secrets, for the stock srs policy and the tokens of the DSNs
/// and notices the site sends (`lib/notice`). No secrets: the site signs nothing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SrsConfig {
    /// The secrets, the first signs; an entry `file:PATH` (relative to the config file's
    /// directory) stands for the secrets listed in that file, read when the config loads.
    pub secrets: Vec<String>,
    /// How long a signature stays valid (whole days).
    #[serde(deserialize_with = "crate::duration::serde_duration::deserialize")]
    pub max_age: Duration,
    /// Base64 characters of an SRS hash.
    pub hash_length: usize,
    /// The domain of the SRS addresses the site makes; None: `[site] hostname`.
    pub domain: Option<String>,
}

impl Default for SrsConfig {
    fn default() -> SrsConfig {
        SrsConfig {
            secrets: Vec::new(),
            max_age: Duration::from_secs(21 * DAY as u64),
            hash_length: 4,
            domain: None,
        }
    }
}

/// The site's signer (`[srs]`) and the domain of the addresses it makes.
#[derive(Debug)]
pub struct SiteSrs {
    /// The signer over `[srs] secrets`.
    pub srs: std::sync::Arc<Srs>,
    /// `[srs] domain`, else the host name.
    pub domain: String,
}

impl SiteSrs {
    /// The signer of `config` (`file:` secrets read relative to `base_dir`), whose addresses
    /// fall under `config.domain` or else `hostname`; `None` when no secret is configured.
    pub fn start(
        config: &SrsConfig,
        base_dir: &Path,
        hostname: &str,
    ) -> Result<Option<SiteSrs>, String> {
        if config.secrets.is_empty() {
            return Ok(None);
        }
        let mut secrets = Vec::new();
        for item in &config.secrets {
            match item.strip_prefix("file:") {
                Some(path) => {
                    let path = base_dir.join(path);
                    let bytes = std::fs::read(&path)
                        .map_err(|e| format!("secrets: cannot read {}: {e}", path.display()))?;
                    secrets.extend(crate::services::site::list_entries(&bytes));
                }
                None => secrets.push(item.clone()),
            }
        }
        let days = u32::try_from(config.max_age.as_secs() / DAY as u64).unwrap_or(0);
        let srs = Srs::new(&secrets, days, config.hash_length)?;
        let domain = config
            .domain
            .clone()
            .unwrap_or_else(|| hostname.to_string());
        Ok(Some(SiteSrs {
            srs: std::sync::Arc::new(srs),
            domain,
        }))
    }
}

/// Signs and verifies addresses with a list of secrets.
#[derive(Clone)]
pub struct Srs {
    secrets: Vec<Vec<u8>>,
    max_age_days: i64,
    hash_length: usize,
}

impl std::fmt::Debug for Srs {
    // Secrets stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Srs")
            .field("secrets", &self.secrets.len())
            .field("max_age_days", &self.max_age_days)
            .field("hash_length", &self.hash_length)
            .finish()
    }
}

/// An HMAC-SHA1 over `parts`, each lowercased (ASCII) as libsrs2 does.
fn hmac_sha1(secret: &[u8], parts: &[&str]) -> [u8; 20] {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret).expect("HMAC takes any key length");
    for part in parts {
        mac.update(part.to_ascii_lowercase().as_bytes());
    }
    mac.finalize().into_bytes().into()
}

/// The value of a base64 character, `+`/`-` and `/`/`_` alike, case folded as libsrs2 compares.
fn base64_class(c: u8) -> Option<u8> {
    match c {
        b'+' | b'-' => Some(b'-'),
        b'/' | b'_' => Some(b'_'),
        c if c.is_ascii_alphanumeric() => Some(c.to_ascii_lowercase()),
        _ => None,
    }
}

/// Whether two hashes match over `len` characters in libsrs2's lax way (case and the two
/// base64 alphabets do not matter), in time independent of where they differ.
fn base64_equivalent(a: &[u8], b: &[u8], len: usize) -> bool {
    if a.len() < len || b.len() < len {
        return false;
    }
    let mut differ = false;
    for (x, y) in a[..len].iter().zip(&b[..len]) {
        differ |= match (base64_class(*x), base64_class(*y)) {
            (Some(x), Some(y)) => x != y,
            _ => true,
        };
    }
    !differ
}

/// `SRS0`/`SRS1` (any case) and a separator at the start of `local`: the rest after it.
fn srs_tag<'a>(local: &'a str, tag: &str) -> Option<&'a str> {
    let head = local.get(..4)?;
    let sep = *local.as_bytes().get(4)?;
    (head.eq_ignore_ascii_case(tag) && SEPARATORS.contains(&sep)).then(|| &local[5..])
}

/// Splits at the first `=`, both sides non-empty; `what` names the missing right side.
fn split_eq<'a>(text: &'a str, what: &'static str) -> Result<(&'a str, &'a str), SrsError> {
    match text.split_once('=') {
        Some((left, right)) if !right.is_empty() => Ok((left, right)),
        _ => Err(SrsError::Missing(what)),
    }
}

impl Srs {
    /// An SRS/BATV signer: `secrets` (the first signs), signatures valid for `max_age_days`
    /// days (1 to 1023), SRS hashes of `hash_length` base64 characters (4 to 27).
    pub fn new(secrets: &[String], max_age_days: u32, hash_length: usize) -> Result<Srs, String> {
        let secrets: Vec<Vec<u8>> = secrets
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| s.as_bytes().to_vec())
            .collect();
        if secrets.is_empty() {
            return Err(SrsError::NoSecrets.to_string());
        }
        if !(1..TIME_SLOTS as u32).contains(&max_age_days) {
            return Err(format!(
                "the maximum age must be 1 to {} days, got {max_age_days}",
                TIME_SLOTS - 1
            ));
        }
        if !(4..=27).contains(&hash_length) {
            return Err(format!(
                "the hash length must be 4 to 27 characters, got {hash_length}"
            ));
        }
        Ok(Srs {
            secrets,
            max_age_days: i64::from(max_age_days),
            hash_length,
        })
    }

    fn hash_with(&self, secret: &[u8], parts: &[&str]) -> String {
        let digest = hmac_sha1(secret, parts);
        let mut text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest);
        text.truncate(self.hash_length);
        text
    }

    fn hash(&self, parts: &[&str]) -> String {
        self.hash_with(&self.secrets[0], parts)
    }

    fn check_hash(&self, hash: &str, parts: &[&str]) -> Result<(), SrsError> {
        if hash.len() < self.hash_length {
            return Err(SrsError::BadHash);
        }
        let valid = self.secrets.iter().any(|secret| {
            let expected = self.hash_with(secret, parts);
            base64_equivalent(hash.as_bytes(), expected.as_bytes(), self.hash_length)
        });
        if valid {
            Ok(())
        } else {
            Err(SrsError::BadHash)
        }
    }

    fn timestamp(now: i64) -> String {
        let day = now.div_euclid(DAY);
        let chars = [(day >> 5) & 31, day & 31].map(|i| TIME_CHARS[i as usize] as char);
        chars.iter().collect()
    }

    fn check_timestamp(&self, stamp: &str, now: i64) -> Result<(), SrsError> {
        if stamp.len() != 2 {
            return Err(SrsError::BadTimestamp);
        }
        let mut then = 0i64;
        for c in stamp.bytes() {
            let value = TIME_CHARS
                .iter()
                .position(|t| *t == c.to_ascii_uppercase())
                .ok_or(SrsError::BadTimestamp)?;
            then = (then << 5) | value as i64;
        }
        let today = now.div_euclid(DAY).rem_euclid(TIME_SLOTS);
        let age = (today - then).rem_euclid(TIME_SLOTS);
        if age <= self.max_age_days {
            Ok(())
        } else {
            Err(SrsError::Expired)
        }
    }

    /// The SRS address under `alias` (a domain; `user@domain` uses its domain) for `sender` at
    /// time `now` (unix seconds): SRS0 for an ordinary sender, SRS1 for another forwarder's
    /// SRS0/SRS1 address; a sender already in `alias` stays as it is.
    pub fn forward(&self, sender: &str, alias: &str, now: i64) -> Result<String, SrsError> {
        let alias = alias.rsplit('@').next().unwrap_or(alias);
        let (local, host) = sender.rsplit_once('@').ok_or(SrsError::NoDomain)?;
        if alias.is_empty() || host.is_empty() {
            return Err(SrsError::NoDomain);
        }
        if host.eq_ignore_ascii_case(alias) {
            return Ok(sender.to_owned());
        }
        if let Some(rest) = srs_tag(local, "SRS1") {
            // Another forwarder's SRS1: keep its first hop, re-sign for our domain.
            let (_, rest) = split_eq(rest, "host")?;
            let (first_hop, user) = split_eq(rest, "user")?;
            let hash = self.hash(&[first_hop, user]);
            return Ok(format!("SRS1={hash}={first_hop}={user}@{alias}"));
        }
        if srs_tag(local, "SRS0").is_some() {
            // Another forwarder's SRS0: that forwarder is the first hop.
            let user = &local[4..];
            let hash = self.hash(&[host, user]);
            return Ok(format!("SRS1={hash}={host}={user}@{alias}"));
        }
        let stamp = Srs::timestamp(now);
        let hash = self.hash(&[&stamp, host, local]);
        Ok(format!("SRS0={hash}={stamp}={host}={local}@{alias}"))
    }

    /// The address an SRS address was made from, if its hash is ours and (SRS0) its timestamp
    /// within the maximum age at `now`: SRS0 gives the original sender, SRS1 the first hop's
    /// SRS0 address.
    pub fn reverse(&self, address: &str, now: i64) -> Result<String, SrsError> {
        let local = address.rsplit_once('@').map_or(address, |(local, _)| local);
        if let Some(rest) = srs_tag(local, "SRS1") {
            let (hash, rest) = split_eq(rest, "host")?;
            let (host, user) = split_eq(rest, "user")?;
            self.check_hash(hash, &[host, user])?;
            return Ok(format!("SRS0{user}@{host}"));
        }
        let rest = srs_tag(local, "SRS0").ok_or(SrsError::NotSigned)?;
        if rest.is_empty() {
            return Err(SrsError::Missing("hash"));
        }
        let (hash, rest) = split_eq(rest, "timestamp")?;
        let (stamp, rest) = split_eq(rest, "host")?;
        let (host, user) = split_eq(rest, "user")?;
        self.check_timestamp(stamp, now)?;
        self.check_hash(hash, &[stamp, host, user])?;
        Ok(format!("{user}@{host}"))
    }

    /// Whether the local part of `address` is SRS0 or SRS1 (any case) with a separator.
    pub fn is_srs(address: &str) -> bool {
        let local = address.rsplit_once('@').map_or(address, |(local, _)| local);
        srs_tag(local, "SRS0").is_some() || srs_tag(local, "SRS1").is_some()
    }

    fn batv_hash(secret: &[u8], key_day: &str, mailbox: &str) -> String {
        let digest = hmac_sha1(secret, &[key_day, mailbox]);
        digest[..3].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The BATV `prvs=` address for `mailbox` at `now`, valid for the maximum age.
    pub fn batv_sign(&self, mailbox: &str, now: i64) -> Result<String, SrsError> {
        if !mailbox.contains('@') {
            return Err(SrsError::NoDomain);
        }
        let expiry = (now.div_euclid(DAY) + self.max_age_days).rem_euclid(1000);
        let key_day = format!("0{expiry:03}");
        let hash = Srs::batv_hash(&self.secrets[0], &key_day, mailbox);
        Ok(format!("prvs={key_day}{hash}={mailbox}"))
    }

    /// The mailbox of a BATV `prvs=` address whose hash matches one of the secrets and whose
    /// expiry day has not passed at `now`.
    pub fn batv_verify(&self, address: &str, now: i64) -> Result<String, SrsError> {
        let rest = match address.get(..5) {
            Some(tag) if tag.eq_ignore_ascii_case("prvs=") => &address[5..],
            _ => return Err(SrsError::NotSigned),
        };
        let (tag, mailbox) = split_eq(rest, "mailbox")?;
        if tag.len() != 10 || !mailbox.contains('@') {
            return Err(SrsError::Missing("tag"));
        }
        let (key_day, hash) = tag.split_at(4);
        let expiry: i64 = key_day[1..].parse().map_err(|_| SrsError::BadTimestamp)?;
        let left = (expiry - now.div_euclid(DAY)).rem_euclid(1000);
        if left > self.max_age_days {
            return Err(SrsError::Expired);
        }
        let valid = self
            .secrets
            .iter()
            .any(|secret| Srs::batv_hash(secret, key_day, mailbox).eq_ignore_ascii_case(hash));
        if valid {
            Ok(mailbox.to_owned())
        } else {
            Err(SrsError::BadHash)
        }
    }

    /// Whether `address` is a BATV `prvs=` address (signature unchecked).
    pub fn is_batv(address: &str) -> bool {
        address
            .get(..5)
            .is_some_and(|tag| tag.eq_ignore_ascii_case("prvs="))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// postsrsd's test time: 2020-01-01 00:01:00 UTC.
    const POSTSRSD_NOW: i64 = 1_577_836_860;

    /// postsrsd's test setup: secret "tops3cr3t", hash length 4, maximum age 21 days.
    fn postsrsd() -> Srs {
        Srs::new(&["tops3cr3t".to_owned()], 21, 4).unwrap()
    }

    // The vectors of postsrsd's tests/unit/test_srs2.c and tests/blackbox/socketmap.py.
    #[test]
    fn postsrsd_forward_vectors() {
        let srs = postsrsd();
        let forward = |s: &str| srs.forward(s, "example.com", POSTSRSD_NOW);
        assert_eq!(forward("test@example.com").unwrap(), "test@example.com");
        assert_eq!(
            forward("test@otherdomain.com").unwrap(),
            "SRS0=vmyz=2W=otherdomain.com=test@example.com"
        );
        assert_eq!(forward("foo"), Err(SrsError::NoDomain));
        assert_eq!(forward("foo@"), Err(SrsError::NoDomain));
        assert_eq!(
            srs.forward("a@b.example", "", POSTSRSD_NOW),
            Err(SrsError::NoDomain)
        );
        assert_eq!(
            forward("SRS0=opaque+string@otherdomain.com").unwrap(),
            "SRS1=chaI=otherdomain.com==opaque+string@example.com"
        );
        assert_eq!(
            forward("SRS1=X=thirddomain.com==opaque+string@otherdomain.com").unwrap(),
            "SRS1=JIBX=thirddomain.com==opaque+string@example.com"
        );
        assert_eq!(
            forward("hash234@somedomain.com").unwrap(),
            "SRS0=-3_5=2W=somedomain.com=hash234@example.com"
        );
    }

    #[test]
    fn postsrsd_reverse_vectors() {
        let srs = postsrsd();
        let reverse = |s: &str| srs.reverse(s, POSTSRSD_NOW);
        let ok = [
            (
                "SRS0=vmyz=2W=otherdomain.com=test@example.com",
                "test@otherdomain.com",
            ),
            (
                "SRS0=XjO9=2V=otherdomain.com=test@example.com",
                "test@otherdomain.com",
            ),
            (
                "SRS1=JIBX=thirddomain.com==opaque+string@example.com",
                "SRS0=opaque+string@thirddomain.com",
            ),
            (
                "srs0=xjo9=2v=otherdomain.com=test@example.com",
                "test@otherdomain.com",
            ),
            (
                "SRS0=XJO9=2V=OTHERDOMAIN.COM=TEST@EXAMPLE.COM",
                "TEST@OTHERDOMAIN.COM",
            ),
            (
                "SRS0=-3_5=2W=somedomain.com=hash234@example.com",
                "hash234@somedomain.com",
            ),
            (
                "SRS0=+3/5=2W=somedomain.com=hash234@example.com",
                "hash234@somedomain.com",
            ),
        ];
        for (address, original) in ok {
            assert_eq!(reverse(address).as_deref(), Ok(original), "{address}");
        }
        let bad = [
            ("test@example.com", SrsError::NotSigned),
            (
                "SRS0=te87=T7=otherdomain.com=test@example.com",
                SrsError::Expired,
            ),
            (
                "SRS0=VcIb=7N=otherdomain.com=test@example.com",
                SrsError::Expired,
            ),
            (
                "SRS0=FAKE=2V=otherdomain.com=test@example.com",
                SrsError::BadHash,
            ),
            (
                "SRS0=FAKE=2V=otherdomain.com=test@foreign.example",
                SrsError::BadHash,
            ),
            ("SRS0=@example.com", SrsError::Missing("hash")),
            ("SRS0=XjO9@example.com", SrsError::Missing("timestamp")),
            ("SRS0=XjO9=2V@example.com", SrsError::Missing("host")),
            (
                "SRS0=XjO9=2V=otherdomain.com@example.com",
                SrsError::Missing("user"),
            ),
        ];
        for (address, error) in bad {
            assert_eq!(reverse(address), Err(error), "{address}");
        }
    }

    #[test]
    fn round_trips_and_rotation() {
        let old = Srs::new(&["old secret".to_owned()], 10, 8).unwrap();
        let rotated = Srs::new(&["new secret".to_owned(), "old secret".to_owned()], 10, 8).unwrap();
        let now = 1_800_000_000;
        for sender in [
            "a@b.example",
            "Mixed.Case+tag@Sub.Example.ORG",
            "x=y@z.example",
        ] {
            let signed = old.forward(sender, "fwd.example", now).unwrap();
            assert!(Srs::is_srs(&signed), "{signed}");
            // The old secret still verifies after rotation, within the maximum age only.
            assert_eq!(rotated.reverse(&signed, now + 10 * DAY).unwrap(), sender);
            assert_eq!(
                rotated.reverse(&signed, now + 11 * DAY),
                Err(SrsError::Expired)
            );
            // A secret that was dropped verifies nothing.
            let dropped = Srs::new(&["new secret".to_owned()], 10, 8).unwrap();
            assert_eq!(dropped.reverse(&signed, now), Err(SrsError::BadHash));
            // SRS1 through a second forwarder, back to the first hop's SRS0.
            let second = rotated.forward(&signed, "next.example", now).unwrap();
            assert!(second.starts_with("SRS1="), "{second}");
            assert_eq!(rotated.reverse(&second, now).unwrap(), signed);

            let batv = rotated.batv_sign(sender, now).unwrap();
            assert!(Srs::is_batv(&batv) && !Srs::is_srs(&batv), "{batv}");
            assert_eq!(old.batv_verify(&batv, now), Err(SrsError::BadHash));
            assert_eq!(rotated.batv_verify(&batv, now + 10 * DAY).unwrap(), sender);
            assert_eq!(
                rotated.batv_verify(&batv, now + 11 * DAY),
                Err(SrsError::Expired)
            );
            assert_eq!(
                rotated.batv_verify(&batv.to_uppercase(), now).unwrap(),
                sender.to_uppercase()
            );
        }
    }

    #[test]
    fn batv_format() {
        let srs = Srs::new(&["k".to_owned()], 7, 4).unwrap();
        // Day 20833 (2027-01-15) + 7 = 20840: DDD = 840.
        let signed = srs.batv_sign("user@example.org", 20_833 * DAY + 5).unwrap();
        assert!(signed.starts_with("prvs=0840"), "{signed}");
        assert_eq!(signed.len(), "prvs=0840xxxxxx=user@example.org".len());
        assert_eq!(
            srs.batv_verify("prvs=0840zzzzzz=user@example.org", 20_833 * DAY),
            Err(SrsError::BadHash)
        );
        assert_eq!(
            srs.batv_verify("prvs=08=user@example.org", 0),
            Err(SrsError::Missing("tag"))
        );
        assert_eq!(
            srs.batv_verify("user@example.org", 0),
            Err(SrsError::NotSigned)
        );
    }

    #[test]
    fn bad_setup() {
        assert!(Srs::new(&[], 21, 4).unwrap_err().contains("no SRS secrets"));
        assert!(
            Srs::new(&["s".to_owned()], 0, 4)
                .unwrap_err()
                .contains("maximum age")
        );
        assert!(
            Srs::new(&["s".to_owned()], 21, 2)
                .unwrap_err()
                .contains("hash length")
        );
    }

    #[test]
    fn the_site_signer_reads_file_secrets_relative_to_the_config() {
        let dir = tempfile::TempDir::new().unwrap();
        std::fs::write(
            dir.path().join("secrets"),
            "# rotated\nnew secret\nold secret\n",
        )
        .unwrap();
        let config = |secrets: &[&str]| SrsConfig {
            secrets: secrets.iter().map(|s| s.to_string()).collect(),
            ..SrsConfig::default()
        };
        assert!(
            SiteSrs::start(&config(&[]), dir.path(), "mx.test")
                .unwrap()
                .is_none()
        );
        let site = SiteSrs::start(&config(&["file:secrets"]), dir.path(), "mx.test")
            .unwrap()
            .unwrap();
        assert_eq!(site.domain, "mx.test");
        let now = 1_700_000_000;
        let signed = site
            .srs
            .forward("a@remote.example", "mx.test", now)
            .unwrap();
        let old = Srs::new(&["old secret".into()], 21, 4).unwrap();
        let by_old = old.forward("a@remote.example", "mx.test", now).unwrap();
        assert_eq!(site.srs.reverse(&by_old, now).unwrap(), "a@remote.example");
        assert_ne!(signed, by_old, "the first secret signs");
        let missing = SiteSrs::start(&config(&["file:absent"]), dir.path(), "mx.test");
        assert!(missing.unwrap_err().contains("cannot read"));
        let domain = SrsConfig {
            domain: Some("fwd.test".into()),
            ..config(&["s"])
        };
        assert_eq!(
            SiteSrs::start(&domain, dir.path(), "mx.test")
                .unwrap()
                .unwrap()
                .domain,
            "fwd.test"
        );
    }
}
