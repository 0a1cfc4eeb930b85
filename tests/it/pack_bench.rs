//! Throughput of stock-pack chains against the trivial policy, side by side in one run, with
//! the load generator in-process and DNS from the test server. A measurement, not a test:
//! `cargo test --release --test it pack_throughput -- --ignored --nocapture` (also
//! `full_pack_throughput`, `dkim_throughput`, `authres_throughput`).

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
    measure_message(name, dns, config, concurrency, messages, None).await
}

/// [`measure`] with every message read from `message` (e.g. a DKIM-signed one).
async fn measure_message(
    name: &str,
    dns: &TestDns,
    config: &str,
    concurrency: usize,
    messages: u64,
    message: Option<std::path::PathBuf>,
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
    let archiving = config.contains("maildir");
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
        message,
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
    let archive = std::sync::Arc::clone(&daemon.engine.current().services.archive);
    let report = loadgen::run(args).await.unwrap();
    let at_count = (archive.archived(), archive.lost());
    daemon.stop(Duration::from_secs(5)).await;
    let p99 = report.latency_ms.as_ref().map_or(f64::NAN, |l| l.p99);
    println!(
        "{name:<28} c={concurrency:<3} {:>8.0} msg/s  p99 {:>7.2} ms  errors {}  verdicts {:?}",
        report.messages_per_sec, p99, report.errors, report.by_stage
    );
    if archiving {
        print_archive_backlog(&archive, at_count).await;
    }
    (report.messages_per_sec, p99)
}

/// What the archive writer had done when the run's last answer came (warm-up included), and
/// how long the rest of its queue took to drain.
async fn print_archive_backlog(
    archive: &luamilter::services::archive::Archive,
    (archived, lost): (u64, u64),
) {
    let started = std::time::Instant::now();
    let mut done = archive.archived() + archive.lost();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = archive.archived() + archive.lost();
        if now == done || started.elapsed() > Duration::from_secs(60) {
            break;
        }
        done = now;
    }
    println!(
        "  archive at the last answer: {archived} archived, {lost} lost; \
         {:.1} s later, drained: {} archived, {} lost",
        started.elapsed().as_secs_f64(),
        archive.archived(),
        archive.lost()
    );
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

/// Packs I and II, and the same with pack IV's bounce and recipient policies (srs, recipients)
/// added, side by side: what signing, the bounce checks and the body the srs policy asks for
/// cost. `cargo test --release --test it pack_four_throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run by hand"]
async fn pack_four_throughput() {
    let dns = TestDns::start().await;
    let with_four = FULL.replace("\"whitelist\",", "\"srs\", \"recipients\", \"whitelist\",")
        + "[policy.srs]\nsecrets = [\"bench secret\"]\nsrs_domain = \"fwd.example.net\"\n\
           batv_domains = [\"example.net\"]\n";
    for c in [1, 8] {
        let base = measure("packs I+II", &dns, FULL, c, 3000).await;
        let four = measure("packs I+II + srs, recipients", &dns, &with_four, c, 3000).await;
        println!(
            "ratio with srs and recipients at c={c}: {:.2}",
            four.0 / base.0
        );
    }
}

/// What the reputation policy costs: packs I and II with and without it (a lookup at MAIL, a
/// learned verdict and a header at end of message), side by side on each store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run by hand"]
async fn reputation_cost() {
    let dns = TestDns::start().await;
    let redis = crate::redis_server::RedisServer::start();
    let with_reputation = FULL.replace("\"greylist\",", "\"reputation\", \"greylist\",");
    let on_redis = |config: &str| {
        format!(
            "{config}\n[store]\nbackend = \"redis\"\nurl = {:?}\n",
            redis.url
        )
    };
    let c = 8;
    let sqlite = measure("packs I+II, SQLite", &dns, FULL, c, 2000).await;
    let sqlite_rep = measure("+ reputation, SQLite", &dns, &with_reputation, c, 2000).await;
    let redis_plain = measure("packs I+II, Redis", &dns, &on_redis(FULL), c, 2000).await;
    let redis_rep = measure(
        "+ reputation, Redis",
        &dns,
        &on_redis(&with_reputation),
        c,
        2000,
    )
    .await;
    println!(
        "with/without reputation at c={c}: SQLite {:.2}, Redis {:.2}",
        sqlite_rep.0 / sqlite.0,
        redis_rep.0 / redis_plain.0
    );
}

