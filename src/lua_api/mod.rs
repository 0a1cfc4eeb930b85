//! What policy scripts see: `ctx`, verdicts, and the built-in modules that `require` serves,
//! one file per module: [`milter`] (`milter`), [`log`] (`milter.log`), [`dns`]
//! (`milter.dns`), [`spf`] (`milter.spf`), [`net`] (`milter.net`), [`store`]
//! (`milter.store`), [`site`] (`milter.site`), [`access`] (`milter.access`), [`mime`]
//! (`milter.mime`), [`smtp`] (`milter.smtp`), [`srs`] (`milter.srs`), [`dkim`] (`milter.dkim`),
//! [`dmarc`] (`milter.dmarc`) and [`archive`] (`milter.archive`), each a thin Lua face over a service of [`crate::services`]; `args`
//! converts the arguments they share. [`stubs`] holds the editor stubs (LuaLS annotations) of all
//! of it, checked against what these modules register.

pub mod access;
pub mod archive;
mod args;
pub mod ctx;
pub mod dkim;
pub mod dmarc;
pub mod dns;
pub mod log;
pub mod milter;
pub mod mime;
pub mod net;
pub mod site;
pub mod smtp;
pub mod spf;
pub mod srs;
pub mod store;
pub mod stubs;
pub mod verdict;

use crate::services::{Services, site::Site};
use mlua::{Lua, Value};
use std::sync::Arc;

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
    "milter.smtp",
    "milter.srs",
    "milter.dkim",
    "milter.dmarc",
    "milter.archive",
];

/// Builds a built-in module by name, or `None` when `name` is not built in.
pub fn builtin_module(
    lua: &Lua,
    name: &str,
    services: &Services,
    site: &Arc<Site>,
) -> Option<mlua::Result<Value>> {
    let module = match name {
        "milter" => milter::module(lua, site),
        "milter.log" => log::module(lua),
        "milter.dns" => dns::module(lua, Arc::clone(&services.resolver)),
        "milter.spf" => spf::module(lua, Arc::clone(&services.spf)),
        "milter.net" => net::module(lua),
        "milter.store" => store::module(lua, Arc::clone(&services.store)),
        "milter.site" => site::module(lua, Arc::clone(site)),
        "milter.access" => access::module(lua, Arc::clone(site)),
        "milter.mime" => mime::module(lua),
        "milter.smtp" => smtp::module(lua, Arc::clone(&services.smtp)),
        "milter.srs" => srs::module(lua, Arc::clone(&services.store), services.srs.clone()),
        "milter.dkim" => dkim::module(lua, Arc::clone(&services.dkim)),
        "milter.dmarc" => dmarc::module(
            lua,
            Arc::clone(&services.resolver),
            Arc::clone(&services.dkim),
        ),
        "milter.archive" => archive::module(
            lua,
            Arc::clone(&services.archive),
            Arc::clone(&services.saved),
        ),
        _ => return None,
    };
    Some(module.map(Value::Table))
}
