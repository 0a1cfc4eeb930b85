//! `milter.site` (read-only site facts) and `milter.access` (the access map) for policies.

use crate::services::site::{Site, list_entries, system_hostname};
use mlua::{Lua, Table, Value};
use std::{net::IpAddr, sync::Arc};

fn ip_arg(text: &str) -> mlua::Result<IpAddr> {
    text.parse()
        .map_err(|_| mlua::Error::runtime(format!("IP address expected, got {text:?}")))
}

/// `milter.site`: `hostname`, `delay_reject`, the predicates `internal(ip)`, `trusted(ip)`,
/// `internal_mta(ip)`, `internal_domain(domain)`, `hello_blacklisted(name)`, and
/// `read_list(path)` (a list file relative to the config file's directory).
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
    let s = Arc::clone(&site);
    m.set(
        "hello_blacklisted",
        lua.create_function(move |_, h: String| Ok(s.hello_blacklisted(&h)))?,
    )?;
    let s = site;
    m.set(
        "read_list",
        lua.create_async_function(move |lua, path: String| {
            let path = s.base_dir.join(path);
            async move {
                Ok(match tokio::fs::read(&path).await {
                    Ok(bytes) => (
                        Value::Table(lua.create_sequence_from(list_entries(&bytes))?),
                        None,
                    ),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        (Value::Nil, Some("missing"))
                    }
                    Err(_) => (Value::Nil, Some("unreadable")),
                })
            }
        })?,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn read_list_reads_relative_to_the_config_dir() {
        let dir = tempfile::TempDir::new().unwrap();
        std::fs::write(
            dir.path().join("words.txt"),
            "# spam\nDetox\n\nWhite Teeth\n",
        )
        .unwrap();
        let mut site = Site::default();
        site.base_dir = dir.path().to_path_buf();
        let lua = Lua::new();
        lua.globals()
            .set("site", site_module(&lua, Arc::new(site)).unwrap())
            .unwrap();
        let out: String = lua
            .load(
                r#"
                local words = site.read_list("words.txt")
                local none, err = site.read_list("absent.txt")
                return table.concat(words, ",") .. "|" .. tostring(none) .. "|" .. err"#,
            )
            .into_function()
            .unwrap()
            .call_async(())
            .await
            .unwrap();
        assert_eq!(out, "Detox,White Teeth|nil|missing");
    }
}