/// The cost of DKIM verification: the trivial policy alone and with the stock dkim policy (and
/// with dkim, dmarc and authres), on one 10 KiB message signed by dkimpy (RSA 2048,
/// relaxed/simple), key from the test DNS server (cached after the warm-up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run by hand"]
async fn dkim_throughput() {
    use crate::dkim::{Key, dkimpy_sign, message, txt};
    let dir = tempfile::TempDir::new().unwrap();
    let key = Key::rsa(dir.path(), "bench", 2048);
    let dns = TestDns::with_records(vec![txt("bench._domainkey.example.test.", &key.record)]).await;
    let line = "The quick brown fox jumps over the lazy dog. 0123456789 ABCDEFGHIJKLMNOPQRS\r\n";
    // Whole lines, just over 10 KiB (a cut line would leave a bare CR at the end).
    let body = line.repeat(10 * 1024 / line.len() + 1);
    let plain = message("ann@example.test", "bench", &body);
    let signed = dkimpy_sign(
        &plain,
        "bench",
        "example.test",
        &key,
        "relaxed/simple",
        "rsa-sha256",
    );
    let path = dir.path().join("signed.eml");
    std::fs::write(&path, &signed).unwrap();
    // The dkim policies run before bench (whose accept at eom ends the chain); every result but
    // a pass of the From domain is refused, so "accept@eom" for all shows each one verified.
    let refuse = "[site.access]\n\"DKIM-Fail:\" = \"REJECT\"\n\"DKIM-Neutral:\" = \"REJECT\"\n\
                  \"DKIM-PermError:\" = \"REJECT\"\n\"DKIM-TempError:\" = \"REJECT\"\n\
                  \"DKIM-None:\" = \"REJECT\"\n";
    let bench = "[policies]\nchain = [\"bench\"]\n".to_string();
    let dkim = format!("[policies]\nchain = [\"dkim\", \"bench\"]\n{refuse}");
    let all =
        format!("[policies]\nchain = [\"dkim\", \"dmarc\", \"authres\", \"bench\"]\n{refuse}");
    for c in [1, 8] {
        let n = 3000;
        let p = || Some(path.clone());
        let trivial = measure_message("trivial, 10 KiB signed", &dns, &bench, c, n, p()).await;
        let verify = measure_message("dkim + trivial", &dns, &dkim, c, n, p()).await;
        let auth = measure_message("dkim, dmarc, authres + trivial", &dns, &all, c, n, p()).await;
        println!(
            "ratios to trivial at c={c}: dkim {:.2}, dkim+dmarc+authres {:.2}",
            verify.0 / trivial.0,
            auth.0 / trivial.0
        );
    }
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

/// What the authres policy costs with ARC sealing off and on, against the trivial policy, on one
/// 10 KiB message: off, the MTA sends no body; on, the body is sent, kept and signed (ARC-Seal
/// and ARC-Message-Signature, RSA 2048).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run by hand"]
async fn authres_throughput() {
    use crate::dkim::{Key, message};
    let dir = tempfile::TempDir::new().unwrap();
    let key = Key::rsa(dir.path(), "bench", 2048);
    let dns = TestDns::start().await;
    let line = "The quick brown fox jumps over the lazy dog. 0123456789 ABCDEFGHIJKLMNOPQRS\r\n";
    let plain = message(
        "ann@example.test",
        "bench",
        &line.repeat(10 * 1024 / line.len() + 1),
    );
    let path = dir.path().join("plain.eml");
    std::fs::write(&path, &plain).unwrap();
    let bench = "[policies]\nchain = [\"bench\"]\n".to_string();
    // iprev (looked up once, then cached) gives every message a result to write and seal.
    let authres = "[policies]\nchain = [\"authres\", \"bench\"]\n[policy.authres]\n";
    let sealing = format!(
        "{authres}arc_seal = \"example.test\"\n[dkim.keys.\"example.test\"]\nselector = \"bench\"\nkey = {:?}\n",
        key.path
    );
    for c in [1, 8] {
        let n = 2000;
        let p = || Some(path.clone());
        let trivial = measure_message("trivial, 10 KiB", &dns, &bench, c, n, p()).await;
        let off = measure_message("authres, arc_seal off", &dns, authres, c, n, p()).await;
        let on = measure_message("authres, arc_seal on", &dns, &sealing, c, n, p()).await;
        println!(
            "ratios to trivial at c={c}: authres {:.2}, authres sealing {:.2}",
            off.0 / trivial.0,
            on.0 / trivial.0
        );
    }
}

/// `examples/stock-pack.toml` as measured: its chain and options, with the Maildir in `dir`, the
/// DNS lists on the test server's zones, an inline SRS secret, and a one-second greylisting
/// delay (the warm-up passes every triplet of the run). The socket, policy directories, DNS
/// and store path are `measure`'s.
fn stock_pack(dir: &std::path::Path) -> toml::Table {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/stock-pack.toml"
    ))
    .unwrap();
    let mut pack: toml::Table = toml::from_str(&text).unwrap();
    for key in ["milter", "store"] {
        pack.remove(key);
    }
    let table = |pack: &toml::Table, key: &str| pack[key].as_table().unwrap().clone();
    let mut policies = table(&pack, "policies");
    policies.remove("dirs");
    pack.insert("policies".into(), policies.into());
    let overrides: toml::Table = toml::from_str(&format!(
        "[archive]\nmaildir = {:?}\nqueue = 4096\n\
         [policy.dnsbl]\ndnsbl = [{{ zone = \"bl.test\" }}]\nrhsbl = [{{ zone = \"rhs.test\" }}]\n\
         [policy.srs]\nsecrets = [\"bench secret\"]\n[policy.greylist]\ndelay = 1\n",
        dir.join("Maildir")
    ))
    .unwrap();
    let mut policy = table(&pack, "policy");
    for (name, options) in overrides["policy"].as_table().unwrap() {
        let mut merged = policy
            .get(name)
            .and_then(|t| t.as_table())
            .cloned()
            .unwrap_or_default();
        merged.extend(options.as_table().unwrap().clone());
        policy.insert(name.clone(), merged.into());
    }
    pack.insert("policy".into(), policy.into());
    pack.insert("archive".into(), overrides["archive"].clone());
    pack
}

