//! `milter.access`: lookups in the generation's access map (see `docs/site.md`).

use crate::services::site::Site;
use mlua::{Lua, Table};
use std::sync::Arc;

/// `milter.access`: `lookup(tag, identity)` → the entry's value or nil.
pub fn module(lua: &Lua, site: Arc<Site>) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set(
        "lookup",
        lua.create_function(move |_, (tag, identity): (String, String)| {
            Ok(site.access.lookup(&tag, &identity).map(str::to_string))
        })?,
    )?;
    Ok(m)
}
