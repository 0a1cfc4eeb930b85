//! SMTP call-backs (`milter.smtp`, `services/smtp.rs`) against real parts on loopback: the test
//! DNS server's `cbv.test` zone sends every mail exchanger to 127.0.0.x, where the scripted test
//! MX of `smtp_server.rs` (or nothing, or a mute listener) plays the sender's MX. The rate
//! limit, the concurrency limits and the cache are shown by counting connections at the MX.

use crate::dns_server::TestDns;
use crate::redis_server::RedisServer;
use crate::smtp_server::TestMx;
use crate::support::{Mta, TestClock, TestDaemon, reply_text};
use indymilter_test::Status;
use luamilter::services::smtp::{
    Outcome, Rate, Reply, Smtp, SmtpConfig, SmtpError, SmtpStats, VerifyOptions,
};
use luamilter::services::store::{self, Backend, StoreConfig};
use luamilter::stage::Stage;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) const HELO: &str = "verifier.test";

/// A call-back service over the test DNS server and a fresh SQLite store, calling port `port`.
pub(crate) struct Fixture {
    pub(crate) smtp: Arc<Smtp>,
    clock: TestClock,
    _dir: tempfile::TempDir,
}

pub(crate) fn config(port: u16) -> SmtpConfig {
    SmtpConfig {
        helo: Some(HELO.into()),
        port,
        connect_timeout: Duration::from_millis(300),
        command_timeout: Duration::from_millis(300),
        timeout: Duration::from_secs(3),
        ..SmtpConfig::default()
    }
}

pub(crate) fn fixture(dns: &TestDns, config: SmtpConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let store = store::open(
        &StoreConfig {
            path: dir.path().join("store.db"),
            ..StoreConfig::default()
        },
        clock.clock(),
    )
    .unwrap();
    let smtp = Smtp::new(dns.resolver(), store, &config, "unused.test".into()).unwrap();
    Fixture {
        smtp: Arc::new(smtp),
        clock,
        _dir: dir,
    }
}

async fn verify(smtp: &Smtp, address: &str) -> Result<(Outcome, bool), SmtpError> {
    smtp.verify(address, VerifyOptions::default())
        .await
        .map(|v| (v.outcome, v.cached))
}

fn refusal(code: u16, text: &str) -> Outcome {
    Outcome::Refused(Reply {
        code,
        text: text.into(),
        stage: Stage::Rcpt,
    })
}

fn report(test: &str, stats: SmtpStats) {
    println!(
        "smtp stats {test}: {} verifies, {} from the cache, {} connections, {} limited",
        stats.verifies, stats.cache_hits, stats.connections, stats.limited
    );
}

#[tokio::test]
async fn accepted_refused_and_tempfailed_addresses_and_the_cache() {
    let dns = TestDns::start().await;
    let mx = TestMx::start().await;
    let f = fixture(&dns, config(mx.addr.port()));

    assert_eq!(
        verify(&f.smtp, "ok@good.cbv.test").await,
        Ok((Outcome::Accepted, false))
    );
    assert_eq!(
        mx.commands(),
        [
            format!("EHLO {HELO}"),
            "MAIL FROM:<>".into(),
            "RCPT TO:<ok@good.cbv.test>".into(),
            "QUIT".into()
        ],
        "no STARTTLS when not offered, no DATA ever"
    );
    let unknown = refusal(550, "5.1.1 <recipient> User unknown");
    assert_eq!(
        verify(&f.smtp, "unknown@good.cbv.test").await,
        Ok((unknown.clone(), false))
    );
    let busy = refusal(451, "4.3.0 Try again later");
    assert_eq!(
        verify(&f.smtp, "busy@good.cbv.test").await,
        Ok((busy.clone(), false))
    );
    assert_eq!(mx.connections(), 3);

    // Accepted and permanently refused addresses are remembered (case does not matter); a
    // temporary refusal is asked again.
    assert_eq!(
        verify(&f.smtp, "OK@Good.CBV.test").await,
        Ok((Outcome::Accepted, true))
    );
    assert_eq!(
        verify(&f.smtp, "unknown@good.cbv.test").await,
        Ok((unknown, true))
    );
    assert_eq!(
        verify(&f.smtp, "busy@good.cbv.test").await,
        Ok((busy, false))
    );
    assert_eq!(mx.connections(), 4);

    // Past cache_ok (7 days) the accepted address is asked again; the refusal (30 days) is not.
    f.clock.advance(Duration::from_secs(7 * 86400 + 1));
    assert_eq!(
        verify(&f.smtp, "ok@good.cbv.test").await,
        Ok((Outcome::Accepted, false))
    );
    assert!(verify(&f.smtp, "unknown@good.cbv.test").await.unwrap().1);
    assert_eq!(mx.connections(), 5);

    // cache = false neither reads nor writes.
    let uncached = VerifyOptions {
        cache: false,
        ..VerifyOptions::default()
    };
    let v = f.smtp.verify("ok@good.cbv.test", uncached).await.unwrap();
    assert!(!v.cached);
    assert_eq!(mx.connections(), 6);
    report("accepted_refused_tempfailed", f.smtp.stats());
}