/// The whole stock pack (examples/stock-pack.toml, 21 policies) against the trivial policy, at
/// c=1, 8 and 64, DNS from the test server (cached after the warm-up), on SQLite with
/// `synchronous = "full"` (the default) and `"normal"` side by side: what the store's fsyncs
/// cost. `cargo test --release --test it stock_pack_throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run by hand"]
async fn stock_pack_throughput() {
    let dns = TestDns::start().await;
    let dir = tempfile::TempDir::new().unwrap();
    let full = stock_pack(dir.path());
    let mut normal = full.clone();
    normal.insert(
        "store".into(),
        toml::from_str::<toml::Table>("synchronous = \"normal\"")
            .unwrap()
            .into(),
    );
    let (full, normal) = (
        toml::to_string(&full).unwrap(),
        toml::to_string(&normal).unwrap(),
    );
    for (c, n) in [(1, 600), (8, 2000), (64, 3000)] {
        let trivial = measure(
            "trivial (bench.lua)",
            &dns,
            "[policies]\nchain = [\"bench\"]\n",
            c,
            n,
        )
        .await;
        let pack = measure("stock pack, sync full", &dns, &full, c, n).await;
        let relaxed = measure("stock pack, sync normal", &dns, &normal, c, n).await;
        println!(
            "c={c}: stock pack / trivial {:.3}; synchronous normal / full {:.2}",
            pack.0 / trivial.0,
            relaxed.0 / pack.0
        );
    }
}
