//! `milter.store`: every operation of the store service as an async Lua function. See
//! `docs/lua-api/store.md`.
//!
//! Expected failures come back as `nil, "unavailable" | "timeout" | "invalid"`; wrong arguments
//! (an unknown list name, a nested table, a malformed duration) raise a Lua error, since they
//! are bugs in the policy rather than conditions to handle.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use mlua::{FromLuaMulti, IntoLuaMulti, Lua, Table, Value as LuaValue};

use super::args;
use crate::services::calls;
use crate::services::store::{
    Decayed, GreylistOptions, GreylistVerdict, List, ListEntry, Result, Scalar, Store, StoreError,
    Value,
};
use crate::throttle::Throttle;

/// Builds the `milter.store` module over `store`.
pub fn module(lua: &Lua, store: Arc<dyn Store>) -> mlua::Result<Table> {
    let module = lua.create_table()?;
    let add = |name: &'static str, f: mlua::Function| module.set(name, f);

    add(
        "get",
        function(lua, &store, "get", |s, lua, key: String| async move {
            let value = s.get(&key).await;
            Ok(value.map(|v| v.map(|v| to_lua(&lua, &v)).transpose()))
        })?,
    )?;
    add(
        "set",
        function(
            lua,
            &store,
            "set",
            |s, _, (key, value, ttl): (String, LuaValue, LuaValue)| async move {
                let (value, ttl) = (from_lua(&value)?, args::ttl(&ttl)?);
                Ok(s.set(&key, &value, ttl).await.map(|()| Ok(true)))
            },
        )?,
    )?;
    add(
        "delete",
        function(lua, &store, "delete", |s, _, key: String| async move {
            Ok(s.delete(&key).await.map(Ok))
        })?,
    )?;
    add(
        "incr",
        function(
            lua,
            &store,
            "incr",
            |s, _, (key, by, ttl): (String, Option<i64>, LuaValue)| async move {
                let ttl = args::ttl(&ttl)?;
                Ok(s.incr(&key, by.unwrap_or(1), ttl).await.map(Ok))
            },
        )?,
    )?;
    add(
        "expire",
        function(
            lua,
            &store,
            "expire",
            |s, _, (key, ttl): (String, LuaValue)| async move {
                let ttl = required(args::ttl(&ttl)?, "ttl")?;
                Ok(s.expire(&key, ttl).await.map(Ok))
            },
        )?,
    )?;
    add(
        "count",
        function(
            lua,
            &store,
            "count",
            |s, _, (key, window): (String, LuaValue)| async move {
                let window = required(args::ttl(&window)?, "window")?;
                Ok(s.count(&key, window).await.map(Ok))
            },
        )?,
    )?;
    add(
        "decay",
        function(
            lua,
            &store,
            "decay",
            |s, lua, (key, half_life, add): (String, LuaValue, Option<Table>)| async move {
                let half_life = required(args::ttl(&half_life)?, "half_life")?;
                let add = decay_amounts(add)?;
                let found = s.decay(&key, half_life, &add).await;
                Ok(found.map(|amounts| lua.create_table_from(amounts)))
            },
        )?,
    )?;
    add(
        "greylist",
        function(
            lua,
            &store,
            "greylist",
            |s, lua, (ip, sender, rcpt, opts): (String, String, String, Option<Table>)| async move {
                let opts = greylist_options(opts)?;
                let verdict = s.greylist(&ip, &sender, &rcpt, &opts).await;
                Ok(verdict.map(|v| match v {
                    GreylistVerdict::Pass { passes } => ("pass", passes).into_lua_multi(&lua),
                    GreylistVerdict::Wait { secs } => ("wait", secs).into_lua_multi(&lua),
                }))
            },
        )?,
    )?;

    for family in [BANS, ADDRESS_LISTS] {
        add_list_functions(lua, &module, &store, family)?;
    }
    Ok(module)
}

/// The four functions over a family of lists, the list chosen by their first argument.
#[derive(Clone, Copy)]
struct ListFamily {
    add: &'static str,
    check: &'static str,
    remove: &'static str,
    all: &'static str,
    resolve: fn(&str) -> mlua::Result<List>,
}

/// `ban(kind, key, reason, ttl)`, `banned`, `unban`, `bans` with kind "ip" or "domain".
const BANS: ListFamily = ListFamily {
    add: "ban",
    check: "banned",
    remove: "unban",
    all: "bans",
    resolve: ban_list,
};

/// `list_add(name, entry, reason, ttl)`, `listed`, `list_remove`, `list` with name
/// "whitelist" or "blacklist".
const ADDRESS_LISTS: ListFamily = ListFamily {
    add: "list_add",
    check: "listed",
    remove: "list_remove",
    all: "list",
    resolve: address_list,
};

