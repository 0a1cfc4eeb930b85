//! The DNS service: one shared, caching hickory resolver for the whole process, typed lookups
//! (A, AAAA, MX, TXT, PTR, NS), forward-confirmed reverse DNS and DNSBL/RHSBL queries.
//!
//! Every failure is a [`DnsError`] with a short stable code (`"nxdomain"`, `"timeout"`, ...) that
//! the `milter.dns` Lua module (in `lua_api`) hands to policies as `nil, code`. Names given to
//! lookups are always treated as fully qualified (no search list), ASCII ones sent byte for byte
//! (SPF names need not be host names), and names returned have no trailing root dot, so they
//! compare equal to HELO names and mail domains.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError as HickoryDnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use serde::Deserialize;

use super::dns_zone::Zones;

/// How many PTR names [`Resolver::fcrdns`] checks at most (as RFC 7208 §5.5 does for `ptr`).
const MAX_PTR_NAMES: usize = 10;

/// Resolver settings (`[dns]` in the config file).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Nameservers as `"ip"` or `"ip:port"`; empty means those of `/etc/resolv.conf`.
    #[serde(deserialize_with = "deserialize_nameservers")]
    pub nameservers: Vec<SocketAddr>,
    /// Time to wait for one answer.
    #[serde(deserialize_with = "crate::duration::serde_duration::deserialize")]
    pub timeout: Duration,
    /// How many times a query is sent before giving up.
    pub attempts: usize,
    /// Number of answers kept in the cache.
    pub cache_size: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(5),
            attempts: 2,
            cache_size: 8192,
        }
    }
}

/// Accepts `"192.0.2.1"` (port 53), `"192.0.2.1:5353"`, `"2001:db8::1"` and `"[2001:db8::1]:5353"`.
fn deserialize_nameservers<'de, D>(deserializer: D) -> Result<Vec<SocketAddr>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Vec::<String>::deserialize(deserializer)?
        .iter()
        .map(|s| {
            s.parse::<SocketAddr>()
                .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                .map_err(|_| serde::de::Error::custom(format!("invalid nameserver address {s:?}")))
        })
        .collect()
}

/// Why a lookup produced no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// The name does not exist (also returned for names that are not valid DNS names).
    #[error("domain does not exist")]
    NxDomain,
    /// The name exists but has no record of the asked type.
    #[error("no record of the requested type")]
    NoData,
    /// The server answered SERVFAIL.
    #[error("server failure")]
    ServFail,
    /// The server answered REFUSED.
    #[error("query refused")]
    Refused,
    /// No answer in time.
    #[error("timed out")]
    Timeout,
    /// Anything else (network errors, other response codes).
    #[error("DNS error: {0}")]
    Other(String),
}

impl DnsError {
    /// The short stable word policies branch on.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NxDomain => "nxdomain",
            Self::NoData => "nodata",
            Self::ServFail => "servfail",
            Self::Refused => "refused",
            Self::Timeout => "timeout",
            Self::Other(_) => "error",
        }
    }

    fn from_response_code(code: ResponseCode) -> Self {
        match code {
            ResponseCode::NXDomain => Self::NxDomain,
            ResponseCode::NoError => Self::NoData,
            ResponseCode::ServFail => Self::ServFail,
            ResponseCode::Refused => Self::Refused,
            other => Self::Other(format!("response code {other}")),
        }
    }
}

impl From<NetError> for DnsError {
    fn from(error: NetError) -> Self {
        match error {
            NetError::Timeout => Self::Timeout,
            NetError::Dns(HickoryDnsError::NoRecordsFound(no)) => {
                Self::from_response_code(no.response_code)
            }
            NetError::Dns(HickoryDnsError::ResponseCode(code)) => Self::from_response_code(code),
            other => Self::Other(other.to_string()),
        }
    }
}

/// Construction of a [`Resolver`] failed (e.g. `/etc/resolv.conf` unreadable).
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the DNS resolver: {0}")]
pub struct SetupError(#[from] NetError);

/// A DNSBL or RHSBL listing: the A records found (e.g. `127.0.0.2`) and the TXT reason, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The A records of the listing, in answer order.
    pub codes: Vec<Ipv4Addr>,
    /// The TXT record of the listing, if the list publishes one.
    pub reason: Option<String>,
}

/// The process-wide DNS resolver: one hickory `TokioResolver` with its cache, or (for
/// `luamilter test`) static answers from zone files.
#[derive(Clone)]
pub struct Resolver {
    inner: Backend,
}

