//! `milter.site`: the generation's site facts, read-only, and `read_list` for list files. See
//! `docs/site.md`.

use super::args::{self, string_list};
use crate::services::site::{ListError, Site, system_hostname};
use mlua::{Lua, Table, Value};
use std::{net::IpAddr, sync::Arc};

/// `milter.site`: `hostname`, `delay_reject`, `errors_url` (`false` when unset), `template(name)` (see
/// [`Site::template`]; `nil` when there is none), `internal_domains()` (a copy), the predicates
/// `internal(ip)`, `trusted(ip)`,
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
    match &site.errors_url {
        Some(url) => m.set("errors_url", url.as_str())?,
        None => m.set("errors_url", false)?,
    }
    let templates = Arc::clone(&site);
    m.set(
        "template",
        lua.create_async_function(move |_, name: String| {
            let site = Arc::clone(&templates);
            async move {
                tokio::task::spawn_blocking(move || site.template(&name))
                    .await
                    .map_err(mlua::Error::external)
            }
        })?,
    )?;
    let s = Arc::clone(&site);
    m.set(
        "internal_domains",
        lua.create_function(move |_, ()| Ok(s.internal_domains().to_vec()))?,
    )?;
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
    use std::sync::Mutex;

    /// The log lines written while the test runs.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn read_list_reads_in_the_config_dir_and_warns_about_the_rest() {
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
        let log = Captured::default();
        let writer = log.clone();
        let _logging = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .finish(),
        );
        let out: String = lua
            .load(
                r#"
                local words = site.read_list("words.txt")
                local none, err = site.read_list("absent.txt")
                local secret, outside = site.read_list("/etc/passwd")
                return table.concat({ table.concat(words, ","), tostring(none), err,
                  tostring(secret), outside }, "|")"#,
            )
            .into_function()
            .unwrap()
            .call_async(())
            .await
            .unwrap();
        assert_eq!(out, "Detox,White Teeth|nil|missing|nil|outside");
        let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        let expected = format!(
            "milter.site.read_list refused /etc/passwd: outside the directories list files are read from ({})",
            dir.path().display()
        );
        assert!(log.contains("WARN") && log.contains(&expected), "{log}");
        assert_eq!(log.lines().count(), 1, "{log}");
    }
}