fn add_list_functions(
    lua: &Lua,
    module: &Table,
    store: &Arc<dyn Store>,
    family: ListFamily,
) -> mlua::Result<()> {
    let resolve = family.resolve;
    module.set(
        family.add,
        function(
            lua,
            store,
            family.add,
            move |s, _, (name, entry, reason, ttl): (String, String, Option<String>, LuaValue)| async move {
                let (list, ttl) = (resolve(&name)?, args::ttl(&ttl)?);
                let reason = reason.unwrap_or_default();
                Ok(s.list_add(list, &entry, &reason, ttl).await.map(|()| Ok(true)))
            },
        )?,
    )?;
    module.set(
        family.check,
        function(
            lua,
            store,
            family.check,
            move |s, lua, (name, key): (String, String)| async move {
                let found = s.listed(resolve(&name)?, &key).await;
                Ok(found.map(|e| entry_or_false(&lua, e)))
            },
        )?,
    )?;
    module.set(
        family.remove,
        function(
            lua,
            store,
            family.remove,
            move |s, _, (name, entry): (String, String)| async move {
                Ok(s.list_remove(resolve(&name)?, &entry).await.map(Ok))
            },
        )?,
    )?;
    module.set(
        family.all,
        function(
            lua,
            store,
            family.all,
            move |s, lua, (name, search): (String, Option<String>)| async move {
                let found = s.list_search(resolve(&name)?, search.as_deref()).await;
                Ok(found.map(|e| entries_to_lua(&lua, &e)))
            },
        )?,
    )
}

