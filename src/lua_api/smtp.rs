//! `milter.smtp`: `verify(address, opts)`, a call-back to the address's mail exchanger over the
//! SMTP service, and `cached(address)`, its remembered answer. See `docs/lua-api/smtp.md`.
//!
//! It returns `"ok"` when `RCPT TO` is accepted, `{ code, text, permanent, stage }` when the
//! exchanger refuses, and `nil, code` when there is no answer (see [`SmtpError::code`]). A
//! malformed option raises, since it is a bug in the policy; a malformed address is data and
//! gives `nil, "invalid"`.

use super::args;
use crate::services::smtp::{Outcome, Smtp, SmtpError, VerifyOptions};
use mlua::{Lua, Table, Value};
use std::sync::Arc;

fn options(table: Option<Table>) -> mlua::Result<VerifyOptions> {
    let mut opts = VerifyOptions::default();
    let Some(table) = table else {
        return Ok(opts);
    };
    for pair in table.pairs::<String, Value>() {
        let (key, value) = pair?;
        match key.as_str() {
            "timeout" => opts.timeout = args::ttl(&value)?,
            "cache" => {
                opts.cache = match value {
                    Value::Boolean(b) => b,
                    Value::Nil => true,
                    _ => {
                        return Err(mlua::Error::runtime(
                            "bad argument #2 to 'verify' (cache must be a boolean)",
                        ));
                    }
                }
            }
            _ => {
                return Err(mlua::Error::runtime(format!(
                    "bad argument #2 to 'verify' (unknown option {key:?})"
                )));
            }
        }
    }
    Ok(opts)
}

fn outcome_value(
    lua: &Lua,
    result: Result<Outcome, SmtpError>,
) -> mlua::Result<(Value, Option<&'static str>)> {
    match result {
        Ok(Outcome::Accepted) => Ok((Value::String(lua.create_string("ok")?), None)),
        Ok(Outcome::Refused(reply)) => {
            let table = lua.create_table()?;
            table.set("code", reply.code)?;
            table.set("text", reply.text.as_str())?;
            table.set("permanent", reply.permanent())?;
            table.set("stage", reply.stage.name())?;
            Ok((Value::Table(table), None))
        }
        Err(error) => Ok((Value::Nil, Some(error.code()))),
    }
}

/// Builds the `milter.smtp` module over `smtp`.
pub fn module(lua: &Lua, smtp: Arc<Smtp>) -> mlua::Result<Table> {
    let module = lua.create_table()?;
    let verifier = Arc::clone(&smtp);
    module.set(
        "verify",
        lua.create_async_function(move |lua, (address, opts): (String, Option<Table>)| {
            let smtp = Arc::clone(&verifier);
            async move {
                let opts = options(opts)?;
                let result = smtp.verify(&address, opts).await.map(|v| v.outcome);
                outcome_value(&lua, result)
            }
        })?,
    )?;
    let cache = Arc::clone(&smtp);
    module.set(
        "cached",
        lua.create_async_function(move |lua, address: String| {
            let smtp = Arc::clone(&cache);
            async move {
                match smtp.cached_outcome(&address).await {
                    Ok(Some(outcome)) => outcome_value(&lua, Ok(outcome)),
                    Ok(None) => Ok((Value::Nil, None)),
                    Err(error) => outcome_value(&lua, Err(error)),
                }
            }
        })?,
    )?;
    Ok(module)
}
