//! The SPF service: RFC 7208 `check_host()` evaluation by viaspf over the process-wide
//! [`Resolver`] (through a viaspf `Lookup` adapter, so SPF shares the DNS cache), MAIL FROM and
//! HELO checks, pyspf-style best guess, and the `Received-SPF` header value.
//!
//! **Best guess.** viaspf can only evaluate records it finds in DNS, so [`Spf::best_guess`]
//! wraps the adapter for that one evaluation: the first TXT query (which `check_host()` always
//! sends for the sender's domain) is answered with the guess record when the domain publishes
//! no `v=spf1` record (no TXT at all, NXDOMAIN, or only other TXT records). A domain that does
//! publish SPF gets its real result. Every other query goes to DNS as usual.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use viaspf::lookup::{Lookup, LookupError, LookupResult, Name};
use viaspf::record::SpfRecord;
use viaspf::{DomainName, ExplanationString, QueryResult, Sender, SpfResult, SpfResultCause};

use crate::services::dns::{DnsError, Resolver};
use crate::services::net::{dot_atom_or_quoted, parse_address, split};

/// SPF settings (`[spf]` in the config file).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpfConfig {
    /// DNS-querying terms allowed per evaluation (RFC 7208 §4.6.4: 10).
    pub max_lookups: usize,
    /// Lookups with empty answers allowed per evaluation (RFC 7208 §4.6.4: 2).
    pub max_void_lookups: usize,
    /// Time limit for one whole evaluation; past it the result is `temperror`.
    #[serde(deserialize_with = "crate::duration::serde_duration::deserialize")]
    pub timeout: Duration,
    /// This host's name, for the `%{r}` macro and the `receiver=` field of `Received-SPF`.
    pub receiver: Option<String>,
    /// The record [`Spf::best_guess`] evaluates for domains that publish none.
    pub best_guess: String,
}

impl Default for SpfConfig {
    fn default() -> Self {
        Self {
            max_lookups: 10,
            max_void_lookups: 2,
            timeout: Duration::from_secs(20),
            receiver: None,
            best_guess: "v=spf1 a/24 mx/24 ptr ?all".to_owned(),
        }
    }
}

/// Setting up the SPF service failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpfError {
    /// A best-guess record is not a valid SPF record.
    #[error("invalid best-guess SPF record {0:?}")]
    InvalidGuessRecord(String),
}

/// A syntactically valid SPF record to use as a best guess.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuessRecord(String);

impl FromStr for GuessRecord {
    type Err = SpfError;

    fn from_str(text: &str) -> Result<Self, SpfError> {
        match text.parse::<SpfRecord>() {
            Ok(_) => Ok(Self(text.to_owned())),
            Err(_) => Err(SpfError::InvalidGuessRecord(text.to_owned())),
        }
    }
}

/// The outcome of one SPF evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpfOutcome {
    /// `pass`, `fail`, `softfail`, `neutral`, `none`, `temperror` or `permerror`.
    pub result: &'static str,
    /// The domain's `exp=` text for a `fail` that has one; otherwise a sentence saying why.
    pub explanation: String,
    /// The mechanism that matched (`ip4:192.0.2.0/24`, `mx`, `all`), if one did.
    pub mechanism: Option<String>,
    /// The `Received-SPF` header value (RFC 7208 §9.1), without the field name.
    pub received_spf: String,
    /// Whether the result came from the best-guess record rather than a published one.
    pub guessed: bool,
}

/// What an evaluation checked, for the explanation and the header.
struct Checked<'a> {
    /// `"mailfrom"` or `"helo"` (the `identity=` field).
    kind: &'static str,
    /// The identity as evaluated (`user@dom`, `postmaster@<helo>`, or the HELO name), or the
    /// text given when it is not a valid identity.
    identity: String,
    /// The MAIL FROM address (`""` for the null sender); `None` for HELO checks.
    envelope_from: Option<String>,
    helo: &'a str,
}

