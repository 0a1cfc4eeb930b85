//! `milter.archive`: `save(message)` hands a whole message to the Maildir writer of the archive
//! service without waiting. See `docs/lua-api/archive.md`.

use crate::services::archive::Archive;
use mlua::{Lua, LuaString, Table};
use std::sync::Arc;

/// Builds the `milter.archive` module over the daemon's archive.
pub fn module(lua: &Lua, archive: Arc<Archive>) -> mlua::Result<Table> {
    let module = lua.create_table()?;
    let saver = Arc::clone(&archive);
    module.set(
        "save",
        lua.create_function(move |_, message: LuaString| {
            Ok(match saver.save(message.as_bytes().to_vec()) {
                Ok(()) => (true, None),
                Err(error) => (false, Some(error.code())),
            })
        })?,
    )?;
    module.set(
        "lost",
        lua.create_function(move |_, ()| Ok(archive.lost()))?,
    )?;
    Ok(module)
}
