//! The dynamic-PTR heuristic of pymilter's milter application (`Milter.dynip.is_dynip`):
//! guesses from a client's PTR name whether the address is a dial-up, DSL, cable or other
//! dynamically assigned one, or has no real PTR at all.

use std::net::IpAddr;
use std::sync::LazyLock;

use regex::Regex;

/// Name patterns of dynamic pools. `<3>` stands for the first 1–3 digit run of the name that
/// equals the address's last octet.
static DYNAMIC_PATTERNS: LazyLock<Regex> = LazyLock::new(|| {
    let patterns = [
        r"h[0-9a-f]{12}\.",
        r"h[0-9]*n[0-9]*c[0-9]*o[0-9]*\.",
        r"pcp[0-9]{6,10}pcs\.",
        r"no-reverse",
        r"S[0-9a-f]{16}\.[a-z]{2}\.",
        r"user<3>\.",
        r"[Cc]ust<3>\.",
        r"^<3>\.",
        r"ppp[^.]*<3>\.",
        r"-ppp[0-9]*\.",
        r"[0-9]*-<3>\.",
        r"[0-9a-f]{1,3}-<3>\.",
        r"p<3>\.pool",
        r"h<3>\.",
        r"xdsl-[0-9]*\.",
        r"-[0-9]*-[0-9]*\.",
        r"\.adsl\.",
        r"\.cable\.",
    ];
    Regex::new(&patterns.join("|")).expect("the dynamic-PTR patterns are valid")
});

/// Whether the PTR name `ptr` of client `ip` looks dynamic (or is no PTR at all). True when
/// any of these holds, checked in order:
///
/// 1. `ptr` is bracketed (`[192.0.2.1]`: the MTA found no PTR).
/// 2. `ptr` contains the address as text (`192.0.2.1`).
/// 3. For IPv6 clients the answer is false from here on (IPv4-mapped addresses count as IPv4).
/// 4. Taking the first four 1–3 digit runs of `ptr` as numbers g1..g4 (fewer if there are
///    fewer) and the octets o1..o4: the last three runs are (o2,o3,o4) or (o1,o2,o3); or g1 = o4
///    and (g2,g3) = (o1,o2); or the last two runs are (o3,o4); or, reading the runs backwards,
///    the first three are (o2,o3,o4) or (o1,o2,o3), or the first two or the last two are (o3,o4).
/// 5. After replacing the first digit run equal to o4 by `<3>`, one of these case-sensitive
///    patterns matches: `h` + 12 hex digits + `.`; `h<d>n<d>c<d>o<d>.`; `pcp` + 6–10 digits +
///    `pcs.`; `no-reverse`; `S` + 16 hex + `.` + 2 letters + `.`; `user<3>.`; `cust<3>.` or
///    `Cust<3>.`; a name starting `<3>.`; `ppp` + non-dots + `<3>.`; `-ppp<digits>.`;
///    `<digits>-<3>.`; 1–3 hex digits + `-<3>.`; `p<3>.pool`; `h<3>.`; `xdsl-<digits>.`;
///    `-<digits>-<digits>.`; `.adsl.`; `.cable.`.
/// 6. `ptr` contains the first three or the last three octets written together (`19202` or
///    `025` for 192.0.2.5).
/// 7. `ptr`, lowercased, contains the address as 8 hex digits (`p50863492` for 80.134.52.146).
///
/// For example `adsl-69-208-201-177.dsl.example.net` for 69.208.201.177 and
/// `mail-1-2.example.com` (rule 5's `-<digits>-<digits>.`) look dynamic,
/// `post3.example.com` for 69.60.99.112 does not.
pub fn looks_dynamic(ptr: &str, ip: IpAddr) -> bool {
    if ptr.starts_with('[') && ptr.ends_with(']') {
        return true;
    }
    let ip = ip.to_canonical();
    if ptr.contains(&ip.to_string()) {
        return true;
    }
    let IpAddr::V4(v4) = ip else {
        return false;
    };
    let octets = v4.octets().map(u32::from);
    let runs = digit_runs(ptr);
    if embeds_octets(
        &runs.iter().take(4).map(|r| r.2).collect::<Vec<_>>(),
        &octets,
    ) {
        return true;
    }
    let marked = match runs.iter().find(|r| r.2 == octets[3]) {
        Some(&(start, end, _)) => format!("{}<3>{}", &ptr[..start], &ptr[end..]),
        None => ptr.to_owned(),
    };
    if DYNAMIC_PATTERNS.is_match(&marked) {
        return true;
    }
    let decimal = octets.map(|o| o.to_string());
    if ptr.contains(&decimal[..3].concat()) || ptr.contains(&decimal[1..].concat()) {
        return true;
    }
    let hex = format!("{:08x}", u32::from(v4));
    ptr.to_lowercase().contains(&hex)
}

