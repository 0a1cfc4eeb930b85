//! `milter.mime`: `decode(text)` and `addresses(text)` over the mime service. See
//! `docs/lua-api/mime.md`.

use crate::services::mime::{Mailbox, addresses, decode};
use mlua::{Lua, LuaString, Table, Value};

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
        let err = lua.load("mime.decode(nil)").exec().unwrap_err();
        assert!(err.to_string().contains("decode"), "{err}");
    }
}
