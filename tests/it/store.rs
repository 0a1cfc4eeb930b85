//! The store backend suite, run against a temporary SQLite file and a real redis-server, plus
//! the Lua module, the `db` CLI, Redis failure and SQLite kill -9 durability.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_server::proto::rr::{RData, RecordType};
use hickory_server::proto::serialize::txt::Parser;
use luamilter::db_cli::{BanKind, BansAction, DbCommand, ListAction, run_db};
use luamilter::lua_api;
use luamilter::services::store::sqlite::SqliteStore;
use luamilter::services::store::{
    self, Backend, GreylistOptions, GreylistVerdict, List, Scalar, Store, StoreConfig, StoreError,
    Synchronous, Value,
};

use crate::{redis_server::RedisServer, support::TestClock};

/// A store under test with its clock; keeps the temp dir or the Redis server alive.
struct Fixture {
    store: Arc<dyn Store>,
    clock: TestClock,
    _dir: Option<tempfile::TempDir>,
    redis: Option<RedisServer>,
}

fn fixture(backend: Backend) -> Fixture {
    let clock = TestClock::new();
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let config = StoreConfig {
                path: dir.path().join("store.db"),
                ..StoreConfig::default()
            };
            Fixture {
                store: store::open(&config, clock.clock()).unwrap(),
                clock,
                _dir: Some(dir),
                redis: None,
            }
        }
        Backend::Redis => {
            let server = RedisServer::start();
            let config = StoreConfig {
                backend: Backend::Redis,
                url: server.url.clone(),
                prefix: "test:".into(),
                timeout: Duration::from_secs(1),
                connect_timeout: Duration::from_millis(300),
                ..StoreConfig::default()
            };
            Fixture {
                store: store::open(&config, clock.clock()).unwrap(),
                clock,
                _dir: None,
                redis: Some(server),
            }
        }
    }
}

fn s(text: &str) -> Value {
    Value::Scalar(Scalar::Str(text.into()))
}

const MIN: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// Runs each listed suite function against both backends.
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Sqlite).await })*
        }
        mod redis {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Redis).await })*
        }
    };
}

suite!(
    values,
    ttl_expiry,
    indexed_writes,
    concurrent_counters,
    sliding_count,
    decaying_amounts,
    greylist_timeline,
    greylist_grouping_and_auto_pass,
    bans_and_lists,
    db_cli,
    export_zone,
    lua_module,
    lua_throughput,
);

async fn values(b: Backend) {
    let f = fixture(b);
    let st = &f.store;
    let mut map = BTreeMap::new();
    map.insert("n".to_string(), Scalar::Int(3));
    map.insert("ok".to_string(), Scalar::Bool(true));
    let cases = [
        s("hello"),
        s("5"),
        Value::Scalar(Scalar::Int(-7)),
        Value::Scalar(Scalar::Num(2.5)),
        Value::Scalar(Scalar::Bool(false)),
        Value::List(vec![Scalar::Str("a".into()), Scalar::Int(1)]),
        Value::Map(map),
    ];
    for (i, v) in cases.iter().enumerate() {
        st.set(&format!("k{i}"), v, None).await.unwrap();
        assert_eq!(st.get(&format!("k{i}")).await.unwrap().as_ref(), Some(v));
    }
    assert_eq!(st.get("missing").await.unwrap(), None);
    st.set("k0", &s("replaced"), None).await.unwrap();
    assert_eq!(st.get("k0").await.unwrap(), Some(s("replaced")));
    assert!(st.delete("k0").await.unwrap());
    assert!(!st.delete("k0").await.unwrap());
    assert_eq!(st.get("k0").await.unwrap(), None);

    assert_eq!(st.incr("c", 5, None).await.unwrap(), 5);
    assert_eq!(st.incr("c", -2, None).await.unwrap(), 3);
    assert_eq!(
        st.get("c").await.unwrap(),
        Some(Value::Scalar(Scalar::Int(3)))
    );
    assert!(matches!(
        st.incr("k1", 1, None).await,
        Err(StoreError::Invalid(_))
    ));
}

