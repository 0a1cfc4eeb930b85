//! `milter.net`: `ipset`, `parse_address`, `split` and `looks_dynamic` over the net service,
//! and the Lua face of an [`IpSet`] (`set:contains(ip)`). See `docs/lua-api/net.md`.

use super::args;
use crate::services::net::{IpSet, looks_dynamic, parse_address, split};
use mlua::{Lua, Table, UserData, UserDataMethods, Value};
use std::net::IpAddr;

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

/// Builds the `milter.net` module.
pub fn module(lua: &Lua) -> mlua::Result<Table> {
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
            let ip = args::ip("looks_dynamic", 2, &ip)?;
            Ok(ptr.is_none_or(|ptr| looks_dynamic(&ptr, ip)))
        })?,
    )?;
    Ok(module)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(chunk: &str) -> mlua::Result<String> {
        let lua = Lua::new();
        lua.globals().set("net", module(&lua)?)?;
        lua.load(chunk).eval()
    }

    #[test]
    fn ipset_contains() {
        let out = eval(
            r#"
            local set = net.ipset{"10.0.0.0/8", "2001:db8::/32", "192.0.2.1"}
            return table.concat({
              tostring(set:contains("10.1.2.3")), tostring(set:contains("::ffff:10.9.9.9")),
              tostring(set:contains("2001:db8::5")), tostring(set:contains("192.0.2.2")),
              tostring(set:contains(nil)), tostring(set:contains("garbage")),
            }, ",")"#,
        )
        .unwrap();
        assert_eq!(out, "true,true,true,false,false,false");
        let err = eval(r#"net.ipset{"10.0.0.0/8", "10.0.0.0/99"}"#).unwrap_err();
        assert!(
            err.to_string()
                .contains("invalid IP set entry \"10.0.0.0/99\""),
            "{err}"
        );
    }

    #[test]
    fn parse_address_and_split() {
        let out = eval(
            r#"
            local a = net.parse_address("<@relay.example:\"J D\"@Example.COM>")
            local null = net.parse_address("<>")
            local bare = net.parse_address("<postmaster>")
            local bad, err = net.parse_address("<user@example.com")
            local l, d = net.split("User@Example.ORG")
            local l2, d2 = net.split("postmaster")
            return table.concat({a["local"], a.domain, a.address, null.address, tostring(null.domain),
              bare["local"], tostring(bare.domain), tostring(bad), err, l, d, l2, tostring(d2)}, "|")"#,
        )
        .unwrap();
        assert_eq!(
            out,
            "J D|example.com|\"J D\"@example.com||nil|postmaster|nil|nil|unbalanced-brackets|User|example.org|postmaster|nil"
        );
    }

    #[test]
    fn looks_dynamic_from_lua() {
        let out = eval(
            r#"return table.concat({
              tostring(net.looks_dynamic("adsl-69-208-201-177.dsl.example.net", "69.208.201.177")),
              tostring(net.looks_dynamic("mail.example.com", "192.0.2.7")),
              tostring(net.looks_dynamic(nil, "192.0.2.7")),
            }, ",")"#,
        )
        .unwrap();
        assert_eq!(out, "true,false,true");
        let err = eval(r#"net.looks_dynamic("x", "nope")"#).unwrap_err();
        assert!(
            err.to_string()
                .contains("bad argument #2 to 'looks_dynamic'"),
            "{err}"
        );
    }
}
