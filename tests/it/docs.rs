//! The documented sample configuration: it parses, builds, and states every default truly.

use luamilter::{config::Config, engine::Generation, services::Services};
use std::{path::Path, sync::Arc};

fn sample_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/luamilter.toml")
}

#[tokio::test]
async fn sample_config_loads_and_builds() {
    let mut config = Config::load(&sample_path()).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::TempDir::new().unwrap();
    config.store.path = dir.path().join("store.db");
    let services = Arc::new(Services::start(&config).unwrap());
    let generation = Generation::build(Arc::new(config), services, 1)
        .unwrap_or_else(|errors| panic!("{}", errors.join("\n")));
    assert_eq!(generation.policies.len(), 1);
    let trivial = &generation.policies[0];
    assert_eq!(trivial.name, "trivial");
    assert_eq!(trivial.options["value"], "\"checked\"");
}

#[test]
fn sample_config_lists_every_key_with_its_default() {
    let text = std::fs::read_to_string(sample_path()).unwrap();
    let raw: toml::Table = toml::from_str(&text).unwrap();
    for (section, keys) in [
        (
            "milter",
            &[
                "listen",
                "socket_mode",
                "max_connections",
                "connection_timeout",
                "socket_activation",
            ][..],
        ),
        (
            "engine",
            &[
                "vms",
                "worker_threads",
                "time_limit",
                "memory_limit_mib",
                "exception_policy",
            ][..],
        ),
        ("log", &["level", "format"][..]),
        ("policies", &["dirs", "chain", "watch"][..]),
        (
            "dns",
            &["nameservers", "timeout", "attempts", "cache_size"][..],
        ),
        (
            "spf",
            &["max_lookups", "max_void_lookups", "timeout", "best_guess"][..],
        ),
        (
            "store",
            &[
                "backend",
                "path",
                "synchronous",
                "url",
                "prefix",
                "timeout",
                "connect_timeout",
                "sentinels",
                "sentinel_master",
                "min_replicas",
            ][..],
        ),
        ("trace", &["keep"][..]),
        ("dkim", &["max_body", "sign_headers", "keys"][..]),
        (
            "smtp",
            &[
                "port",
                "connect_timeout",
                "command_timeout",
                "timeout",
                "per_domain",
                "rate",
                "global",
                "cache_ok",
                "cache_fail",
                "relay",
                "send_global",
            ][..],
        ),
    ] {
        let table = raw[section].as_table().unwrap();
        let mut written: Vec<&str> = table.keys().map(String::as_str).collect();
        written.sort_unstable();
        let mut expected = keys.to_vec();
        expected.sort_unstable();
        assert_eq!(written, expected, "keys of [{section}]");
    }

    let sample = Config::load(&sample_path()).unwrap();
    let default = Config::default();
    assert_eq!(sample.milter.listen, default.milter.listen);
    assert_eq!(sample.milter.socket_mode, default.milter.socket_mode);
    assert_eq!(
        sample.milter.max_connections,
        default.milter.max_connections
    );
    assert_eq!(
        sample.milter.connection_timeout,
        default.milter.connection_timeout
    );
    assert_eq!(sample.engine.vms, default.engine.vms);
    assert_eq!(sample.engine.worker_threads, default.engine.worker_threads);
    assert_eq!(sample.engine.time_limit, default.engine.time_limit);
    assert_eq!(
        sample.engine.memory_limit_mib,
        default.engine.memory_limit_mib
    );
    assert_eq!(
        sample.engine.exception_policy,
        default.engine.exception_policy
    );
    assert_eq!(sample.log.level, default.log.level);
    assert_eq!(sample.log.format, default.log.format);
    assert_eq!(sample.policies.chain, default.policies.chain);
    assert_eq!(sample.policies.watch, default.policies.watch);
    assert_eq!(sample.milter.control_socket, default.milter.control_socket);
    assert_eq!(
        sample.milter.socket_activation,
        default.milter.socket_activation
    );
    assert_eq!(sample.dns, default.dns);
    assert_eq!(sample.spf, default.spf);
    assert_eq!(sample.store, default.store);
    assert_eq!(sample.trace, default.trace);
    assert_eq!(sample.smtp, default.smtp);
    // The one documented difference: the sample sits in examples/, the default dir's target.
    assert_eq!(default.policies.dirs, [Path::new("examples")]);
    assert_eq!(
        sample.policy_dirs(),
        [sample_path().parent().unwrap().join(".")]
    );
}

#[tokio::test]
async fn the_stock_pack_sample_loads_every_stock_policy() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/stock-pack.toml");
    let mut config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::TempDir::new().unwrap();
    config.store.path = dir.path().join("store.db");
    let services = Arc::new(Services::start(&config).unwrap());
    let generation = Generation::build(Arc::new(config), services, 1)
        .unwrap_or_else(|errors| panic!("{}", errors.join("\n")));
    let mut names: Vec<&str> = generation
        .policies
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    let mut stock: Vec<&str> = luamilter::stock::policy_names().collect();
    names.sort_unstable();
    stock.sort_unstable();
    assert_eq!(names, stock, "the sample enables every stock policy");
    assert!(
        generation
            .policies
            .iter()
            .all(|p| p.origin == luamilter::engine::policy::Origin::Stock)
    );
}

