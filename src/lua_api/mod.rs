//! What policy scripts see: the `milter` module, `ctx`, verdicts and the built-in modules that
//! `require` serves.

pub mod ctx;
pub mod site;
pub mod verdict;

use crate::{
    duration::parse_duration,
    services::{Services, dns, net, site::Site, spf, store},
};
use mlua::{Lua, Table, Value, Variadic};
use std::{sync::Arc, time::Duration};

/// Names `require` resolves without touching the file system.
pub const BUILTIN_MODULES: &[&str] = &[
    "milter",
    "milter.log",
    "milter.dns",
    "milter.spf",
    "milter.net",
    "milter.store",
    "milter.site",
    "milter.access",
    "milter.mime",
];

/// Builds a built-in module by name, or `None` when `name` is not built in.
pub fn builtin_module(
    lua: &Lua,
    name: &str,
    services: &Services,
    site: &Arc<Site>,
) -> Option<mlua::Result<Value>> {
    let module = match name {
        "milter" => milter_module(lua).and_then(|m| {
            // The site facts and the access map, also as milter.site and milter.access.
            m.set("site", site::site_module(lua, Arc::clone(site))?)?;
            m.set("access", site::access_module(lua, Arc::clone(site))?)?;
            Ok(m)
        }),
        "milter.log" => log_module(lua),
        "milter.dns" => dns::lua_module(lua, Arc::clone(&services.resolver)),
        "milter.spf" => spf::lua_module(lua, Arc::clone(&services.spf)),
        "milter.net" => net::lua_module(lua),
        "milter.store" => store::lua_module(lua, Arc::clone(&services.store)),
        "milter.site" => site::site_module(lua, Arc::clone(site)),
        "milter.access" => site::access_module(lua, Arc::clone(site)),
        "milter.mime" => crate::services::mime::lua_module(lua),
        _ => return None,
    };
    Some(module.map(Value::Table))
}

/// The `milter` module: verdict constructors, `duration`, `sleep` and `log`.
fn milter_module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    verdict::add_constructors(lua, &m)?;
    m.set(
        "duration",
        lua.create_function(|_, v: Value| duration_seconds(&v).map_err(mlua::Error::runtime))?,
    )?;
    m.set(
        "sleep",
        lua.create_async_function(|_, v: Value| async move {
            let secs = duration_seconds(&v).map_err(mlua::Error::runtime)?;
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            Ok(())
        })?,
    )?;
    m.set("log", log_module(lua)?)?;
    m.set(
        "fill",
        lua.load(FILL)
            .set_name("=milter.fill")
            .eval::<mlua::Function>()?,
    )?;
    m.set("version", env!("CARGO_PKG_VERSION"))?;
    Ok(m)
}

/// `milter.fill(template, values)`: `{key}` placeholders replaced by `values[key]` (an unknown
/// key gives ""), for a string or a list of lines. Written in Lua: it runs on policy strings.
const FILL: &str = r#"
local function fill(template, values)
  if type(template) == "table" then
    local lines = {}
    for i, line in ipairs(template) do lines[i] = fill(line, values) end
    return lines
  end
  return (tostring(template):gsub("{(%w+)}", function(key)
    local v = values and values[key]
    return v ~= nil and tostring(v) or ""
  end))
end
return fill
"#;

/// Seconds from a number or a duration string ("5m").
pub fn duration_seconds(v: &Value) -> Result<f64, String> {
    match v {
        Value::Integer(n) if *n >= 0 => Ok(*n as f64),
        Value::Number(n) if *n >= 0.0 && n.is_finite() => Ok(*n),
        Value::String(s) => {
            let text = s.to_str().map_err(|e| e.to_string())?;
            parse_duration(&text).map(|d| d.as_secs_f64())
        }
        other => Err(format!(
            "expected a duration like \"5m\" or a number of seconds, got {}",
            other
                .to_string()
                .unwrap_or_else(|_| other.type_name().to_string())
        )),
    }
}

/// `milter.log`: `debug info warn error`, each taking values joined by spaces. Lines carry the
/// session fields of the span the handler runs in (policy, stage, client, queue id).
fn log_module(lua: &Lua) -> mlua::Result<Table> {
    let log = lua.create_table()?;
    macro_rules! level {
        ($name:literal, $mac:ident) => {
            log.set(
                $name,
                lua.create_function(|_, parts: Variadic<Value>| {
                    let text = join_values(&parts);
                    tracing::$mac!(target: "luamilter::policy", "{text}");
                    Ok(())
                })?,
            )?;
        };
    }
    level!("debug", debug);
    level!("info", info);
    level!("warn", warn);
    level!("error", error);
    Ok(log)
}

fn join_values(parts: &[Value]) -> String {
    parts
        .iter()
        .map(|v| match v {
            Value::String(s) => s.to_string_lossy(),
            other => other
                .to_string()
                .unwrap_or_else(|_| other.type_name().to_string()),
        })
        .collect::<Vec<_>>()
        .join(" ")
}
