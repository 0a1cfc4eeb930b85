//! DMARC (RFC 7489): the policy of the From domain, and whether SPF or DKIM passed for a domain
//! aligned with it. Policy discovery is RFC 7489 §6.6.3: `_dmarc.<From domain>`, else
//! `_dmarc.<organizational domain>`, the organizational domain taken from the Public Suffix List
//! (the `psl` crate). Records are parsed by `mail-auth`; lookups go through our resolver.

use super::dns::{DnsError, Resolver};
use mail_auth::{
    common::parse::TxtRecordParser,
    dmarc::{Alignment, Dmarc, Policy},
};
use sha1::Digest;

/// What a DMARC check starts from: the From domain and the results already computed.
#[derive(Debug, Clone, Default)]
pub struct DmarcInput {
    /// The RFC 5322 From domain.
    pub from_domain: String,
    /// The SPF result (RFC 8601 word) and the domain SPF checked (MAIL FROM or HELO).
    pub spf: Option<(String, String)>,
    /// The `d=` domains of the DKIM signatures that passed.
    pub dkim_pass: Vec<String>,
    /// The message's place in the `pct=` sample, in [0, 100): the policy applies to a failing
    /// message when `sample < pct` (see [`sample_of`]).
    pub sample: f64,
}

/// The outcome of a DMARC check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmarcOutcome {
    /// `pass`, `fail`, `none` (no policy), `temperror` or `permerror`.
    pub result: &'static str,
    /// The policy for this message: `none`, `quarantine` or `reject`, lowered one step by
    /// `t=y` or, for a failing message outside the `pct=` sample, by sampling; `none` when
    /// there is no record.
    pub policy: &'static str,
    /// The policy the record publishes for the From domain (`p=`, or `sp=` for a subdomain).
    pub published: &'static str,
    /// The record's `pct=` (100 when absent or invalid).
    pub pct: u8,
    /// Whether the policy applies in full: false when the message failed and fell outside the
    /// `pct=` sample, so `policy` is one step below `published`.
    pub sampled: bool,
    /// The From domain.
    pub domain: String,
    /// Its organizational domain.
    pub org_domain: String,
    /// Where the applied record was found.
    pub record_domain: Option<String>,
    /// Whether SPF passed for an aligned domain.
    pub spf_aligned: bool,
    /// Whether a DKIM signature passed for an aligned domain.
    pub dkim_aligned: bool,
    /// Alignment modes of the record (`r` or `s`), SPF then DKIM.
    pub modes: (&'static str, &'static str),
    /// Aggregate report addresses (`rua=`, without `mailto:`).
    pub rua: Vec<String>,
}

/// The organizational domain of `domain`: its registrable part under the Public Suffix List,
/// or the domain itself when it is a public suffix or unknown.
pub fn organizational_domain(domain: &str) -> String {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    psl::domain_str(&domain).unwrap_or(&domain).to_string()
}

/// The author domain (RFC 7489 §6.6.1): the domain of the From header's addresses. `None` when
/// there is no From header, several of them, or addresses in different domains (DMARC then does
/// not apply).
pub fn author_domain(headers: &[(String, String)]) -> Option<String> {
    let mut from = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("From"));
    let (_, value) = from.next()?;
    if from.next().is_some() {
        return None;
    }
    let addresses = mailparse::addrparse(value).ok()?;
    let mut domains = addresses.iter().flat_map(|a| match a {
        mailparse::MailAddr::Single(s) => vec![s.addr.clone()],
        mailparse::MailAddr::Group(g) => g.addrs.iter().map(|s| s.addr.clone()).collect(),
    });
    let first = domains.next()?.rsplit_once('@')?.1.to_ascii_lowercase();
    domains
        .all(|a| {
            a.rsplit_once('@')
                .is_some_and(|(_, d)| d.eq_ignore_ascii_case(&first))
        })
        .then_some(first)
}

/// Whether `a` and `b` are aligned under `mode`.
fn aligned(a: &str, b: &str, mode: &Alignment) -> bool {
    match mode {
        Alignment::Strict => a.eq_ignore_ascii_case(b),
        Alignment::Relaxed => organizational_domain(a) == organizational_domain(b),
    }
}

fn policy_word(policy: &Policy) -> &'static str {
    match policy {
        Policy::Reject => "reject",
        Policy::Quarantine => "quarantine",
        Policy::None | Policy::Unspecified => "none",
    }
}

/// One step down: `reject` → `quarantine` → `none` (RFC 7489 §6.6.4, `t=y`).
fn lower(policy: &'static str) -> &'static str {
    match policy {
        "reject" => "quarantine",
        _ => "none",
    }
}

/// The `pct=` tag of a DMARC record (RFC 7489 §6.3): 100 when absent or not an integer from 0
/// to 100 (mail-auth follows DMARCbis, which dropped the tag, and does not parse it).
fn pct(record: &str) -> u8 {
    record
        .split(';')
        .filter_map(|tag| tag.split_once('='))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("pct"))
        .and_then(|(_, value)| value.trim().parse::<u8>().ok())
        .filter(|pct| *pct <= 100)
        .unwrap_or(100)
}

/// A message's place in the `pct=` sample, in [0, 100), derived from `key` (the MTA's queue id):
/// the same message gets the same disposition when it is replayed, and queue ids, which the
/// sender does not choose, spread evenly. Without a key, a random place.
pub fn sample_of(key: &str) -> f64 {
    if key.is_empty() {
        return fastrand::f64() * 100.0;
    }
    let digest = sha1::Sha1::digest(key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) % 10_000) as f64 / 100.0
}

