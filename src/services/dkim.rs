//! DKIM (RFC 6376) and ARC (RFC 8617) over the `mail-auth` crate: verifying the signatures of a
//! message as received, checking an ARC chain, and signing with the site's keys (`[dkim] keys`).
//!
//! Every key record is looked up through luamilter's own [`Resolver`] (its cache, its zone files
//! under `luamilter test`) before `mail-auth` runs: the records are handed to it as a per-message
//! cache, and the resolver `mail-auth` carries has no nameserver, so it never queries on its own.

use super::dns::{DnsError, Resolver};
use crate::config::ConfigSource;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimResult, Error, MessageAuthenticator,
    Parameters, ResolverCache, Txt,
    arc::ArcSealer,
    common::verify::DomainKey,
    common::{
        crypto::{Ed25519Key, RsaKey, Sha256, SigningKey},
        headers::HeaderWriter,
        parse::TxtRecordParser,
        resolver::ToFqdn,
    },
    dkim::{Canonicalization, DkimError, DkimSigner, Done},
    hickory_resolver::{
        TokioResolver, config::ResolverConfig, net::runtime::TokioRuntimeProvider,
        proto::op::ResponseCode,
    },
};
use rustls_pki_types::{PrivateKeyDer, pem::PemObject};
use serde::Deserialize;
use std::{
    borrow::Borrow,
    collections::{BTreeMap, HashMap},
    hash::Hash,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// The headers signed when `[dkim] sign_headers` is not set (RFC 6376 §5.4.1's list, less the
/// trace and list headers a forwarder may add).
const DEFAULT_SIGN_HEADERS: &[&str] = &[
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "In-Reply-To",
    "References",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
];

/// `[dkim]` in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DkimConfig {
    /// The most body bytes kept for verifying and signing; a longer body is neither verified
    /// (its signatures get `neutral`) nor signed.
    pub max_body: usize,
    /// The headers a signature covers, in order.
    pub sign_headers: Vec<String>,
    /// The signing keys, by domain.
    pub keys: BTreeMap<String, KeyConfig>,
}

impl Default for DkimConfig {
    fn default() -> DkimConfig {
        DkimConfig {
            max_body: 4 * 1024 * 1024,
            sign_headers: DEFAULT_SIGN_HEADERS.iter().map(|h| h.to_string()).collect(),
            keys: BTreeMap::new(),
        }
    }
}

/// One signing key (`[dkim.keys."example.org"]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// The selector: the key is published at `<selector>._domainkey.<domain>`.
    pub selector: String,
    /// A PEM file with an RSA (PKCS#1 or PKCS#8) or Ed25519 (PKCS#8) private key; relative to
    /// the config file's directory.
    pub key: toml::Spanned<PathBuf>,
    /// How long its signatures are valid: the `x=` tag, that long after signing (RFC 6376
    /// §3.5). None: no `x=`.
    #[serde(default, deserialize_with = "expiry")]
    pub expire_after: Option<Duration>,
}

/// `expire_after` as a duration ("30d" or seconds); at least one second, since `x=` counts
/// whole seconds and must be after `t=`.
fn expiry<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let after = crate::duration::serde_duration::deserialize(d)?;
    if after < Duration::from_secs(1) {
        return Err(serde::de::Error::custom(
            "expire_after must be at least 1s (x= counts whole seconds after t=)",
        ));
    }
    Ok(Some(after))
}

/// A signing key could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(String);

/// One signature's verification, as `milter.dkim.verify` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureCheck {
    /// `pass`, `fail`, `policy` (expired), `neutral`, `temperror`, `permerror` (RFC 8601
    /// words).
    pub result: &'static str,
    /// The signing domain (`d=`).
    pub domain: String,
    /// The selector (`s=`).
    pub selector: String,
    /// The algorithm (`a=`), e.g. `rsa-sha256`.
    pub algorithm: String,
    /// The agent or user identifier (`i=`), `@domain` when the signature has none.
    pub identity: String,
    /// Why it did not pass.
    pub reason: Option<String>,
}

/// The ARC chain's validation (`arc=` in Authentication-Results).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArcCheck {
    /// `none` (no chain), `pass` or `fail`.
    pub result: &'static str,
    /// How many ARC sets the chain has.
    pub sets: usize,
    /// Why it failed.
    pub reason: Option<String>,
}

enum Signer {
    Rsa(Box<DkimSigner<RsaKey<Sha256>, Done>>),
    Ed25519(Box<DkimSigner<Ed25519Key, Done>>),
}

