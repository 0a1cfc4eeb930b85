//! Policy options: the defaults a policy declares, overridden by its `[policy.NAME]` config
//! table, checked against the declared types.
//!
//! Rules: a key must be declared by the policy (or be `add_KEY` for a declared list, which
//! appends); booleans take booleans, strings take strings, numbers take numbers or duration
//! strings ("10m" becomes 600), lists take arrays whose items match the default's first item,
//! tables take TOML tables.

use mlua::{Lua, Table, Value};
use std::collections::BTreeMap;

/// One configured override: key, value, and where it was written (`file:line`).
pub struct Override<'a> {
    /// The option name as written in config.
    pub key: &'a str,
    /// The TOML value.
    pub value: &'a toml::Value,
    /// `file:line` of the value.
    pub at: String,
}

/// Builds the effective options table: a copy of `declared` with `overrides` applied.
/// Returns every problem found, each prefixed with its config location.
pub fn effective_options(
    lua: &Lua,
    policy: &str,
    declared: &Table,
    overrides: &[Override<'_>],
) -> Result<Table, Vec<String>> {
    let out = lua.create_table().map_err(|e| vec![e.to_string()])?;
    let mut errors = Vec::new();
    for pair in declared.pairs::<Value, Value>() {
        match pair {
            Ok((k, v)) => {
                if let Err(e) = out.raw_set(k, deep_copy(lua, &v)) {
                    errors.push(e.to_string());
                }
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    // Whole values first, then `add_KEY` appends, whatever order the config file lists them in.
    let (appends, replaces): (Vec<_>, Vec<_>) =
        overrides.iter().partition(|o| o.key.starts_with("add_"));
    for o in replaces.into_iter().chain(appends) {
        if let Err(e) = apply(lua, &out, declared, o) {
            errors.push(format!("{}: [policy.{policy}] {}: {e}", o.at, o.key));
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn apply(lua: &Lua, out: &Table, declared: &Table, o: &Override<'_>) -> Result<(), String> {
    let get = |k: &str| declared.raw_get::<Value>(k).map_err(|e| e.to_string());
    let default = get(o.key)?;
    if !default.is_nil() {
        let value = convert(lua, &default, o.value)?;
        return out.raw_set(o.key, value).map_err(|e| e.to_string());
    }
    if let Some(list_key) = o.key.strip_prefix("add_")
        && let Value::Table(list) = get(list_key)?
        && is_list(&list)
    {
        let extra = convert(lua, &Value::Table(list), o.value)?;
        let target: Table = out.raw_get(list_key).map_err(|e| e.to_string())?;
        if let Value::Table(extra) = extra {
            for item in extra.sequence_values::<Value>() {
                target
                    .raw_push(item.map_err(|e| e.to_string())?)
                    .map_err(|e| e.to_string())?;
            }
        }
        return Ok(());
    }
    let mut known: Vec<String> = declared
        .pairs::<String, Value>()
        .filter_map(Result::ok)
        .map(|(k, _)| k)
        .collect();
    known.sort();
    Err(if known.is_empty() {
        "unknown option: this policy declares no options".to_string()
    } else {
        format!("unknown option (declared: {})", known.join(", "))
    })
}

fn is_list(t: &Table) -> bool {
    t.raw_len() > 0 || t.pairs::<Value, Value>().next().is_none()
}

fn describe(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("string {s:?}"),
        other => format!("{} {other}", other.type_str()),
    }
}

/// Converts a TOML value to Lua, shaped like the declared default.
fn convert(lua: &Lua, default: &Value, value: &toml::Value) -> Result<Value, String> {
    let mismatch = |want: &str| Err(format!("expected {want}, got {}", describe(value)));
    match (default, value) {
        (Value::Boolean(_), toml::Value::Boolean(b)) => Ok(Value::Boolean(*b)),
        (Value::Boolean(_), _) => mismatch("a boolean"),
        (Value::String(_), toml::Value::String(s)) => lua
            .create_string(s)
            .map(Value::String)
            .map_err(|e| e.to_string()),
        (Value::String(_), _) => mismatch("a string"),
        (Value::Integer(_) | Value::Number(_), toml::Value::Integer(n)) => Ok(Value::Integer(*n)),
        (Value::Integer(_) | Value::Number(_), toml::Value::Float(f)) => Ok(Value::Number(*f)),
        (Value::Integer(_) | Value::Number(_), toml::Value::String(s)) => {
            let secs = crate::duration::parse_duration(s)
                .map_err(|e| format!("expected a number or a duration like \"5m\": {e}"))?
                .as_secs_f64();
            Ok(if secs.fract() == 0.0 {
                Value::Integer(secs as i64)
            } else {
                Value::Number(secs)
            })
        }
        (Value::Integer(_) | Value::Number(_), _) => mismatch("a number or a duration like \"5m\""),
        (Value::Table(t), toml::Value::Array(items)) if is_list(t) => {
            let item_default: Value = t.raw_get(1).map_err(|e| e.to_string())?;
            let out = lua.create_table().map_err(|e| e.to_string())?;
            for (i, item) in items.iter().enumerate() {
                let v = if item_default.is_nil() {
                    convert_any(lua, item)?
                } else {
                    convert(lua, &item_default, item).map_err(|e| format!("item {}: {e}", i + 1))?
                };
                out.raw_set(i + 1, v).map_err(|e| e.to_string())?;
            }
            Ok(Value::Table(out))
        }
        (Value::Table(t), _) if is_list(t) => mismatch("a list"),
        (Value::Table(_), toml::Value::Table(_)) => convert_any(lua, value),
        (Value::Table(_), _) => mismatch("a table"),
        _ => Err(format!(
            "the policy declares this option as a {}, which config cannot set",
            default.type_name()
        )),
    }
}

/// Converts any TOML value to its natural Lua form.
fn convert_any(lua: &Lua, value: &toml::Value) -> Result<Value, String> {
    let e = |e: mlua::Error| e.to_string();
    Ok(match value {
        toml::Value::String(s) => Value::String(lua.create_string(s).map_err(e)?),
        toml::Value::Integer(n) => Value::Integer(*n),
        toml::Value::Float(f) => Value::Number(*f),
        toml::Value::Boolean(b) => Value::Boolean(*b),
        toml::Value::Datetime(d) => Value::String(lua.create_string(d.to_string()).map_err(e)?),
        toml::Value::Array(items) => {
            let t = lua.create_table().map_err(e)?;
            for item in items {
                t.raw_push(convert_any(lua, item)?).map_err(e)?;
            }
            Value::Table(t)
        }
        toml::Value::Table(map) => {
            let t = lua.create_table().map_err(e)?;
            for (k, v) in map {
                t.raw_set(k.as_str(), convert_any(lua, v)?).map_err(e)?;
            }
            Value::Table(t)
        }
    })
}

fn deep_copy(lua: &Lua, v: &Value) -> Value {
    match v {
        Value::Table(t) => {
            let Ok(copy) = lua.create_table() else {
                return v.clone();
            };
            for (k, item) in t.pairs::<Value, Value>().filter_map(Result::ok) {
                let _ = copy.raw_set(k, deep_copy(lua, &item));
            }
            Value::Table(copy)
        }
        other => other.clone(),
    }
}

/// Renders an options table for `luamilter check` as sorted `key = value` pairs.
pub fn describe_options(options: &Table) -> BTreeMap<String, String> {
    options
        .pairs::<Value, Value>()
        .filter_map(Result::ok)
        .map(|(k, v)| (k.to_string().unwrap_or_default(), render(&v)))
        .collect()
}

fn render(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{:?}", s.to_string_lossy()),
        Value::Table(t) if t.raw_len() > 0 || t.pairs::<Value, Value>().next().is_none() => {
            let items: Vec<String> = t
                .sequence_values::<Value>()
                .filter_map(Result::ok)
                .map(|i| render(&i))
                .collect();
            format!("[{}]", items.join(", "))
        }
        Value::Table(t) => {
            let items: Vec<String> = describe_options(t)
                .into_iter()
                .map(|(k, v)| format!("{k} = {v}"))
                .collect();
            format!("{{ {} }}", items.join(", "))
        }
        other => other
            .to_string()
            .unwrap_or_else(|_| other.type_name().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(decl: &str, toml_text: &str) -> Result<BTreeMap<String, String>, Vec<String>> {
        let lua = Lua::new();
        let declared: Table = lua.load(decl).eval().unwrap();
        let parsed: toml::Table = toml::from_str(toml_text).unwrap();
        let overrides: Vec<Override> = parsed
            .iter()
            .map(|(k, v)| Override {
                key: k,
                value: v,
                at: "c.toml:1".into(),
            })
            .collect();
        effective_options(&lua, "p", &declared, &overrides).map(|t| describe_options(&t))
    }

    #[test]
    fn overrides_only_what_is_named() {
        let o = run(
            "return { delay = 300, name = 'x', on = false, list = {'a'} }",
            "delay = \"10m\"\non = true",
        )
        .unwrap();
        assert_eq!(o["delay"], "600");
        assert_eq!(o["on"], "true");
        assert_eq!(o["name"], "\"x\"");
        assert_eq!(o["list"], "[\"a\"]");
    }

    #[test]
    fn add_prefix_extends_lists() {
        let o = run("return { words = {'a', 'b'} }", "add_words = [\"c\"]").unwrap();
        assert_eq!(o["words"], "[\"a\", \"b\", \"c\"]");
        // Replacing and appending together: the append applies to the replacement.
        let o = run(
            "return { words = {'a'} }",
            "add_words = [\"c\"]\nwords = [\"b\"]",
        )
        .unwrap();
        assert_eq!(o["words"], "[\"b\", \"c\"]");
    }

    #[test]
    fn reports_every_bad_key_with_location() {
        let errs = run(
            "return { delay = 300, on = false, list = {'a'} }",
            "dealy = 1\non = \"yes\"\nlist = [1]",
        )
        .unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(
            errs.iter()
                .any(|e| e.contains("dealy: unknown option (declared: delay, list, on)")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.contains("on: expected a boolean, got string \"yes\"")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.contains("list: item 1: expected a string")),
            "{errs:?}"
        );
        assert!(
            errs.iter().all(|e| e.starts_with("c.toml:1: [policy.p]")),
            "{errs:?}"
        );
    }

    #[test]
    fn bad_durations_are_explained() {
        let errs = run("return { delay = 300 }", "delay = \"soon\"").unwrap_err();
        assert!(
            errs[0].contains("expected a number or a duration"),
            "{errs:?}"
        );
    }
}
