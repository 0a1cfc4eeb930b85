//! DNS, SPF and the store reached from policies, through a real milter client, against a test
//! DNS server on loopback, a SQLite file and a real redis-server.

use crate::{
    dns_server::TestDns,
    redis_server::RedisServer,
    support::{Mta, TestDaemon, added_header, reply_text},
};
use indymilter_test::Status;
use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

fn dns_config(dns: &TestDns, timeout: &str) -> String {
    format!(
        "[dns]\nnameservers = [\"{}\"]\ntimeout = \"{timeout}\"\nattempts = 1\n",
        dns.addr
    )
}

async fn session(d: &TestDaemon, ip: impl Into<IpAddr>, helo: &str) -> Mta {
    let mut c = d.client().await;
    c.connect("client.test", ip.into()).await.unwrap();
    c.helo(helo).await.unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_waiting_on_dns_overlap() {
    let dns = TestDns::with_delay(Duration::from_millis(100)).await;
    let policy = r#"
local dns = require "milter.dns"
local milter = require "milter"
return {
  connect = function(ctx, host, ip)
    local names, err = dns.ptr(ip)
    if not names and err ~= "nxdomain" and err ~= "nodata" then return milter.tempfail{ text = "dns " .. tostring(err) .. " " .. ip } end
  end,
}"#;
    let d = TestDaemon::start(&[("lookup", policy)], &dns_config(&dns, "5s")).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..200u32 {
        let client = d.client().await;
        tasks.push(tokio::spawn(async move {
            let mut c = client;
            // A different address each time, so no answer comes from the cache.
            c.connect("h", Ipv4Addr::new(192, 0, 2, (n + 1) as u8))
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), Status::Continue);
    }
    let elapsed = started.elapsed();
    println!("200 sessions, each a 100 ms DNS lookup at connect: {elapsed:?} (serially 20 s)");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_server_that_never_answers_gives_a_timeout_value() {
    let dns = TestDns::silent().await;
    let policy = r#"
local dns = require "milter.dns"
local milter = require "milter"
return {
  mail = function(ctx, sender)
    local addrs, err = dns.a("example.test")
    if not addrs then return milter.tempfail{ code = 451, xcode = "4.4.3", text = "DNS " .. err } end
  end,
}"#;
    let d = TestDaemon::start(&[("lookup", policy)], &dns_config(&dns, "300ms")).await;
    let mut c = session(&d, Ipv4Addr::new(192, 0, 2, 1), "h").await;
    let started = Instant::now();
    assert_eq!(
        reply_text(&c.mail(["<a@example.test>"]).await.unwrap()),
        "451 4.4.3 DNS timeout"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spf_only_example_against_test_zones() {
    let dns = TestDns::start().await;
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/spf-only.lua"
    ))
    .unwrap();
    let extra = dns_config(&dns, "2s") + "[spf]\nreceiver = \"mx.test\"\n";
    let d = TestDaemon::start(&[("spf-only", &example)], &extra).await;

    let mut c = session(&d, Ipv4Addr::new(192, 0, 2, 99), "mail.example.test").await;
    let refused = reply_text(&c.mail(["<user@exp.spf.test>"]).await.unwrap());
    assert_eq!(
        refused,
        "550 5.7.23 SPF fail: 192.0.2.99 is not allowed to send for exp.spf.test"
    );

    let mut c = session(&d, Ipv4Addr::new(192, 0, 2, 5), "mail.example.test").await;
    assert_eq!(
        c.mail(["<user@pass-ip4.spf.test>"]).await.unwrap(),
        Status::Continue
    );
    c.rcpt(["<r@example.test>"]).await.unwrap();
    let (actions, _) = c.eom().await.unwrap();
    let spf = added_header(&actions, "Received-SPF").expect("Received-SPF");
    assert!(actions.has_insert_header(0, "Received-SPF", spf.as_str()));
    assert!(spf.starts_with("pass (mx.test: "), "{spf}");
    assert!(
        spf.contains("client-ip=192.0.2.5") && spf.contains("mechanism=\"ip4:192.0.2.0/24\""),
        "{spf}"
    );

    let mut c = session(&d, Ipv4Addr::new(192, 0, 2, 5), "mail.example.test").await;
    let temp = reply_text(&c.mail(["<user@temperror.spf.test>"]).await.unwrap());
    assert_eq!(temp, "451 4.4.3 SPF temporary error, try again later");

    let mut c = session(&d, Ipv4Addr::new(192, 0, 2, 5), "mail.example.test").await;
    let perm = reply_text(&c.mail(["<user@syntax.spf.test>"]).await.unwrap());
    assert!(perm.starts_with("550 5.5.2 SPF record error"), "{perm}");

    // Localhost is not checked.
    let mut c = session(&d, Ipv4Addr::LOCALHOST, "localhost").await;
    assert_eq!(
        c.mail(["<user@fail.spf.test>"]).await.unwrap(),
        Status::Continue
    );
    d.stop().await;
}

/// Greylists every recipient for one second; bans a client after three unknown recipients.
const STATEFUL: &str = r#"
local milter = require "milter"
local store = require "milter.store"
return {
  options = { delay = "1s", max_bad = 3 },
  connect = function(ctx, host, ip)
    local banned, err = store.banned("ip", ip)
    if err then return milter.tempfail{ text = "store " .. err } end
    if banned then return milter.reject{ text = "Banned for dictionary attacks" } end
  end,
  rcpt = function(ctx, rcpt, args, opts)
    local ip = ctx.client.ip
    if rcpt:match("^unknown") then
      local bad = store.incr("bad:" .. ip, 1, "1h")
      if bad and bad >= opts.max_bad then store.ban("ip", ip, "dictionary attack", "7d") end
      return milter.reject{ code = 550, xcode = "5.1.1", text = "no such user" }
    end
    local verdict, n = store.greylist(ip, ctx.sender, rcpt, { delay = opts.delay })
    if verdict == "wait" then
      return milter.tempfail{ code = 451, xcode = "4.7.1", text = "Greylisted, retry in " .. n .. "s" }
    elseif verdict == nil then
      return milter.tempfail{ text = "store " .. n }
    end
  end,
}"#;

async fn greylist_and_ban(d: &TestDaemon) {
    let ip = Ipv4Addr::new(198, 51, 100, 20);
    let mut c = session(d, ip, "h").await;
    c.mail(["<a@example.org>"]).await.unwrap();
    let first = reply_text(&c.rcpt(["<u@example.org>"]).await.unwrap());
    assert!(first.starts_with("451 4.7.1 Greylisted"), "{first}");
    let again = reply_text(&c.rcpt(["<u@example.org>"]).await.unwrap());
    assert!(again.starts_with("451 4.7.1 Greylisted"), "{again}");
    d.clock.advance(Duration::from_millis(1100));
    assert_eq!(c.rcpt(["<u@example.org>"]).await.unwrap(), Status::Continue);

    for n in 0..3 {
        let refused = c.rcpt([format!("<unknown{n}@example.org>")]).await.unwrap();
        assert_eq!(reply_text(&refused), "550 5.1.1 no such user");
    }
    let mut next = d.client().await;
    let banned = next.connect("client.test", ip).await.unwrap();
    assert_eq!(
        reply_text(&banned),
        "550 5.7.1 Banned for dictionary attacks"
    );
    // Another client is not affected.
    let mut other = d.client().await;
    assert_eq!(
        other
            .connect("h", Ipv4Addr::new(198, 51, 100, 21))
            .await
            .unwrap(),
        Status::Continue
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greylisting_and_bans_with_the_embedded_store_and_the_db_cli() {
    let d = TestDaemon::start(&[("stateful", STATEFUL)], "[store]\npath = \"state.db\"\n").await;
    greylist_and_ban(&d).await;
    let config = d.dir.path().join("luamilter.toml");
    let db = |args: &[&str]| {
        let out = crate::support::luamilter_cli("db", &config, args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let bans = db(&["bans", "list"]);
    assert!(
        bans.contains("198.51.100.20") && bans.contains("dictionary attack"),
        "{bans}"
    );
    db(&["unban", "ip", "198.51.100.20"]);
    let mut c = d.client().await;
    assert_eq!(
        c.connect("h", Ipv4Addr::new(198, 51, 100, 20))
            .await
            .unwrap(),
        Status::Continue
    );
    db(&["ban", "ip", "203.0.113.7", "--reason", "by hand"]);
    let mut c = d.client().await;
    assert_eq!(
        reply_text(&c.connect("h", Ipv4Addr::new(203, 0, 113, 7)).await.unwrap()),
        "550 5.7.1 Banned for dictionary attacks"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greylisting_and_bans_with_redis_and_redis_down() {
    let mut redis = RedisServer::start();
    let extra = format!(
        "[store]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout = \"500ms\"\n",
        redis.url
    );
    let d = TestDaemon::start(&[("stateful", STATEFUL)], &extra).await;
    greylist_and_ban(&d).await;

    redis.stop();
    let mut c = d.client().await;
    let status = c
        .connect("h", Ipv4Addr::new(198, 51, 100, 30))
        .await
        .unwrap();
    assert!(
        reply_text(&status).starts_with("451 4.7.1 store "),
        "{status:?}"
    );
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = d.client().await;
        if c.connect("h", Ipv4Addr::new(198, 51, 100, 30))
            .await
            .unwrap()
            == Status::Continue
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the store did not come back with redis"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    d.stop().await;
}