/// The ARC sealer of a `[dkim.keys]` key (the same key, domain, selector and headers).
enum Sealer {
    Rsa(Box<ArcSealer<RsaKey<Sha256>, Done>>),
    Ed25519(Box<ArcSealer<Ed25519Key, Done>>),
}

impl ArcCheck {
    /// No chain.
    pub fn none() -> ArcCheck {
        ArcCheck {
            result: "none",
            sets: 0,
            reason: None,
        }
    }
}

/// DKIM verification and signing, and ARC verification, over the shared resolver.
pub struct Dkim {
    resolver: Arc<Resolver>,
    /// `mail-auth`'s entry point, over a resolver without nameservers: every record it needs is
    /// in the per-message cache.
    authenticator: MessageAuthenticator,
    signers: HashMap<String, (Signer, Sealer)>,
    max_body: usize,
}

impl Dkim {
    /// Loads the signing keys of `config` (relative paths from the config file's directory):
    /// a missing or unreadable key is an error naming file and line.
    pub fn new(
        resolver: Arc<Resolver>,
        config: &DkimConfig,
        source: &ConfigSource,
    ) -> Result<Dkim, KeyError> {
        let mut signers = HashMap::new();
        for (domain, key) in &config.keys {
            let path = source.base_dir().join(key.key.get_ref());
            let signer = load_signers(&path, domain, key, &config.sign_headers).map_err(|e| {
                KeyError(format!(
                    "{}: [dkim.keys.\"{domain}\"] key {}: {e}",
                    source.locate(key.key.span().start),
                    path.display()
                ))
            })?;
            signers.insert(domain.to_ascii_lowercase(), signer);
        }
        let offline = TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, Vec::new(), Vec::new()),
            TokioRuntimeProvider::default(),
        )
        .build()
        .map_err(|e| KeyError(format!("cannot set up the DKIM verifier: {e}")))?;
        Ok(Dkim {
            resolver,
            authenticator: MessageAuthenticator(offline),
            signers,
            max_body: config.max_body,
        })
    }

    /// The most body bytes kept for verifying and signing.
    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// Verifies every DKIM-Signature of `message` (headers and body as received, CRLF line
    /// ends), in header order.
    pub async fn verify(&self, message: &[u8]) -> Vec<SignatureCheck> {
        let Some(parsed) = AuthenticatedMessage::parse(message) else {
            return Vec::new();
        };
        let names = parsed
            .dkim_headers
            .iter()
            .map(|h| key_name(&h.header.s, &h.header.d));
        let keys = self.prefetch(names).await;
        let outputs = self
            .authenticator
            .verify_dkim(Parameters::new(&parsed).with_txt_cache(&keys))
            .await;
        outputs
            .iter()
            .filter_map(|output| {
                let signature = output.signature()?;
                let (result, reason) = result_words(output.result());
                Some(SignatureCheck {
                    result,
                    domain: signature.d.to_ascii_lowercase(),
                    selector: signature.s.clone(),
                    algorithm: algorithm_name(signature.a),
                    identity: if signature.i.is_empty() {
                        format!("@{}", signature.d.to_ascii_lowercase())
                    } else {
                        signature.i.clone()
                    },
                    reason,
                })
            })
            .collect()
    }

    /// The signatures of a message whose body was longer than [`Dkim::max_body`]: `neutral`,
    /// not verified.
    pub fn unverified(message: &[u8], reason: &str) -> Vec<SignatureCheck> {
        let Some(parsed) = AuthenticatedMessage::parse(message) else {
            return Vec::new();
        };
        parsed
            .dkim_headers
            .iter()
            .map(|h| SignatureCheck {
                result: "neutral",
                domain: h.header.d.to_ascii_lowercase(),
                selector: h.header.s.clone(),
                algorithm: algorithm_name(h.header.a),
                identity: format!("@{}", h.header.d.to_ascii_lowercase()),
                reason: Some(reason.to_string()),
            })
            .collect()
    }

    /// Validates the ARC chain of `message`.
    pub async fn verify_arc(&self, message: &[u8]) -> ArcCheck {
        let Some(parsed) = AuthenticatedMessage::parse(message) else {
            return ArcCheck::none();
        };
        let names = (parsed
            .ams_headers
            .iter()
            .map(|h| key_name(&h.header.s, &h.header.d)))
        .chain(
            parsed
                .as_headers
                .iter()
                .map(|h| key_name(&h.header.s, &h.header.d)),
        );
        let keys = self.prefetch(names).await;
        let output = self
            .authenticator
            .verify_arc(Parameters::new(&parsed).with_txt_cache(&keys))
            .await;
        let sets = parsed.as_headers.len();
        match output.result() {
            DkimResult::None => ArcCheck::none(),
            DkimResult::Pass => ArcCheck {
                result: "pass",
                sets,
                reason: None,
            },
            other => ArcCheck {
                result: "fail",
                sets,
                reason: result_words(other).1,
            },
        }
    }

    /// Whether a key is configured for `domain`.
    pub fn signs_for(&self, domain: &str) -> bool {
        self.signers.contains_key(&domain.to_ascii_lowercase())
    }

    /// Signs `message` with the key of `domain`: the DKIM-Signature header's value (folded
    /// with LF and a tab).
    pub fn sign(&self, domain: &str, message: &[u8]) -> Result<String, String> {
        let signer = (self.signers.get(&domain.to_ascii_lowercase()))
            .ok_or_else(|| format!("no [dkim] key for {domain}"))?;
        let signature = match &signer.0 {
            Signer::Rsa(s) => s.sign(message),
            Signer::Ed25519(s) => s.sign(message),
        }
        .map_err(|e| e.to_string())?;
        let header = signature.to_header();
        let value = header
            .split_once(':')
            .map_or(header.as_str(), |(_, v)| v)
            .trim()
            .replace("\r\n", "\n");
        Ok(value)
    }

    /// Adds an ARC set to `message` with the key of `domain`: `results` (an
    /// Authentication-Results value, `authserv-id; method=result ...`) becomes its
    /// ARC-Authentication-Results, and the seal's `cv=` is the validation of the chain the
    /// message already has. Returns the ARC-Seal, ARC-Message-Signature and
    /// ARC-Authentication-Results headers as (name, value) pairs, values folded with LF.
    pub async fn seal(
        &self,
        domain: &str,
        message: &[u8],
        results: &str,
    ) -> Result<Vec<(String, String)>, String> {
        let (_, sealer) = (self.signers.get(&domain.to_ascii_lowercase()))
            .ok_or_else(|| format!("no [dkim] key for {domain}"))?;
        let parsed = AuthenticatedMessage::parse(message).ok_or("the message cannot be parsed")?;
        let names = (parsed.ams_headers.iter())
            .map(|h| key_name(&h.header.s, &h.header.d))
            .chain((parsed.as_headers.iter()).map(|h| key_name(&h.header.s, &h.header.d)));
        let keys = self.prefetch(names).await;
        let chain = self
            .authenticator
            .verify_arc(Parameters::new(&parsed).with_txt_cache(&keys))
            .await;
        // The whole value as the "authserv-id": mail-auth writes it as given, so its
        // whitespace is collapsed here as relaxed canonicalization will read it.
        let results = results.split_whitespace().collect::<Vec<_>>().join(" ");
        let results = AuthenticationResults::new(&results);
        let set = match sealer {
            Sealer::Rsa(s) => s.seal(&parsed, &results, &chain),
            Sealer::Ed25519(s) => s.seal(&parsed, &results, &chain),
        }
        .map_err(|e| format!("cannot seal: {e}"))?;
        Ok(set.to_header().split("\r\n").fold(
            Vec::new(),
            |mut headers: Vec<(String, String)>, line| {
                match headers.last_mut() {
                    Some(last) if line.starts_with([' ', '\t']) => {
                        last.1.push('\n');
                        last.1.push_str(line);
                    }
                    _ => {
                        if let Some((name, value)) = line.split_once(':') {
                            headers.push((name.to_string(), value.trim().to_string()));
                        }
                    }
                }
                headers
            },
        ))
    }

    /// Looks up every key record named in `names` through the shared resolver, concurrently,
    /// into a cache `mail-auth` reads from.
    async fn prefetch(&self, names: impl Iterator<Item = String>) -> Prefetched {
        let mut names: Vec<String> = names.collect();
        names.sort();
        names.dedup();
        let lookups = names.into_iter().map(|name| {
            let resolver = Arc::clone(&self.resolver);
            async move {
                let record = match resolver.txt(&name).await {
                    Ok(records) => records
                        .iter()
                        .map(|r| DomainKey::parse(r.as_bytes()))
                        .find(Result::is_ok)
                        .unwrap_or(Err(mail_auth::Error::Dns(
                            mail_auth::DnsError::InvalidRecordType,
                        )))
                        .into(),
                    Err(e) => Txt::Error(mail_auth::Error::Dns(dns_error(&e))),
                };
                (name.to_fqdn().into_owned().into_boxed_str(), record)
            }
        });
        let found = futures_util::future::join_all(lookups).await;
        Prefetched(Mutex::new(found.into_iter().collect()))
    }
}

