//! What the milter logs while `luamilter test` drives it, caught in memory instead of written
//! to standard error: the decision log (which policy answered what at which stage, and the
//! message's decision trace), policy log lines (`milter.log`), faults, shadow verdicts and held
//! rejects. Each event keeps its `stage` and `policy`, from its own fields or from the handler
//! it was logged in ([`crate::log_fields`]).
//!
//! The layer is installed for the current thread only ([`Capture::install`]) and the milter runs
//! on a current-thread runtime there, so nothing else in the process is caught.

use crate::log_fields;
use serde::Serialize;
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{Arc, Mutex},
};
use tracing::{
    Event, Level, Metadata, Subscriber,
    field::{Field, Visit},
    span,
};
use tracing_subscriber::{
    layer::{Context, SubscriberExt},
    registry::LookupSpan,
};

/// One event the milter logged.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Captured {
    /// "ERROR", "WARN", "INFO" or "DEBUG".
    pub level: String,
    /// Where it came from: `luamilter::policy` for `milter.log`, `luamilter::server` for
    /// decisions.
    pub target: String,
    /// The text.
    pub message: String,
    /// The milter stage it belongs to, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// The policy it belongs to, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Its other fields, as text.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, String>,
}

impl Captured {
    /// Whether this is the decision log line of a stage.
    pub fn is_decision(&self) -> bool {
        self.target == "luamilter::server" && self.message == "decision"
    }

    /// Whether this is the one line the live log writes per message (its outcome and trace,
    /// which the report shows on its own).
    pub fn is_message_summary(&self) -> bool {
        self.target == "luamilter::server" && self.message == "message"
    }

    /// Whether this is a line a policy logged with `milter.log`.
    pub fn is_policy_log(&self) -> bool {
        self.target == "luamilter::policy"
    }

    /// A field by name.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

/// The events caught so far, shared by the layer and the driver.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<Captured>>>);

impl Capture {
    /// Takes the events caught since the last call.
    pub fn drain(&self) -> Vec<Captured> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Catches this thread's events until the guard is dropped.
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        let subscriber = tracing_subscriber::registry().with(Layer(self.clone()));
        tracing::subscriber::set_default(subscriber)
    }
}

/// The fields of a span, kept in its extensions.
#[derive(Default)]
struct SpanFields(BTreeMap<String, String>);

/// Records fields as text.
struct Fields<'a> {
    message: &'a mut String,
    fields: &'a mut BTreeMap<String, String>,
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.fields
                .insert(field.name().to_string(), value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.fields
                .insert(field.name().to_string(), format!("{value:?}"));
        }
    }
}

struct Layer(Capture);

/// Modules whose debug lines are the decision trail (each stage's decision, shadow verdicts,
/// held rejects, demerits): the live log keeps them at debug, a test run shows them.
const TRAIL: [&str; 4] = [
    "luamilter::server",
    "luamilter::engine::chain",
    "luamilter::session",
    "luamilter::lua_api::ctx",
];

/// luamilter's own events at info and above, the decision trail, and every line a policy logs.
fn wanted(metadata: &Metadata<'_>) -> bool {
    let target = metadata.target();
    if target == "luamilter::policy" {
        return true;
    }
    if TRAIL.contains(&target) && *metadata.level() <= Level::DEBUG {
        return true;
    }
    target.starts_with("luamilter") && *metadata.level() <= Level::INFO
        || target.starts_with("indymilter") && *metadata.level() <= Level::WARN
}

impl<S> tracing_subscriber::Layer<S> for Layer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
        wanted(metadata)
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        let mut message = String::new();
        attrs.record(&mut Fields {
            message: &mut message,
            fields: &mut fields,
        });
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        let mut message = String::new();
        event.record(&mut Fields {
            message: &mut message,
            fields: &mut fields,
        });
        // The running handler's fields, and those of the enclosing spans, fill in what the event
        // itself does not say.
        log_fields::visit(|name, value| {
            fields
                .entry(name.to_string())
                .or_insert_with(|| value.to_string());
        });
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope {
                if let Some(SpanFields(outer)) = span.extensions().get::<SpanFields>() {
                    for (k, v) in outer {
                        fields.entry(k.clone()).or_insert_with(|| v.clone());
                    }
                }
            }
        }
        let metadata = event.metadata();
        let captured = Captured {
            level: metadata.level().to_string(),
            target: metadata.target().to_string(),
            message,
            stage: fields.remove("stage"),
            policy: fields.remove("policy"),
            fields,
        };
        (self.0)
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(captured);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::Stage;

    #[test]
    fn events_take_stage_and_policy_from_their_handler() {
        let capture = Capture::default();
        {
            let _guard = capture.install();
            let log = std::pin::pin!(async {
                tracing::info!(target: "luamilter::policy", "hello {}", 1);
            });
            let policy = "greylist".to_string();
            let handler = log_fields::in_handler(&policy, &Stage::Rcpt, log);
            futures_util::FutureExt::now_or_never(handler).unwrap();
            tracing::info!(target: "luamilter::server", stage = "mail", policy = "spf", verdict = "reject", "decision");
            tracing::debug!(target: "luamilter::engine::chain", "shadow: would reject");
            tracing::debug!(target: "luamilter::reload", "not wanted");
            tracing::info!(target: "other", "not wanted");
        }
        let events = capture.drain();
        assert_eq!(events.len(), 3, "{events:?}");
        assert_eq!(events[2].message, "shadow: would reject");
        assert_eq!(events[0].message, "hello 1");
        assert!(events[0].is_policy_log());
        assert_eq!(events[0].stage.as_deref(), Some("rcpt"));
        assert_eq!(events[0].policy.as_deref(), Some("greylist"));
        assert!(events[1].is_decision());
        assert_eq!(events[1].field("verdict"), Some("reject"));
        assert_eq!(events[1].policy.as_deref(), Some("spf"));
        assert!(capture.drain().is_empty());
    }
}