/// Wraps one operation as an async Lua function. `op` returns `Err` for argument errors (raised
/// in Lua) and `Ok(store result)`; a store error becomes `nil, code`, a success the values.
fn function<A, F, Fut, R>(
    lua: &Lua,
    store: &Arc<dyn Store>,
    name: &'static str,
    op: F,
) -> mlua::Result<mlua::Function>
where
    A: FromLuaMulti + Send + 'static,
    F: Fn(Arc<dyn Store>, Lua, A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = mlua::Result<Result<mlua::Result<R>>>> + Send + 'static,
    R: IntoLuaMulti,
{
    let store = store.clone();
    let op = Arc::new(op);
    lua.create_async_function(move |lua, args: A| {
        let (store, op) = (store.clone(), op.clone());
        async move {
            calls::note(calls::Service::Store);
            match crate::metrics::store_call(name, op(store, lua.clone(), args)).await? {
                Ok(values) => values?.into_lua_multi(&lua),
                Err(e) => {
                    log_failure(name, &e);
                    (LuaValue::Nil, e.code()).into_lua_multi(&lua)
                }
            }
        }
    })
}

/// Logs a failed call: a warning at most every [`WARN_EVERY_SECS`] (a Redis outage would
/// otherwise log once per message), the rest at debug level.
fn log_failure(name: &str, e: &StoreError) {
    static WARNINGS: Throttle = Throttle::new(Duration::from_secs(WARN_EVERY_SECS));
    if WARNINGS.due() {
        tracing::warn!(
            "store.{name} failed: {e} (further failures for {WARN_EVERY_SECS}s at debug level)"
        );
    } else {
        tracing::debug!("store.{name} failed: {e}");
    }
}

const WARN_EVERY_SECS: u64 = 10;

fn ban_list(kind: &str) -> mlua::Result<List> {
    List::ban(kind).ok_or_else(|| {
        mlua::Error::runtime(format!(
            "ban kind must be \"ip\" or \"domain\", not {kind:?}"
        ))
    })
}

fn address_list(name: &str) -> mlua::Result<List> {
    List::address_list(name).ok_or_else(|| {
        mlua::Error::runtime(format!(
            "list must be \"whitelist\" or \"blacklist\", not {name:?}"
        ))
    })
}

fn required(ttl: Option<Duration>, what: &str) -> mlua::Result<Duration> {
    ttl.ok_or_else(|| mlua::Error::runtime(format!("{what} is required")))
}

fn greylist_options(table: Option<Table>) -> mlua::Result<GreylistOptions> {
    let mut opts = GreylistOptions::default();
    let Some(table) = table else {
        return Ok(opts);
    };
    for pair in table.pairs::<String, LuaValue>() {
        let (key, value) = pair?;
        let prefix = |max: u8| -> mlua::Result<u8> {
            match value {
                LuaValue::Integer(n) if (0..=i64::from(max)).contains(&n) => Ok(n as u8),
                _ => Err(mlua::Error::runtime(format!(
                    "greylist option {key} must be an integer from 0 to {max}"
                ))),
            }
        };
        match key.as_str() {
            "delay" => opts.delay = required(args::ttl(&value)?, "delay")?,
            "retry_window" => opts.retry_window = required(args::ttl(&value)?, "retry_window")?,
            "lifetime" => opts.lifetime = required(args::ttl(&value)?, "lifetime")?,
            "ipv4_prefix" => opts.ipv4_prefix = prefix(32)?,
            "ipv6_prefix" => opts.ipv6_prefix = prefix(128)?,
            "auto_pass" => {
                opts.auto_pass = match value {
                    LuaValue::Integer(n) if n >= 0 => u32::try_from(n).unwrap_or(u32::MAX),
                    _ => {
                        return Err(mlua::Error::runtime(
                            "greylist option auto_pass must be a non-negative integer",
                        ));
                    }
                }
            }
            _ => {
                return Err(mlua::Error::runtime(format!(
                    "unknown greylist option {key:?}"
                )));
            }
        }
    }
    Ok(opts)
}

/// The amounts `store.decay` adds: a table of names to finite numbers.
fn decay_amounts(table: Option<Table>) -> mlua::Result<Decayed> {
    let mut out = Decayed::new();
    for pair in table.iter().flat_map(|t| t.pairs::<LuaValue, LuaValue>()) {
        let (name, amount) = pair?;
        let amount = match amount {
            LuaValue::Integer(n) => n as f64,
            LuaValue::Number(n) if n.is_finite() => n,
            _ => {
                return Err(mlua::Error::runtime(
                    "store.decay: amounts must be finite numbers",
                ));
            }
        };
        let LuaValue::String(name) = name else {
            return Err(mlua::Error::runtime(
                "store.decay: amounts are keyed by name",
            ));
        };
        out.insert(name.to_str()?.to_string(), amount);
    }
    Ok(out)
}

fn scalar_from_lua(value: &LuaValue) -> mlua::Result<Scalar> {
    Ok(match value {
        LuaValue::Boolean(b) => Scalar::Bool(*b),
        LuaValue::Integer(i) => Scalar::Int(*i),
        LuaValue::Number(n) if n.is_finite() => Scalar::Num(*n),
        LuaValue::String(s) => Scalar::Str(s.to_str()?.to_string()),
        other => {
            return Err(mlua::Error::runtime(format!(
                "store values are strings, finite numbers, booleans or flat tables, not a {}",
                other.type_name()
            )));
        }
    })
}

/// A Lua value as a stored value: a scalar, a sequence (list) or a string-keyed flat table.
fn from_lua(value: &LuaValue) -> mlua::Result<Value> {
    let LuaValue::Table(table) = value else {
        return scalar_from_lua(value).map(Value::Scalar);
    };
    let len = table.raw_len();
    let mut map = BTreeMap::new();
    let mut count = 0;
    for pair in table.pairs::<LuaValue, LuaValue>() {
        let (key, value) = pair?;
        count += 1;
        if let LuaValue::String(k) = &key {
            map.insert(k.to_str()?.to_string(), scalar_from_lua(&value)?);
        } else if len == 0 {
            return Err(mlua::Error::runtime(
                "a stored table is a list or has only string keys",
            ));
        }
    }
    if len > 0 {
        if count != len {
            return Err(mlua::Error::runtime(
                "a stored table is a list or has only string keys",
            ));
        }
        return (1..=len)
            .map(|i| scalar_from_lua(&table.raw_get(i)?))
            .collect::<mlua::Result<_>>()
            .map(Value::List);
    }
    Ok(Value::Map(map))
}

fn scalar_to_lua(lua: &Lua, s: &Scalar) -> mlua::Result<LuaValue> {
    Ok(match s {
        Scalar::Bool(b) => LuaValue::Boolean(*b),
        Scalar::Int(i) => LuaValue::Integer(*i),
        Scalar::Num(n) => LuaValue::Number(*n),
        Scalar::Str(s) => LuaValue::String(lua.create_string(s)?),
    })
}

fn to_lua(lua: &Lua, value: &Value) -> mlua::Result<LuaValue> {
    Ok(match value {
        Value::Scalar(s) => scalar_to_lua(lua, s)?,
        Value::List(items) => LuaValue::Table(
            lua.create_sequence_from(
                items
                    .iter()
                    .map(|s| scalar_to_lua(lua, s))
                    .collect::<mlua::Result<Vec<_>>>()?,
            )?,
        ),
        Value::Map(map) => {
            let t = lua.create_table()?;
            for (k, v) in map {
                t.set(k.as_str(), scalar_to_lua(lua, v)?)?;
            }
            LuaValue::Table(t)
        }
    })
}

/// `{entry=, reason=, created=, expires=}` with times in unix seconds.
fn entry_to_lua(lua: &Lua, e: &ListEntry) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("entry", e.entry.as_str())?;
    t.set("reason", e.reason.as_str())?;
    t.set("created", e.created / 1000)?;
    t.set("expires", e.expires.map(|x| x / 1000))?;
    Ok(t)
}

fn entry_or_false(lua: &Lua, entry: Option<ListEntry>) -> mlua::Result<LuaValue> {
    match entry {
        Some(e) => entry_to_lua(lua, &e).map(LuaValue::Table),
        None => Ok(LuaValue::Boolean(false)),
    }
}

fn entries_to_lua(lua: &Lua, entries: &[ListEntry]) -> mlua::Result<Table> {
    lua.create_sequence_from(
        entries
            .iter()
            .map(|e| entry_to_lua(lua, e))
            .collect::<mlua::Result<Vec<_>>>()?,
    )
}