/// `<selector>._domainkey.<domain>`.
fn key_name(selector: &str, domain: &str) -> String {
    format!("{selector}._domainkey.{domain}")
}

/// Our DNS error as `mail-auth` reads it: no record is permanent, anything else temporary.
fn dns_error(error: &DnsError) -> mail_auth::DnsError {
    match error {
        DnsError::NxDomain => mail_auth::DnsError::RecordNotFound(ResponseCode::NXDomain),
        DnsError::NoData => mail_auth::DnsError::RecordNotFound(ResponseCode::NoError),
        other => mail_auth::DnsError::Resolver(other.to_string()),
    }
}

/// The RFC 8601 result word of a `mail-auth` result, and the reason it did not pass.
fn result_words(result: &DkimResult) -> (&'static str, Option<String>) {
    match result {
        DkimResult::Pass => ("pass", None),
        DkimResult::None => ("none", None),
        // RFC 8601 §2.7.1 `policy`: signed, but not acceptable here, as RFC 6376 §3.5 allows
        // for a signature past its x= (mail-auth reports it as neutral).
        DkimResult::Neutral(Error::Dkim(DkimError::SignatureExpired)) => {
            ("policy", Some("signature expired (x= is past)".to_string()))
        }
        DkimResult::Neutral(e) => ("neutral", Some(e.to_string())),
        DkimResult::Fail(e) => ("fail", Some(e.to_string())),
        DkimResult::PermError(e) => ("permerror", Some(e.to_string())),
        DkimResult::TempError(e) => ("temperror", Some(e.to_string())),
    }
}