fn mode_word(mode: &Alignment) -> &'static str {
    match mode {
        Alignment::Strict => "s",
        Alignment::Relaxed => "r",
    }
}

/// The DMARC record at `_dmarc.<domain>` and its `pct=`: `Ok(None)` when there is none.
async fn record(resolver: &Resolver, domain: &str) -> Result<Option<(Dmarc, u8)>, DnsError> {
    match resolver.txt(&format!("_dmarc.{domain}")).await {
        Ok(records) => Ok(records
            .iter()
            .find_map(|r| Some((Dmarc::parse(r.as_bytes()).ok()?, pct(r))))),
        Err(DnsError::NxDomain | DnsError::NoData) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Evaluates DMARC for `input`.
pub async fn check(resolver: &Resolver, input: &DmarcInput) -> DmarcOutcome {
    let domain = input.from_domain.trim_end_matches('.').to_ascii_lowercase();
    let org = organizational_domain(&domain);
    let mut outcome = DmarcOutcome {
        result: "none",
        policy: "none",
        published: "none",
        pct: 100,
        sampled: true,
        domain: domain.clone(),
        org_domain: org.clone(),
        record_domain: None,
        spf_aligned: false,
        dkim_aligned: false,
        modes: ("r", "r"),
        rua: Vec::new(),
    };
    if domain.is_empty() {
        return outcome;
    }
    let found = match record(resolver, &domain).await {
        Ok(Some(r)) => Ok(Some((r, domain.clone(), true))),
        Ok(None) if org != domain => record(resolver, &org)
            .await
            .map(|r| r.map(|r| (r, org.clone(), false))),
        Ok(None) => Ok(None),
        Err(e) => Err(e),
    };
    let ((dmarc, pct), record_domain, own) = match found {
        Ok(Some(found)) => found,
        Ok(None) => return outcome,
        Err(_) => {
            outcome.result = "temperror";
            return outcome;
        }
    };
    let mut policy = if own { &dmarc.p } else { &dmarc.sp };
    if matches!(policy, Policy::Unspecified) {
        policy = &dmarc.p;
    }
    outcome.published = policy_word(policy);
    outcome.policy = if dmarc.t {
        lower(outcome.published)
    } else {
        outcome.published
    };
    outcome.pct = pct;
    outcome.record_domain = Some(record_domain);
    outcome.modes = (mode_word(&dmarc.aspf), mode_word(&dmarc.adkim));
    outcome.rua = dmarc.rua.iter().map(|u| u.uri().to_string()).collect();
    outcome.spf_aligned = input.spf.as_ref().is_some_and(|(result, spf_domain)| {
        result == "pass" && aligned(spf_domain, &domain, &dmarc.aspf)
    });
    outcome.dkim_aligned = (input.dkim_pass.iter()).any(|d| aligned(d, &domain, &dmarc.adkim));
    outcome.result = if outcome.spf_aligned || outcome.dkim_aligned {
        "pass"
    } else {
        "fail"
    };
    // Sampling (RFC 7489 §6.6.4) concerns the messages the policy would act on. DMARCbis
    // replaced pct= by t=y, so with t=y the record's pct= is not applied a second time.
    if outcome.result == "fail" && !dmarc.t && input.sample >= f64::from(pct) {
        outcome.sampled = false;
        outcome.policy = lower(outcome.policy);
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pct_is_read_from_the_record_and_defaults_to_100() {
        assert_eq!(
            pct("v=DMARC1; p=reject; pct=25; rua=mailto:a@b.example"),
            25
        );
        assert_eq!(pct("v=DMARC1; p=reject;PCT = 0"), 0);
        assert_eq!(pct("v=DMARC1; p=reject"), 100);
        assert_eq!(pct("v=DMARC1; p=reject; pct=150"), 100);
        assert_eq!(pct("v=DMARC1; p=reject; pct=half"), 100);
    }

    #[test]
    fn the_sample_place_comes_from_the_queue_id() {
        let place = sample_of("4Z9xKq1Ab2z");
        assert_eq!(place, sample_of("4Z9xKq1Ab2z"));
        assert!((0.0..100.0).contains(&place));
        // Over many queue ids, the places spread over the range: about half under 50.
        let under = (0..1000)
            .filter(|i| sample_of(&format!("Q{i:05}")) < 50.0)
            .count();
        assert!((400..600).contains(&under), "{under}");
    }

    #[test]
    fn organizational_domains_follow_the_public_suffix_list() {
        assert_eq!(organizational_domain("mail.example.co.uk"), "example.co.uk");
        assert_eq!(organizational_domain("a.b.example.com"), "example.com");
        assert_eq!(organizational_domain("Example.COM."), "example.com");
        assert_eq!(organizational_domain("co.uk"), "co.uk");
    }

    #[test]
    fn the_author_domain_is_that_of_the_one_from_header() {
        let h = |v: &str| vec![("From".to_string(), v.to_string())];
        assert_eq!(
            author_domain(&h("Ann <ann@Example.org>")),
            Some("example.org".into())
        );
        assert_eq!(author_domain(&h("a@x.org, b@y.org")), None);
        assert_eq!(author_domain(&[]), None);
    }

    #[test]
    fn relaxed_alignment_is_by_organizational_domain_and_strict_by_name() {
        assert!(aligned(
            "bounce.example.co.uk",
            "example.co.uk",
            &Alignment::Relaxed
        ));
        assert!(!aligned(
            "other.co.uk",
            "example.co.uk",
            &Alignment::Relaxed
        ));
        assert!(!aligned(
            "bounce.example.com",
            "example.com",
            &Alignment::Strict
        ));
        assert!(aligned("EXAMPLE.com", "example.com", &Alignment::Strict));
    }
}
