//! Verdicts: what a handler answers (accept, continue, reject, tempfail, discard), validated when built.

pub use luamilter_vocab::VerdictKind;

use mlua::{FromLua, Lua, Table, UserData, UserDataFields, UserDataMethods, Value};
use std::fmt;

/// An SMTP reply attached to a reject or tempfail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Three-digit reply code, "550".
    pub code: String,
    /// Enhanced status code, "5.7.1".
    pub xcode: Option<String>,
    /// Text lines (a multi-line reply has several).
    pub lines: Vec<String>,
    /// Answer at once even when `[site] delay_reject` holds rejects until DATA.
    pub immediate: bool,
}

/// A handler's answer for one stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No objection: later policies run, the stage goes on.
    Continue,
    /// Stop filtering: accept the message (the connection at connect and helo).
    Accept,
    /// Accept the message and silently drop it.
    Discard,
    /// Refuse with a 5xx (the recipient only at rcpt).
    Reject(Option<Reply>),
    /// Refuse with a 4xx (the recipient only at rcpt).
    Tempfail(Option<Reply>),
}

impl Verdict {
    /// Whether this verdict ends the chain for the stage.
    pub fn is_final(&self) -> bool {
        !matches!(self, Verdict::Continue)
    }

    /// The verdict's kind; its [`name`](VerdictKind::name) is the keyword logs and Lua show.
    pub fn kind(&self) -> VerdictKind {
        match self {
            Verdict::Continue => VerdictKind::Continue,
            Verdict::Accept => VerdictKind::Accept,
            Verdict::Discard => VerdictKind::Discard,
            Verdict::Reject(_) => VerdictKind::Reject,
            Verdict::Tempfail(_) => VerdictKind::Tempfail,
        }
    }

    fn reply(&self) -> Option<&Reply> {
        match self {
            Verdict::Reject(r) | Verdict::Tempfail(r) => r.as_ref(),
            _ => None,
        }
    }

    /// Builds a reject or tempfail from the Lua argument of `milter.reject{...}`.
    fn from_lua_spec(permanent: bool, spec: Option<Value>) -> Result<Verdict, String> {
        let class = if permanent { '5' } else { '4' };
        let reply = match spec {
            None | Some(Value::Nil) => None,
            Some(Value::String(s)) => Some(build_reply(
                class,
                None,
                None,
                Some(lines_of(&s.to_str().map_err(|e| e.to_string())?)),
            )?),
            Some(Value::Table(t)) => Some(reply_from_table(class, &t)?),
            Some(other) => {
                return Err(format!(
                    "expected a table {{code=, xcode=, text=}} or a string, got {}",
                    other.type_name()
                ));
            }
        };
        Ok(if permanent {
            Verdict::Reject(reply)
        } else {
            Verdict::Tempfail(reply)
        })
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind().name())?;
        if let Some(r) = self.reply() {
            write!(f, " {}", r.code)?;
            if let Some(x) = &r.xcode {
                write!(f, " {x}")?;
            }
            if !r.lines.is_empty() {
                write!(f, " {}", r.lines.join(" / "))?;
            }
        }
        Ok(())
    }
}

fn lines_of(text: &str) -> Vec<String> {
    text.split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l).to_string())
        .collect()
}