fn algorithm_name(algorithm: mail_auth::common::crypto::Algorithm) -> String {
    use mail_auth::common::crypto::Algorithm;
    match algorithm {
        Algorithm::RsaSha256 => "rsa-sha256",
        Algorithm::RsaSha1 => "rsa-sha1",
        Algorithm::Ed25519Sha256 => "ed25519-sha256",
        #[allow(unreachable_patterns)]
        _ => "unknown",
    }
    .to_string()
}

/// Reads a PEM private key (RSA or Ed25519) and builds its relaxed/relaxed DKIM signer and its
/// ARC sealer (each owns a copy of the key).
fn load_signers(
    path: &std::path::Path,
    domain: &str,
    config: &KeyConfig,
    headers: &[String],
) -> Result<(Signer, Sealer), String> {
    let selector = config.selector.as_str();
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| format!("not a PEM key: {e}"))?;
    if let PrivateKeyDer::Pkcs8(pkcs8) = &der {
        let ed25519 = || Ed25519Key::from_pkcs8_maybe_unchecked_der(pkcs8.secret_pkcs8_der());
        if let (Ok(key), Ok(seal_key)) = (ed25519(), ed25519()) {
            return Ok((
                Signer::Ed25519(Box::new(signer(key, domain, config, headers))),
                Sealer::Ed25519(Box::new(sealer(seal_key, domain, selector, headers))),
            ));
        }
    }
    let rsa = |der: PrivateKeyDer<'_>| {
        RsaKey::<Sha256>::from_key_der(der)
            .map_err(|e| format!("not an RSA or Ed25519 private key: {e}"))
    };
    let seal_key = rsa(der.clone_key())?;
    let key = rsa(der)?;
    Ok((
        Signer::Rsa(Box::new(signer(key, domain, config, headers))),
        Sealer::Rsa(Box::new(sealer(seal_key, domain, selector, headers))),
    ))
}

fn sealer<T: SigningKey<Hasher = Sha256>>(
    key: T,
    domain: &str,
    selector: &str,
    headers: &[String],
) -> ArcSealer<T, Done> {
    ArcSealer::from_key(key)
        .domain(domain)
        .selector(selector)
        .headers(headers.iter().cloned())
}

fn signer<T: SigningKey>(
    key: T,
    domain: &str,
    config: &KeyConfig,
    headers: &[String],
) -> DkimSigner<T, Done> {
    let signer = DkimSigner::from_key(key)
        .domain(domain)
        .selector(&config.selector)
        .headers(headers.iter().cloned())
        .header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed);
    match config.expire_after {
        Some(after) => signer.expiration(after.as_secs()),
        None => signer,
    }
}

/// Key records looked up for one message, read by `mail-auth` as its TXT cache.
struct Prefetched(Mutex<HashMap<Box<str>, Txt>>);

impl ResolverCache<Box<str>, Txt> for Prefetched {
    fn get<Q>(&self, name: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.lock().ok()?.get(name).cloned()
    }

    fn remove<Q>(&self, name: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.lock().ok()?.remove(name)
    }

    fn insert(&self, key: Box<str>, value: Txt, _valid_until: Instant) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(key, value);
        }
    }
}
