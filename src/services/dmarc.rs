//! DMARC (RFC 7489): the policy of the From domain, and whether SPF or DKIM passed for a domain
//! aligned with it. Policy discovery is RFC 7489 §6.6.3: `_dmarc.<From domain>`, else
//! `_dmarc.<organizational domain>`, the organizational domain taken from the Public Suffix List
//! (the `psl` crate). Records are parsed by `mail-auth`; lookups go through our resolver.

use super::dns::{DnsError, Resolver};
use mail_auth::{
    common::parse::TxtRecordParser,
    dmarc::{Alignment, Dmarc, Policy},
};

/// What a DMARC check starts from: the From domain and the results already computed.
#[derive(Debug, Clone, Default)]
pub struct DmarcInput {
    /// The RFC 5322 From domain.
    pub from_domain: String,
    /// The SPF result (RFC 8601 word) and the domain SPF checked (MAIL FROM or HELO).
    pub spf: Option<(String, String)>,
    /// The `d=` domains of the DKIM signatures that passed.
    pub dkim_pass: Vec<String>,
}

/// The outcome of a DMARC check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmarcOutcome {
    /// `pass`, `fail`, `none` (no policy), `temperror` or `permerror`.
    pub result: &'static str,
    /// The policy requested for this message: `none`, `quarantine` or `reject` (after `t=y`);
    /// `none` when there is no record.
    pub policy: &'static str,
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

fn mode_word(mode: &Alignment) -> &'static str {
    match mode {
        Alignment::Strict => "s",
        Alignment::Relaxed => "r",
    }
}

/// The DMARC record at `_dmarc.<domain>`: `Ok(None)` when there is none.
async fn record(resolver: &Resolver, domain: &str) -> Result<Option<Dmarc>, DnsError> {
    match resolver.txt(&format!("_dmarc.{domain}")).await {
        Ok(records) => Ok(records
            .iter()
            .filter_map(|r| Dmarc::parse(r.as_bytes()).ok())
            .next()),
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
    let (dmarc, record_domain, own) = match found {
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
    let mut word = policy_word(policy);
    if dmarc.t {
        word = match word {
            "reject" => "quarantine",
            _ => "none",
        };
    }
    outcome.policy = word;
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
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

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