fn reply_from_table(class: char, t: &Table) -> Result<Reply, String> {
    for pair in t.pairs::<Value, Value>() {
        let (k, _) = pair.map_err(|e| e.to_string())?;
        let key = k.to_string().unwrap_or_default();
        if !matches!(key.as_str(), "code" | "xcode" | "text" | "immediate") {
            return Err(format!(
                "unknown reply field {key:?} (use code, xcode, text, immediate)"
            ));
        }
    }
    let code = match t.get::<Value>("code").map_err(|e| e.to_string())? {
        Value::Nil => None,
        Value::Integer(n) => Some(n.to_string()),
        Value::Number(n) if n.fract() == 0.0 => Some((n as i64).to_string()),
        Value::String(s) => Some(s.to_str().map_err(|e| e.to_string())?.to_string()),
        other => {
            return Err(format!(
                "code must be a number like 550, got {}",
                other.type_name()
            ));
        }
    };
    let xcode = match t.get::<Value>("xcode").map_err(|e| e.to_string())? {
        Value::Nil => None,
        Value::String(s) => Some(s.to_str().map_err(|e| e.to_string())?.to_string()),
        other => {
            return Err(format!(
                "xcode must be a string like \"5.7.1\", got {}",
                other.type_name()
            ));
        }
    };
    let text = match t.get::<Value>("text").map_err(|e| e.to_string())? {
        Value::Nil => None,
        Value::String(s) => Some(lines_of(&s.to_str().map_err(|e| e.to_string())?)),
        Value::Table(lines) => Some(
            lines
                .sequence_values::<String>()
                .collect::<mlua::Result<Vec<_>>>()
                .map_err(|e| format!("text lines must be strings: {e}"))?,
        ),
        other => {
            return Err(format!(
                "text must be a string or a list of lines, got {}",
                other.type_name()
            ));
        }
    };
    let immediate = match t.get::<Value>("immediate").map_err(|e| e.to_string())? {
        Value::Nil => false,
        Value::Boolean(b) => b,
        other => {
            return Err(format!(
                "immediate must be true or false, got {}",
                other.type_name()
            ));
        }
    };
    build_reply(class, code, xcode, text).map(|reply| Reply { immediate, ..reply })
}

fn build_reply(
    class: char,
    code: Option<String>,
    xcode: Option<String>,
    lines: Option<Vec<String>>,
) -> Result<Reply, String> {
    let kind = if class == '5' { "reject" } else { "tempfail" };
    let defaulted = code.is_none();
    let code = code.unwrap_or_else(|| if class == '5' { "550" } else { "451" }.to_string());
    let valid_code =
        code.len() == 3 && code.starts_with(class) && code.bytes().all(|b| b.is_ascii_digit());
    if !valid_code {
        return Err(format!("{kind} needs a {class}xx reply code, got {code:?}"));
    }
    let xcode = match xcode {
        Some(x) => {
            let parts: Vec<&str> = x.split('.').collect();
            let ok = parts.len() == 3
                && parts[0] == class.to_string()
                && parts[1..]
                    .iter()
                    .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
            if !ok {
                return Err(format!(
                    "{kind} needs an enhanced status code of class {class} like \"{class}.7.1\", got {x:?}"
                ));
            }
            Some(x)
        }
        None if defaulted => Some(format!("{class}.7.1")),
        None => None,
    };
    let lines = lines.unwrap_or_default();
    if lines.len() > 32 {
        return Err(format!("a reply has at most 32 lines, got {}", lines.len()));
    }
    if let Some(long) = lines.iter().find(|l| l.len() > 980) {
        return Err(format!(
            "a reply line has at most 980 bytes, got {}",
            long.len()
        ));
    }
    if lines.iter().any(|l| l.contains('\r')) {
        return Err("reply text must not contain carriage returns".into());
    }
    Ok(Reply {
        code,
        xcode,
        lines,
        immediate: false,
    })
}

impl UserData for Verdict {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("kind", |_, v| Ok(v.kind().name()));
        fields.add_field_method_get("code", |_, v| Ok(v.reply().map(|r| r.code.clone())));
        fields.add_field_method_get("xcode", |_, v| Ok(v.reply().and_then(|r| r.xcode.clone())));
        fields.add_field_method_get("text", |_, v| Ok(v.reply().map(|r| r.lines.join("\n"))));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method("__tostring", |_, v, ()| Ok(v.to_string()));
    }
}

