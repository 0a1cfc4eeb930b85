//! Shadow mode (`[policy.NAME] mode = "shadow"`): what shadowed policies would have done,
//! counted per policy, stage and verdict for `luamilter ctl stats`. Process-wide, so the counts
//! survive reloads.

use crate::{lua_api::verdict::Verdict, stage::Stage};
use std::{
    collections::BTreeMap,
    sync::{Mutex, MutexGuard},
};

static WOULD: Mutex<BTreeMap<(String, Stage, &'static str), u64>> = Mutex::new(BTreeMap::new());

fn counts() -> MutexGuard<'static, BTreeMap<(String, Stage, &'static str), u64>> {
    WOULD.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts a verdict a shadowed policy would have given.
pub fn count(policy: &str, stage: Stage, verdict: &Verdict) {
    *counts()
        .entry((policy.to_string(), stage, verdict.kind().name()))
        .or_default() += 1;
}

/// The counts, one line each: `policy stage verdict count`.
pub fn report() -> Vec<String> {
    counts()
        .iter()
        .map(|((policy, stage, verdict), n)| format!("{policy} {stage} {verdict} {n}"))
        .collect()
}
