//! Several DNS list queries at once: `dns.lists` of the `milter.dns` Lua module.
//!
//! A policy that consults a handful of DNSBL, RHSBL and DNSWL zones would otherwise wait for
//! each answer in turn, since every Lua DNS call suspends its coroutine until the answer is in.
//! [`query_all`] runs the queries side by side, so a batch costs about one round trip instead
//! of one per zone.

use std::net::IpAddr;
use std::sync::Arc;

use futures_util::future::join_all;
use mlua::{Lua, Table, Value};

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

/// Reads the query list given to `dns.lists`; a malformed entry is a policy bug and raises.
fn queries_argument(list: &Table) -> mlua::Result<Vec<Query>> {
    let bad =
        |message: String| mlua::Error::runtime(format!("bad argument #1 to 'lists' ({message})"));
    let count = list.raw_len();
    if count > MAX_QUERIES {
        return Err(bad(format!("at most {MAX_QUERIES} queries, got {count}")));
    }
    let mut queries = Vec::with_capacity(count);
    for (n, entry) in list.sequence_values::<Value>().enumerate() {
        let Value::Table(entry) = entry? else {
            return Err(bad(format!("query {} is not a table", n + 1)));
        };
        let text = |key: &str| -> mlua::Result<Option<String>> {
            match entry.raw_get::<Value>(key)? {
                Value::Nil => Ok(None),
                Value::String(s) => Ok(Some(s.to_str()?.to_string())),
                other => Err(bad(format!(
                    "query {}: {key} must be a string, got {}",
                    n + 1,
                    other.type_name()
                ))),
            }
        };
        let Some(zone) = text("zone")? else {
            return Err(bad(format!("query {} has no zone", n + 1)));
        };
        queries.push(match (text("ip")?, text("domain")?) {
            (Some(ip), None) => Query::Ip {
                ip: ip.parse().map_err(|_| {
                    bad(format!("query {}: IP address expected, got {ip:?}", n + 1))
                })?,
                zone,
            },
            (None, Some(domain)) => Query::Domain { domain, zone },
            _ => {
                return Err(bad(format!("query {} needs either ip or domain", n + 1)));
            }
        });
    }
    Ok(queries)
}

/// An answer as Lua sees it: `{ listed = true, codes = {...}, reason = "..." }`,
/// `{ listed = false }` or `{ error = "timeout" }`.
fn answer_value(lua: &Lua, answer: Answer) -> mlua::Result<Table> {
    let table = lua.create_table()?;
    match answer {
        Ok(Some(listing)) => {
            table.set("listed", true)?;
            table.set(
                "codes",
                lua.create_sequence_from(listing.codes.iter().map(ToString::to_string))?,
            )?;
            table.set("reason", listing.reason)?;
        }
        Ok(None) => table.set("listed", false)?,
        Err(error) => table.set("error", error.code())?,
    }
    Ok(table)
}

/// Adds `lists(queries)` to the `milter.dns` module table. See `docs/lua-api/dns.md`.
pub fn register(lua: &Lua, module: &Table, resolver: Arc<Resolver>) -> mlua::Result<()> {
    module.set(
        "lists",
        lua.create_async_function(move |lua, list: Table| {
            let resolver = Arc::clone(&resolver);
            async move {
                let queries = queries_argument(&list)?;
                let answers = query_all(&resolver, &queries).await;
                lua.create_sequence_from(
                    answers
                        .into_iter()
                        .map(|answer| answer_value(&lua, answer))
                        .collect::<mlua::Result<Vec<_>>>()?,
                )
            }
        })?,
    )
}
