//! `milter.site`: the generation's site facts, read-only, and `read_list` for list files. See
//! `docs/site.md`.

use super::args::{self, string_list};
use crate::services::site::{ListError, Site, system_hostname};
use mlua::{Lua, Table, Value};
use std::{net::IpAddr, sync::Arc};

/// `milter.site`: `hostname`, `delay_reject`, the predicates `internal(ip)`, `trusted(ip)`,
/// `internal_mta(ip)`, `internal_domain(domain)`, `hello_blacklisted(name)`, and
/// `read_list(path)` (see [`Site::read_list`]), which returns the entries or `nil, code` (see
/// [`ListError::code`]) and logs a warning when it refuses a path outside.
pub fn module(lua: &Lua, site: Arc<Site>) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set(
        "hostname",
        site.hostname.clone().unwrap_or_else(system_hostname),
    )?;
    m.set("delay_reject", site.delay_reject)?;
    let by_ip = [
        ("internal", Site::internal as fn(&Site, IpAddr) -> bool),
        ("trusted", Site::trusted),
        ("internal_mta", Site::internal_mta),
    ];
    for (name, predicate) in by_ip {
        let s = Arc::clone(&site);
        m.set(
            name,
            lua.create_function(move |_, ip: String| Ok(predicate(&s, args::ip(name, 1, &ip)?)))?,
        )?;
    }
    let by_name = [
        (
            "internal_domain",
            Site::internal_domain as fn(&Site, &str) -> bool,
        ),
        ("hello_blacklisted", Site::hello_blacklisted),
    ];
    for (name, predicate) in by_name {
        let s = Arc::clone(&site);
        m.set(
            name,
            lua.create_function(move |_, text: String| Ok(predicate(&s, &text)))?,
        )?;
    }
    m.set(
        "read_list",
        lua.create_async_function(move |lua, path: String| {
            let site = Arc::clone(&site);
            async move {
                let read = tokio::task::spawn_blocking(move || site.read_list(&path))
                    .await
                    .map_err(mlua::Error::external)?;
                Ok(match read {
                    Ok(entries) => (string_list(&lua, entries)?, None),
                    Err(error) => {
                        if let ListError::Outside { .. } = error {
                            tracing::warn!("milter.site.read_list refused {error}");
                        }
                        (Value::Nil, Some(error.code()))
                    }
                })
            }
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
            .set("site", module(&lua, Arc::new(site)).unwrap())
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
