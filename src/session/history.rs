//! Message histories for `luamilter why`: when a message ends, what the policies decided about
//! it is stored (by queue id, with indexes by Message-ID and by client IP) for `[trace] keep`,
//! in the shared store, so with Redis any MX host can answer for any other.

use super::Trace;
use crate::services::store::{Scalar, Store, StoreError, Value};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Key prefix of the records; the indexes add `msgid:` and `ip:`.
const PREFIX: &str = "luamilter.trace:";
/// Records `luamilter why --client` lists at most.
pub const MAX_LISTED: usize = 100;

/// The index key of a client's messages that ended in one minute (unix seconds / 60).
fn client_bucket(client: &str, minute: i64) -> String {
    format!("{PREFIX}ip:{client}:{minute}")
}

/// `[trace]`: how long message histories are kept.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceConfig {
    /// How long a message's history is kept; "0" keeps none.
    #[serde(deserialize_with = "crate::duration::serde_duration::deserialize")]
    pub keep: Duration,
}

impl Default for TraceConfig {
    fn default() -> TraceConfig {
        TraceConfig {
            keep: Duration::from_secs(7 * 86400),
        }
    }
}

/// What happened to one message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRecord {
    /// The MTA's queue id.
    pub queue_id: String,
    /// The Message-ID header, if the message got that far.
    #[serde(default)]
    pub message_id: Option<String>,
    /// When the message ended (unix seconds).
    pub time: i64,
    /// The client: its IP, else its host name.
    pub client: String,
    /// The HELO name.
    #[serde(default)]
    pub helo: Option<String>,
    /// MAIL FROM.
    pub sender: String,
    /// Recipients accepted.
    pub recipients: Vec<String>,
    /// The answer the message got ("accept", "reject 550 5.7.1 …", "aborted").
    pub outcome: String,
    /// The decisions.
    pub trace: Trace,
}

impl MessageRecord {
    /// Stores the record for `keep` with its indexes, in one atomic store write (so once the
    /// record can be found, every way to it works): the client index is a counter per client
    /// and minute plus one key per message.
    pub async fn save(&self, store: &dyn Store, keep: Duration) -> Result<(), StoreError> {
        let queue_id = string(self.queue_id.clone());
        let text = serde_json::to_string(self).unwrap_or_default();
        let mut values = vec![(format!("{PREFIX}{}", self.queue_id), string(text))];
        if let Some(id) = &self.message_id {
            values.push((format!("{PREFIX}msgid:{id}"), queue_id.clone()));
        }
        let bucket = client_bucket(&self.client, self.time.div_euclid(60));
        store
            .set_indexed(&bucket, &queue_id, &values, Some(keep))
            .await
            .map(drop)
    }

    /// The record of a queue id or a Message-ID (with or without angle brackets).
    pub async fn find(store: &dyn Store, id: &str) -> Result<Option<MessageRecord>, StoreError> {
        if let Some(record) = Self::by_queue_id(store, id).await? {
            return Ok(Some(record));
        }
        for message_id in [id.to_string(), format!("<{}>", id.trim_matches(['<', '>']))] {
            let key = format!("{PREFIX}msgid:{message_id}");
            if let Some(Value::Scalar(Scalar::Str(queue_id))) = store.get(&key).await? {
                return Self::by_queue_id(store, &queue_id).await;
            }
        }
        Ok(None)
    }

    /// The records of client `ip` that ended within `window` seconds of `around` (unix
    /// seconds), oldest first; at most [`MAX_LISTED`].
    pub async fn by_client(
        store: &dyn Store,
        ip: &str,
        around: i64,
        window: i64,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        let mut records = Vec::new();
        let first = (around - window).div_euclid(60);
        let last = (around + window).div_euclid(60);
        for minute in first..=last {
            let bucket = client_bucket(ip, minute);
            let Some(Value::Scalar(Scalar::Int(count))) = store.get(&bucket).await? else {
                continue;
            };
            for n in 1..=count {
                let key = format!("{bucket}:{n}");
                let Some(Value::Scalar(Scalar::Str(queue_id))) = store.get(&key).await? else {
                    continue;
                };
                match Self::by_queue_id(store, &queue_id).await? {
                    Some(r) if (r.time - around).abs() <= window => records.push(r),
                    _ => {}
                }
                if records.len() >= MAX_LISTED {
                    return Ok(records);
                }
            }
        }
        Ok(records)
    }

    async fn by_queue_id(
        store: &dyn Store,
        queue_id: &str,
    ) -> Result<Option<MessageRecord>, StoreError> {
        match store.get(&format!("{PREFIX}{queue_id}")).await? {
            Some(Value::Scalar(Scalar::Str(text))) => Ok(serde_json::from_str(&text).ok()),
            _ => Ok(None),
        }
    }
}

fn string(text: String) -> Value {
    Value::Scalar(Scalar::Str(text))
}

impl std::fmt::Display for MessageRecord {
    /// The record as `luamilter why` prints it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "queue id   {}", self.queue_id)?;
        if let Some(id) = &self.message_id {
            writeln!(f, "message-id {id}")?;
        }
        writeln!(f, "time       {}", self.time)?;
        writeln!(f, "client     {}", self.client)?;
        if let Some(helo) = &self.helo {
            writeln!(f, "helo       {helo}")?;
        }
        writeln!(f, "from       <{}>", self.sender)?;
        writeln!(f, "to         {}", self.recipients.join(", "))?;
        writeln!(f, "outcome    {}", self.outcome)?;
        writeln!(f, "decisions")?;
        for step in &self.trace.steps {
            writeln!(f, "  {step}")?;
        }
        if self.trace.steps.is_empty() {
            writeln!(f, "  (no policy decided; every handler continued)")?;
        }
        if self.trace.dropped > 0 {
            writeln!(f, "  (+{} more not kept)", self.trace.dropped)?;
        }
        Ok(())
    }
}
