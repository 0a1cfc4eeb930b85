//! The stock pack's case files (tests/cases/NAME.toml, one or more per stock policy) run
//! through `luamilter test --cases`, the command admins run on their own case files: the real
//! binary, the daemon's callbacks in-process, zone files for DNS, a throwaway SQLite store
//! and a real redis-server for the files that name it. The format is documented in
//! docs/testing.md and `luamilter::offline::cases`; tests/cases/README.md says what the stock
//! files cover.

use crate::{dns_server::TestDns, redis_server::RedisServer};
use luamilter::offline::cases::{self, CaseOptions};
use std::{path::Path, process::Command};

fn cases_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases")
}

#[test]
fn every_case_file_passes() {
    let redis = RedisServer::start();
    let out = Command::new(env!("CARGO_BIN_EXE_luamilter"))
        .args(["test", "--cases"])
        .arg(cases_dir())
        .args(["--redis-url", &redis.url])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let failures: Vec<&str> = stdout
        .lines()
        .filter(|l| {
            l.starts_with("  FAIL") || l.starts_with("  ERROR") || l.starts_with("        ")
        })
        .collect();
    assert!(
        out.status.success(),
        "failing case(s):\n{}\n{}",
        failures.join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    let totals = stdout.lines().last().unwrap_or_default();
    assert!(totals.ends_with(" passed, 0 failed, 0 skipped"), "{totals}");
    let passed: usize = totals.split(' ').next().unwrap().parse().unwrap();
    assert!(passed > 200, "{totals}");
}

/// The zone files answer as a real DNS server serving them does: the whole stock suite gives
/// the same results over hickory's resolver and the test DNS server on loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stock_cases_pass_on_a_real_dns_server_too() {
    let dns = TestDns::start().await;
    let files = cases::collect(&[cases_dir()]).unwrap();
    let options = CaseOptions {
        live_dns: Some(dns.config(std::time::Duration::from_secs(2))),
        ..CaseOptions::default()
    };
    let results = tokio::task::spawn_blocking(move || cases::run_files(&files, &options))
        .await
        .unwrap();
    let failures: Vec<String> = results.iter().flat_map(|r| r.failures()).collect();
    assert!(
        failures.is_empty(),
        "{} failing case(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(results.iter().map(|r| r.cases.len()).sum::<usize>() > 200);
}

#[test]
fn every_stock_policy_has_cases_and_a_doc_page() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut missing = Vec::new();
    for name in luamilter::stock::policy_names() {
        if !root.join(format!("tests/cases/{name}.toml")).exists() {
            missing.push(format!("tests/cases/{name}.toml"));
        }
        if !root.join(format!("docs/policies/{name}.md")).exists() {
            missing.push(format!("docs/policies/{name}.md"));
        }
    }
    assert!(
        missing.is_empty(),
        "stock policies without cases or docs: {missing:?}"
    );
}