/// An evaluated result before it is turned into an [`SpfOutcome`].
struct Verdict {
    result: &'static str,
    /// Why, in words (the header comment).
    comment: String,
    /// The domain's `exp=` explanation, for `fail`.
    exp: Option<String>,
    mechanism: Option<String>,
    problem: Option<String>,
}

/// The SPF service. Cheap to share behind an `Arc`.
pub struct Spf {
    lookup: DnsLookup,
    config: viaspf::Config,
    receiver: Option<String>,
    guess: GuessRecord,
}

impl Spf {
    /// Builds the service over `resolver`; fails when the best-guess record is invalid.
    pub fn new(resolver: Arc<Resolver>, config: &SpfConfig) -> Result<Self, SpfError> {
        let mut builder = viaspf::Config::builder()
            .max_lookups(config.max_lookups)
            .max_void_lookups(config.max_void_lookups)
            .timeout(config.timeout);
        if let Some(receiver) = &config.receiver {
            builder = builder.hostname(receiver.clone());
        }
        Ok(Self {
            lookup: DnsLookup(resolver),
            config: builder.build(),
            receiver: config.receiver.clone(),
            guess: config.best_guess.parse()?,
        })
    }

    /// Checks the MAIL FROM identity `sender` (any envelope form; the null sender `<>` or `""`
    /// is checked as `postmaster@<helo>`) for client `ip`.
    pub async fn check_host(&self, ip: IpAddr, sender: &str, helo: &str) -> SpfOutcome {
        let (checked, result) = self
            .evaluate_mail_from(&self.lookup, ip, sender, helo)
            .await;
        self.outcome(ip, &checked, result, false)
    }

    /// Checks the HELO identity `helo` for client `ip`.
    pub async fn check_helo(&self, ip: IpAddr, helo: &str) -> SpfOutcome {
        let result = match Sender::from_domain(helo) {
            Ok(sender) => Some(
                viaspf::evaluate_sender(
                    &self.lookup,
                    &self.config,
                    ip,
                    &sender,
                    Some(sender.domain()),
                )
                .await,
            ),
            Err(_) => None,
        };
        let checked = Checked {
            kind: "helo",
            identity: helo.to_owned(),
            envelope_from: None,
            helo,
        };
        self.outcome(ip, &checked, result, false)
    }

    /// Like [`check_host`](Self::check_host), but a domain that publishes no SPF record is
    /// evaluated with the configured best-guess record.
    pub async fn best_guess(&self, ip: IpAddr, sender: &str, helo: &str) -> SpfOutcome {
        self.best_guess_with(ip, sender, helo, &self.guess).await
    }

    /// [`best_guess`](Self::best_guess) with another guess record (e.g. without `ptr` for
    /// clients whose PTR looks dynamic).
    pub async fn best_guess_with(
        &self,
        ip: IpAddr,
        sender: &str,
        helo: &str,
        record: &GuessRecord,
    ) -> SpfOutcome {
        let lookup = GuessLookup {
            inner: &self.lookup,
            record: &record.0,
            first_txt: AtomicBool::new(true),
            guessed: AtomicBool::new(false),
        };
        let (checked, result) = self.evaluate_mail_from(&lookup, ip, sender, helo).await;
        self.outcome(ip, &checked, result, lookup.guessed.load(Ordering::Relaxed))
    }