async fn ttl_expiry(b: Backend) {
    let f = fixture(b);
    let st = &f.store;
    st.set("t", &s("v"), Some(MIN)).await.unwrap();
    st.set("forever", &s("v"), None).await.unwrap();
    f.clock.advance(Duration::from_secs(59));
    assert_eq!(st.get("t").await.unwrap(), Some(s("v")));
    f.clock.advance(Duration::from_secs(2));
    assert_eq!(st.get("t").await.unwrap(), None);
    assert!(!st.delete("t").await.unwrap(), "an expired key is gone");
    assert!(!st.expire("t", MIN).await.unwrap());

    // incr: the ttl applies when the counter is created, later increments keep it.
    assert_eq!(st.incr("c", 1, Some(MIN)).await.unwrap(), 1);
    f.clock.advance(Duration::from_secs(40));
    assert_eq!(st.incr("c", 1, Some(MIN)).await.unwrap(), 2);
    f.clock.advance(Duration::from_secs(30));
    assert_eq!(
        st.incr("c", 1, Some(MIN)).await.unwrap(),
        1,
        "window restarted"
    );

    // expire: set, then extend.
    assert!(st.expire("forever", HOUR).await.unwrap());
    f.clock.advance(Duration::from_secs(1800));
    assert!(st.expire("forever", HOUR).await.unwrap());
    f.clock.advance(Duration::from_secs(3000));
    assert_eq!(st.get("forever").await.unwrap(), Some(s("v")));
    f.clock.advance(Duration::from_secs(601));
    assert_eq!(st.get("forever").await.unwrap(), None);
}

/// `set_indexed`: the counter, the numbered entry and the values land together, and expire
/// together; the counter keeps its first expiry, as `incr` does.
async fn indexed_writes(b: Backend) {
    let f = fixture(b);
    let st = &f.store;
    let values = [("rec:a".to_string(), s("A")), ("id:a".to_string(), s("a"))];
    assert_eq!(
        st.set_indexed("ix", &s("a"), &values, Some(MIN))
            .await
            .unwrap(),
        1
    );
    f.clock.advance(Duration::from_secs(30));
    let later = [("rec:b".to_string(), s("B"))];
    assert_eq!(
        st.set_indexed("ix", &s("b"), &later, Some(MIN))
            .await
            .unwrap(),
        2
    );
    let int = |n| Some(Value::Scalar(Scalar::Int(n)));
    assert_eq!(st.get("ix").await.unwrap(), int(2));
    for (key, value) in [
        ("ix:1", "a"),
        ("ix:2", "b"),
        ("rec:a", "A"),
        ("id:a", "a"),
        ("rec:b", "B"),
    ] {
        assert_eq!(st.get(key).await.unwrap(), Some(s(value)), "{key}");
    }
    f.clock.advance(Duration::from_secs(31));
    for gone in ["ix", "ix:1", "rec:a", "id:a"] {
        assert_eq!(st.get(gone).await.unwrap(), None, "{gone} outlived its ttl");
    }
    assert_eq!(st.get("rec:b").await.unwrap(), Some(s("B")));
    assert_eq!(
        st.set_indexed("ix", &s("c"), &[], None).await.unwrap(),
        1,
        "an expired index starts again"
    );
    // A value that cannot be stored fails the whole write: nothing of it is kept.
    let bad = [("rec:c".to_string(), Value::Scalar(Scalar::Num(f64::NAN)))];
    assert!(matches!(
        st.set_indexed("ix", &s("d"), &bad, None).await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(st.get("ix").await.unwrap(), int(1));
    assert_eq!(
        st.get("ix:2").await.unwrap(),
        Some(s("b")),
        "not overwritten"
    );
}

async fn concurrent_counters(b: Backend) {
    let f = fixture(b);
    let (tasks, each) = (40, 25);
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let st = f.store.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                for _ in 0..each {
                    seen.push(st.incr("hits", 1, Some(HOUR)).await.unwrap());
                    st.count("events", MIN).await.unwrap();
                }
                seen
            })
        })
        .collect();
    let mut all = HashSet::new();
    for h in handles {
        for n in h.await.unwrap() {
            assert!(all.insert(n), "incr returned {n} twice");
        }
    }
    let total = tasks * each;
    assert_eq!(all, (1..=total as i64).collect::<HashSet<_>>());
    assert_eq!(
        f.store.get("hits").await.unwrap(),
        Some(Value::Scalar(Scalar::Int(total as i64)))
    );
    assert_eq!(
        f.store.count("events", MIN).await.unwrap(),
        total as i64 + 1
    );
}