/// Rule 4: the digit runs `g` (at most four) spell octets of the address.
fn embeds_octets(g: &[u32], o: &[u32; 4]) -> bool {
    let n = g.len();
    let (first3, last3) = (&o[..3], &o[1..]);
    let low2 = &o[2..];
    let forward = (n >= 3 && (g[n - 3..] == *last3 || g[n - 3..] == *first3))
        || (n >= 3 && g[0] == o[3] && g[1..3] == o[..2])
        || (n >= 2 && g[n - 2..] == *low2);
    let r: Vec<u32> = g.iter().rev().copied().collect();
    let backward = (n >= 3 && (r[..3] == *last3 || r[..3] == *first3))
        || (n >= 2 && (r[..2] == *low2 || r[n - 2..] == *low2));
    forward || backward
}

/// The runs of 1–3 ASCII digits in `text`, left to right and greedy (so `12345` gives `123`
/// and `45`), as `(start, end, value)`.
fn digit_runs(text: &str) -> Vec<(usize, usize, u32)> {
    let bytes = text.as_bytes();
    let mut runs = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let start = i;
            while i < bytes.len() && i - start < 3 && bytes[i].is_ascii_digit() {
                i += 1;
            }
            let value = text[start..i].parse().expect("1-3 ASCII digits");
            runs.push((start, i, value));
        } else {
            i += 1;
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dynamic(ptr: &str, ip: &str) -> bool {
        looks_dynamic(ptr, ip.parse().unwrap())
    }

    #[test]
    fn documented_examples() {
        assert!(!dynamic("post3.fabulousdealz.com", "69.60.99.112"));
        assert!(dynamic(
            "adsl-69-208-201-177.dsl.emhril.ameritech.net",
            "69.208.201.177"
        ));
        assert!(dynamic("[1.2.3.4]", "1.2.3.4"));
        assert!(dynamic(
            "c-71-63-151-151.hsd1.mn.comcast.net",
            "71.63.151.151"
        ));
        assert!(dynamic("p50863492.dip0.t-ipconnect.de", "80.134.52.146"));
        assert!(!dynamic("cncln.online.ln.cn", "218.25.240.137"));
        for ip in ["192.0.2.55", "198.51.100.2", "203.0.113.9"] {
            assert!(dynamic("mail-1-2.example.com", ip), "{ip}");
        }
        // As in the original: a last octet of 1 turns the name into `mail-<3>-2.`, which no
        // pattern matches.
        assert!(!dynamic("mail-1-2.example.com", "203.0.113.1"));
        for name in ["testAuth", "testDefang", "pro-send.com"] {
            for ip in ["1.2.3.4", "192.0.2.1", "10.0.0.1"] {
                assert!(!dynamic(name, ip), "{name} {ip}");
            }
        }
    }

    #[test]
    fn each_rule_on_its_own() {
        // 2: literal address
        assert!(dynamic("host192.0.2.7.example.net", "192.0.2.7"));
        // 4: g1 = o4 and (g2,g3) = (o1,o2)
        assert!(dynamic("7.192.0.x.example.net", "192.0.2.7"));
        // 4: reversed runs (o4,o3,o2)
        assert!(dynamic("7.2.0.in-addr.example.net", "192.0.2.7"));
        // 5: patterns around <3>
        assert!(dynamic("user7.example.net", "192.0.2.7"));
        assert!(dynamic("Cust7.example.net", "192.0.2.7"));
        assert!(!dynamic("Cust7.example.net", "192.0.2.8"));
        assert!(dynamic("7.example.net", "192.0.2.7"));
        assert!(dynamic("pppoe-x7.example.net", "192.0.2.7"));
        assert!(dynamic("p7.pool.example.net", "192.0.2.7"));
        assert!(dynamic("host.adsl.example.net", "192.0.2.7"));
        assert!(dynamic("host.cable.example.net", "192.0.2.7"));
        assert!(dynamic("no-reverse-dns.example.net", "192.0.2.7"));
        assert!(dynamic("h0123456789ab.example.net", "192.0.2.7"));
        assert!(dynamic("xdsl-12.example.net", "192.0.2.7"));
        // patterns are case-sensitive
        assert!(!dynamic("host.ADSL.example.net", "192.0.2.7"));
        // 6: first three / last three octets written together
        assert!(dynamic("x19802.example.net", "198.0.2.77"));
        // 7: hex address, any case
        assert!(dynamic("mailC0000207.example.net", "192.0.2.7"));
    }

    #[test]
    fn static_looking_names() {
        assert!(!dynamic("mail.example.com", "192.0.2.7"));
        assert!(!dynamic("mx1.example.com", "192.0.2.7"));
        assert!(!dynamic("smtp.example.co.uk", "203.0.113.25"));
    }

    #[test]
    fn ipv6_clients() {
        assert!(dynamic("[2001:db8::1]", "2001:db8::1"));
        assert!(
            !dynamic("host.adsl.example.net", "2001:db8::1"),
            "IPv6 stops after rule 2"
        );
        assert!(
            dynamic("host.adsl.example.net", "::ffff:192.0.2.7"),
            "mapped IPv4 counts as IPv4"
        );
    }

    #[test]
    fn digit_runs_are_greedy_three_digit_chunks() {
        let values: Vec<u32> = digit_runs("a12345b6.007").iter().map(|r| r.2).collect();
        assert_eq!(values, [123, 45, 6, 7]);
    }
}