/// Every key of the classic milter's `milter.cfg` (milter-app notes §3), by section.
const CLASSIC_KEYS: &[(&str, &[&str])] = &[
    (
        "milter",
        &[
            "datadir",
            "logdir",
            "socket",
            "tempdir",
            "timeout",
            "log_headers",
            "internal_connect",
            "internal_domains",
            "trusted_relay",
            "private_relay",
            "internal_mta",
            "hello_blacklist",
            "check_user",
            "case_sensitive_localpart",
            "max_demerits",
            "email_providers",
            "errors_url",
            "banned_exts",
        ],
    ),
    (
        "defang",
        &[
            "banned_exts",
            "scan_rfc822",
            "scan_zip",
            "scan_html",
            "block_chinese",
            "block_forward",
            "porn_words",
            "spam_words",
            "from_words",
        ],
    ),
    (
        "scrub",
        &["hide_path", "reject_virus_from", "internal_policy"],
    ),
    (
        "wiretap",
        &[
            "blind",
            "users",
            "discard",
            "dest",
            "archive",
            "smart_alias",
        ],
    ),
    ("smart_alias", &["name"]),
    (
        "dspam",
        &[
            "whitelist_senders",
            "whitelist_mx",
            "dspam_dict",
            "dspam_userdir",
            "dspam_users",
            "dspam_train",
            "dspam_screener",
            "dspam_exempt",
            "dspam_whitelist",
            "dspam_reject",
            "dspam_internal",
            "dspam_sizelimit",
        ],
    ),
    (
        "spf",
        &[
            "delegate",
            "reject_neutral",
            "accept_softfail",
            "accept_fail",
            "best_guess",
            "reject_noptr",
            "supply_sender",
            "access_file",
            "access_file_nulls",
            "access_file_colon",
            "trusted_forwarder",
        ],
    ),
    (
        "srs",
        &[
            "config",
            "secret",
            "maxage",
            "hashlength",
            "separator",
            "database",
            "ses",
            "srs",
            "sign",
            "fwdomain",
            "reject_spoofed",
            "banned_users",
        ],
    ),
    ("gossip", &["server", "peers", "ttl"]),
    ("greylist", &["dbfile", "time", "expire", "retain"]),
    ("dkim", &["privkey", "domain", "selector"]),
];

#[test]
fn the_migration_guide_maps_every_classic_key() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/migrating-from-pymilter.md");
    let guide = std::fs::read_to_string(path).unwrap();
    // (the heading above the row, the row's first cell, its last cell)
    let mut rows = Vec::new();
    let mut heading = "";
    for line in guide.lines() {
        if line.starts_with('#') {
            heading = line;
        } else if let Some(row) = line.strip_prefix('|') {
            let cells: Vec<&str> = row.split(" | ").map(str::trim).collect();
            let last = cells.last().unwrap().trim_end_matches('|').trim();
            rows.push((heading, cells[0], last));
        }
    }
    let mut missing = Vec::new();
    for (section, keys) in CLASSIC_KEYS {
        let tag = format!("[{section}]");
        for key in *keys {
            let mapped = rows.iter().any(|(heading, first, last)| {
                let names_key =
                    first.contains(&format!("`{key}`")) || first.contains(&format!("{tag} {key}"));
                let in_section = first.contains(&tag) || heading.contains(&tag);
                names_key && in_section && !last.starts_with("not yet")
            });
            if !mapped {
                missing.push(format!("{tag} {key}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "classic keys the migration guide does not map: {missing:?}"
    );
}

/// Every test the docs name (`` `module::test_name` `` in README.md, BENCHMARKS.md and docs/),
/// for a module of this test binary, exists there: a renamed test cannot leave the docs
/// pointing at nothing.
#[test]
fn every_test_the_docs_name_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut docs = vec![root.join("README.md"), root.join("BENCHMARKS.md")];
    let mut dirs = vec![root.join("docs")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                docs.push(path);
            }
        }
    }
    let mut named = 0;
    let mut missing = Vec::new();
    for doc in docs {
        let text = std::fs::read_to_string(&doc).unwrap();
        for token in text.split('`').skip(1).step_by(2) {
            let Some((module, test)) = token.split_once("::") else {
                continue;
            };
            let is_name = |s: &str| {
                !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            };
            let source = root.join("tests/it").join(format!("{module}.rs"));
            if !is_name(module) || !is_name(test) || !source.exists() {
                continue;
            }
            named += 1;
            let code = std::fs::read_to_string(&source).unwrap();
            if !code.contains(&format!("fn {test}(")) {
                missing.push(format!("{}: {module}::{test}", doc.display()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "tests named in the docs but not found:\n{}",
        missing.join("\n")
    );
    assert!(named > 20, "only {named} test names found in the docs");
}