async fn sliding_count(b: Backend) {
    let f = fixture(b);
    let st = &f.store;
    assert_eq!(st.count("rcpt:192.0.2.1", MIN).await.unwrap(), 1);
    f.clock.advance(Duration::from_secs(30));
    assert_eq!(st.count("rcpt:192.0.2.1", MIN).await.unwrap(), 2);
    assert_eq!(st.count("rcpt:192.0.2.9", MIN).await.unwrap(), 1);
    f.clock.advance(Duration::from_secs(31));
    assert_eq!(
        st.count("rcpt:192.0.2.1", MIN).await.unwrap(),
        2,
        "first event left"
    );
    f.clock.advance(Duration::from_secs(61));
    assert_eq!(st.count("rcpt:192.0.2.1", MIN).await.unwrap(), 1);
}

/// `decay`: amounts halve every half-life, adds are atomic, an empty add only reads, and a
/// record untouched for 20 half-lives is gone.
async fn decaying_amounts(b: Backend) {
    let f = fixture(b);
    let st = &f.store;
    let amounts = |pairs: &[(&str, f64)]| -> store::Decayed {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    };
    let close = |got: &store::Decayed, want: &[(&str, f64)]| {
        assert_eq!(got.len(), want.len(), "{got:?}");
        for (k, v) in want {
            assert!((got[*k] - v).abs() < 1e-9, "{k}: {got:?} want {v}");
        }
    };
    assert!(
        st.decay("rep:a", DAY, &amounts(&[]))
            .await
            .unwrap()
            .is_empty()
    );
    let got = st
        .decay("rep:a", DAY, &amounts(&[("ham", 4.0)]))
        .await
        .unwrap();
    close(&got, &[("ham", 4.0)]);
    f.clock.advance(DAY);
    close(
        &st.decay("rep:a", DAY, &amounts(&[])).await.unwrap(),
        &[("ham", 2.0)],
    );
    let got = st
        .decay("rep:a", DAY, &amounts(&[("spam", 1.0), ("ham", 1.0)]))
        .await
        .unwrap();
    close(&got, &[("ham", 3.0), ("spam", 1.0)]);
    f.clock.advance(DAY * 2);
    close(
        &st.decay("rep:a", DAY, &amounts(&[])).await.unwrap(),
        &[("ham", 0.75), ("spam", 0.25)],
    );
    assert!(
        st.decay("rep:b", DAY, &amounts(&[]))
            .await
            .unwrap()
            .is_empty(),
        "keys are apart"
    );

    // Concurrent adds lose nothing.
    let handles: Vec<_> = (0..20)
        .map(|_| {
            let st = st.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    let one = [("spam".to_string(), 1.0)].into_iter().collect();
                    st.decay("rep:c", DAY, &one).await.unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    close(
        &st.decay("rep:c", DAY, &amounts(&[])).await.unwrap(),
        &[("spam", 200.0)],
    );

    f.clock.advance(DAY * 21);
    assert!(
        st.decay("rep:a", DAY, &amounts(&[]))
            .await
            .unwrap()
            .is_empty(),
        "expired"
    );
}

/// pymilter's testgrey timeline (time=10 min, expire=4 h, retain=36 d).
async fn greylist_timeline(b: Backend) {
    let f = fixture(b);
    let opts = GreylistOptions {
        delay: 10 * MIN,
        retry_window: 4 * HOUR,
        lifetime: 36 * DAY,
        ..GreylistOptions::default()
    };
    let (st, clock) = (&f.store, &f.clock);
    let grey = |ip: &'static str| {
        let opts = opts.clone();
        async move {
            st.greylist(ip, "sender@example.com", "rcpt@example.net", &opts)
                .await
                .unwrap()
        }
    };
    use GreylistVerdict::{Pass, Wait};
    assert_eq!(grey("192.0.2.1").await, Wait { secs: 600 });
    clock.advance(5 * MIN);
    assert_eq!(grey("192.0.2.1").await, Wait { secs: 300 });
    clock.advance(10 * MIN);
    assert_eq!(grey("192.0.2.1").await, Pass { passes: 1 });
    assert_eq!(grey("198.51.100.1").await, Wait { secs: 600 });
    clock.advance(5 * HOUR - 15 * MIN);
    assert_eq!(grey("192.0.2.1").await, Pass { passes: 2 });
    clock.advance(HOUR);
    assert_eq!(
        grey("198.51.100.1").await,
        Wait { secs: 600 },
        "past expire"
    );
    clock.advance(37 * DAY - 6 * HOUR);
    assert_eq!(grey("192.0.2.1").await, Wait { secs: 600 }, "past retain");

    let entries = st.greylist_entries().await.unwrap();
    let clients: Vec<_> = entries.iter().map(|e| e.client.as_str()).collect();
    assert_eq!(clients, ["192.0.2.0/24"], "expired triplets are not listed");
    assert_eq!(entries[0].passes, 0);
    assert_eq!(entries[0].sender, "sender@example.com");
}

async fn greylist_grouping_and_auto_pass(b: Backend) {
    let f = fixture(b);
    let opts = GreylistOptions {
        auto_pass: 2,
        ..GreylistOptions::default()
    };
    let st = &f.store;
    let grey = |ip: &'static str, rcpt: &'static str| {
        let opts = opts.clone();
        async move { st.greylist(ip, "S@Example.com", rcpt, &opts).await.unwrap() }
    };
    use GreylistVerdict::{Pass, Wait};
    assert_eq!(grey("192.0.2.1", "a@x").await, Wait { secs: 300 });
    assert_eq!(grey("2001:db8:0:1::5", "a@x").await, Wait { secs: 300 });
    f.clock.advance(6 * MIN);
    // Same /24 and same /64: the retries from a neighbour pass.
    assert_eq!(grey("192.0.2.200", "A@X").await, Pass { passes: 1 });
    assert_eq!(
        grey("2001:db8:0:1:ffff::1", "a@x").await,
        Pass { passes: 1 }
    );
    assert_eq!(grey("192.0.3.1", "a@x").await, Wait { secs: 300 });
    // A second triplet from 192.0.2.0/24 passes the normal way: two passes for the client.
    assert_eq!(grey("192.0.2.1", "b@x").await, Wait { secs: 300 });
    f.clock.advance(6 * MIN);
    assert_eq!(grey("192.0.2.1", "b@x").await, Pass { passes: 1 });
    // From now on any new triplet of that client passes at once; other clients still wait.
    assert_eq!(grey("192.0.2.7", "c@x").await, Pass { passes: 1 });
    assert_eq!(grey("2001:db8:0:1::5", "c@x").await, Wait { secs: 300 });
}

async fn bans_and_lists(b: Backend) {
    let f = fixture(b);
    let st = &f.store;
    st.list_add(
        List::BannedIp,
        "192.0.2.9",
        "dictionary attack",
        Some(7 * DAY),
    )
    .await
    .unwrap();
    st.list_add(List::BannedIp, "2001:DB8::0:1", "", None)
        .await
        .unwrap();
    assert!(matches!(
        st.list_add(List::BannedIp, "not-an-ip", "", None).await,
        Err(StoreError::Invalid(_))
    ));
    let ban = st
        .listed(List::BannedIp, "192.0.2.9")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ban.reason, "dictionary attack");
    assert_eq!(ban.expires, Some(ban.created + 7 * 86_400_000));
    assert!(
        st.listed(List::BannedIp, "2001:db8::1")
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        st.listed(List::BannedIp, "192.0.2.10")
            .await
            .unwrap()
            .is_none()
    );

    // Domains: pymilter's isbanned table.
    for d in ["*.foo.bar", "*.info", "baz.bar"] {
        st.list_add(List::BannedDomain, d, "spam", None)
            .await
            .unwrap();
    }
    for (domain, banned) in [
        ("bif.foo.bar", true),
        ("bif.foo.com", false),
        ("foo.info", true),
        ("foo.baz.bar", false),
        ("BAZ.bar", true),
        ("foo.bar", false),
    ] {
        let found = st.listed(List::BannedDomain, domain).await.unwrap();
        assert_eq!(found.is_some(), banned, "{domain}");
    }

    // White/blacklists: an address matches itself or its domain.
    st.list_add(List::Whitelist, "Friend@Example.org", "", None)
        .await
        .unwrap();
    st.list_add(List::Blacklist, "spam.example", "", Some(DAY))
        .await
        .unwrap();
    assert!(
        st.listed(List::Whitelist, "friend@example.org")
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        st.listed(List::Whitelist, "foe@example.org")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        st.listed(List::Blacklist, "x@spam.example")
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        st.listed(List::Whitelist, "x@spam.example")
            .await
            .unwrap()
            .is_none()
    );

    let found = st
        .list_search(List::BannedIp, Some("DICTIONARY"))
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(st.list_search(List::BannedIp, None).await.unwrap().len(), 2);

    assert!(st.list_remove(List::BannedIp, "192.0.2.9").await.unwrap());
    assert!(!st.list_remove(List::BannedIp, "192.0.2.9").await.unwrap());
    assert!(
        st.listed(List::BannedIp, "192.0.2.9")
            .await
            .unwrap()
            .is_none()
    );

    f.clock.advance(DAY + MIN);
    assert!(
        st.listed(List::Blacklist, "x@spam.example")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        st.list_search(List::Blacklist, None)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        st.list_search(List::BannedDomain, None)
            .await
            .unwrap()
            .len(),
        3
    );
}

