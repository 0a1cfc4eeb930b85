//! The `milter` module: verdict constructors, `duration`, `sleep`, `fill` and `version`, with
//! `milter.log`, `milter.site` and `milter.access` as its fields.

use super::{access, args::duration_seconds, log, site, verdict};
use crate::services::site::Site;
use mlua::{Lua, Table, Value};
use std::{sync::Arc, time::Duration};

/// Builds the `milter` module over the generation's `site`.
pub fn module(lua: &Lua, site: &Arc<Site>) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    verdict::add_constructors(lua, &m)?;
    m.set(
        "duration",
        lua.create_function(|_, v: Value| duration_seconds(&v))?,
    )?;
    m.set(
        "sleep",
        lua.create_async_function(|_, v: Value| async move {
            let secs = duration_seconds(&v)?;
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            Ok(())
        })?,
    )?;
    m.set("log", log::module(lua)?)?;
    m.set(
        "fill",
        lua.load(FILL)
            .set_name("=milter.fill")
            .eval::<mlua::Function>()?,
    )?;
    m.set("version", env!("CARGO_PKG_VERSION"))?;
    // The site facts and the access map, also as milter.site and milter.access.
    m.set("site", site::module(lua, Arc::clone(site))?)?;
    m.set("access", access::module(lua, Arc::clone(site))?)?;
    Ok(m)
}

/// `milter.fill(template, values)`: `{key}` placeholders (letters, digits, `_`) replaced by `values[key]` (an unknown
/// key gives ""), for a string or a list of lines. Written in Lua: it runs on policy strings.
const FILL: &str = r#"
local function fill(template, values)
  if type(template) == "table" then
    local lines = {}
    for i, line in ipairs(template) do lines[i] = fill(line, values) end
    return lines
  end
  return (tostring(template):gsub("{([%w_]+)}", function(key)
    local v = values and values[key]
    return v ~= nil and tostring(v) or ""
  end))
end
return fill
"#;