#[tokio::test]
async fn silent_and_dropping_exchangers_give_timeout_and_closed() {
    let dns = TestDns::start().await;
    let mx = TestMx::start().await;
    let f = fixture(&dns, config(mx.addr.port()));
    let started = Instant::now();
    assert_eq!(
        verify(&f.smtp, "silent@good.cbv.test").await,
        Err(SmtpError::Timeout)
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    assert_eq!(
        verify(&f.smtp, "drop@good.cbv.test")
            .await
            .unwrap_err()
            .code(),
        "closed"
    );
    // Neither is remembered.
    assert_eq!(
        verify(&f.smtp, "drop@good.cbv.test")
            .await
            .unwrap_err()
            .code(),
        "closed"
    );
    assert_eq!(mx.connections(), 3);

    // A whole-call deadline shorter than the command timeout wins.
    let short = VerifyOptions {
        timeout: Some(Duration::from_millis(100)),
        cache: true,
    };
    let started = Instant::now();
    assert_eq!(
        f.smtp.verify("silent2@good.cbv.test", short).await,
        Err(SmtpError::Timeout)
    );
    assert!(started.elapsed() < Duration::from_millis(290));
    report("silent_and_dropping", f.smtp.stats());
}

#[tokio::test]
async fn exchangers_come_from_mx_else_the_domain_address() {
    let dns = TestDns::start().await;
    let mx = TestMx::start().await;
    let port = mx.addr.port();
    let _mute = TestMx::mute("127.0.0.2".parse().unwrap(), port).await;
    let f = fixture(&dns, config(port));

    // No MX: the domain's A record.
    assert_eq!(
        verify(&f.smtp, "ok@fallback.cbv.test").await,
        Ok((Outcome::Accepted, false))
    );
    // No MX and no address, a null MX, a domain that does not exist.
    for domain in [
        "nomail.cbv.test",
        "nullmx.cbv.test",
        "nothing-here.cbv.test",
    ] {
        let err = verify(&f.smtp, &format!("ok@{domain}")).await.unwrap_err();
        assert_eq!(err.code(), "nomx", "{domain}: {err}");
    }
    // The first MX refuses connections: the second one answers.
    assert_eq!(
        verify(&f.smtp, "ok@backup.cbv.test").await,
        Ok((Outcome::Accepted, false))
    );
    // Only a refusing MX: "refused"; a mute one (never greets): "timeout".
    assert_eq!(
        verify(&f.smtp, "ok@dead.cbv.test")
            .await
            .unwrap_err()
            .code(),
        "refused"
    );
    assert_eq!(
        verify(&f.smtp, "ok@mute.cbv.test").await,
        Err(SmtpError::Timeout)
    );
    // Not an address at all.
    assert_eq!(
        verify(&f.smtp, "nobody").await.unwrap_err().code(),
        "invalid"
    );
    assert_eq!(mx.connections(), 2);
    report("exchangers", f.smtp.stats());
}

#[tokio::test]
async fn starttls_offered_and_botched_gives_tls() {
    let dns = TestDns::start().await;
    let mx = TestMx::offering_starttls().await;
    let f = fixture(&dns, config(mx.addr.port()));
    assert_eq!(
        verify(&f.smtp, "ok@good.cbv.test")
            .await
            .unwrap_err()
            .code(),
        "tls"
    );
    assert_eq!(mx.commands(), [format!("EHLO {HELO}"), "STARTTLS".into()]);
    report("starttls", f.smtp.stats());
}

#[tokio::test]
async fn starttls_offered_is_used_and_the_call_back_goes_on_over_tls() {
    let dns = TestDns::start().await;
    let mx = TestMx::with_tls().await;
    let f = fixture(&dns, config(mx.addr.port()));
    assert_eq!(
        verify(&f.smtp, "ok@good.cbv.test").await,
        Ok((Outcome::Accepted, false))
    );
    assert_eq!(
        verify(&f.smtp, "unknown@other.cbv.test").await,
        Ok((refusal(550, "5.1.1 <recipient> User unknown"), false))
    );
    assert_eq!(
        mx.commands()[..6],
        [
            format!("EHLO {HELO}"),
            "STARTTLS".into(),
            "<TLS>".into(),
            format!("EHLO {HELO}"),
            "MAIL FROM:<>".into(),
            "RCPT TO:<ok@good.cbv.test>".into(),
        ],
        "the self-signed certificate is taken: a call-back carries no secret"
    );
    report("starttls_ok", f.smtp.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_per_domain_call_backs_at_once_and_one_per_address() {
    let dns = TestDns::start().await;
    let mx = TestMx::holding(Duration::from_millis(150)).await;
    let f = fixture(
        &dns,
        SmtpConfig {
            rate: "100/m".parse().unwrap(),
            ..config(mx.addr.port())
        },
    );
    // Eight different addresses of one domain at once: two at a time reach the MX.
    let mut tasks = Vec::new();
    for n in 0..8 {
        let smtp = Arc::clone(&f.smtp);
        tasks.push(tokio::spawn(async move {
            verify(&smtp, &format!("ok{n}@slow.cbv.test")).await
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().0, Outcome::Accepted);
    }
    assert_eq!(mx.connections(), 8);
    assert_eq!(mx.max_open(), 2, "per_domain = 2");

    // Six sessions verifying one address at once: the two that find a slot free call back, the
    // four that wait for one find the answer in the cache when it comes free.
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let smtp = Arc::clone(&f.smtp);
        tasks.push(tokio::spawn(async move {
            verify(&smtp, "ok@other.cbv.test").await
        }));
    }
    let mut cached = 0;
    for task in tasks {
        let (outcome, hit) = task.await.unwrap().unwrap();
        assert_eq!(outcome, Outcome::Accepted);
        cached += usize::from(hit);
    }
    assert_eq!(mx.connections(), 10);
    assert_eq!(cached, 4);
    report("per_domain", f.smtp.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_limit_bounds_call_backs_to_all_domains() {
    let dns = TestDns::start().await;
    let mx = TestMx::holding(Duration::from_millis(100)).await;
    let f = fixture(
        &dns,
        SmtpConfig {
            global: 1,
            ..config(mx.addr.port())
        },
    );
    let mut tasks = Vec::new();
    for domain in ["good", "other", "slow", "rated", "busy"] {
        let smtp = Arc::clone(&f.smtp);
        tasks.push(tokio::spawn(async move {
            verify(&smtp, &format!("ok@{domain}.cbv.test")).await
        }));
    }
    for task in tasks {
        assert!(task.await.unwrap().is_ok());
    }
    assert_eq!(mx.connections(), 5);
    assert_eq!(mx.max_open(), 1, "global = 1");
    report("global", f.smtp.stats());
}

#[tokio::test]
async fn past_the_rate_a_domain_is_not_called_back() {
    let dns = TestDns::start().await;
    let mx = TestMx::start().await;
    let f = fixture(
        &dns,
        SmtpConfig {
            rate: "3/m".parse().unwrap(),
            ..config(mx.addr.port())
        },
    );
    for n in 0..3 {
        assert!(
            verify(&f.smtp, &format!("ok{n}@rated.cbv.test"))
                .await
                .is_ok()
        );
    }
    assert_eq!(
        verify(&f.smtp, "ok3@rated.cbv.test").await,
        Err(SmtpError::Limited("rate"))
    );
    // Another domain has its own bucket, and a remembered answer costs no token.
    assert!(verify(&f.smtp, "ok@good.cbv.test").await.is_ok());
    assert_eq!(
        verify(&f.smtp, "ok0@rated.cbv.test").await,
        Ok((Outcome::Accepted, true))
    );
    assert_eq!(mx.connections(), 4);
    report("rate", f.smtp.stats());
}

#[test]
fn the_rate_refills_over_its_window() {
    // Timing-free check of the documented default: 10 per minute.
    let rate: Rate = "10/m".parse().unwrap();
    assert_eq!(rate, SmtpConfig::default().rate);
}

#[tokio::test]
async fn two_mx_hosts_share_the_cache_through_redis() {
    let dns = TestDns::start().await;
    let mx = TestMx::start().await;
    let redis = RedisServer::start();
    let host = || {
        let store = store::open(
            &StoreConfig {
                backend: Backend::Redis,
                url: redis.url.clone(),
                prefix: "cbv:".into(),
                ..StoreConfig::default()
            },
            store::system_clock(),
        )
        .unwrap();
        Smtp::new(dns.resolver(), store, &config(mx.addr.port()), HELO.into()).unwrap()
    };
    let (first, second) = (host(), host());
    assert!(!verify(&first, "unknown@good.cbv.test").await.unwrap().1);
    let (outcome, cached) = verify(&second, "unknown@good.cbv.test").await.unwrap();
    assert!(cached);
    assert_eq!(outcome, refusal(550, "5.1.1 <recipient> User unknown"));
    assert_eq!(mx.connections(), 1);
    report("redis first host", first.stats());
    report("redis second host", second.stats());
}

pub(crate) fn daemon_config(dns: &TestDns, mx: &TestMx) -> String {
    format!(
        "[dns]\nnameservers = [\"{}\"]\ntimeout = \"2s\"\nattempts = 1\n\
         [smtp]\nhelo = \"{HELO}\"\nport = {}\nconnect_timeout = \"300ms\"\n\
         command_timeout = \"300ms\"\n",
        dns.addr,
        mx.addr.port()
    )
}

/// A milter client to `d`, connected from 192.0.2.1 and past HELO.
pub(crate) async fn session(d: &TestDaemon) -> Mta {
    let mut c = d.client().await;
    c.connect("client.test", Ipv4Addr::new(192, 0, 2, 1))
        .await
        .unwrap();
    c.helo("client.test").await.unwrap();
    c
}

const VERIFY_POLICY: &str = r#"
local milter = require "milter"
local smtp = require "milter.smtp"
return {
  mail = function(ctx, sender)
    local address = sender:match("^<(.*)>$") or sender
    local result, err = smtp.verify(address, { timeout = "2s" })
    if result == "ok" then return nil end
    if not result then
      return milter.tempfail{ code = 451, xcode = "4.4.3", text = "call-back " .. err }
    end
    if result.permanent then
      return milter.reject{ code = 550, xcode = "5.1.0", text = "sender refused by its MX at " .. result.stage .. ": " .. result.code }
    end
    return milter.tempfail{ code = 451, xcode = "4.1.0", text = "sender MX said " .. result.code }
  end,
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_verifies_senders_through_milter_smtp() {
    let dns = TestDns::start().await;
    let mx = TestMx::start().await;
    let d = TestDaemon::start(&[("cbv", VERIFY_POLICY)], &daemon_config(&dns, &mx)).await;
    let mail = |sender: &'static str| {
        let d = &d;
        async move { session(d).await.mail([sender]).await.unwrap() }
    };
    assert_eq!(mail("<ok@good.cbv.test>").await, Status::Continue);
    assert_eq!(
        reply_text(&mail("<unknown@good.cbv.test>").await),
        "550 5.1.0 sender refused by its MX at rcpt: 550"
    );
    assert_eq!(
        reply_text(&mail("<busy@good.cbv.test>").await),
        "451 4.1.0 sender MX said 451"
    );
    assert_eq!(
        reply_text(&mail("<silent@good.cbv.test>").await),
        "451 4.4.3 call-back timeout"
    );
    assert_eq!(
        reply_text(&mail("<drop@good.cbv.test>").await),
        "451 4.4.3 call-back closed"
    );
    assert_eq!(
        reply_text(&mail("<ok@nomail.cbv.test>").await),
        "451 4.4.3 call-back nomx"
    );
    assert_eq!(mx.connections(), 5);
    // The second time, accepted and refused senders come from the cache.
    assert_eq!(mail("<ok@good.cbv.test>").await, Status::Continue);
    assert!(reply_text(&mail("<unknown@good.cbv.test>").await).starts_with("550 "));
    assert_eq!(mx.connections(), 5);
    let stats = d
        .daemon
        .as_ref()
        .unwrap()
        .engine
        .current()
        .services
        .smtp
        .stats();
    report("daemon", stats);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_options_raise_and_bad_addresses_do_not() {
    let dns = TestDns::start().await;
    let mx = TestMx::start().await;
    let policy = r#"
local milter = require "milter"
local smtp = require "milter.smtp"
return {
  mail = function(ctx, sender)
    local result, err = smtp.verify("no address", {})
    assert(result == nil and err == "invalid", tostring(err))
    local ok, raised = pcall(smtp.verify, "a@good.cbv.test", { retries = 3 })
    assert(not ok and tostring(raised):find("unknown option"), tostring(raised))
    return milter.reject{ code = 550, text = "checked" }
  end,
}"#;
    let d = TestDaemon::start(&[("opts", policy)], &daemon_config(&dns, &mx)).await;
    let mut c = d.client().await;
    c.connect("client.test", Ipv4Addr::new(192, 0, 2, 1))
        .await
        .unwrap();
    c.helo("client.test").await.unwrap();
    assert_eq!(
        reply_text(&c.mail(["<a@b.test>"]).await.unwrap()),
        "550 checked"
    );
    assert_eq!(mx.connections(), 0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_backs_per_second_at_the_default_limits() {
    let dns = TestDns::start().await;
    let mx = TestMx::start().await;
    // The default limits; only the port (and the timeouts, unused here) differ.
    let f = fixture(&dns, config(mx.addr.port()));
    let domains = ["good", "other", "slow", "rated", "busy"];
    let started = Instant::now();
    let mut tasks = Vec::new();
    // Each domain's whole burst (rate 10/m), then one more each: that one is "limited".
    for n in 0..11 {
        for domain in domains {
            let smtp = Arc::clone(&f.smtp);
            tasks.push(tokio::spawn(async move {
                verify(&smtp, &format!("ok{n}@{domain}.cbv.test")).await
            }));
        }
    }
    let mut limited = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => {}
            Err(SmtpError::Limited("rate")) => limited += 1,
            Err(other) => panic!("{other}"),
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(limited, domains.len());
    assert_eq!(mx.connections(), 10 * domains.len());
    assert!(mx.max_open() <= 2 * domains.len());
    println!(
        "{} call-backs to {} domains on loopback in {elapsed:?}: {:.0}/s with the default limits \
         (the per-domain burst of 10 spent; at most {} open at once)",
        mx.connections(),
        domains.len(),
        mx.connections() as f64 / elapsed.as_secs_f64(),
        mx.max_open()
    );
    report("throughput", f.smtp.stats());
}

/// A measurement, not a test: how many call-backs a second one daemon makes with the default
/// limits (2 per domain at once, 10 per domain per minute, 20 at once in all) against the
/// scripted MX on loopback, and the cache's hit rate when every address is asked twice.
/// Bounded: 400 addresses over 40 domains (within each domain's burst of 10), 60 s at most.
/// `cargo test --release --test it callback_rate -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run it with --ignored --nocapture"]
async fn callback_rate_with_the_default_limits() {
    let dns = TestDns::start().await;
    let mx = TestMx::start().await;
    let f = fixture(&dns, config(mx.addr.port()));
    let addresses: Vec<String> = (0..400)
        .map(|n| format!("ok{}@d{}.many.cbv.test", n / 40, n % 40))
        .collect();
    let pass = |smtp: Arc<Smtp>| {
        let addresses = addresses.clone();
        async move {
            let started = Instant::now();
            let tasks: Vec<_> = addresses
                .into_iter()
                .map(|a| {
                    let smtp = Arc::clone(&smtp);
                    tokio::spawn(async move { verify(&smtp, &a).await })
                })
                .collect();
            for task in tasks {
                assert_eq!(task.await.unwrap().map(|v| v.0), Ok(Outcome::Accepted));
            }
            started.elapsed()
        }
    };
    let (first, second) = tokio::time::timeout(Duration::from_secs(60), async {
        (
            pass(Arc::clone(&f.smtp)).await,
            pass(Arc::clone(&f.smtp)).await,
        )
    })
    .await
    .expect("the measurement ends within 60 s");
    let stats = f.smtp.stats();
    println!(
        "call-backs: {} in {:.2} s = {:.0}/s (max {} open at the MX); the same again from the \
         cache: {:.2} s = {:.0}/s",
        addresses.len(),
        first.as_secs_f64(),
        addresses.len() as f64 / first.as_secs_f64(),
        mx.max_open(),
        second.as_secs_f64(),
        addresses.len() as f64 / second.as_secs_f64()
    );
    println!(
        "cache hit rate: {} of {} verifies = {:.0}%",
        stats.cache_hits,
        stats.verifies,
        100.0 * stats.cache_hits as f64 / stats.verifies as f64
    );
    report("callback_rate", stats);
    assert_eq!(mx.connections(), addresses.len());
}
