//! `milter.archive`: `save(message)` hands a whole message to the Maildir writer of the archive
//! service without waiting; `keep(kind, message)` does the same for the Maildir of kept copies
//! (`[site] save_dir`), marking the copy with its kind. See `docs/lua-api/archive.md`.

use crate::services::archive::Archive;
use mlua::{Lua, LuaString, Table};
use std::sync::Arc;

/// `(true)` when queued, `(false, code)` when not: how `save` and `keep` answer.
fn queued(archive: &Archive, message: Vec<u8>) -> (bool, Option<&'static str>) {
    match archive.save(message) {
        Ok(()) => (true, None),
        Err(error) => (false, Some(error.code())),
    }
}

/// Whether `kind` names a kind of kept copy: 1 to 32 letters, digits, `-` or `_`.
fn valid_kind(kind: &str) -> bool {
    (1..=32).contains(&kind.len())
        && kind
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Builds the `milter.archive` module over the daemon's archive and its Maildir of kept
/// copies.
pub fn module(lua: &Lua, archive: Arc<Archive>, saved: Arc<Archive>) -> mlua::Result<Table> {
    let module = lua.create_table()?;
    let saver = Arc::clone(&archive);
    module.set(
        "save",
        lua.create_function(move |_, message: LuaString| {
            Ok(queued(&saver, message.as_bytes().to_vec()))
        })?,
    )?;
    module.set(
        "keep",
        lua.create_function(move |_, (kind, message): (String, LuaString)| {
            if !valid_kind(&kind) {
                return Err(mlua::Error::runtime(format!(
                    "milter.archive.keep: kind must be 1 to 32 letters, digits, - or _, got {kind:?}"
                )));
            }
            let mut copy = format!("X-Luamilter-Kept: {kind}\r\n").into_bytes();
            copy.extend_from_slice(&message.as_bytes());
            Ok(queued(&saved, copy))
        })?,
    )?;
    module.set(
        "lost",
        lua.create_function(move |_, ()| Ok(archive.lost()))?,
    )?;
    Ok(module)
}
