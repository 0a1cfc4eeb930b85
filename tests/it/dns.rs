//! The DNS service against a real DNS server on 127.0.0.1, directly and through the Lua module.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use luamilter::lua_api;
use luamilter::services::dns::{DnsError, Listing, Resolver};
use mlua::{Lua, Value};

use crate::dns_server::TestDns;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

#[tokio::test]
async fn every_record_type() {
    let server = TestDns::start().await;
    let r = server.resolver();
    assert_eq!(
        r.a("example.test").await.unwrap(),
        [Ipv4Addr::new(192, 0, 2, 10), Ipv4Addr::new(192, 0, 2, 11)]
    );
    assert_eq!(
        r.aaaa("example.test.").await.unwrap(),
        ["2001:db8::10".parse::<std::net::Ipv6Addr>().unwrap()]
    );
    assert_eq!(
        r.mx("EXAMPLE.test").await.unwrap(),
        [
            (10, "mx1.example.test".into()),
            (20, "mx2.example.test".into()),
            (30, "mx3.example.test".into())
        ]
    );
    let mut txt = r.txt("example.test").await.unwrap();
    txt.sort();
    assert_eq!(txt, ["hello world", "v=spf1 ip4:192.0.2.0/24 -all"]);
    assert_eq!(
        r.txt("split.example.test").await.unwrap(),
        ["first part second part"]
    );
    let mut ptr = r.ptr(ip("192.0.2.25")).await.unwrap();
    ptr.sort();
    assert_eq!(ptr, ["mail.example.test", "mx1.example.test"]);
    assert_eq!(
        r.ptr(ip("2001:db8::10")).await.unwrap(),
        ["v6host.example.test"]
    );
    let mut ns = r.ns("example.test").await.unwrap();
    ns.sort();
    assert_eq!(ns, ["ns1.example.test", "ns2.example.test"]);
}

#[tokio::test]
async fn cname_is_followed() {
    let server = TestDns::start().await;
    let r = server.resolver();
    assert_eq!(r.a("www.example.test").await.unwrap().len(), 2);
}

#[tokio::test]
async fn nxdomain_nodata_servfail_refused() {
    let server = TestDns::start().await;
    let r = server.resolver();
    assert_eq!(r.a("nothing.example.test").await, Err(DnsError::NxDomain));
    assert_eq!(r.a("txtonly.example.test").await, Err(DnsError::NoData));
    assert_eq!(r.mx("mail.example.test").await, Err(DnsError::NoData));
    assert_eq!(r.ptr(ip("192.0.2.200")).await, Err(DnsError::NxDomain));
    assert_eq!(r.a("host.servfail.test").await, Err(DnsError::ServFail));
    assert_eq!(r.a("outside.nowhere").await, Err(DnsError::Refused));
    assert_eq!(
        r.a("not a name..").await,
        Err(DnsError::NxDomain),
        "an invalid name cannot exist"
    );
}

