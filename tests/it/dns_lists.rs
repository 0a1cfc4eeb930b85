//! `dns.lists`: several DNS list queries from one Lua call, against the test DNS server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use luamilter::lua_api;
use luamilter::services::dns::Resolver;
use mlua::Lua;

use crate::dns_server::TestDns;

/// Runs `chunk` as a coroutine with `dns` bound to the module; its result or error text.
async fn run(resolver: Arc<Resolver>, chunk: &str) -> Result<String, String> {
    let lua = Lua::new();
    lua.globals()
        .set("dns", lua_api::dns::module(&lua, resolver).unwrap())
        .unwrap();
    lua.load(chunk)
        .into_function()
        .unwrap()
        .call_async::<String>(())
        .await
        .map_err(|e| e.to_string())
}

/// Renders every answer of a `dns.lists` call as one line.
const SHOW: &str = r#"
local function show(answers)
  local out = {}
  for i, a in ipairs(answers) do
    if a.listed then
      out[i] = "listed " .. table.concat(a.codes, "+") .. " " .. tostring(a.reason)
    elseif a.listed == false then
      out[i] = "not listed"
    else
      out[i] = "error " .. a.error
    end
  end
  return table.concat(out, "\n")
end
"#;

#[tokio::test]
async fn answers_come_back_in_query_order() {
    let server = TestDns::start().await;
    let chunk = format!(
        r#"{SHOW}
        return show(dns.lists{{
          {{ ip = "198.51.100.5", zone = "bl.test" }},
          {{ ip = "192.0.2.1", zone = "bl.test" }},
          {{ domain = "bad.example.test", zone = "rhs.test." }},
          {{ ip = "2001:db8::bad", zone = "bl.test" }},
          {{ domain = "good.example.test", zone = "rhs.test" }},
          {{ ip = "192.0.2.1", zone = "x.servfail.test" }},
          {{ ip = "::ffff:127.0.0.2", zone = "bl.test" }},
        }})"#
    );
    let shown = run(server.resolver(), &chunk).await.unwrap();
    assert_eq!(
        shown,
        "listed 127.0.0.2+127.0.0.4 spam source, see https://bl.test/198.51.100.5\n\
         not listed\n\
         listed 127.0.0.2 domain used by spammers\n\
         listed 127.0.0.3 nil\n\
         not listed\n\
         error servfail\n\
         listed 127.0.0.2 test entry"
    );
    assert_eq!(
        run(server.resolver(), r#"return tostring(#dns.lists{})"#).await,
        Ok("0".into())
    );
}

#[tokio::test]
async fn a_silent_server_gives_timeout_answers() {
    let server = TestDns::silent().await;
    let resolver = Arc::new(Resolver::new(&server.config(Duration::from_millis(200))).unwrap());
    let chunk = format!(
        r#"{SHOW}
        return show(dns.lists{{ {{ ip = "192.0.2.1", zone = "bl.test" }}, {{ domain = "a.test", zone = "rhs.test" }} }})"#
    );
    let start = Instant::now();
    assert_eq!(
        run(resolver, &chunk).await.unwrap(),
        "error timeout\nerror timeout"
    );
    // One timed-out query costs about 400 ms here (UDP, then TCP); two in turn would cost 800.
    assert!(
        start.elapsed() < Duration::from_millis(700),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn malformed_queries_raise() {
    let server = TestDns::start().await;
    let cases = [
        (
            r#"dns.lists{ { ip = "nope", zone = "bl.test" } }"#,
            "query 1: IP address expected, got \"nope\"",
        ),
        (
            r#"dns.lists{ { ip = "192.0.2.1" } }"#,
            "query 1 has no zone",
        ),
        (
            r#"dns.lists{ { zone = "a" }, { zone = "bl.test", ip = "192.0.2.1", domain = "x" } }"#,
            "query 1 needs either ip or domain",
        ),
        (r#"dns.lists{ "bl.test" }"#, "query 1 is not a table"),
        (
            r#"dns.lists{ { zone = 5, ip = "192.0.2.1" } }"#,
            "query 1: zone must be a string, got integer",
        ),
        (
            r#"local q = {} for i = 1, 65 do q[i] = { ip = "192.0.2.1", zone = "bl.test" } end dns.lists(q)"#,
            "at most 64 queries, got 65",
        ),
    ];
    for (code, expected) in cases {
        let err = run(server.resolver(), &format!("{code} return ''"))
            .await
            .unwrap_err();
        assert!(
            err.contains(&format!("bad argument #1 to 'lists' ({expected})")),
            "{code}: {err}"
        );
    }
}

/// The point of `dns.lists`: queries overlap. Twelve lookups that each take 150 ms on the
/// server finish in about one round trip, not twelve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_run_side_by_side() {
    let server = TestDns::with_delay(Duration::from_millis(150)).await;
    let chunk = r#"
        local q = {}
        for i = 1, 12 do q[i] = { domain = "n" .. i .. ".example.test", zone = "rhs.test" } end
        local listed = 0
        for _, a in ipairs(dns.lists(q)) do if a.listed == false then listed = listed + 1 end end
        return tostring(listed)
    "#;
    let start = Instant::now();
    assert_eq!(run(server.resolver(), chunk).await, Ok("12".into()));
    let elapsed = start.elapsed();
    println!("12 list queries at 150 ms each through dns.lists: {elapsed:?}");
    assert!(
        elapsed < Duration::from_millis(900),
        "queries did not overlap: {elapsed:?}"
    );
}

/// Measures a batch of six cached list queries: one `dns.lists` call versus six `dns.dnsbl`
/// calls in turn. Run by hand:
/// `cargo test --test it cached_batch_cost -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run by hand"]
async fn cached_batch_cost() {
    const N: u32 = 5_000;
    let server = TestDns::start().await;
    let lua = Lua::new();
    lua.globals()
        .set(
            "dns",
            lua_api::dns::module(&lua, server.resolver()).unwrap(),
        )
        .unwrap();
    let zones = r#"local zones = { "bl.test", "a.bl.test", "b.bl.test", "c.bl.test", "d.bl.test", "e.bl.test" }"#;
    let batch = lua
        .load(format!(
            r#"{zones}
            local q = {{}}
            for i, z in ipairs(zones) do q[i] = {{ ip = "198.51.100.5", zone = z }} end
            local n = ...
            for _ = 1, n do assert(dns.lists(q)[1].listed) end"#
        ))
        .into_function()
        .unwrap();
    let one_by_one = lua
        .load(format!(
            r#"{zones}
            local n = ...
            for _ = 1, n do
              for i, z in ipairs(zones) do local hit = dns.dnsbl("198.51.100.5", z); assert(i > 1 or hit) end
            end"#
        ))
        .into_function()
        .unwrap();
    batch.call_async::<()>(1).await.unwrap(); // warm the cache
    let start = Instant::now();
    batch.call_async::<()>(N).await.unwrap();
    let batched = start.elapsed() / N;
    let start = Instant::now();
    one_by_one.call_async::<()>(N).await.unwrap();
    let sequential = start.elapsed() / N;
    println!(
        "6 cached list queries: dns.lists {batched:?}/batch, dns.dnsbl in turn {sequential:?}/batch"
    );
    assert!(batched > Duration::ZERO && sequential > Duration::ZERO);
}
