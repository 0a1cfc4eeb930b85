//! The decision trace of a message: which policy said what at which stage, how long it took and
//! which service calls it made. Kept in the session while the message runs, written compactly
//! in the final decision log line, and stored for `luamilter why`.

use crate::services::calls::CallCount;
use serde::{Deserialize, Serialize};
use std::{fmt, time::Duration};

/// Steps kept per message; later ones are counted, not kept (a bounded record).
pub const MAX_STEPS: usize = 64;

/// One handler call worth remembering: it decided, would have decided (shadow mode), failed,
/// or called a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// The milter stage.
    pub stage: String,
    /// The policy, or "-" for a verdict owed from an earlier stage.
    pub policy: String,
    /// The verdict with its reply ("reject 550 5.7.1 Go away"), "continue", or "fault: …".
    pub verdict: String,
    /// Whether the policy runs in shadow mode: the verdict was logged, not enforced.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
    /// Time spent in the handler, in microseconds.
    pub micros: u64,
    /// Service calls the handler made.
    #[serde(default, skip_serializing_if = "CallCount::is_empty")]
    pub calls: CallCount,
}

impl Step {
    /// A step of `policy` at `stage`.
    pub fn new(stage: &str, policy: &str, verdict: String, elapsed: Duration) -> Step {
        Step {
            stage: stage.to_string(),
            policy: policy.to_string(),
            verdict,
            shadow: false,
            micros: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            calls: CallCount::default(),
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let would = if self.shadow { "would " } else { "" };
        write!(
            f,
            "{}:{}={would}{} ({:.1}ms",
            self.stage,
            self.policy,
            self.verdict,
            self.micros as f64 / 1000.0
        )?;
        if self.calls.dns > 0 {
            write!(f, " dns={}", self.calls.dns)?;
        }
        if self.calls.store > 0 {
            write!(f, " store={}", self.calls.store)?;
        }
        if self.calls.smtp > 0 {
            write!(f, " smtp={}", self.calls.smtp)?;
        }
        f.write_str(")")
    }
}

/// The steps of a connection or a message, bounded by [`MAX_STEPS`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace {
    /// The steps kept, in order.
    pub steps: Vec<Step>,
    /// Steps not kept because the trace was full.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Trace {
    /// Adds a step, or counts it when the trace is full.
    pub fn push(&mut self, step: Step) {
        if self.steps.len() < MAX_STEPS {
            self.steps.push(step);
        } else {
            self.dropped = self.dropped.saturating_add(1);
        }
    }
}

impl fmt::Display for Trace {
    /// One line: the steps separated by "; ".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Line(&[self]).fmt(f)
    }
}

/// Several traces written as one line, in order, without copying their steps.
pub struct Line<'a>(pub &'a [&'a Trace]);

impl fmt::Display for Line<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let steps = self.0.iter().flat_map(|t| t.steps.iter());
        for (i, step) in steps.enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{step}")?;
        }
        let dropped: u32 = self.0.iter().map(|t| t.dropped).sum();
        if dropped > 0 {
            write!(f, "; (+{dropped} more)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_is_one_compact_line_and_bounded() {
        let mut trace = Trace::default();
        let mut step = Step::new(
            "rcpt",
            "greylist",
            "tempfail 451 4.7.1 Greylisted".into(),
            Duration::from_micros(2100),
        );
        step.calls = CallCount {
            dns: 0,
            store: 2,
            smtp: 1,
        };
        trace.push(step);
        let mut shadow = Step::new(
            "mail",
            "spf",
            "reject 550 5.7.1 SPF fail".into(),
            Duration::ZERO,
        );
        shadow.shadow = true;
        trace.push(shadow);
        assert_eq!(
            trace.to_string(),
            "rcpt:greylist=tempfail 451 4.7.1 Greylisted (2.1ms store=2 smtp=1); \
             mail:spf=would reject 550 5.7.1 SPF fail (0.0ms)"
        );
        for _ in 0..MAX_STEPS {
            trace.push(Step::new("header", "p", "continue".into(), Duration::ZERO));
        }
        assert_eq!(trace.steps.len(), MAX_STEPS);
        assert_eq!(trace.dropped, 2);
        assert!(trace.to_string().ends_with("; (+2 more)"));
    }
}
