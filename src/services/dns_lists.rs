//! Several DNS list queries at once, over the [`dns`](crate::services::dns) service: what
//! `dns.lists` of the `milter.dns` Lua module runs.
//!
//! A policy that consults a handful of DNSBL, RHSBL and DNSWL zones would otherwise wait for
//! each answer in turn, since every Lua DNS call suspends its coroutine until the answer is in.
//! [`query_all`] runs the queries side by side, so a batch costs about one round trip instead
//! of one per zone.

use std::net::IpAddr;

use futures_util::future::join_all;

use crate::services::dns::{DnsError, Listing, Resolver};

/// The most queries one `dns.lists` call may carry (a guard against a runaway policy).
pub const MAX_QUERIES: usize = 64;

/// One list query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// An address looked up in an IP list (DNSBL or DNSWL): reversed octets or nibbles.
    Ip {
        /// The address.
        ip: IpAddr,
        /// The list's zone.
        zone: String,
    },
    /// A domain looked up in a domain list (RHSBL): `domain.zone`.
    Domain {
        /// The domain.
        domain: String,
        /// The list's zone.
        zone: String,
    },
}

/// The answer to one query: listed, not listed (`Ok(None)`), or a failed lookup.
pub type Answer = Result<Option<Listing>, DnsError>;

/// Runs every query concurrently and returns the answers in query order. The lookups are
/// polled together in the caller's task: no task is spawned, so a batch answered from the
/// cache costs little more than the same lookups in turn.
pub async fn query_all(resolver: &Resolver, queries: &[Query]) -> Vec<Answer> {
    join_all(queries.iter().map(|query| async move {
        match query {
            Query::Ip { ip, zone } => resolver.dnsbl(*ip, zone).await,
            Query::Domain { domain, zone } => resolver.rhsbl(domain, zone).await,
        }
    }))
    .await
}