// One per process, behind an Arc: the size of the live variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
enum Backend {
    Live(TokioResolver),
    Static(std::sync::Arc<Zones>),
}

impl Resolver {
    /// Builds the resolver from `config` (nameservers from `/etc/resolv.conf` when the list is
    /// empty). Must be called inside a tokio runtime.
    pub fn new(config: &DnsConfig) -> Result<Self, SetupError> {
        let builder = if config.nameservers.is_empty() {
            TokioResolver::builder_tokio()?
        } else {
            let servers = config
                .nameservers
                .iter()
                .map(|addr| {
                    let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                    for connection in &mut server.connections {
                        connection.port = addr.port();
                    }
                    server
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, Vec::new(), servers),
                TokioRuntimeProvider::default(),
            )
        };
        let mut builder = builder;
        let options: &mut ResolverOpts = builder.options_mut();
        options.timeout = config.timeout;
        options.attempts = config.attempts.max(1);
        options.cache_size = config.cache_size as u64;
        options.use_hosts_file = ResolveHosts::Never;
        options.ndots = 0;
        options.preserve_intermediates = false;
        Ok(Self {
            inner: Backend::Live(builder.build()?),
        })
    }

    /// A resolver that answers from `zones` only and never touches the network.
    pub fn from_zones(zones: Zones) -> Self {
        Self {
            inner: Backend::Static(std::sync::Arc::new(zones)),
        }
    }

    /// Runs one query and returns the answer data of the asked type (never empty).
    async fn query(&self, name: &str, rtype: RecordType) -> Result<Vec<RData>, DnsError> {
        super::calls::note(super::calls::Service::Dns);
        let inner = match &self.inner {
            Backend::Live(inner) => inner,
            Backend::Static(zones) => return zones.answer(name, rtype),
        };
        let answer = Self::lookup(inner, name, rtype).await;
        let result = answer.as_ref().map_or_else(DnsError::code, |_| "ok");
        crate::metrics::dns_query(rtype.into(), result);
        answer
    }

    async fn lookup(
        inner: &TokioResolver,
        name: &str,
        rtype: RecordType,
    ) -> Result<Vec<RData>, DnsError> {
        let name = query_name(name).ok_or(DnsError::NxDomain)?;
        let lookup = inner.lookup(name, rtype).await?;
        let data: Vec<RData> = lookup
            .answers()
            .iter()
            .filter(|record| record.record_type() == rtype)
            .map(|record| record.data.clone())
            .collect();
        if data.is_empty() {
            Err(DnsError::NoData)
        } else {
            Ok(data)
        }
    }

