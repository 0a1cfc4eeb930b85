//! Log output: tracing with an env-filter level, as logfmt (`text`) or JSON lines on standard
//! error.
//!
//! Both formats write the same flat fields, in this order: `timestamp`, `level`, `target`,
//! then the fields of the spans the event happened in, then the session fields of a policy
//! handler running ([`crate::log_fields`]: the session's `client` and `queue_id`, the `policy`
//! and `stage`), then the event's own (`message` first). So every line of a message can be
//! found by its `queue_id` in either format. An event's field replaces a span or session field
//! of the same name; an inner span's an outer one's.
//!
//! Lines go to standard error through [`crate::log_output`]: the milter worker threads gather
//! theirs and write them when they run out of work, so a line wakes no other thread.

use crate::{
    config::{LogConfig, LogFormat},
    log_fields,
    log_output::LogOutput,
};
use serde_json::Value;
use std::fmt::{self, Write};
use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{
    EnvFilter,
    fmt::{
        FmtContext, FormatEvent, FormatFields, FormattedFields,
        format::{JsonFields, Writer},
        time::{FormatTime, SystemTime},
    },
    registry::LookupSpan,
};

/// Installs the global subscriber. `RUST_LOG`, when set, overrides the configured level.
/// indymilter's own logging is held at `warn` unless the filter names it.
pub fn init(config: &LogConfig) {
    let mut spec = std::env::var("RUST_LOG").unwrap_or_else(|_| config.level.clone());
    if !spec.contains("indymilter") {
        spec.push_str(",indymilter=warn");
    }
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"));
    // Span fields are kept as JSON whatever the format, so both can read them back.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(LogOutput)
        .fmt_fields(JsonFields::new())
        .event_format(FlatLine(config.format))
        .try_init();
}

/// Writes each event as one line of flat fields in the configured format.
struct FlatLine(LogFormat);

impl<S, N> FormatEvent<S, N> for FlatLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let meta = event.metadata();
        let mut fields = Fields(Vec::with_capacity(12));
        fields.set("timestamp", timestamp.into());
        fields.set("level", meta.level().as_str().into());
        fields.set("target", meta.target().into());
        for span in ctx.event_scope().into_iter().flat_map(|s| s.from_root()) {
            if let Some(text) = span.extensions().get::<FormattedFields<N>>()
                && let Ok(Value::Object(map)) = serde_json::from_str(&text.fields)
            {
                for (name, value) in map {
                    fields.set(&name, value);
                }
            }
        }
        log_fields::visit(|name, value| fields.set(name, value.into()));
        event.record(&mut fields);
        match self.0 {
            LogFormat::Json => fields.write_json(&mut writer)?,
            LogFormat::Text => fields.write_logfmt(&mut writer)?,
        }
        writer.write_char('\n')
    }
}

/// An event's fields in order; setting a name again replaces its value in place.
struct Fields(Vec<(String, Value)>);

impl Fields {
    fn set(&mut self, name: &str, value: Value) {
        match self.0.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name.to_string(), value)),
        }
    }

    /// `{"name":value,...}` in field order.
    fn write_json(&self, out: &mut impl Write) -> fmt::Result {
        out.write_char('{')?;
        for (i, (name, value)) in self.0.iter().enumerate() {
            if i > 0 {
                out.write_char(',')?;
            }
            write!(out, "{}:{value}", Value::from(name.as_str()))?;
        }
        out.write_char('}')
    }

    /// `name=value ...`; a string value is quoted (with JSON escapes) when it is empty or holds
    /// a space, `=`, `"` or a control character.
    fn write_logfmt(&self, out: &mut impl Write) -> fmt::Result {
        for (i, (name, value)) in self.0.iter().enumerate() {
            if i > 0 {
                out.write_char(' ')?;
            }
            match value {
                Value::String(text) if !needs_quotes(text) => write!(out, "{name}={text}")?,
                other => write!(out, "{name}={other}")?,
            }
        }
        Ok(())
    }
}

fn needs_quotes(text: &str) -> bool {
    text.is_empty()
        || text
            .chars()
            .any(|c| c == ' ' || c == '=' || c == '"' || c.is_control())
}

impl Visit for Fields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.set(field.name(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.set(field.name(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.set(field.name(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.set(field.name(), value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.set(field.name(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.set(field.name(), format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logfmt_quotes_only_what_needs_it_and_json_keeps_the_order() {
        let mut fields = Fields(Vec::new());
        fields.set("message", "message".into());
        fields.set("client", "192.0.2.7".into());
        fields.set("verdict", "reject 550 5.7.1 \"no\"".into());
        fields.set("queue_id", "".into());
        fields.set("n", 3.into());
        fields.set("client", "192.0.2.8".into());
        let mut logfmt = String::new();
        fields.write_logfmt(&mut logfmt).unwrap();
        assert_eq!(
            logfmt,
            r#"message=message client=192.0.2.8 verdict="reject 550 5.7.1 \"no\"" queue_id="" n=3"#
        );
        let mut json = String::new();
        fields.write_json(&mut json).unwrap();
        assert_eq!(
            json,
            r#"{"message":"message","client":"192.0.2.8","verdict":"reject 550 5.7.1 \"no\"","queue_id":"","n":3}"#
        );
    }
}
