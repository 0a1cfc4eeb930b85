//! Which service calls a piece of work made: the engine runs each policy handler inside
//! [`counted`], and the services [`note`] their calls, so a message's decision trace can say
//! that the greylist handler made two store calls and the spf one three DNS queries.

use serde::{Deserialize, Serialize};
use std::{cell::Cell, future::Future, pin::pin};

tokio::task_local! {
    static CALLS: Cell<CallCount>;
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
    let _ = CALLS.try_with(|calls| {
        let mut count = calls.get();
        match service {
            Service::Dns => count.dns += 1,
            Service::Store => count.store += 1,
            Service::Smtp => count.smtp += 1,
        }
        calls.set(count);
    });
}

/// Runs `work` and counts the service calls it makes.
pub async fn counted<F: Future>(work: F) -> (F::Output, CallCount) {
    let mut scoped = pin!(CALLS.scope(Cell::default(), work));
    let output = scoped.as_mut().await;
    let count = scoped.take_value().unwrap_or_default().get();
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