async fn db(store: &Arc<dyn Store>, cmd: DbCommand) -> String {
    let mut out = Vec::new();
    run_db(store.clone(), cmd, &mut out).await.unwrap();
    String::from_utf8(out).unwrap()
}

async fn db_cli(b: Backend) {
    let f = fixture(b);
    let st = &f.store;
    let ban = |key: &str, reason: &str| DbCommand::Ban {
        kind: BanKind::Ip,
        key: key.into(),
        reason: reason.into(),
        ttl: Some(7 * DAY),
    };
    assert_eq!(
        db(st, ban("192.0.2.1", "by hand")).await,
        "banned 192.0.2.1\n"
    );
    db(st, ban("192.0.2.2", "too many bad rcpt")).await;
    let domain = DbCommand::Ban {
        kind: BanKind::Domain,
        key: "*.Spam.example".into(),
        reason: String::new(),
        ttl: None,
    };
    db(st, domain).await;
    let listed = db(
        st,
        DbCommand::Bans {
            action: BansAction::List { kind: None },
        },
    )
    .await;
    let lines: Vec<_> = listed.lines().collect();
    assert_eq!(lines.len(), 3, "{listed}");
    assert!(lines[0].starts_with("ip\t192.0.2.1\tadded="), "{listed}");
    assert!(lines[1].ends_with("\ttoo many bad rcpt"), "{listed}");
    assert!(lines[2].starts_with("domain\t*.spam.example\t"), "{listed}");
    assert!(lines[2].contains("expires=never"), "{listed}");
    let search = BansAction::Search {
        text: "BAD RCPT".into(),
        kind: Some(BanKind::Ip),
    };
    let found = db(st, DbCommand::Bans { action: search }).await;
    assert_eq!(found.lines().count(), 1, "{found}");
    let unban = DbCommand::Unban {
        kind: BanKind::Ip,
        key: "192.0.2.1".into(),
    };
    assert_eq!(db(st, unban.clone()).await, "unbanned 192.0.2.1\n");
    assert_eq!(db(st, unban).await, "not banned: 192.0.2.1\n");

    let add = ListAction::Add {
        entry: "Partner.example".into(),
        reason: "contract".into(),
        ttl: None,
    };
    assert_eq!(
        db(st, DbCommand::Whitelist { action: add }).await,
        "added partner.example\n"
    );
    let list = db(
        st,
        DbCommand::Whitelist {
            action: ListAction::List { search: None },
        },
    )
    .await;
    assert!(
        list.starts_with("partner.example\t") && list.ends_with("\tcontract\n"),
        "{list}"
    );
    let remove = ListAction::Remove {
        entry: "partner.example".into(),
    };
    assert_eq!(
        db(
            st,
            DbCommand::Blacklist {
                action: remove.clone()
            }
        )
        .await,
        "not listed: partner.example\n"
    );
    assert_eq!(
        db(st, DbCommand::Whitelist { action: remove }).await,
        "removed partner.example\n"
    );

    st.greylist("192.0.2.1", "a@b", "c@d", &GreylistOptions::default())
        .await
        .unwrap();
    let grey = db(
        st,
        DbCommand::Greylist {
            action: luamilter::db_cli::GreylistAction::List,
        },
    )
    .await;
    assert!(grey.starts_with("192.0.2.0/24\ta@b\tc@d\tfirst="), "{grey}");
    assert!(grey.ends_with("\tpasses=0\n"), "{grey}");
}

