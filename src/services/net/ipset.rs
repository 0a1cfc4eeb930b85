//! `IpSet`: a set of IPv4/IPv6 addresses and CIDR networks, compiled once into sorted,
//! merged ranges and matched with a binary search.
//!
//! IPv4 entries and lookups live in the IPv4-mapped IPv6 space (`::ffff:0:0/96`), so an
//! IPv4-mapped IPv6 client address (`::ffff:192.0.2.1`) matches IPv4 entries and the other way
//! round.

use std::net::IpAddr;

/// An entry of an [`IpSet`] could not be parsed; the message names the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid IP set entry {entry:?}: {reason}")]
pub struct IpSetError {
    /// The entry as given.
    pub entry: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// A compiled set of addresses and networks. Build it once, then call
/// [`contains`](Self::contains) as often as needed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpSet {
    /// Disjoint, non-adjacent inclusive ranges, sorted by start.
    ranges: Vec<(u128, u128)>,
}

impl IpSet {
    /// Builds a set from entries such as `"192.0.2.1"`, `"10.0.0.0/8"`, `"2001:db8::/32"` or
    /// `"::1"`. Host bits below the prefix are ignored (`10.1.2.3/8` is `10.0.0.0/8`).
    pub fn new<I, S>(entries: I) -> Result<Self, IpSetError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut ranges = entries
            .into_iter()
            .map(|entry| parse_entry(entry.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        ranges.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            match merged.last_mut() {
                Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        Ok(Self { ranges: merged })
    }

    /// Whether `ip` is in the set.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let key = as_u128(ip);
        let after = self.ranges.partition_point(|&(start, _)| start <= key);
        after > 0 && key <= self.ranges[after - 1].1
    }

    /// Whether the set has no entries.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// The address as a 128-bit number, IPv4 mapped into `::ffff:0:0/96`.
fn as_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// Parses one entry into an inclusive range.
fn parse_entry(entry: &str) -> Result<(u128, u128), IpSetError> {
    let error = |reason| IpSetError {
        entry: entry.to_owned(),
        reason,
    };
    let text = entry.trim();
    let (address, prefix) = match text.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (text, None),
    };
    let ip: IpAddr = address.parse().map_err(|_| error("not an IP address"))?;
    let width = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => width,
        Some(p) if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) => {
            return Err(error("prefix length is not a number"));
        }
        Some(p) => match p.parse::<u32>() {
            Ok(p) if p <= width => p,
            _ => return Err(error("prefix length too large")),
        },
    };
    // IPv4 prefixes count within the mapped space's last 32 bits.
    let bits = if ip.is_ipv4() { prefix + 96 } else { prefix };
    let host_mask = u128::MAX.checked_shr(bits).unwrap_or(0);
    let start = as_u128(ip) & !host_mask;
    Ok((start, start | host_mask))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn set(entries: &[&str]) -> IpSet {
        IpSet::new(entries).unwrap()
    }

    fn has(set: &IpSet, ip: &str) -> bool {
        set.contains(ip.parse().unwrap())
    }

    #[test]
    fn ipv4_addresses_and_networks() {
        let s = set(&["10.0.0.0/8", "192.0.2.7", "198.51.100.128/25"]);
        assert!(has(&s, "10.0.0.0") && has(&s, "10.255.255.255") && has(&s, "10.1.2.3"));
        assert!(!has(&s, "11.0.0.0") && !has(&s, "9.255.255.255"));
        assert!(has(&s, "192.0.2.7") && !has(&s, "192.0.2.6") && !has(&s, "192.0.2.8"));
        assert!(has(&s, "198.51.100.128") && has(&s, "198.51.100.255"));
        assert!(!has(&s, "198.51.100.127"));
    }

    #[test]
    fn ipv6_and_mapped_addresses() {
        let s = set(&["2001:db8::/32", "::1", "192.0.2.0/24"]);
        assert!(has(&s, "2001:db8:ffff::1") && !has(&s, "2001:db9::1"));
        assert!(has(&s, "::1") && !has(&s, "::2"));
        assert!(
            has(&s, "::ffff:192.0.2.9"),
            "IPv4-mapped IPv6 matches an IPv4 entry"
        );
        assert!(!has(&s, "::ffff:192.0.3.9"));
        assert!(
            !has(&s, "::192.0.2.9"),
            "IPv4-compatible form is not mapped"
        );
        let mapped = set(&["::ffff:203.0.113.0/120"]);
        assert!(
            has(&mapped, "203.0.113.5"),
            "IPv4 client matches a mapped IPv6 entry"
        );
    }

    #[test]
    fn host_bits_are_masked_and_edges_hold() {
        let s = set(&["10.1.2.3/8", "0.0.0.0/0"]);
        assert!(has(&s, "255.255.255.255") && has(&s, "0.0.0.0"));
        assert!(
            !has(&s, "::1") && !has(&s, "2001:db8::1"),
            "/0 of IPv4 is all of IPv4 only"
        );
        let all = set(&["::/0"]);
        assert!(has(&all, "1.2.3.4") && has(&all, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"));
        assert!(!set(&[]).contains("1.2.3.4".parse().unwrap()));
        assert!(set(&[]).is_empty());
    }

    #[test]
    fn overlapping_and_adjacent_entries_merge() {
        let s = set(&["10.0.0.0/24", "10.0.1.0/24", "10.0.0.128/25", "10.0.3.0/24"]);
        assert_eq!(s.ranges.len(), 2);
        assert_eq!(
            Ipv6Addr::from(s.ranges[0].0),
            "::ffff:10.0.0.0".parse::<Ipv6Addr>().unwrap()
        );
        assert!(has(&s, "10.0.1.255") && !has(&s, "10.0.2.0") && has(&s, "10.0.3.1"));
    }

    #[test]
    fn errors_name_the_entry() {
        for (entry, reason) in [
            ("10.0.0.0/33", "prefix length too large"),
            ("2001:db8::/129", "prefix length too large"),
            ("10.0.0.0/x", "prefix length is not a number"),
            ("10.0.0.0/+8", "prefix length is not a number"),
            ("10.0.0.0/", "prefix length is not a number"),
            ("10.0.0", "not an IP address"),
            ("example.com", "not an IP address"),
        ] {
            let err = IpSet::new(["192.0.2.1", entry]).unwrap_err();
            assert_eq!(err.entry, entry);
            assert_eq!(err.reason, reason);
            assert!(err.to_string().contains(&format!("{entry:?}")));
        }
    }
}
