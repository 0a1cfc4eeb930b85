//! Property runs over every parser that reads outside input: envelope addresses, header values
//! (MIME words, address lists), the access map, the config, zone text, stored values, the
//! banned-IP zone export, captured messages and Received headers, durations and IP sets.
//!
//! Inputs are arbitrary text plus mutations (bytes flipped, inserted, dropped) of valid
//! examples, from a fixed seed: the run is the same every time and bounded by the case count
//! (`LUAMILTER_FUZZ_CASES`, default 2,000 per parser). The same parsers have cargo-fuzz targets
//! in `fuzz/` for open-ended runs on nightly.

use luamilter::{
    config::Config,
    duration::parse_duration,
    offline::message::{Message, Received},
    services::{
        access::AccessMap,
        dns_zone::Zones,
        mime,
        net::{IpSet, parse_address, split},
        site::list_entries,
        store::{Value, zone::bind_zone},
    },
};
use proptest::{
    collection::vec,
    prelude::*,
    test_runner::{Config as RunConfig, RngAlgorithm, TestRng, TestRunner},
};
use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

fn cases() -> u32 {
    std::env::var("LUAMILTER_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000)
}

/// Runs `test` on `cases()` inputs from `inputs`, from a fixed seed; fails with the smallest
/// failing input proptest finds.
fn fuzz<S: Strategy>(name: &str, inputs: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let config = RunConfig {
        cases: cases(),
        failure_persistence: None,
        ..RunConfig::default()
    };
    let rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
    let mut runner = TestRunner::new_with_rng(config, rng);
    if let Err(e) = runner.run(&inputs, test) {
        panic!("{name}: {e}");
    }
    println!("fuzz {name}: {} inputs, 0 failures", cases());
}

/// One of `seeds` with up to eight bytes flipped, inserted or dropped.
fn mutated(seeds: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    (
        0..seeds.len(),
        vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 0..8),
    )
        .prop_map(move |(i, edits)| {
            let mut bytes = seeds[i].as_bytes().to_vec();
            for (at, byte, op) in edits {
                let at = at.index(bytes.len() + 1);
                match op {
                    0 if at < bytes.len() => bytes[at] = byte,
                    1 => bytes.insert(at, byte),
                    _ if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    _ => {}
                }
            }
            bytes
        })
}

/// Arbitrary bytes, or a mutated seed.
fn bytes(seeds: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![vec(any::<u8>(), 0..300), mutated(seeds)]
}

/// Arbitrary text, printable ASCII lines, or a mutated seed (lossily made UTF-8).
fn text(seeds: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ -~\t\n]{0,300}",
        mutated(seeds).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
}

const ADDRESSES: &[&str] = &[
    "<user@example.org>",
    "<\"quoted local\\\"part\"@Example.ORG>",
    "<@relay.example,@r2.example:user@host.example>",
    "<>",
    "postmaster",
    "<user@[192.0.2.1]>",
    "<first.last+tag@sub.example.co.uk>",
];

#[test]
fn addresses() {
    fuzz("address", text(ADDRESSES), |input| {
        let (local, domain) = split(&input);
        if let Some(domain) = &domain {
            prop_assert!(input.starts_with(local) && input[local.len()..].starts_with('@'));
            prop_assert!(!domain.contains('@'));
        }
        if let Ok(address) = parse_address(&input) {
            // What the parser accepted it prints in a form it reads back as the same address.
            let again = parse_address(&format!("<{}>", address.address()));
            prop_assert_eq!(again.as_ref().ok(), Some(&address), "{:?}", again);
        }
        Ok(())
    });
}

const HEADER_VALUES: &[&str] = &[
    "=?UTF-8?B?w6lsw6h2ZQ==?= <eleve@example.org>",
    "=?iso-8859-1?Q?Andr=E9?= Pirard <PIRARD@vm1.ulg.ac.be>",
    "\"Doe, John\" <john@example.org>, group: a@b.example, c@d.example;",
    "undisclosed-recipients:;",
    "=?utf-8?q?broken",
];

#[test]
fn header_values() {
    fuzz("header value", bytes(HEADER_VALUES), |input| {
        let _ = mime::decode(&input);
        if let Ok(list) = mime::addresses(&input) {
            for mailbox in list {
                // The address is the local part and the domain it reports.
                let domain = mailbox.domain.as_deref().map(|d| format!("@{d}"));
                prop_assert!(mailbox.address.ends_with(domain.as_deref().unwrap_or("")));
            }
        }
        Ok(())
    });
}

const ACCESS: &[&str] = &[
    "# the access map\nConnect:192.0.2.1 REJECT\nConnect:10 OK\nFrom:spammer@ 550 5.7.1 No\nTo:postmaster@ OK\nspf:example.com pass\n",
    "Connect:[IPv6:2001:db8::1]\0\tDISCARD\0\n",
    "greylist:example.org\tOK\n",
];

#[test]
fn access_map() {
    fuzz("access map", text(ACCESS), |input| {
        let mut map = AccessMap::default();
        match map.add_text("fuzz", &input) {
            Ok(()) => {}
            Err(errors) => {
                for e in errors {
                    prop_assert!(e.to_string().starts_with("fuzz:"), "{}", e);
                }
            }
        }
        map.lookup("Connect", "192.0.2.1");
        map.lookup("From", "spammer@example.org");
        Ok(())
    });
}