    /// Evaluates the MAIL FROM identity; the result is `None` when `sender` has no valid domain
    /// (RFC 7208 §4.3: the result is then `none`).
    async fn evaluate_mail_from<'h>(
        &self,
        lookup: &impl Lookup,
        ip: IpAddr,
        sender: &str,
        helo: &'h str,
    ) -> (Checked<'h>, Option<QueryResult>) {
        let mail_from = MailFrom::new(sender, helo);
        let result = match &mail_from.sender {
            Some(sender) => {
                let helo_domain = DomainName::new(helo).ok();
                Some(
                    viaspf::evaluate_sender(lookup, &self.config, ip, sender, helo_domain.as_ref())
                        .await,
                )
            }
            None => None,
        };
        let checked = Checked {
            kind: "mailfrom",
            identity: mail_from.identity,
            envelope_from: Some(mail_from.envelope_from),
            helo,
        };
        (checked, result)
    }

    /// Turns a viaspf result into the outcome with its explanation and header.
    fn outcome(
        &self,
        ip: IpAddr,
        checked: &Checked<'_>,
        result: Option<QueryResult>,
        guessed: bool,
    ) -> SpfOutcome {
        let ip = ip.to_canonical();
        let id = &checked.identity;
        let Some(query) = result else {
            let comment = format!("{id} is not a valid {} identity", checked.kind);
            let verdict = Verdict {
                result: "none",
                comment,
                exp: None,
                mechanism: None,
                problem: None,
            };
            return self.finish(verdict, ip, checked, guessed);
        };
        let mechanism = match &query.cause {
            Some(SpfResultCause::Match(mechanism)) => Some(mechanism.to_string()),
            _ => None,
        };
        let problem = match &query.cause {
            Some(SpfResultCause::Error(cause)) => Some(cause.to_string()),
            _ => None,
        };
        let cause = problem.as_deref().unwrap_or("unknown error");
        let (word, comment, exp) = match query.spf_result {
            SpfResult::Pass => (
                "pass",
                format!("domain of {id} designates {ip} as permitted sender"),
                None,
            ),
            SpfResult::Fail(exp) => (
                "fail",
                format!("domain of {id} does not designate {ip} as permitted sender"),
                match exp {
                    ExplanationString::External(text) => Some(text),
                    ExplanationString::Default => None,
                },
            ),
            SpfResult::Softfail => (
                "softfail",
                format!("domain of transitioning {id} does not designate {ip} as permitted sender"),
                None,
            ),
            SpfResult::Neutral => (
                "neutral",
                format!("{ip} is neither permitted nor denied by domain of {id}"),
                None,
            ),
            SpfResult::None => (
                "none",
                format!("domain of {id} does not designate permitted sender hosts"),
                None,
            ),
            SpfResult::Temperror => (
                "temperror",
                format!("error in processing during lookup of {id}: {cause}"),
                None,
            ),
            SpfResult::Permerror => (
                "permerror",
                format!("permanent error in processing domain of {id}: {cause}"),
                None,
            ),
        };
        let verdict = Verdict {
            result: word,
            comment,
            exp,
            mechanism,
            problem,
        };
        self.finish(verdict, ip, checked, guessed)
    }

    /// Assembles the outcome and its `Received-SPF` value:
    /// `result (receiver: comment) client-ip=..; envelope-from=..; helo=..; receiver=..;
    /// identity=..; mechanism=..|problem=..`.
    fn finish(
        &self,
        verdict: Verdict,
        ip: IpAddr,
        checked: &Checked<'_>,
        guessed: bool,
    ) -> SpfOutcome {
        let Verdict {
            result,
            comment,
            exp,
            mechanism,
            problem,
        } = verdict;
        crate::metrics::spf_result(checked.kind, result);
        let mut header = format!("{result} (");
        if let Some(receiver) = &self.receiver {
            header.push_str(&comment_text(receiver));
            header.push_str(": ");
        }
        if guessed {
            header.push_str("best guess: ");
        }
        header.push_str(&comment_text(&comment));
        header.push(')');
        let mut fields: Vec<(&str, &str)> = Vec::new();
        let client_ip = ip.to_string();
        fields.push(("client-ip", &client_ip));
        if let Some(envelope_from) = &checked.envelope_from {
            fields.push(("envelope-from", envelope_from));
        }
        if !checked.helo.is_empty() {
            fields.push(("helo", checked.helo));
        }
        if let Some(receiver) = &self.receiver {
            fields.push(("receiver", receiver));
        }
        fields.push(("identity", checked.kind));
        if let Some(mechanism) = &mechanism {
            fields.push(("mechanism", mechanism));
        }
        if let Some(problem) = &problem {
            fields.push(("problem", problem));
        }
        for (i, (key, value)) in fields.iter().enumerate() {
            header.push_str(if i == 0 { " " } else { "; " });
            header.push_str(key);
            header.push('=');
            header.push_str(&dot_atom_or_quoted(value));
        }
        SpfOutcome {
            result,
            explanation: exp.unwrap_or(comment),
            mechanism,
            received_spf: header,
            guessed,
        }
    }
}

