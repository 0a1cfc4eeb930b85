//! Throughput of stock-pack chains against the trivial policy, side by side in one run, with
//! the load generator in-process and DNS from the test server. A measurement, not a test:
//! `cargo test --release --test it pack_throughput -- --ignored --nocapture`.

use crate::dns_server::TestDns;
use luamilter::{config::Config, daemon::Daemon};
use luamilter_loadgen::{self as loadgen, BenchArgs};
use std::time::Duration;

const PACK_ONE: &str = r#"
[policies]
chain = ["helo", "spf", "dnsbl"]
[policy.dnsbl]
dnsbl = [{ zone = "bl.test" }]
rhsbl = [{ zone = "rhs.test" }]
"#;

async fn measure(
    name: &str,
    dns: &TestDns,
    config: &str,
    concurrency: usize,
    messages: u64,
) -> (f64, f64) {
    let dir = tempfile::TempDir::new().unwrap();
    let sock = dir.path().join("m.sock");
    let base = format!(
        "[milter]\nlisten = \"unix:{}\"\n[policies]\ndirs = [{:?}]\nwatch = false\n\
         [dns]\nnameservers = [\"{}\"]\ntimeout = \"2s\"\nattempts = 1\n[store]\npath = {:?}\n[log]\nlevel = \"warn\"\n",
        sock.display(),
        concat!(env!("CARGO_MANIFEST_DIR"), "/examples"),
        dns.addr,
        dir.path().join("store.db"),
    );
    let greylisting = config.contains("greylist");
    let mut table: toml::Table = toml::from_str(&base).unwrap();
    for (k, v) in toml::from_str::<toml::Table>(config).unwrap() {
        match (table.get_mut(&k), v) {
            (Some(toml::Value::Table(t)), toml::Value::Table(o)) => t.extend(o),
            (_, v) => {
                table.insert(k, v);
            }
        }
    }
    let config = Config::parse(
        &toml::to_string(&table).unwrap(),
        Some(dir.path().join("c.toml")),
    )
    .unwrap();
    let daemon = Daemon::start(config).await.unwrap();
    let args = BenchArgs {
        socket: daemon.local.clone(),
        concurrency,
        messages,
        per_connection: 5,
        body_size: 2048,
        spam_fraction: 0.0,
        timeout: 10.0,
        server_pid: None,
        hold: None,
        hold_secs: 0.0,
        json: false,
    };
    // Warm up (DNS cache, Lua; with greylisting, every triplet of the run: the generator's
    // senders and recipients repeat from run to run), then measure.
    let warmup = if greylisting { messages } else { messages / 10 };
    loadgen::run(BenchArgs {
        messages: warmup,
        ..args.clone()
    })
    .await
    .unwrap();
    if greylisting {
        // Past the greylisting delay: the warmed-up triplets pass.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let report = loadgen::run(args).await.unwrap();
    daemon.stop(Duration::from_secs(5)).await;
    let p99 = report.latency_ms.as_ref().map_or(f64::NAN, |l| l.p99);
    println!(
        "{name:<28} c={concurrency:<3} {:>8.0} msg/s  p99 {:>7.2} ms  errors {}  verdicts {:?}",
        report.messages_per_sec, p99, report.errors, report.by_stage
    );
    (report.messages_per_sec, p99)
}

/// Packs I and II together, in a sensible order.
const FULL: &str = r#"
[policies]
chain = ["helo", "bans", "auth", "spf", "dnsbl", "whitelist", "internal", "greylist", "keywords", "sender_header"]
[site]
internal_networks = ["10.0.0.0/8"]
internal_domains = ["example.net"]
[policy.dnsbl]
dnsbl = [{ zone = "bl.test" }]
rhsbl = [{ zone = "rhs.test" }]
[policy.greylist]
delay = 1
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run by hand"]
async fn full_pack_throughput() {
    let dns = TestDns::start().await;
    let redis = crate::redis_server::RedisServer::start();
    let with_redis = format!(
        "{FULL}\n[store]\nbackend = \"redis\"\nurl = {:?}\n",
        redis.url
    );
    for c in [1, 8] {
        let trivial = measure(
            "trivial (bench.lua)",
            &dns,
            "[policies]\nchain = [\"bench\"]\n",
            c,
            3000,
        )
        .await;
        let sqlite = measure("packs I+II, SQLite store", &dns, FULL, c, 3000).await;
        let redis = measure("packs I+II, Redis store", &dns, &with_redis, c, 3000).await;
        println!(
            "ratios to trivial at c={c}: SQLite {:.2}, Redis {:.2}",
            sqlite.0 / trivial.0,
            redis.0 / trivial.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run by hand"]
async fn pack_throughput() {
    let dns = TestDns::start().await;
    for c in [1, 8] {
        let trivial = measure(
            "trivial (bench.lua)",
            &dns,
            "[policies]\nchain = [\"bench\"]\n",
            c,
            4000,
        )
        .await;
        let pack = measure("helo, spf, dnsbl (cached)", &dns, PACK_ONE, c, 4000).await;
        println!("ratio pack I / trivial at c={c}: {:.2}", pack.0 / trivial.0);
    }
    let slow = TestDns::with_delay(Duration::from_millis(50)).await;
    let uncached = format!("{PACK_ONE}\n[dns]\ncache_size = 0\n");
    measure("helo, spf, dnsbl (50 ms DNS)", &slow, &uncached, 8, 400).await;
}

/// The content policies: the body collected in Lua, parsed and defanged, and archived to a
/// Maildir (fsync'd by the writer thread, off the milter's path), against the trivial policy.
/// `cargo test --release --test it content_throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run by hand"]
async fn content_throughput() {
    let dns = TestDns::start().await;
    let maildir = tempfile::TempDir::new().unwrap();
    let archive = format!(
        "[policies]\nchain = [\"defang\", \"archive\"]\n[archive]\nmaildir = {:?}\nqueue = 4096\n",
        maildir.path().join("Maildir")
    );
    for c in [1, 8] {
        let trivial = measure(
            "trivial (bench.lua)",
            &dns,
            "[policies]\nchain = [\"bench\"]\n",
            c,
            2000,
        )
        .await;
        let defang = measure(
            "defang",
            &dns,
            "[policies]\nchain = [\"defang\"]\n",
            c,
            2000,
        )
        .await;
        let both = measure("defang + archive", &dns, &archive, c, 2000).await;
        println!(
            "ratios to trivial at c={c}: defang {:.2}, defang + archive {:.2}",
            defang.0 / trivial.0,
            both.0 / trivial.0
        );
    }
    let kept = std::fs::read_dir(maildir.path().join("Maildir/new"))
        .unwrap()
        .count();
    println!("archived: {kept} messages");
}