const CONFIG: &[&str] = &[
    include_str!("../../examples/luamilter.toml"),
    "[milter]\nlisten = \"inet:8894@127.0.0.1\"\n[policies]\nchain = [\"a\"]\n[engine]\ntime_limit = \"2s\"\n",
    "[store]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:6379/\"\ntimeout = \"500ms\"\n",
];

#[test]
fn config() {
    fuzz("config", text(CONFIG), |input| {
        if let Err(e) = Config::parse(&input, None) {
            prop_assert!(!e.to_string().trim().is_empty());
        }
        Ok(())
    });
}

const ZONES: &[&str] = &[
    "; a test zone\n$ORIGIN example.test.\n@ IN A 192.0.2.10\n@ IN TXT \"v=spf1 \" \"-all\"\nmail 300 IN A 192.0.2.25\nwww IN CNAME example.test.\n*.wild IN TXT \"wildcard\"\n$SERVFAIL down.example.test.\n25.2.0.192.in-addr.arpa. IN PTR mail.example.test.\n",
    "other.test IN MX 10 mx.other.test\nother.test IN AAAA 2001:db8::1\n",
];

#[test]
fn zone_text() {
    use hickory_resolver::proto::rr::RecordType;
    fuzz("zone text", text(ZONES), |input| {
        let mut zones = Zones::new();
        if zones.add_text(&input, None).is_ok() {
            for name in ["example.test", "www.example.test", "x.wild.example.test"] {
                for rtype in [RecordType::A, RecordType::TXT, RecordType::MX] {
                    let _ = zones.answer(name, rtype);
                }
            }
        }
        Ok(())
    });
}

const STORED: &[&str] = &[
    "{\"Str\":\"x\"}",
    "\"text\"",
    "42",
    "1.5",
    "[1,\"a\",true]",
    "{\"k\":1,\"j\":\"v\"}",
];

#[test]
fn stored_values() {
    fuzz("stored value", text(STORED), |input| {
        if let Ok(value) = Value::decode(&input)
            && let Ok(encoded) = value.encode()
        {
            prop_assert_eq!(Value::decode(&encoded).ok(), Some(value));
        }
        Ok(())
    });
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (any::<u8>(), 0..4u8).prop_map(|(d, c)| IpAddr::V4(Ipv4Addr::new(192, 0, c, d))),
        any::<u32>().prop_map(|n| IpAddr::V4(Ipv4Addr::from(n))),
        any::<u128>().prop_map(|n| IpAddr::V6(Ipv6Addr::from(n))),
    ]
}

#[test]
fn zone_export() {
    let inputs = (
        vec(ip(), 0..400),
        vec(ip(), 0..20),
        "[a-z0-9.-]{0,40}",
        any::<u32>(),
    );
    fuzz("zone export", inputs, |(banned, whitelist, zone, ttl)| {
        let whitelist: HashSet<IpAddr> = whitelist.into_iter().collect();
        let out = bind_zone(&banned, &whitelist, &zone, ttl);
        let records: HashSet<&str> = out.lines().map(|l| l.split(' ').next().unwrap()).collect();
        // Every banned, non-whitelisted IPv4 address has its record or its /24's wildcard.
        for ip in banned.iter().filter(|ip| !whitelist.contains(ip)) {
            if let IpAddr::V4(v4) = ip {
                let [a, b, c, d] = v4.octets();
                prop_assert!(
                    records.contains(format!("{d}.{c}.{b}.{a}").as_str())
                        || records.contains(format!("*.{c}.{b}.{a}").as_str()),
                    "{} missing",
                    ip
                );
            }
        }
        Ok(())
    });
}

const MESSAGES: &[&str] = &[
    "Received: from mail.example (mail.example [192.0.2.25])\r\n\tby mx.example (Postfix) with ESMTP id ABC\r\nFrom: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n",
    "Subject: no body\n",
    "X: folded\n continued\n\nbody\n.\n",
];

#[test]
fn captured_messages() {
    fuzz("captured message", bytes(MESSAGES), |input| {
        let _ = Message::parse(&input);
        Ok(())
    });
    fuzz("received header", text(MESSAGES), |input| {
        let _ = Received::parse(&input);
        Ok(())
    });
}

const SITE: &[&str] = &[
    "192.0.2.0/24\n10.0.0.1\n2001:db8::/32\n",
    "# comment\nexample.com\n.example.org\n",
];

#[test]
fn site_lists_durations_and_ip_sets() {
    fuzz("site list", bytes(SITE), |input| {
        for entry in list_entries(&input) {
            prop_assert!(!entry.contains('\n'));
        }
        Ok(())
    });
    fuzz("ip set", text(SITE), |input| {
        if let Ok(set) = IpSet::new(input.lines()) {
            set.contains(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
        }
        Ok(())
    });
    const DURATIONS: &[&str] = &["5s", "300ms", "2m", "1h", "7", "1.5s"];
    fuzz("duration", text(DURATIONS), |input| {
        let _ = parse_duration(&input);
        Ok(())
    });
}