    /// IPv4 addresses of `name`.
    pub async fn a(&self, name: &str) -> Result<Vec<Ipv4Addr>, DnsError> {
        let data = self.query(name, RecordType::A).await?;
        Ok(data
            .into_iter()
            .filter_map(|d| match d {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect())
    }

    /// IPv6 addresses of `name`.
    pub async fn aaaa(&self, name: &str) -> Result<Vec<Ipv6Addr>, DnsError> {
        let data = self.query(name, RecordType::AAAA).await?;
        Ok(data
            .into_iter()
            .filter_map(|d| match d {
                RData::AAAA(aaaa) => Some(aaaa.0),
                _ => None,
            })
            .collect())
    }

    /// Mail exchangers of `name` as `(preference, exchange)`, lowest preference first.
    pub async fn mx(&self, name: &str) -> Result<Vec<(u16, String)>, DnsError> {
        let data = self.query(name, RecordType::MX).await?;
        let mut mx: Vec<(u16, String)> = data
            .into_iter()
            .filter_map(|d| match d {
                RData::MX(mx) => Some((mx.preference, name_text(&mx.exchange))),
                _ => None,
            })
            .collect();
        mx.sort();
        Ok(mx)
    }

    /// TXT records of `name`, the strings of each record joined without separator (invalid
    /// UTF-8 replaced).
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError> {
        let data = self.query(name, RecordType::TXT).await?;
        Ok(data
            .into_iter()
            .filter_map(|d| match d {
                RData::TXT(txt) => {
                    Some(String::from_utf8_lossy(&txt.txt_data.concat()).into_owned())
                }
                _ => None,
            })
            .collect())
    }

    /// PTR names of `ip` (the in-addr.arpa / ip6.arpa name is built here; an IPv4-mapped IPv6
    /// address is looked up as IPv4).
    pub async fn ptr(&self, ip: IpAddr) -> Result<Vec<String>, DnsError> {
        let ip = ip.to_canonical();
        let data = self
            .query(&Name::from(ip).to_ascii(), RecordType::PTR)
            .await?;
        Ok(data
            .into_iter()
            .filter_map(|d| match d {
                RData::PTR(ptr) => Some(name_text(&ptr.0)),
                _ => None,
            })
            .collect())
    }

    /// Nameservers of `name`.
    pub async fn ns(&self, name: &str) -> Result<Vec<String>, DnsError> {
        let data = self.query(name, RecordType::NS).await?;
        Ok(data
            .into_iter()
            .filter_map(|d| match d {
                RData::NS(ns) => Some(name_text(&ns.0)),
                _ => None,
            })
            .collect())
    }

    /// Forward-confirmed reverse DNS: the PTR names of `ip` (at most ten are checked) whose A
    /// (IPv4) or AAAA (IPv6) records include `ip`. An empty list means no name is confirmed. An
    /// error is returned when the PTR lookup fails, or when no name is confirmed and a forward
    /// lookup failed temporarily (so a policy can tell "unconfirmed" from "could not check").
    pub async fn fcrdns(&self, ip: IpAddr) -> Result<Vec<String>, DnsError> {
        let ip = ip.to_canonical();
        let names = self.ptr(ip).await?;
        let mut checks = tokio::task::JoinSet::new();
        for (index, name) in names.into_iter().take(MAX_PTR_NAMES).enumerate() {
            let resolver = self.clone();
            checks.spawn(async move {
                let found = match ip {
                    IpAddr::V4(v4) => resolver.a(&name).await.map(|list| list.contains(&v4)),
                    IpAddr::V6(v6) => resolver.aaaa(&name).await.map(|list| list.contains(&v6)),
                };
                (index, name, found)
            });
        }
        let mut confirmed = Vec::new();
        let mut temporary = None;
        while let Some(joined) = checks.join_next().await {
            let (index, name, found) = joined.map_err(|e| DnsError::Other(e.to_string()))?;
            match found {
                Ok(true) => confirmed.push((index, name)),
                Ok(false) | Err(DnsError::NxDomain | DnsError::NoData) => {}
                Err(error) => temporary = Some(error),
            }
        }
        confirmed.sort();
        let confirmed: Vec<String> = confirmed.into_iter().map(|(_, name)| name).collect();
        match temporary {
            Some(error) if confirmed.is_empty() => Err(error),
            _ => Ok(confirmed),
        }
    }

    /// Queries DNS blocklist `zone` for `ip` (IPv4 and IPv4-mapped: reversed octets, IPv6:
    /// reversed nibbles). `Ok(None)` means not listed (NXDOMAIN or no A record).
    pub async fn dnsbl(&self, ip: IpAddr, zone: &str) -> Result<Option<Listing>, DnsError> {
        let zone = zone.trim_end_matches('.');
        self.listing(&format!("{}.{zone}", reversed_ip(ip.to_canonical())))
            .await
    }

    /// Queries right-hand-side blocklist `zone` for `domain`. `Ok(None)` means not listed.
    pub async fn rhsbl(&self, domain: &str, zone: &str) -> Result<Option<Listing>, DnsError> {
        let (domain, zone) = (domain.trim_end_matches('.'), zone.trim_end_matches('.'));
        self.listing(&format!("{domain}.{zone}")).await
    }

    async fn listing(&self, name: &str) -> Result<Option<Listing>, DnsError> {
        match self.a(name).await {
            Ok(codes) => {
                let reason = self.txt(name).await.ok().map(|txt| txt.join(" "));
                Ok(Some(Listing { codes, reason }))
            }
            Err(DnsError::NxDomain | DnsError::NoData) => Ok(None),
            Err(error) => Err(error),
        }
    }
}

/// The name to query for `text` (always fully qualified; one trailing dot is optional).
///
/// ASCII text is taken byte for byte, one label between dots: the DNS allows any octet in a label
/// (RFC 2181 §11), and SPF names are such text: `a:foo:bar/baz.example.com`, or what a macro
/// expands to (`%%`, `%_`: a `%` or a space, RFC 7208 §7.1). They are queried as written, not
/// refused by hostname rules. Other text goes through IDNA, so `bücher.example` is looked up by
/// its A-labels. `None` when no name can stand for `text`: an empty label, a label over 63 octets,
/// a name over 255, text IDNA refuses.
fn query_name(text: &str) -> Option<Name> {
    if !text.is_ascii() {
        let mut name = Name::from_utf8(text).ok()?;
        name.set_fqdn(true);
        return Some(name);
    }
    let text = text.strip_suffix('.').unwrap_or(text);
    if text.is_empty() {
        return Some(Name::root());
    }
    Name::from_labels(text.split('.').map(str::as_bytes)).ok()
}

/// A name as policies see it: its labels as they are (A-labels stay A-labels) joined by dots,
/// without the trailing root dot; the root is `"."`. No escapes, so a name read from an answer
/// (an MX host, a PTR name) is queried again as the same name by [`query_name`] (all but a label
/// holding a dot, which reads as two).
fn name_text(name: &Name) -> String {
    if name.is_root() {
        return ".".to_owned();
    }
    let labels: Vec<String> = name
        .iter()
        .map(|label| String::from_utf8_lossy(label).into_owned())
        .collect();
    labels.join(".")
}

/// The DNSBL query label for `ip`: `4.3.2.1` for 1.2.3.4, 32 reversed nibbles for IPv6.
fn reversed_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}")
        }
        IpAddr::V6(v6) => {
            let hex = format!("{:032x}", u128::from(v6));
            let nibbles: Vec<String> = hex.chars().rev().map(String::from).collect();
            nibbles.join(".")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reversed_ip_forms() {
        assert_eq!(reversed_ip("192.0.2.1".parse().unwrap()), "1.2.0.192");
        assert_eq!(
            reversed_ip("2001:db8::1".parse().unwrap()),
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
        );
    }

    #[test]
    fn query_names_keep_every_ascii_octet() {
        let labels = |text: &str| -> Option<Vec<Vec<u8>>> {
            query_name(text).map(|name| {
                assert!(name.is_fqdn(), "{text}");
                name.iter().map(<[u8]>::to_vec).collect()
            })
        };
        let bytes = |list: &[&str]| Some(list.iter().map(|l| l.as_bytes().to_vec()).collect());
        assert_eq!(
            labels("foo:bar/baz.Example.com"),
            bytes(&["foo:bar/baz", "Example", "com"])
        );
        assert_eq!(
            labels("macro%percent  space%20url-space.example.com."),
            bytes(&["macro%percent  space%20url-space", "example", "com"])
        );
        assert_eq!(
            labels("_spf.example.com"),
            bytes(&["_spf", "example", "com"])
        );
        assert_eq!(
            labels("bücher.example"),
            bytes(&["xn--bcher-kva", "example"])
        );
        assert_eq!(labels("."), bytes(&[]));
        for invalid in ["not a name..", "a..b", ".a", &"x".repeat(64)] {
            assert_eq!(labels(invalid), None, "{invalid}");
        }
    }

    #[test]
    fn name_text_round_trips_through_query_name() {
        for text in [
            "mx1.example.test",
            "foo:bar/baz.example.com",
            "a b.users.example",
            ".",
        ] {
            assert_eq!(name_text(&query_name(text).unwrap()), text);
        }
        assert_eq!(name_text(&query_name("Mixed.Case.").unwrap()), "Mixed.Case");
    }

    #[test]
    fn config_parses_nameserver_forms_and_rejects_unknown_keys() {
        let config: DnsConfig = toml::from_str(
            r#"nameservers = ["192.0.2.1", "192.0.2.2:5353", "2001:db8::1", "[2001:db8::2]:54"]
               timeout = "1500ms""#,
        )
        .unwrap();
        assert_eq!(
            config.nameservers,
            [
                "192.0.2.1:53",
                "192.0.2.2:5353",
                "[2001:db8::1]:53",
                "[2001:db8::2]:54"
            ]
            .map(|s| s.parse::<SocketAddr>().unwrap())
        );
        assert_eq!(config.timeout, Duration::from_millis(1500));
        assert_eq!(config.attempts, DnsConfig::default().attempts);
        assert!(toml::from_str::<DnsConfig>("retries = 3").is_err());
        let err = toml::from_str::<DnsConfig>(r#"nameservers = ["nope"]"#).unwrap_err();
        assert!(
            err.to_string()
                .contains("invalid nameserver address \"nope\""),
            "{err}"
        );
    }

    #[test]
    fn error_codes() {
        let codes: Vec<&str> = [
            DnsError::NxDomain,
            DnsError::NoData,
            DnsError::ServFail,
            DnsError::Refused,
            DnsError::Timeout,
            DnsError::Other("x".into()),
        ]
        .iter()
        .map(DnsError::code)
        .collect();
        assert_eq!(
            codes,
            [
                "nxdomain", "nodata", "servfail", "refused", "timeout", "error"
            ]
        );
    }
}
