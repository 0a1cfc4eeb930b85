//! The net service: IP sets ([`IpSet`]), envelope address parsing ([`parse_address`],
//! [`split`]) and the dynamic-PTR heuristic ([`looks_dynamic`]), plus the `milter.net` Lua
//! module over them. Pure computation: nothing here does I/O.

mod address;
mod dynamic;
mod ipset;

use std::net::IpAddr;

use mlua::{Lua, Table, UserData, UserDataMethods, Value};

pub use address::{Address, AddressError, parse_address, split};
pub use dynamic::looks_dynamic;
pub use ipset::{IpSet, IpSetError};

impl UserData for IpSet {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        // Anything that is not an IP address (nil, garbage) is simply not in the set.
        methods.add_method("contains", |_, set, ip: Option<String>| {
            Ok(ip
                .and_then(|ip| ip.parse::<IpAddr>().ok())
                .is_some_and(|ip| set.contains(ip)))
        });
    }
}

/// Parses a Lua IP argument of `function`, raising a Lua "bad argument" error when it is not an
/// address (a programming error in the policy, not an expected failure).
pub(crate) fn ip_argument(function: &str, position: u8, text: &str) -> mlua::Result<IpAddr> {
    text.parse().map_err(|_| {
        mlua::Error::runtime(format!(
            "bad argument #{position} to '{function}' (IP address expected, got {text:?})"
        ))
    })
}

/// Builds the `milter.net` Lua module: `ipset`, `parse_address`, `split`, `looks_dynamic`. See
/// `docs/lua-api/net.md`.
pub fn lua_module(lua: &Lua) -> mlua::Result<Table> {
    let module = lua.create_table()?;
    module.set(
        "ipset",
        lua.create_function(|_, entries: Vec<String>| {
            IpSet::new(&entries).map_err(|e| mlua::Error::runtime(e.to_string()))
        })?,
    )?;
    module.set(
        "parse_address",
        lua.create_function(|lua, text: String| {
            Ok(match parse_address(&text) {
                Ok(address) => {
                    let table = lua.create_table()?;
                    table.set("address", address.address())?;
                    table.set("local", address.local)?;
                    table.set("domain", address.domain)?;
                    (Value::Table(table), None)
                }
                Err(error) => (Value::Nil, Some(error.code())),
            })
        })?,
    )?;
    module.set(
        "split",
        lua.create_function(|_, address: String| {
            let (local, domain) = split(&address);
            Ok((local.to_owned(), domain))
        })?,
    )?;
    module.set(
        "looks_dynamic",
        // A missing PTR (nil) counts as dynamic, like a bracketed one.
        lua.create_function(|_, (ptr, ip): (Option<String>, String)| {
            let ip = ip_argument("looks_dynamic", 2, &ip)?;
            Ok(ptr.is_none_or(|ptr| looks_dynamic(&ptr, ip)))
        })?,
    )?;
    Ok(module)
}