/// The MAIL FROM identity of one check.
struct MailFrom {
    /// `local@domain` as checked, or the text given when there is no domain to check.
    identity: String,
    /// The address as the MTA sent it, without brackets (`""` for the null sender).
    envelope_from: String,
    /// What viaspf evaluates; `None` without a valid domain (RFC 7208 §4.3: `none`).
    sender: Option<Sender>,
}

impl MailFrom {
    /// The identity of the envelope sender `text` (any form the MTA passes).
    ///
    /// The null sender is `postmaster@<helo>` (RFC 7208 §2.4). Otherwise only the domain must be
    /// valid (§4.3: ‘If the <domain> is malformed […] check_host() immediately returns the result
    /// "none"’). The local part serves `%{l}` and `%{s}` alone, so it is kept as the MTA sent it,
    /// even where it is not RFC 5321 syntax (an unquoted space); an empty one (`<@example.net>`)
    /// is `postmaster` (§4.3: ‘If the <sender> has no local-part, substitute the string
    /// "postmaster" for the local-part.’).
    fn new(text: &str, helo: &str) -> Self {
        let (local, domain, envelope_from) = match parse_address(text) {
            Ok(address) if address.is_null() => {
                (String::new(), Some(helo.to_owned()), String::new())
            }
            Ok(address) if address.domain.is_some() => (
                dot_atom_or_quoted(&address.local),
                address.domain.clone(),
                address.address(),
            ),
            // Not an address the parser takes (`<@example.net>`, `<a b@example.net>`) or one
            // without a domain: the text as sent, split at its last `@`, without a source route.
            _ => {
                let trimmed = text.trim();
                let inner = trimmed
                    .strip_prefix('<')
                    .and_then(|rest| rest.strip_suffix('>'))
                    .unwrap_or(trimmed);
                let (local, domain) = split(inner);
                let local = match local.strip_prefix('@').and_then(|r| r.split_once(':')) {
                    Some((_route, local)) => local,
                    None => local,
                };
                (local.to_owned(), domain, inner.to_owned())
            }
        };
        let local = if local.is_empty() {
            "postmaster"
        } else {
            &local
        };
        let Some(domain) = domain else {
            return Self {
                identity: envelope_from.clone(),
                envelope_from,
                sender: None,
            };
        };
        let sender = DomainName::new(&domain)
            .ok()
            .map(|name| Sender::from_parts(local, name));
        Self {
            identity: format!("{local}@{domain}"),
            envelope_from,
            sender,
        }
    }
}

/// Text made safe inside a header comment: parentheses and backslashes escaped, control
/// characters replaced by spaces.
fn comment_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '(' | ')' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// The viaspf `Lookup` adapter over the shared resolver: NXDOMAIN and NODATA are "no records"
/// (they count as void lookups), timeouts are timeouts, everything else (SERVFAIL, REFUSED,
/// network errors) is a DNS error, i.e. `temperror`.
struct DnsLookup(Arc<Resolver>);

fn lookup_error(error: DnsError) -> LookupError {
    match error {
        DnsError::NxDomain | DnsError::NoData => LookupError::NoRecords,
        DnsError::Timeout => LookupError::Timeout,
        other => LookupError::Dns(Some(Box::new(other))),
    }
}

