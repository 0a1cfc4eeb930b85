//! Export of banned IPs as BIND zone data for an IP DNSBL (the seed's `ban2zone.py`).
//!
//! Each banned IP becomes `<reversed address> IN A 127.0.0.2`; IPv4 in dotted reverse form,
//! IPv6 in nibble form. An IPv4 /24 with more than 128 banned addresses becomes one wildcard
//! record. Whitelisted IPs are left out. The output starts with `$ORIGIN` and `$TTL` and has no
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
        .filter(|ip| !whitelist.contains(ip))
        .collect::<Vec<_>>();
    Ok(bind_zone(&banned, zone, ttl))
}

/// Renders `ips` as zone data for `zone` with default `ttl` seconds.
pub fn bind_zone(ips: &[IpAddr], zone: &str, ttl: u32) -> String {
    let mut v4_nets: BTreeMap<[u8; 3], BTreeSet<u8>> = BTreeMap::new();
    let mut v6: BTreeSet<Ipv6Addr> = BTreeSet::new();
    for ip in ips {
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

    #[test]
    fn nibbles() {
        let ip: Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert_eq!(
            reverse_v6(ip),
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
        );
    }
}
