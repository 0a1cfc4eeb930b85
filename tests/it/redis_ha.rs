//! The Redis store for several MX hosts, against real processes on loopback: a Sentinel failover
//! (graceful, then `kill -9` of the master) under traffic, TLS with a private CA and an ACL user
//! whose password comes from a file.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use luamilter::services::store::{
    self, Backend, GreylistOptions, List, ListEntry, Scalar, Store, StoreConfig, Value,
};

use crate::redis_server::{RedisSentinel, RedisServer};
use crate::support::{TestDaemon, reply_text};

/// Every acknowledged write of the traffic task: ban entries and greylisted senders.
#[derive(Default)]
struct Acknowledged {
    bans: BTreeSet<String>,
    senders: BTreeSet<String>,
}

/// The calls that failed and the time from the first to the last failure.
#[derive(Default)]
struct Failures {
    count: usize,
    first: Option<Instant>,
    last: Option<Instant>,
    /// The distinct messages, for the test's output.
    messages: BTreeSet<String>,
}

impl Failures {
    /// Counts `e`, which must be one of the fail-safe answers.
    fn record(&mut self, e: &store::StoreError) {
        assert!(matches!(e.code(), "unavailable" | "timeout"), "{e}");
        self.count += 1;
        self.first.get_or_insert_with(Instant::now);
        self.last = Some(Instant::now());
        self.messages
            .insert(e.to_string().chars().take(100).collect());
    }

    fn window(&self) -> Duration {
        match (self.first, self.last) {
            (Some(first), Some(last)) => last - first,
            _ => Duration::ZERO,
        }
    }
}