#[tokio::test]
async fn silent_server_times_out() {
    let server = TestDns::silent().await;
    let r = Resolver::new(&server.config(Duration::from_millis(200))).unwrap();
    let start = Instant::now();
    assert_eq!(r.a("example.test").await, Err(DnsError::Timeout));
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn fcrdns_confirms_only_matching_names() {
    let server = TestDns::start().await;
    let r = server.resolver();
    assert_eq!(r.fcrdns(ip("192.0.2.25")).await.unwrap().len(), 2);
    assert_eq!(
        r.fcrdns(ip("192.0.2.26")).await.unwrap(),
        Vec::<String>::new(),
        "forged.example.test points elsewhere"
    );
    assert_eq!(
        r.fcrdns(ip("2001:db8::10")).await.unwrap(),
        ["v6host.example.test"]
    );
    assert_eq!(r.fcrdns(ip("192.0.2.200")).await, Err(DnsError::NxDomain));
    assert_eq!(
        r.fcrdns(ip("192.0.2.27")).await,
        Err(DnsError::ServFail),
        "the only name could not be checked"
    );
}

#[tokio::test]
async fn dnsbl_and_rhsbl() {
    let server = TestDns::start().await;
    let r = server.resolver();
    assert_eq!(
        r.dnsbl(ip("127.0.0.2"), "bl.test").await.unwrap(),
        Some(Listing {
            codes: vec![Ipv4Addr::new(127, 0, 0, 2)],
            reason: Some("test entry".into())
        })
    );
    let listing = r
        .dnsbl(ip("198.51.100.5"), "bl.test")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(listing.codes.len(), 2);
    assert_eq!(
        listing.reason.as_deref(),
        Some("spam source, see https://bl.test/198.51.100.5")
    );
    assert_eq!(
        r.dnsbl(ip("2001:db8::bad"), "bl.test").await.unwrap(),
        Some(Listing {
            codes: vec![Ipv4Addr::new(127, 0, 0, 3)],
            reason: None
        })
    );
    assert_eq!(r.dnsbl(ip("192.0.2.1"), "bl.test").await, Ok(None));
    assert!(
        r.dnsbl(ip("::ffff:127.0.0.2"), "bl.test.")
            .await
            .unwrap()
            .is_some(),
        "mapped IPv4"
    );
    assert_eq!(
        r.dnsbl(ip("192.0.2.1"), "bl.servfail.test").await,
        Err(DnsError::ServFail)
    );
    let listing = r
        .rhsbl("Bad.Example.Test.", "rhs.test")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(listing.reason.as_deref(), Some("domain used by spammers"));
    assert_eq!(r.rhsbl("good.example.test", "rhs.test").await, Ok(None));
}

/// Runs `chunk` as a coroutine with `dns` bound to the Lua module and returns its value.
async fn run_lua<T: mlua::FromLuaMulti>(resolver: Arc<Resolver>, chunk: &str) -> T {
    let lua = Lua::new();
    lua.globals()
        .set("dns", lua_api::dns::module(&lua, resolver).unwrap())
        .unwrap();
    lua.load(chunk)
        .into_function()
        .unwrap()
        .call_async::<T>(())
        .await
        .unwrap()
}

#[tokio::test]
async fn lua_module_returns_data_and_error_values() {
    let server = TestDns::start().await;
    let result: String = run_lua(
        server.resolver(),
        r#"
        local out = {}
        local function add(...) out[#out + 1] = table.concat({...}, ",") end
        local a = dns.a("example.test"); table.sort(a); add(table.unpack(a))
        add(table.unpack(dns.aaaa("example.test")))
        for _, mx in ipairs(dns.mx("example.test")) do add(mx.preference, mx.exchange) end
        add(table.unpack(dns.txt("split.example.test")))
        add(table.unpack(dns.ptr("2001:db8::10")))
        add(#dns.ns("example.test"))
        add(table.unpack(dns.fcrdns("2001:db8::10")))
        local hit = dns.dnsbl("127.0.0.2", "bl.test"); add(hit.codes[1], hit.reason)
        add(tostring(dns.dnsbl("192.0.2.1", "bl.test")))
        hit = dns.rhsbl("bad.example.test", "rhs.test"); add(hit.codes[1], hit.reason)
        for _, name in ipairs({"nothing.example.test", "txtonly.example.test", "x.servfail.test", "outside.nowhere"}) do
          local value, err = dns.a(name); add(tostring(value), err)
        end
        local value, err = dns.dnsbl("192.0.2.1", "x.servfail.test"); add(tostring(value), err)
        return table.concat(out, "\n")
        "#,
    )
    .await;
    assert_eq!(
        result,
        "192.0.2.10,192.0.2.11\n2001:db8::10\n10,mx1.example.test\n20,mx2.example.test\n\
         30,mx3.example.test\nfirst part second part\nv6host.example.test\n2\nv6host.example.test\n\
         127.0.0.2,test entry\nfalse\n127.0.0.2,domain used by spammers\n\
         nil,nxdomain\nnil,nodata\nnil,servfail\nnil,refused\nnil,servfail"
    );
}

#[tokio::test]
async fn lua_timeout_is_an_error_value() {
    let server = TestDns::silent().await;
    let resolver = Arc::new(Resolver::new(&server.config(Duration::from_millis(200))).unwrap());
    let (value, err): (Value, String) = run_lua(resolver, r#"return dns.mx("example.test")"#).await;
    assert!(value.is_nil());
    assert_eq!(err, "timeout");
}

#[tokio::test]
async fn lua_bad_ip_argument_raises() {
    let server = TestDns::start().await;
    let lua = Lua::new();
    lua.globals()
        .set(
            "dns",
            lua_api::dns::module(&lua, server.resolver()).unwrap(),
        )
        .unwrap();
    let err = lua
        .load(r#"return dns.ptr("not-an-ip")"#)
        .into_function()
        .unwrap()
        .call_async::<()>(())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("bad argument #1 to 'ptr' (IP address expected"),
        "{err}"
    );
}

/// Rule 1 of the design: while one coroutine waits for DNS, the others run. 200 lookups that
/// each take 100 ms on the server must finish in far less than 200 × 100 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_from_many_coroutines_overlap() {
    let server = TestDns::with_delay(Duration::from_millis(100)).await;
    let lua = Lua::new();
    lua.globals()
        .set(
            "dns",
            lua_api::dns::module(&lua, server.resolver()).unwrap(),
        )
        .unwrap();
    let lookup = lua
        .load(r#"local name = ...; local a, err = dns.a(name); return a and #a or err"#)
        .into_function()
        .unwrap();
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        // distinct names so the cache cannot answer
        let f = lookup.clone();
        tasks.spawn(async move { f.call_async::<Value>(format!("n{i}.example.test")).await });
    }
    let mut answered = 0;
    while let Some(result) = tasks.join_next().await {
        let value = result.unwrap().unwrap();
        assert_eq!(
            value.as_string().map(|s| s.to_string_lossy()),
            Some("nxdomain".into())
        );
        answered += 1;
    }
    let elapsed = start.elapsed();
    println!("200 concurrent Lua DNS lookups at 100 ms each: {elapsed:?}");
    assert_eq!(answered, 200);
    assert!(
        elapsed < Duration::from_secs(2),
        "lookups did not overlap: {elapsed:?}"
    );
}

/// Measures the cost of a cached answer: `Resolver::a` called from Rust versus `dns.a` called
/// from a Lua loop. Run by hand: `cargo test --test it cached_lookup_cost -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "measurement; run by hand"]
async fn cached_lookup_cost() {
    const N: u32 = 20_000;
    let server = TestDns::start().await;
    let resolver = server.resolver();
    resolver.a("example.test").await.unwrap(); // warm the cache
    let start = Instant::now();
    for _ in 0..N {
        assert_eq!(resolver.a("example.test").await.unwrap().len(), 2);
    }
    let rust = start.elapsed() / N;
    let lua = Lua::new();
    lua.globals()
        .set("dns", lua_api::dns::module(&lua, resolver).unwrap())
        .unwrap();
    let chunk = lua
        .load(r#"local n = ...; for _ = 1, n do assert(#dns.a("example.test") == 2) end"#)
        .into_function()
        .unwrap();
    let start = Instant::now();
    chunk.call_async::<()>(N).await.unwrap();
    let from_lua = start.elapsed() / N;
    println!("cached A lookup: Rust {rust:?}/lookup, Lua module {from_lua:?}/lookup");
    assert!(from_lua > Duration::ZERO && rust > Duration::ZERO);
}
