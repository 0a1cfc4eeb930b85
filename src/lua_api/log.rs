//! `milter.log`: `debug info warn error`, each taking values joined by spaces. Lines carry the
//! session fields of the span the handler runs in (policy, stage, client, queue id).

use mlua::{Lua, Table, Value, Variadic};

/// Builds the `milter.log` module.
pub fn module(lua: &Lua) -> mlua::Result<Table> {
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