impl FromLua for Verdict {
    fn from_lua(value: Value, _: &Lua) -> mlua::Result<Self> {
        match value {
            Value::UserData(ud) => Ok(ud.borrow::<Verdict>()?.clone()),
            other => Err(mlua::Error::FromLuaConversionError {
                from: other.type_name(),
                to: "Verdict".into(),
                message: None,
            }),
        }
    }
}

/// Adds `accept continue discard reject tempfail` to the `milter` module table.
pub fn add_constructors(lua: &Lua, module: &Table) -> mlua::Result<()> {
    for (name, verdict) in [
        ("accept", Verdict::Accept),
        ("continue", Verdict::Continue),
        ("discard", Verdict::Discard),
    ] {
        let ud = lua.create_userdata(verdict)?;
        module.set(name, lua.create_function(move |_, ()| Ok(ud.clone()))?)?;
    }
    for (name, permanent) in [("reject", true), ("tempfail", false)] {
        module.set(
            name,
            lua.create_function(move |_, spec: Option<Value>| {
                Verdict::from_lua_spec(permanent, spec)
                    .map_err(|e| mlua::Error::runtime(format!("milter.{name}: {e}")))
            })?,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(src: &str) -> Result<Verdict, String> {
        let lua = Lua::new();
        let m = lua.create_table().unwrap();
        add_constructors(&lua, &m).unwrap();
        lua.globals().set("milter", m).unwrap();
        lua.load(src).eval::<Verdict>().map_err(|e| e.to_string())
    }

    fn reply(code: &str, xcode: Option<&str>, lines: &[&str]) -> Option<Reply> {
        Some(Reply {
            code: code.into(),
            xcode: xcode.map(Into::into),
            lines: lines.iter().map(|l| l.to_string()).collect(),
            immediate: false,
        })
    }

    #[test]
    fn builds_every_kind() {
        assert_eq!(eval("return milter.accept()"), Ok(Verdict::Accept));
        assert_eq!(eval("return milter.continue()"), Ok(Verdict::Continue));
        assert_eq!(eval("return milter.discard()"), Ok(Verdict::Discard));
        assert_eq!(eval("return milter.reject()"), Ok(Verdict::Reject(None)));
        assert_eq!(
            eval("return milter.reject{code=554, xcode='5.7.0', text='no\\nway'}"),
            Ok(Verdict::Reject(reply("554", Some("5.7.0"), &["no", "way"])))
        );
        assert_eq!(
            eval("return milter.tempfail{text={'a','b'}}"),
            Ok(Verdict::Tempfail(reply("451", Some("4.7.1"), &["a", "b"])))
        );
        assert_eq!(
            eval("return milter.reject 'Sender refused'"),
            Ok(Verdict::Reject(reply(
                "550",
                Some("5.7.1"),
                &["Sender refused"]
            )))
        );
    }

    #[test]
    fn refuses_mismatched_codes() {
        assert!(
            eval("return milter.reject{code=451}")
                .unwrap_err()
                .contains("5xx")
        );
        assert!(
            eval("return milter.tempfail{code=550}")
                .unwrap_err()
                .contains("4xx")
        );
        assert!(
            eval("return milter.reject{code=550, xcode='4.7.1'}")
                .unwrap_err()
                .contains("class 5")
        );
        assert!(
            eval("return milter.reject{code=550, txt='x'}")
                .unwrap_err()
                .contains("unknown reply field")
        );
        assert!(
            eval("return milter.reject(42)")
                .unwrap_err()
                .contains("expected a table")
        );
    }

    #[test]
    fn exposes_fields_to_lua() {
        let lua = Lua::new();
        let m = lua.create_table().unwrap();
        add_constructors(&lua, &m).unwrap();
        lua.globals().set("milter", m).unwrap();
        let s: String = lua
            .load("local v = milter.reject{code=550, xcode='5.7.1', text='x'} return v.kind..v.code..v.xcode..v.text..tostring(v)")
            .eval()
            .unwrap();
        assert_eq!(s, "reject5505.7.1xreject 550 5.7.1 x");
    }
}
