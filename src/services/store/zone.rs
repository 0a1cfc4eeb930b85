//! Export of banned IPs as BIND zone data for an IP DNSBL (the seed's `ban2zone.py`).
//!
//! Each banned IP becomes `<reversed address> IN A 127.0.0.2`; IPv4 in dotted reverse form,
//! IPv6 in nibble form. An IPv4 /24 with more than 128 banned addresses becomes one wildcard
//! record. Whitelisted IPs are left out; a whitelisted IP inside a wildcard /24 gets a TXT
//! record of its own, which keeps the wildcard from answering for it (RFC 4592: a wildcard
//! never matches a name that exists). The output starts with `$ORIGIN` and `$TTL` and has no
//! SOA or NS records: `$INCLUDE` it from the zone file that holds those (and its serial).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{List, Result, Store};

/// Answer of every record, the usual DNSBL "listed" address.
const LISTED: &str = "127.0.0.2";
/// A /24 with more banned addresses than this is exported as a wildcard.
const WILDCARD_OVER: usize = 128;

/// Reads the banned IPs and the whitelist from `store` and renders the zone.
pub async fn export_zone(store: &dyn Store, zone: &str, ttl: u32) -> Result<String> {
    let whitelist: HashSet<IpAddr> = store
        .list_all(List::Whitelist)
        .await?
        .iter()
        .filter_map(|e| e.entry.parse().ok())
        .collect();
    let banned = store
        .list_all(List::BannedIp)
        .await?
        .iter()
        .filter_map(|e| e.entry.parse::<IpAddr>().ok())
        .collect::<Vec<_>>();
    Ok(bind_zone(&banned, &whitelist, zone, ttl))
}

/// Renders the banned `ips`, minus the `whitelist`ed ones, as zone data for `zone` with default
/// `ttl` seconds.
pub fn bind_zone(ips: &[IpAddr], whitelist: &HashSet<IpAddr>, zone: &str, ttl: u32) -> String {
    let mut v4_nets: BTreeMap<[u8; 3], BTreeSet<u8>> = BTreeMap::new();
    let mut v6: BTreeSet<Ipv6Addr> = BTreeSet::new();
    for ip in ips.iter().filter(|ip| !whitelist.contains(ip)) {
        match ip {
            IpAddr::V4(v4) => {
                let [a, b, c, d] = v4.octets();
                v4_nets.entry([a, b, c]).or_default().insert(d);
            }
            IpAddr::V6(v6addr) => {
                v6.insert(*v6addr);
            }
        }
    }
    let origin = zone.trim_end_matches('.');
    let mut out = String::new();
    let _ = writeln!(out, "; banned IPs exported by luamilter");
    let _ = writeln!(out, "$ORIGIN {origin}.");
    let _ = writeln!(out, "$TTL {ttl}");
    for ([a, b, c], hosts) in &v4_nets {
        if hosts.len() > WILDCARD_OVER {
            let _ = writeln!(
                out,
                "*.{c}.{b}.{a} IN A {LISTED} ; {} ips banned",
                hosts.len()
            );
            let mut exempt: Vec<Ipv4Addr> = whitelist
                .iter()
                .filter_map(|ip| match ip {
                    IpAddr::V4(v4) if v4.octets()[..3] == [*a, *b, *c] => Some(*v4),
                    _ => None,
                })
                .collect();
            exempt.sort();
            for ip in exempt {
                let _ = writeln!(out, "{} IN TXT \"whitelisted\"", reverse_v4(ip));
            }
        } else {
            for d in hosts {
                let name = reverse_v4(Ipv4Addr::new(*a, *b, *c, *d));
                let _ = writeln!(out, "{name} IN A {LISTED}");
            }
        }
    }
    for ip in &v6 {
        let _ = writeln!(out, "{} IN A {LISTED}", reverse_v6(*ip));
    }
    out
}

fn reverse_v4(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("{d}.{c}.{b}.{a}")
}

/// The 32 nibbles of `ip`, least significant first, dot-separated.
fn reverse_v6(ip: Ipv6Addr) -> String {
    let bits = u128::from(ip);
    (0..32)
        .map(|i| format!("{:x}", (bits >> (4 * i)) & 0xf))
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_server::proto::rr::{RData, RecordType};
    use hickory_server::proto::serialize::txt::Parser;

    /// A /24 over the wildcard limit with a whitelisted address in it: one wildcard, and the
    /// whitelisted name exists (TXT) so the wildcard does not cover it; no other record.
    #[test]
    fn whitelisted_ip_inside_a_wildcard_is_left_out() {
        let ips: Vec<IpAddr> = (0..=129)
            .map(|d| IpAddr::V4(Ipv4Addr::new(198, 51, 100, d)))
            .collect();
        let whitelist: HashSet<IpAddr> = ["198.51.100.7", "192.0.2.1"]
            .iter()
            .map(|ip| ip.parse().unwrap())
            .collect();
        let text = bind_zone(&ips, &whitelist, "bl.example.org", 600);
        let (_, records) = Parser::new(text.as_str(), None, None).parse().unwrap();
        let mut found: Vec<(String, RecordType, String)> = records
            .values()
            .flat_map(|set| set.records_without_rrsigs())
            .map(|r| {
                let data = match &r.data {
                    RData::A(a) => a.0.to_string(),
                    RData::TXT(t) => t.to_string(),
                    other => panic!("unexpected record {other:?}"),
                };
                (r.name.to_ascii(), r.record_type(), data)
            })
            .collect();
        found.sort();
        assert_eq!(
            found,
            [
                (
                    "*.100.51.198.bl.example.org.".to_string(),
                    RecordType::A,
                    "127.0.0.2".to_string()
                ),
                (
                    "7.100.51.198.bl.example.org.".to_string(),
                    RecordType::TXT,
                    "whitelisted".to_string()
                ),
            ]
        );
        assert!(text.contains("; 129 ips banned"), "{text}");
    }

    #[test]
    fn nibbles() {
        let ip: Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert_eq!(
            reverse_v6(ip),
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
        );
    }
}
