//! `milter.dns`: the DNS service's lookups (`a aaaa mx txt ptr ns fcrdns dnsbl rhsbl`) and
//! `lists`, several DNS list queries at once. See `docs/lua-api/dns.md`.
//!
//! Each function returns its data, or `nil, code` when the lookup fails (see
//! [`DnsError::code`]); a malformed argument (an IP that is not one, a bad `lists` query)
//! raises, since it is a bug in the policy.

use super::args::{self, string_list};
use crate::services::{
    dns::{DnsError, Listing, Resolver},
    dns_lists::{Answer, MAX_QUERIES, Query, query_all},
};
use mlua::{Lua, Table, Value};
use std::sync::Arc;

/// What a Lua DNS function returns: `value` on success, `nil, code` on failure.
type LuaReply = (Value, Option<&'static str>);

fn reply<T>(
    lua: &Lua,
    result: Result<T, DnsError>,
    convert: impl FnOnce(&Lua, T) -> mlua::Result<Value>,
) -> mlua::Result<LuaReply> {
    match result {
        Ok(value) => Ok((convert(lua, value)?, None)),
        Err(error) => Ok((Value::Nil, Some(error.code()))),
    }
}

/// `{ codes = {...}, reason = "..." }`.
fn listing_table(lua: &Lua, listing: Listing) -> mlua::Result<Table> {
    let table = lua.create_table()?;
    table.set("codes", string_list(lua, listing.codes)?)?;
    table.set("reason", listing.reason)?;
    Ok(table)
}

/// A `dnsbl` or `rhsbl` answer: the listing's table, or `false` when not listed.
fn listing_value(lua: &Lua, listing: Option<Listing>) -> mlua::Result<Value> {
    match listing {
        Some(listing) => listing_table(lua, listing).map(Value::Table),
        None => Ok(Value::Boolean(false)),
    }
}

/// Builds the `milter.dns` module over `resolver`.
pub fn module(lua: &Lua, resolver: Arc<Resolver>) -> mlua::Result<Table> {
    let module = lua.create_table()?;

    macro_rules! by_name {
        ($field:literal, $method:ident, $convert:expr) => {{
            let resolver = resolver.clone();
            module.set(
                $field,
                lua.create_async_function(move |lua, name: String| {
                    let resolver = resolver.clone();
                    async move { reply(&lua, resolver.$method(&name).await, $convert) }
                })?,
            )?;
        }};
    }
    by_name!("a", a, string_list);
    by_name!("aaaa", aaaa, string_list);
    by_name!("txt", txt, string_list);
    by_name!("ns", ns, string_list);
    by_name!("mx", mx, |lua: &Lua, mx: Vec<(u16, String)>| {
        let list = lua.create_table()?;
        for (preference, exchange) in mx {
            let entry = lua.create_table()?;
            entry.set("preference", preference)?;
            entry.set("exchange", exchange)?;
            list.push(entry)?;
        }
        Ok(Value::Table(list))
    });

    macro_rules! by_ip {
        ($field:literal, $method:ident) => {{
            let resolver = resolver.clone();
            module.set(
                $field,
                lua.create_async_function(move |lua, ip: String| {
                    let resolver = resolver.clone();
                    async move {
                        let ip = args::ip($field, 1, &ip)?;
                        reply(&lua, resolver.$method(ip).await, string_list)
                    }
                })?,
            )?;
        }};
    }
    by_ip!("ptr", ptr);
    by_ip!("fcrdns", fcrdns);

    let dnsbl_resolver = resolver.clone();
    module.set(
        "dnsbl",
        lua.create_async_function(move |lua, (ip, zone): (String, String)| {
            let resolver = dnsbl_resolver.clone();
            async move {
                let ip = args::ip("dnsbl", 1, &ip)?;
                reply(&lua, resolver.dnsbl(ip, &zone).await, listing_value)
            }
        })?,
    )?;
    let rhsbl_resolver = resolver.clone();
    module.set(
        "rhsbl",
        lua.create_async_function(move |lua, (domain, zone): (String, String)| {
            let resolver = rhsbl_resolver.clone();
            async move { reply(&lua, resolver.rhsbl(&domain, &zone).await, listing_value) }
        })?,
    )?;
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
    )?;
    Ok(module)
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

/// A `lists` answer: `{ listed = true, codes = {...}, reason = "..." }`, `{ listed = false }`
/// or `{ error = "timeout" }`.
fn answer_value(lua: &Lua, answer: Answer) -> mlua::Result<Table> {
    match answer {
        Ok(Some(listing)) => {
            let table = listing_table(lua, listing)?;
            table.set("listed", true)?;
            Ok(table)
        }
        Ok(None) => lua.create_table_from([("listed", false)]),
        Err(error) => lua.create_table_from([("error", error.code())]),
    }
}