fn to_names(names: Vec<String>) -> LookupResult<Vec<Name>> {
    names
        .iter()
        .map(|name| Name::new(name).map_err(|e| LookupError::Dns(Some(Box::new(e)))))
        .collect()
}

#[async_trait]
impl Lookup for DnsLookup {
    async fn lookup_a<'lookup, 'a>(&'lookup self, name: &'a Name) -> LookupResult<Vec<Ipv4Addr>> {
        self.0.a(name.as_str()).await.map_err(lookup_error)
    }

    async fn lookup_aaaa<'lookup, 'a>(
        &'lookup self,
        name: &'a Name,
    ) -> LookupResult<Vec<Ipv6Addr>> {
        self.0.aaaa(name.as_str()).await.map_err(lookup_error)
    }

    /// A null MX (`0 .`, RFC 7505) names no host: the root is left out, so `mx` does not match
    /// for it (the RFC 7208 test suite's `mx-empty`: neutral). An answer of the null MX alone
    /// then counts as a void lookup, as the address lookup of the root would have.
    async fn lookup_mx<'lookup, 'a>(&'lookup self, name: &'a Name) -> LookupResult<Vec<Name>> {
        let mx = self.0.mx(name.as_str()).await.map_err(lookup_error)?;
        to_names(
            mx.into_iter()
                .map(|(_, exchange)| exchange)
                .filter(|exchange| exchange != ".")
                .collect(),
        )
    }

    async fn lookup_txt<'lookup, 'a>(&'lookup self, name: &'a Name) -> LookupResult<Vec<String>> {
        self.0.txt(name.as_str()).await.map_err(lookup_error)
    }

    async fn lookup_ptr<'lookup>(&'lookup self, ip: IpAddr) -> LookupResult<Vec<Name>> {
        to_names(self.0.ptr(ip).await.map_err(lookup_error)?)
    }
}

/// The best-guess wrapper (see the module documentation).
struct GuessLookup<'l> {
    inner: &'l DnsLookup,
    record: &'l str,
    first_txt: AtomicBool,
    guessed: AtomicBool,
}

/// RFC 7208 §4.5: a record starting with exactly `v=spf1` (case-insensitive) and a space or end.
fn is_spf_record(text: &str) -> bool {
    text.get(..6)
        .is_some_and(|v| v.eq_ignore_ascii_case("v=spf1"))
        && (text.len() == 6 || text[6..].starts_with(' '))
}

#[async_trait]
impl Lookup for GuessLookup<'_> {
    async fn lookup_a<'lookup, 'a>(&'lookup self, name: &'a Name) -> LookupResult<Vec<Ipv4Addr>> {
        self.inner.lookup_a(name).await
    }

    async fn lookup_aaaa<'lookup, 'a>(
        &'lookup self,
        name: &'a Name,
    ) -> LookupResult<Vec<Ipv6Addr>> {
        self.inner.lookup_aaaa(name).await
    }

    async fn lookup_mx<'lookup, 'a>(&'lookup self, name: &'a Name) -> LookupResult<Vec<Name>> {
        self.inner.lookup_mx(name).await
    }

    async fn lookup_txt<'lookup, 'a>(&'lookup self, name: &'a Name) -> LookupResult<Vec<String>> {
        let answer = self.inner.lookup_txt(name).await;
        if !self.first_txt.swap(false, Ordering::Relaxed) {
            return answer;
        }
        match answer {
            Ok(records) if records.iter().any(|r| is_spf_record(r)) => Ok(records),
            Ok(_) | Err(LookupError::NoRecords) => {
                self.guessed.store(true, Ordering::Relaxed);
                Ok(vec![self.record.to_owned()])
            }
            Err(error) => Err(error),
        }
    }

    async fn lookup_ptr<'lookup>(&'lookup self, ip: IpAddr) -> LookupResult<Vec<Name>> {
        self.inner.lookup_ptr(ip).await
    }
}