/// Writes a ban and a greylist triplet per round until `stop`; records what the store
/// acknowledged, and asserts every failure is one of the fail-safe answers.
async fn traffic(
    st: Arc<dyn Store>,
    first: usize,
    stop: Arc<tokio::sync::Notify>,
) -> (Acknowledged, Failures) {
    let mut acked = Acknowledged::default();
    let mut failures = Failures::default();
    let stopped = stop.notified();
    tokio::pin!(stopped);
    for i in first.. {
        let ip = format!("10.{}.{}.1", i / 250, i % 250);
        let ban = ListEntry {
            entry: ip.clone(),
            reason: format!("round {i}"),
            created: 1,
            expires: None,
        };
        match st.list_put(List::BannedIp, ban).await {
            Ok(()) => {
                acked.bans.insert(ip.clone());
            }
            Err(e) => failures.record(&e),
        }
        let sender = format!("s{i}@example.org");
        let opts = GreylistOptions::default();
        match st.greylist(&ip, &sender, "r@example.net", &opts).await {
            Ok(_) => {
                acked.senders.insert(sender);
            }
            Err(e) => failures.record(&e),
        }
        tokio::select! {
            _ = &mut stopped => break,
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }
    (acked, failures)
}

/// Sends messages through `daemon` (the stock greylist policy, `fail_closed`) until `stop`;
/// returns the RCPT answers.
async fn milter_traffic(daemon: Arc<TestDaemon>, stop: Arc<tokio::sync::Notify>) -> Vec<String> {
    let mut answers = Vec::new();
    let stopped = stop.notified();
    tokio::pin!(stopped);
    for i in 0u32.. {
        let mut mta = daemon.client().await;
        let ip = std::net::Ipv4Addr::from(0xC000_0200 + (i % 250) + 1);
        mta.connect("mail.example.test", ip).await.unwrap();
        mta.helo("mail.example.test").await.unwrap();
        mta.mail(["<s@example.test>"]).await.unwrap();
        answers.push(reply_text(
            &mta.rcpt([format!("<r{i}@example.org>")]).await.unwrap(),
        ));
        mta.close().await.unwrap();
        tokio::select! {
            _ = &mut stopped => break,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    answers
}

/// Asserts that every acknowledged item is among the stored ones.
fn assert_none_lost(what: &str, acked: &BTreeSet<String>, stored: impl Iterator<Item = String>) {
    let stored: BTreeSet<String> = stored.collect();
    let lost: Vec<_> = acked.difference(&stored).collect();
    assert!(lost.is_empty(), "acknowledged {what} lost: {lost:?}");
}

/// Asserts that everything in `acked` is in the store (read from the current master).
async fn assert_kept(st: &dyn Store, acked: &Acknowledged) {
    let bans = st.list_all(List::BannedIp).await.unwrap();
    assert_none_lost("bans", &acked.bans, bans.into_iter().map(|e| e.entry));
    let records = st.greylist_entries().await.unwrap();
    let senders = records.into_iter().map(|e| e.sender);
    assert_none_lost("greylist records", &acked.senders, senders);
}

/// When [`through`] calls its event.
enum Moment {
    /// Traffic is running on the old master.
    Start,
    /// The sentinels name a new master.
    Switched,
}

/// Runs traffic while `event` happens, until writes succeed again on a master other than
/// `old_master`; returns what was acknowledged and the new master's port.
async fn through(
    st: &Arc<dyn Store>,
    sentinels: &[RedisSentinel],
    old_master: u16,
    first: usize,
    mut event: impl FnMut(Moment),
) -> (Acknowledged, u16) {
    let stop = Arc::new(tokio::sync::Notify::new());
    let task = tokio::spawn(traffic(st.clone(), first, stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    event(Moment::Start);
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut switched = None;
    let new_master = loop {
        assert!(Instant::now() < deadline, "no failover within 45 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
        if switched.is_none() {
            switched = sentinels[0].master_port().filter(|p| *p != old_master);
            if switched.is_some() {
                event(Moment::Switched);
            }
        }
        let probe = st.set("probe", &Value::Scalar(Scalar::Int(1)), None);
        if let Some(port) = switched
            && probe.await.is_ok()
        {
            break port;
        }
    };
    // Traffic on the new master for a while, then stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.notify_one();
    let (acked, failures) = task.await.unwrap();
    eprintln!(
        "failover {old_master} -> {new_master}: {} bans and {} greylist records acknowledged, \
         {} calls answered unavailable/timeout over {:?}: {:?}",
        acked.bans.len(),
        acked.senders.len(),
        failures.count,
        failures.window(),
        failures.messages
    );
    assert!(!acked.bans.is_empty() && !acked.senders.is_empty());
    (acked, new_master)
}

/// Waits until every sentinel knows the other sentinels and `replicas` replicas.
fn wait_for_topology(sentinels: &[RedisSentinel], master: &RedisServer, replicas: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = sentinels.iter().all(|s| {
            s.master_field("num-other-sentinels") == Some(sentinels.len() - 1)
                && s.master_field("num-slaves") == Some(replicas)
        }) && master
            .cli(&["INFO", "replication"])
            .contains(&format!("connected_slaves:{replicas}"));
        if ready {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sentinels did not see the topology"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_keeps_acknowledged_writes() {
    // A master and a replica; a write is acknowledged once the replica has it (`min_replicas`,
    // i.e. WAIT, in luamilter; `min-replicas-to-write` on the servers); three sentinels, two
    // must agree.
    let settings = [
        "--min-replicas-to-write",
        "1",
        "--min-replicas-max-lag",
        "10",
        "--repl-diskless-sync-delay",
        "0",
    ];
    let master = RedisServer::start_with(&settings);
    let master_port = master.port;
    let port = master_port.to_string();
    let mut replica_args = vec!["--replicaof", "127.0.0.1", &port];
    replica_args.extend(settings);
    let mut servers = [master, RedisServer::start_with(&replica_args)];
    let sentinels: Vec<RedisSentinel> = (0..3)
        .map(|_| RedisSentinel::start(master_port, 2))
        .collect();
    wait_for_topology(&sentinels, &servers[0], 1);

    let config = StoreConfig {
        backend: Backend::Redis,
        url: "redis://127.0.0.1/".into(),
        sentinels: sentinels.iter().map(RedisSentinel::address).collect(),
        sentinel_master: "mymaster".into(),
        min_replicas: 1,
        prefix: "ha:".into(),
        timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_millis(300),
        ..StoreConfig::default()
    };
    let st = store::open(&config, store::system_clock()).unwrap();
    // A daemon on the same Redis, greylisting with the stock policy, failing closed.
    let dir = tempfile::tempdir().unwrap();
    let sentinel_list: Vec<String> = config.sentinels.iter().map(|s| format!("{s:?}")).collect();
    let daemon_config = dir.path().join("luamilter.toml");
    std::fs::write(
        &daemon_config,
        format!(
            "[milter]\nlisten = \"inet:0@127.0.0.1\"\ncontrol_socket = {:?}\n\
             [policies]\ndirs = [\".\"]\nchain = [\"greylist\"]\n\
             [policy.greylist]\nfail_closed = true\n\
             [store]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1/\"\nprefix = \"mx:\"\n\
             sentinels = [{}]\nmin_replicas = 1\ntimeout = \"1s\"\n",
            dir.path().join("ctl.sock"),
            sentinel_list.join(", ")
        ),
    )
    .unwrap();
    let daemon = Arc::new(TestDaemon::start_config(dir, &daemon_config).await.unwrap());

    // 1. A graceful failover: the old master turns replica and answers READONLY, which the
    // store takes as "master moved".
    let (acked, second) = through(&st, &sentinels, master_port, 0, |moment| {
        if let Moment::Start = moment {
            sentinels[0].failover();
        }
    })
    .await;
    assert_kept(st.as_ref(), &acked).await;

    // 2. kill -9 of the new master mid-traffic: the replica is promoted; writes need a replica
    // again, so they resume when the killed host comes back (empty) and turns replica.
    // Mail flows through the daemon meanwhile.
    let stop_mail = Arc::new(tokio::sync::Notify::new());
    let mail = tokio::spawn(milter_traffic(daemon.clone(), stop_mail.clone()));
    let victim = servers.iter_mut().find(|s| s.port == second).unwrap();
    let (more, third) = through(&st, &sentinels, second, 100_000, |moment| match moment {
        Moment::Start => victim.stop(),
        Moment::Switched => victim.restart(),
    })
    .await;
    stop_mail.notify_one();
    let answers = mail.await.unwrap();
    // Every RCPT got the greylist answer or, while the master was switching, the documented
    // fail-closed one; never an accept, never a policy error.
    let greylisted = answers.iter().filter(|a| a.contains("Greylisted")).count();
    let unavailable = answers
        .iter()
        .filter(|a| a.contains("Greylisting is unavailable"))
        .count();
    eprintln!("milter: {greylisted} greylisted, {unavailable} unavailable during the switch");
    assert_eq!(greylisted + unavailable, answers.len(), "{answers:?}");
    assert!(greylisted > 0 && unavailable > 0, "{answers:?}");
    // The last answers came from the new master.
    assert!(
        answers.last().unwrap().contains("Greylisted"),
        "{answers:?}"
    );
    assert_eq!(third, master_port);
    assert_kept(st.as_ref(), &acked).await;
    assert_kept(st.as_ref(), &more).await;
}

/// Opens a store on `config` and writes and reads a key through it.
async fn assert_round_trip(config: &StoreConfig) {
    let st = store::open(config, store::system_clock()).unwrap();
    let value = Value::Scalar(Scalar::Str("round trip".into()));
    st.set("k", &value, None).await.unwrap();
    assert_eq!(st.get("k").await.unwrap(), Some(value));
}

/// Opens a store on `config` (which succeeds: nothing connects yet) and returns the error of its
/// first call, which must be "unavailable".
async fn refused(config: &StoreConfig) -> String {
    let st = store::open(config, store::system_clock()).unwrap();
    let err = st.get("k").await.unwrap_err();
    assert_eq!(err.code(), "unavailable", "{err}");
    err.to_string()
}

/// [`refused`], with an error that names `sentinel`.
async fn refused_naming(config: &StoreConfig, sentinel: &str) -> String {
    let err = refused(config).await;
    assert!(err.contains(sentinel), "{err}");
    err
}

/// The error of `store::open` on `config`, which must be a configuration error.
fn invalid(config: &StoreConfig) -> String {
    let err = store::open(config, store::system_clock()).err().unwrap();
    assert_eq!(err.code(), "invalid", "{err}");
    err.to_string()
}

/// Runs the openssl CLI in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success(), "openssl {args:?}");
}

/// A private CA and a certificate for 127.0.0.1 signed by it, made with the openssl CLI in
/// `dir`: returns the paths of the CA certificate, the server certificate and its key.
fn private_ca(dir: &Path) -> (String, String, String) {
    openssl(
        dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ]
        .iter()
        .chain(&[
            "-subj",
            "/CN=test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ])
        .copied()
        .collect::<Vec<_>>(),
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
        ]
        .iter()
        .chain(&["-keyout", "server.key", "-out", "server.csr"])
        .copied()
        .collect::<Vec<_>>(),
    );
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
        ]
        .iter()
        .chain(&[
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ])
        .copied()
        .collect::<Vec<_>>(),
    );
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    (path("ca.pem"), path("server.pem"), path("server.key"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_private_ca_and_password_file() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = private_ca(dir.path());
    // TLS only, and only the ACL user `mx` (the default user is off).
    let server = RedisServer::start_with(&[
        "--port",
        "0",
        "--tls-port",
        "{port}",
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-auth-clients",
        "no",
        "--user",
        "default",
        "off",
        "--user",
        "mx",
        "on",
        ">s3cret-pw",
        "~*",
        "&*",
        "+@all",
    ]);
    let password_file = dir.path().join("redis.password");
    std::fs::write(&password_file, "s3cret-pw\n").unwrap();
    let config = StoreConfig {
        backend: Backend::Redis,
        url: format!("rediss://mx@127.0.0.1:{}/", server.port),
        password_file: Some(password_file.clone()),
        tls_ca_file: Some(ca.into()),
        timeout: Duration::from_secs(2),
        ..StoreConfig::default()
    };
    assert_round_trip(&config).await;

    // The system roots do not know our CA.
    refused(&StoreConfig {
        tls_ca_file: None,
        ..config.clone()
    })
    .await;
    // A wrong password.
    std::fs::write(&password_file, "wrong\n").unwrap();
    refused(&config).await;

    // A missing password file is a configuration error at start.
    let missing = StoreConfig {
        password_file: Some(dir.path().join("absent")),
        ..config
    };
    let err = invalid(&missing);
    assert!(err.contains("absent"), "{err}");
}

/// A Redis store configuration that finds the master through `sentinels`.
fn sentinel_config(sentinels: Vec<String>) -> StoreConfig {
    StoreConfig {
        backend: Backend::Redis,
        url: "redis://127.0.0.1/".into(),
        sentinels,
        sentinel_master: "mymaster".into(),
        timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_millis(500),
        ..StoreConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_with_a_password_from_a_file() {
    // The master and the sentinel each have their own password.
    let master = RedisServer::start_with(&["--requirepass", "master-pw"]);
    let sentinel = RedisSentinel::start_with(
        master.port,
        1,
        &[
            "--requirepass",
            "sentinel-pw",
            "--sentinel",
            "auth-pass",
            "mymaster",
            "master-pw",
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let master_password = dir.path().join("redis.password");
    std::fs::write(&master_password, "master-pw\n").unwrap();
    let sentinel_password = dir.path().join("sentinel.password");
    std::fs::write(&sentinel_password, "sentinel-pw\n").unwrap();
    let config = StoreConfig {
        password_file: Some(master_password),
        sentinel_password_file: Some(sentinel_password.clone()),
        ..sentinel_config(vec![sentinel.address()])
    };
    assert_round_trip(&config).await;

    // Without the sentinels' password, or with a wrong one: "unavailable", naming the sentinel.
    let without = StoreConfig {
        sentinel_password_file: None,
        ..config.clone()
    };
    let err = refused_naming(&without, &sentinel.address()).await;
    assert!(err.contains("NOAUTH"), "{err}");
    std::fs::write(&sentinel_password, "wrong\n").unwrap();
    refused_naming(&config, &sentinel.address()).await;

    // Configuration errors at start: an empty password file, a user without a password, a
    // sentinel password without sentinels.
    std::fs::write(&sentinel_password, "\n").unwrap();
    let err = invalid(&config);
    assert!(err.contains("store.sentinel_password_file"), "{err}");
    assert!(err.contains("empty"), "{err}");
    let err = invalid(&StoreConfig {
        sentinel_password_file: None,
        sentinel_user: Some("mx".into()),
        ..config.clone()
    });
    assert!(err.contains("store.sentinel_user"), "{err}");
    let err = invalid(&StoreConfig {
        sentinels: Vec::new(),
        ..config
    });
    assert!(err.contains("store.sentinels"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_over_tls_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = private_ca(dir.path());
    let master = RedisServer::start();
    // The sentinel also listens in clear, on another port, for the test's own checks.
    let tls_port = crate::redis_server::free_port().to_string();
    let sentinel = RedisSentinel::start_with(
        master.port,
        1,
        &[
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-auth-clients",
            "no",
        ],
    );
    let tls_address = format!("rediss://127.0.0.1:{tls_port}");
    let config = StoreConfig {
        tls_ca_file: Some(ca.into()),
        ..sentinel_config(vec![tls_address.clone()])
    };
    assert_round_trip(&config).await;

    // The system roots do not know our CA: "unavailable", naming the sentinel.
    let system_roots = StoreConfig {
        tls_ca_file: None,
        ..config.clone()
    };
    refused_naming(&system_roots, &tls_address).await;
    // The TLS port does not answer in clear.
    let clear = format!("127.0.0.1:{tls_port}");
    let in_clear = StoreConfig {
        sentinels: vec![clear.clone()],
        ..config.clone()
    };
    refused_naming(&in_clear, &clear).await;
    // Either every sentinel speaks TLS or none does.
    let err = invalid(&StoreConfig {
        sentinels: vec![tls_address, sentinel.address()],
        ..config
    });
    assert!(err.contains("rediss://"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readonly_replica_without_sentinel_is_reported_as_master_moved() {
    let master = RedisServer::start();
    let node = RedisServer::start();
    let config = StoreConfig {
        backend: Backend::Redis,
        url: node.url.clone(),
        timeout: Duration::from_secs(1),
        ..StoreConfig::default()
    };
    let st = store::open(&config, store::system_clock()).unwrap();
    st.set("k", &Value::Scalar(Scalar::Int(1)), None)
        .await
        .unwrap();
    // The node the URL names is demoted: it refuses writes (READONLY).
    node.cli(&["REPLICAOF", "127.0.0.1", &master.port.to_string()]);
    let err = st.incr("n", 1, None).await.unwrap_err();
    assert_eq!(err.code(), "unavailable", "{err}");
    assert!(err.to_string().contains("master moved"), "{err}");
    // Promoted again (as a VIP or DNS name moving back would look): writes work, no restart.
    node.cli(&["REPLICAOF", "NO", "ONE"]);
    assert_eq!(st.incr("n", 1, None).await.unwrap(), 1);
}
