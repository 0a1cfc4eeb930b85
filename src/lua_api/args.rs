//! Lua argument conversions shared by the built-in modules: IP addresses, durations and TTLs,
//! and lists of strings handed back to Lua.

use crate::duration::parse_duration;
use mlua::{Lua, Value};
use std::{net::IpAddr, time::Duration};

/// Parses IP argument number `position` of `function`, raising a Lua "bad argument" error when
/// it is not an address (a programming error in the policy, not an expected failure).
pub fn ip(function: &str, position: u8, text: &str) -> mlua::Result<IpAddr> {
    text.parse().map_err(|_| {
        mlua::Error::runtime(format!(
            "bad argument #{position} to '{function}' (IP address expected, got {text:?})"
        ))
    })
}

/// Seconds from a number or a duration string ("5m").
pub fn duration_seconds(v: &Value) -> mlua::Result<f64> {
    match v {
        Value::Integer(n) if *n >= 0 => Ok(*n as f64),
        Value::Number(n) if *n >= 0.0 && n.is_finite() => Ok(*n),
        Value::String(s) => parse_duration(&s.to_str()?)
            .map(|d| d.as_secs_f64())
            .map_err(mlua::Error::runtime),
        other => Err(mlua::Error::runtime(format!(
            "expected a duration like \"5m\" or a number of seconds, got {}",
            other
                .to_string()
                .unwrap_or_else(|_| other.type_name().to_string())
        ))),
    }
}

/// A time to live or a window: nil (none) or a positive duration, as for [`duration_seconds`].
pub fn ttl(v: &Value) -> mlua::Result<Option<Duration>> {
    if v.is_nil() {
        return Ok(None);
    }
    let secs = duration_seconds(v)?;
    if secs > 0.0 && secs < 1e12 {
        Ok(Some(Duration::from_secs_f64(secs)))
    } else {
        Err(mlua::Error::runtime(format!(
            "a duration must be positive, got {secs}"
        )))
    }
}

/// A Lua sequence of the items as strings.
pub fn string_list<T: ToString>(
    lua: &Lua,
    items: impl IntoIterator<Item = T>,
) -> mlua::Result<Value> {
    Ok(Value::Table(lua.create_sequence_from(
        items.into_iter().map(|item| item.to_string()),
    )?))
}
