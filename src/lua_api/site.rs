//! `milter.site` (read-only site facts) and `milter.access` (the access map) for policies.

use crate::site::{Site, system_hostname};
use mlua::{Lua, Table};
use std::{net::IpAddr, sync::Arc};

fn ip_arg(text: &str) -> mlua::Result<IpAddr> {
    text.parse()
        .map_err(|_| mlua::Error::runtime(format!("IP address expected, got {text:?}")))
}

/// `milter.site`: `hostname`, `delay_reject`, and the predicates `internal(ip)`,
/// `trusted(ip)`, `internal_mta(ip)`, `internal_domain(domain)`, `hello_blacklisted(name)`.
pub fn site_module(lua: &Lua, site: Arc<Site>) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set(
        "hostname",
        site.hostname.clone().unwrap_or_else(system_hostname),
    )?;
    m.set("delay_reject", site.delay_reject)?;
    let s = Arc::clone(&site);
    m.set(
        "internal",
        lua.create_function(move |_, ip: String| Ok(s.internal(ip_arg(&ip)?)))?,
    )?;
    let s = Arc::clone(&site);
    m.set(
        "trusted",
        lua.create_function(move |_, ip: String| Ok(s.trusted(ip_arg(&ip)?)))?,
    )?;
    let s = Arc::clone(&site);
    m.set(
        "internal_mta",
        lua.create_function(move |_, ip: String| Ok(s.internal_mta(ip_arg(&ip)?)))?,
    )?;
    let s = Arc::clone(&site);
    m.set(
        "internal_domain",
        lua.create_function(move |_, d: String| Ok(s.internal_domain(&d)))?,
    )?;
    let s = site;
    m.set(
        "hello_blacklisted",
        lua.create_function(move |_, h: String| Ok(s.hello_blacklisted(&h)))?,
    )?;
    Ok(m)
}

/// `milter.access`: `lookup(tag, identity)` → the entry's value or nil.
pub fn access_module(lua: &Lua, site: Arc<Site>) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set(
        "lookup",
        lua.create_function(move |_, (tag, identity): (String, String)| {
            Ok(site.access.lookup(&tag, &identity).map(str::to_string))
        })?,
    )?;
    Ok(m)
}
