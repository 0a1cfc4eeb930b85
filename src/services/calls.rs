//! Which service calls a piece of work made: the engine runs each policy handler inside
//! [`counted`], and the services [`note`] their calls, so a message's decision trace can say
//! that the greylist handler made two store calls and the spf one three DNS queries.

use serde::{Deserialize, Serialize};
use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
};

tokio::task_local! {
    static CALLS: Arc<Counters>;
}

#[derive(Default)]
struct Counters {
    dns: AtomicU32,
    store: AtomicU32,
    smtp: AtomicU32,
}

/// A service whose calls are counted.
#[derive(Clone, Copy, Debug)]
pub enum Service {
    /// A DNS query (SPF's included), answered from the cache or not.
    Dns,
    /// A store operation.
    Store,
    /// An SMTP call-back asked for (answered from the cache or not).
    Smtp,
}

/// Calls made by one piece of work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallCount {
    /// DNS queries.
    pub dns: u32,
    /// Store operations.
    pub store: u32,
    /// SMTP call-backs asked for.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub smtp: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl CallCount {
    /// Whether no call was made.
    pub fn is_empty(&self) -> bool {
        self.dns == 0 && self.store == 0 && self.smtp == 0
    }
}

/// Counts one call of `service` for the work running in [`counted`] (nothing outside it).
pub fn note(service: Service) {
    let _ = CALLS.try_with(|c| {
        let counter = match service {
            Service::Dns => &c.dns,
            Service::Store => &c.store,
            Service::Smtp => &c.smtp,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    });
}

/// Runs `work` and counts the service calls it makes.
pub async fn counted<F: Future>(work: F) -> (F::Output, CallCount) {
    let counters = Arc::new(Counters::default());
    let output = CALLS.scope(Arc::clone(&counters), work).await;
    let count = CallCount {
        dns: counters.dns.load(Ordering::Relaxed),
        store: counters.store.load(Ordering::Relaxed),
        smtp: counters.smtp.load(Ordering::Relaxed),
    };
    (output, count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_are_counted_inside_the_scope_only() {
        note(Service::Dns);
        let ((), count) = counted(async {
            note(Service::Dns);
            tokio::task::yield_now().await;
            note(Service::Store);
            note(Service::Dns);
            note(Service::Smtp);
        })
        .await;
        assert_eq!(
            count,
            CallCount {
                dns: 2,
                store: 1,
                smtp: 1
            }
        );
    }
}