async fn export_zone(b: Backend) {
    let f = fixture(b);
    let st = &f.store;
    // 130 bans in one /24 (a wildcard), 3 in another, one of them whitelisted, one IPv6.
    for host in 0..130 {
        let ip = format!("198.51.100.{host}");
        st.list_add(List::BannedIp, &ip, "", None).await.unwrap();
    }
    for ip in ["192.0.2.1", "192.0.2.20", "192.0.2.33", "2001:db8::1"] {
        st.list_add(List::BannedIp, ip, "", None).await.unwrap();
    }
    st.list_add(List::Whitelist, "192.0.2.33", "", None)
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bl.zone");
    let cmd = DbCommand::ExportZone {
        zone: "bl.example.org".into(),
        ttl: 1800,
        out: Some(out.clone()),
    };
    assert_eq!(db(st, cmd).await, "");
    let text = std::fs::read_to_string(&out).unwrap();
    let (origin, records) = Parser::new(text.as_str(), None, None).parse().unwrap();
    assert_eq!(origin.to_ascii(), "bl.example.org.");
    let mut names = Vec::new();
    for set in records.values() {
        for record in set.records_without_rrsigs() {
            assert_eq!(record.record_type(), RecordType::A);
            assert_eq!(record.ttl, 1800);
            let RData::A(a) = &record.data else {
                panic!("not an A record")
            };
            assert_eq!(a.0.to_string(), "127.0.0.2");
            names.push(record.name.to_ascii());
        }
    }
    names.sort();
    let v6 = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.example.org.";
    assert_eq!(
        names,
        [
            "*.100.51.198.bl.example.org.",
            v6,
            "1.2.0.192.bl.example.org.",
            "20.2.0.192.bl.example.org.",
        ]
    );
    assert!(text.contains("; 130 ips banned"), "{text}");
}

