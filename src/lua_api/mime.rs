//! `milter.mime`: `decode(text)` and `addresses(text)` over the mime service, `defang(message,
//! options)` over the defang service. See `docs/lua-api/mime.md`.

use crate::services::{
    defang::{DEFAULT_BANNED_EXTS, DefangOptions, Defanged, defang},
    mime::{Mailbox, addresses, decode},
};
use mlua::{Lua, LuaString, Table, Value};

/// The default text of the part that replaces a bad one.
const DEFAULT_NOTICE: &str = "This message appeared to contain a virus.\r\n\
    It was originally named '{name}', and has been removed.\r\n\
    See your administrator.\r\n";

/// `defang`'s options table; absent keys take the defaults of docs/lua-api/mime.md.
fn defang_options(opts: Option<Table>) -> mlua::Result<DefangOptions> {
    let flag = |key: &str, default: bool| -> mlua::Result<bool> {
        Ok(match &opts {
            Some(t) => t.get::<Option<bool>>(key)?.unwrap_or(default),
            None => default,
        })
    };
    let banned_exts = match opts
        .as_ref()
        .map(|t| t.get::<Option<Vec<String>>>("banned_exts"))
    {
        Some(list) => list?,
        None => None,
    };
    let notice = match opts.as_ref().map(|t| t.get::<Option<String>>("notice")) {
        Some(text) => text?,
        None => None,
    };
    Ok(DefangOptions {
        banned_exts: banned_exts
            .unwrap_or_else(|| DEFAULT_BANNED_EXTS.iter().map(|e| e.to_string()).collect()),
        scan_rfc822: flag("scan_rfc822", true)?,
        scan_zip: flag("scan_zip", true)?,
        scan_html: flag("scan_html", true)?,
        notice: notice.unwrap_or_else(|| DEFAULT_NOTICE.to_string()),
    })
}

fn defanged_table(lua: &Lua, d: Defanged) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("body", lua.create_string(&d.body)?)?;
    let headers = lua.create_table()?;
    for (name, value) in d.headers {
        let h = lua.create_table()?;
        h.set("name", name)?;
        h.set("value", value)?;
        headers.push(h)?;
    }
    t.set("headers", headers)?;
    t.set("removed", lua.create_sequence_from(d.removed)?)?;
    t.set("scripts", d.scripts)?;
    Ok(t)
}

fn mailbox_table(lua: &Lua, m: Mailbox) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("name", m.name)?;
    t.set("address", m.address)?;
    t.set("local", m.local)?;
    t.set("domain", m.domain)?;
    t.set("group", m.group)?;
    Ok(t)
}

/// Builds the `milter.mime` module.
pub fn module(lua: &Lua) -> mlua::Result<Table> {
    let module = lua.create_table()?;
    module.set(
        "decode",
        lua.create_function(|_, text: LuaString| Ok(decode(&text.as_bytes())))?,
    )?;
    module.set(
        "addresses",
        lua.create_function(|lua, text: LuaString| {
            Ok(match addresses(&text.as_bytes()) {
                Ok(list) => {
                    let t = lua.create_table()?;
                    for m in list {
                        t.push(mailbox_table(lua, m)?)?;
                    }
                    (Value::Table(t), None)
                }
                Err(error) => (Value::Nil, Some(error.code())),
            })
        })?,
    )?;
    module.set(
        "defang",
        lua.create_function(|lua, (message, opts): (LuaString, Option<Table>)| {
            let opts = defang_options(opts)?;
            Ok(match defang(&message.as_bytes(), &opts) {
                Ok(Some(changed)) => (Value::Table(defanged_table(lua, changed)?), None, None),
                Ok(None) => (Value::Boolean(false), None, None),
                Err(error) => (Value::Nil, Some(error.code()), Some(error.to_string())),
            })
        })?,
    )?;
    module.set(
        "default_banned_exts",
        lua.create_function(|lua, ()| {
            lua.create_sequence_from(DEFAULT_BANNED_EXTS.iter().copied())
        })?,
    )?;
    Ok(module)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_tables_and_error_words() {
        let lua = Lua::new();
        lua.globals().set("mime", module(&lua).unwrap()).unwrap();
        let out: String = lua
            .load(
                r#"
                local list = mime.addresses("=?utf-8?q?Detox_Now?= <Spam@Example.TEST>")
                local m = list[1]
                local bad, err = mime.addresses("nobody")
                return table.concat({ #list, m.name, m.address, m["local"], m.domain,
                  tostring(m.group), tostring(bad), err, mime.decode("=?utf-8?b?w6k=?=") }, "|")"#,
            )
            .eval()
            .unwrap();
        assert_eq!(
            out,
            "1|Detox Now|Spam@example.test|Spam|example.test|nil|nil|invalid|\u{e9}"
        );
        let defanged: String = lua
            .load(
                r#"
                local clean = mime.defang("Subject: x\r\n\r\nhello\r\n")
                local bad = mime.defang("Content-Type: application/octet-stream; name=a.EXE\r\n\r\nMZ",
                  { notice = "gone: {name}" })
                local none = mime.defang("Content-Type: application/octet-stream; name=a.EXE\r\n\r\nMZ",
                  { banned_exts = { "js" } })
                local _, err = mime.defang("Content-Type: multipart/mixed; boundary=b\r\n\r\nno parts\r\n")
                return table.concat({ tostring(clean), tostring(none), bad.removed[1],
                  tostring(bad.body:find("gone: a.EXE", 1, true) ~= nil), err,
                  #mime.default_banned_exts() }, "|")"#,
            )
            .eval()
            .unwrap();
        assert_eq!(defanged, "false|false|a.EXE|true|boundary|42");
        let err = lua.load("mime.decode(nil)").exec().unwrap_err();
        assert!(err.to_string().contains("decode"), "{err}");
    }
}
