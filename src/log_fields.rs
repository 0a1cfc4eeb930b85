//! The session fields of the log lines written while a policy handler runs: the session's
//! `client` and `queue_id`, the handler's `policy` and `stage`. The server and the engine lend
//! them to the stage's future ([`crate::lent`]) instead of opening tracing spans per stage and
//! per handler (each a registry entry and its fields formatted, whether or not a line is
//! written); the log formatter ([`crate::logging`]) and `luamilter test`'s capture read them
//! back with [`visit`]. Lines carry them whatever the log level.

use crate::{lent, stage::Stage};
use std::future::Future;

scoped_tls::scoped_thread_local!(static SESSION: SessionFields);
scoped_tls::scoped_thread_local!(static POLICY: String);
scoped_tls::scoped_thread_local!(static STAGE: Stage);

/// The session a stage belongs to, as its log lines name it.
pub struct SessionFields {
    /// The client's label (its IP address, or host name).
    pub client: String,
    /// The queue id, or "".
    pub queue_id: String,
}

/// Runs `stage` (pinned, see [`lent::lend`]) with the log fields of `session`.
pub fn in_session<'a, F: Future + Unpin + 'a>(
    session: &'a SessionFields,
    stage: F,
) -> impl Future<Output = F::Output> + 'a {
    lent::lend(&SESSION, session, stage)
}

/// Runs `handler` (pinned, see [`lent::lend`]), the handler of `policy` for `stage`, with their
/// log fields.
pub fn in_handler<'a, F: Future + Unpin + 'a>(
    policy: &'a String,
    stage: &'a Stage,
    handler: F,
) -> impl Future<Output = F::Output> + 'a {
    lent::lend(&POLICY, policy, lent::lend(&STAGE, stage, handler))
}

/// Calls `field` with the name and value of each field lent to this thread, in the order
/// `client`, `queue_id`, `policy`, `stage`.
pub fn visit(mut field: impl FnMut(&'static str, &str)) {
    if SESSION.is_set() {
        SESSION.with(|s| {
            field("client", &s.client);
            field("queue_id", &s.queue_id);
        });
    }
    if POLICY.is_set() {
        POLICY.with(|policy| field("policy", policy));
    }
    if STAGE.is_set() {
        STAGE.with(|stage| field("stage", stage.name()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen() -> Vec<(&'static str, String)> {
        let mut fields = Vec::new();
        visit(|name, value| fields.push((name, value.to_string())));
        fields
    }

    #[tokio::test]
    async fn fields_are_lent_for_the_polls_of_the_stage_only() {
        let session = SessionFields {
            client: "192.0.2.7".into(),
            queue_id: "Q1".into(),
        };
        let stage = std::pin::pin!(async {
            let before = seen();
            // Across an await point, too.
            tokio::task::yield_now().await;
            let handler = std::pin::pin!(async { seen() });
            let handler = in_handler(&"gate".to_string(), &Stage::Mail, handler).await;
            (before, handler)
        });
        let inside = in_session(&session, stage).await;
        assert_eq!(
            inside.0,
            [("client", "192.0.2.7".into()), ("queue_id", "Q1".into())]
        );
        assert_eq!(
            inside.1,
            [
                ("client", "192.0.2.7".into()),
                ("queue_id", "Q1".into()),
                ("policy", "gate".into()),
                ("stage", "mail".into())
            ]
        );
        assert!(seen().is_empty());
    }
}