/// Runs `src` as a coroutine in a bare Lua state with the module as global `store`.
async fn run_lua<T: mlua::FromLuaMulti + mlua::MaybeSend + 'static>(
    st: &Arc<dyn Store>,
    src: &str,
) -> mlua::Result<T> {
    let lua = mlua::Lua::new();
    lua.globals()
        .set("store", lua_api::store::module(&lua, st.clone())?)?;
    lua.load(src).into_function()?.call_async::<T>(()).await
}

async fn lua_module(b: Backend) {
    let f = fixture(b);
    let st = &f.store;
    let src = r#"
        local out = {}
        assert(store.set("s", "text", "5m") == true)
        assert(store.set("t", {a = 1, b = "x", c = true}) == true)
        assert(store.set("l", {"x", 2.5}, 60) == true)
        assert(store.get("s") == "text")
        local t = store.get("t")
        assert(t.a == 1 and math.type(t.a) == "integer" and t.b == "x" and t.c == true)
        local l = store.get("l")
        assert(#l == 2 and l[1] == "x" and l[2] == 2.5)
        assert(store.get("missing") == nil)
        assert(store.incr("n") == 1 and store.incr("n", 4, "1h") == 5)
        local v, err = store.incr("s", 1)
        assert(v == nil and err == "invalid", tostring(err))
        assert(store.expire("n", 10) == true and store.expire("nope", 10) == false)
        assert(store.delete("n") == true and store.delete("n") == false)
        assert(store.count("bad:1", "1m") == 1 and store.count("bad:1", "1m") == 2)
        assert(next(store.decay("rep:x", "1d")) == nil)
        local d = store.decay("rep:x", "1d", {ham = 2, spam = 0.5})
        assert(d.ham == 2 and d.spam == 0.5, tostring(d.ham))

        local r, n = store.greylist("192.0.2.1", "a@b", "c@d", {delay = "1m"})
        assert(r == "wait" and n == 60, r .. " " .. tostring(n))

        assert(store.ban("ip", "192.0.2.66", "3 bad rcpts", "7d") == true)
        local ban = store.banned("ip", "192.0.2.66")
        assert(ban.reason == "3 bad rcpts" and ban.expires - ban.created == 7 * 86400)
        assert(store.banned("ip", "192.0.2.67") == false)
        assert(#store.bans("ip") == 1 and #store.bans("ip", "nothing") == 0)
        local ok, e = store.ban("ip", "nonsense")
        assert(ok == nil and e == "invalid")
        assert(store.unban("ip", "192.0.2.66") == true)

        assert(store.list_add("whitelist", "example.org", "partner") == true)
        assert(store.listed("whitelist", "joe@Example.org").entry == "example.org")
        assert(store.listed("blacklist", "joe@example.org") == false)
        assert(store.list("whitelist")[1].reason == "partner")
        assert(store.list_remove("whitelist", "example.org") == true)

        for _, bad in ipairs({
            function() store.ban("cidr", "x") end,
            function() store.set("x", {nested = {}}) end,
            function() store.set("x", {1, a = 2}) end,
            function() store.set("x", 1, "5 minutes") end,
            function() store.set("x", 1, -1) end,
            function() store.greylist("1.2.3.4", "a", "b", {delai = 5}) end,
            function() store.list_add("greylist", "x") end,
            function() store.decay("x") end,
            function() store.decay("x", "1d", {ham = "one"}) end,
            function() store.decay("x", "1d", {ham = 0/0}) end,
        }) do
            assert(not pcall(bad), "should raise")
        end
        return "ok"
    "#;
    assert_eq!(run_lua::<String>(st, src).await.unwrap(), "ok");
    assert_eq!(st.get("s").await.unwrap(), Some(s("text")));
}

/// Store operations per second from Lua: one coroutine in a loop, then 32 at once.
async fn lua_throughput(b: Backend) {
    let f = fixture(b);
    let ops = 600;
    let src = format!(
        r#"
        for i = 1, {ops} / 3 do
            assert(store.set("k" .. i, i))
            assert(store.get("k" .. i) == i)
            assert(store.incr("total") == i)
        end
        return "ok""#
    );
    let started = Instant::now();
    assert_eq!(run_lua::<String>(&f.store, &src).await.unwrap(), "ok");
    let sequential = ops as f64 / started.elapsed().as_secs_f64();

    let lua = mlua::Lua::new();
    lua.globals()
        .set(
            "store",
            lua_api::store::module(&lua, f.store.clone()).unwrap(),
        )
        .unwrap();
    let worker = lua
        .load(format!(
            r#"return function(w)
                for i = 1, {ops} / 3 do
                    local k = "w" .. w .. ":" .. i
                    assert(store.set(k, i))
                    assert(store.get(k) == i)
                    store.incr("all")
                end
            end"#
        ))
        .eval::<mlua::Function>()
        .unwrap();
    let workers = 32;
    let started = Instant::now();
    let runs: Vec<_> = (0..workers)
        .map(|w| tokio::spawn(worker.call_async::<()>(w)))
        .collect();
    for r in runs {
        r.await.unwrap().unwrap();
    }
    let concurrent = (ops * workers) as f64 / started.elapsed().as_secs_f64();
    assert_eq!(
        f.store.get("all").await.unwrap(),
        Some(Value::Scalar(Scalar::Int(ops as i64 / 3 * workers as i64)))
    );
    eprintln!(
        "store ops/s from Lua, {b:?}: {sequential:.0} (1 coroutine), {concurrent:.0} ({workers} coroutines)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_and_back() {
    let mut f = fixture(Backend::Redis);
    let st = f.store.clone();
    st.set("before", &s("1"), None).await.unwrap();
    f.redis.as_mut().unwrap().stop();
    for _ in 0..3 {
        let started = Instant::now();
        let err = st.get("before").await.unwrap_err();
        assert_eq!(err.code(), "unavailable", "{err}");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        let err = st
            .greylist("192.0.2.1", "a", "b", &GreylistOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(err.code(), "unavailable" | "timeout"), "{err}");
    }
    let lua_answer: (Option<i64>, String) =
        run_lua(&st, r#"return store.incr("x")"#).await.unwrap();
    assert_eq!(lua_answer, (None, "unavailable".to_string()));

    f.redis.as_mut().unwrap().restart();
    // The server restarted empty (no persistence); the store reconnects by itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match st.set("after", &s("2"), None).await {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "no reconnect: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(st.get("after").await.unwrap(), Some(s("2")));
    assert_eq!(st.incr("x", 1, None).await.unwrap(), 1);
}

#[tokio::test]
async fn redis_down_at_start() {
    let config = StoreConfig {
        backend: Backend::Redis,
        url: "redis://127.0.0.1:1/".into(),
        timeout: Duration::from_millis(500),
        ..StoreConfig::default()
    };
    let st = store::open(&config, store::system_clock()).expect("lazy: opens while down");
    let started = Instant::now();
    assert_eq!(st.get("k").await.unwrap_err().code(), "unavailable");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn sqlite_unwritable_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, "").unwrap();
    let err = SqliteStore::open(
        &blocker.join("store.db"),
        Synchronous::Full,
        Duration::from_secs(1),
        store::system_clock(),
    )
    .err()
    .expect("opening under a file must fail");
    assert_eq!(err.code(), "unavailable");
}

/// A database whose pages are damaged (not a read error): the error names the file, says what
/// SQLite says, and that a failing disk reads as the same.
#[tokio::test]
async fn sqlite_damaged_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let open = || {
        SqliteStore::open(
            &path,
            Synchronous::Full,
            Duration::from_secs(1),
            store::system_clock(),
        )
        .unwrap()
    };
    let st = open();
    for n in 0..500 {
        st.set(
            &format!("key{n}"),
            &s("a value long enough to fill some pages"),
            None,
        )
        .await
        .unwrap();
    }
    drop(st);
    // The writer thread checkpoints the WAL into the file and removes it as it closes.
    let wal = dir.path().join("store.db-wal");
    let deadline = Instant::now() + Duration::from_secs(5);
    while wal.exists() {
        assert!(Instant::now() < deadline, "the WAL stayed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 4 * 4096);
    bytes[2 * 4096..].fill(0x5a);
    std::fs::write(&path, bytes).unwrap();
    let st = open();
    let Err(StoreError::Unavailable(message)) = st.get("key250").await else {
        panic!("a damaged page read as data");
    };
    let expected = format!(
        "{}: database disk image is malformed (or a read error: see the kernel log)",
        path.display()
    );
    assert_eq!(message, expected);
}

const CHILD_ENV: &str = "LUAMILTER_STORE_WRITER";

/// kill -9 durability: a child process writes and prints each acknowledged key; the parent
/// kills it mid-stream and reopens the file: every acknowledged write must be there.
#[test]
fn sqlite_kill9_keeps_acknowledged_writes() {
    for sync in ["normal", "full"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store::sqlite_writer_child",
                "--ignored",
                "--nocapture",
            ])
            .args(["--test-threads", "1"])
            .env(CHILD_ENV, format!("{}|{sync}", path.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut acked = Vec::new();
        for line in lines.by_ref() {
            if let Some(key) = line.unwrap().strip_prefix("ack ") {
                acked.push(key.to_string());
                if acked.len() == 300 {
                    break;
                }
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // Acknowledgements printed before the kill are still in the pipe.
        acked.extend(
            lines
                .map_while(|l| l.ok())
                .filter_map(|l| l.strip_prefix("ack ").map(str::to_string)),
        );
        assert!(acked.len() >= 300, "child wrote only {} keys", acked.len());
        let missing = missing_after_reopen(&path, &acked);
        assert!(missing.is_empty(), "synchronous={sync}: lost {missing:?}");
    }
}

/// The keys of `keys` whose value (the key itself, as a string) is not in the SQLite file at `path`.
pub fn missing_after_reopen(path: &Path, keys: &[String]) -> Vec<String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let st = SqliteStore::open(
            path,
            Synchronous::Full,
            Duration::from_secs(5),
            store::system_clock(),
        )
        .unwrap();
        let mut missing = Vec::new();
        for k in keys {
            if st.get(k).await.unwrap() != Some(s(k)) {
                missing.push(k.clone());
            }
        }
        missing
    })
}

/// The child side of the kill -9 test (run only by it): writes from 8 tasks until killed.
#[test]
#[ignore = "child process of sqlite_kill9_keeps_acknowledged_writes"]
fn sqlite_writer_child() {
    let spec = std::env::var(CHILD_ENV).expect("run by sqlite_kill9_keeps_acknowledged_writes");
    let (path, sync) = spec.rsplit_once('|').unwrap();
    let sync = if sync == "full" {
        Synchronous::Full
    } else {
        Synchronous::Normal
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let st = Arc::new(
            SqliteStore::open(
                Path::new(path),
                sync,
                Duration::from_secs(5),
                store::system_clock(),
            )
            .unwrap(),
        );
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let st = st.clone();
                tokio::spawn(async move {
                    for i in 0.. {
                        let key = format!("t{t}-{i}");
                        st.set(&key, &s(&key), None).await.unwrap();
                        println!("ack {key}");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[test]
fn config_section_parses() {
    let config: StoreConfig = toml::from_str(
        r#"
        backend = "redis"
        url = "redis://10.0.0.5:6379/2"
        prefix = "mx:"
        timeout = "500ms"
        connect_timeout = 2
        "#,
    )
    .unwrap();
    assert_eq!(config.backend, Backend::Redis);
    assert_eq!(config.timeout, Duration::from_millis(500));
    assert_eq!(config.connect_timeout, Duration::from_secs(2));
    assert_eq!(config.path, StoreConfig::default().path);
    let err = toml::from_str::<StoreConfig>("backend = \"sqlite\"\npaht = \"x\"").unwrap_err();
    assert!(err.to_string().contains("paht"), "{err}");
    let err = toml::from_str::<StoreConfig>("timeout = \"5 minutes\"").unwrap_err();
    assert!(err.to_string().contains("invalid duration"), "{err}");
}
