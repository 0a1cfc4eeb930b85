//! `milter.smtp`: `verify(address, opts)`, a call-back to the address's mail exchanger over the
//! SMTP service, `cached(address)`, its remembered answer, and `send(dsn, opts)`, a DSN
//! submitted to the relay. See `docs/lua-api/smtp.md`.
//!
//! It returns `"ok"` when `RCPT TO` is accepted, `{ code, text, permanent, stage }` when the
//! exchanger refuses, and `nil, code` when there is no answer (see [`SmtpError::code`]). A
//! malformed option raises, since it is a bug in the policy; a malformed address is data and
//! gives `nil, "invalid"`.

use super::args;
use crate::services::dsn::{Action, Dsn, valid_status};
use crate::services::smtp::{Outcome, Reply, Smtp, SmtpError, VerifyOptions};
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
        Ok(Outcome::Refused(reply)) => Ok((reply_table(lua, &reply)?, None)),
        Err(error) => Ok((Value::Nil, Some(error.code()))),
    }
}

/// `{ code, text, permanent, stage }`.
fn reply_table(lua: &Lua, reply: &Reply) -> mlua::Result<Value> {
    let table = lua.create_table()?;
    table.set("code", reply.code)?;
    table.set("text", reply.text.as_str())?;
    table.set("permanent", reply.permanent())?;
    table.set("stage", reply.stage.name())?;
    Ok(Value::Table(table))
}

fn send_error(message: impl std::fmt::Display) -> mlua::Error {
    mlua::Error::runtime(format!("bad argument #1 to 'send' ({message})"))
}

fn text_field(key: &str, value: Value) -> mlua::Result<String> {
    match value {
        Value::String(s) => Ok(s.to_string_lossy()),
        other => Err(send_error(format!(
            "{key} must be a string, got {}",
            other.type_name()
        ))),
    }
}

/// The original header: a list of `{ name = …, value = … }` (as `ctx.headers`) or of
/// `{ name, value }` pairs.
fn header_list(value: Value) -> mlua::Result<Vec<(String, String)>> {
    let Value::Table(list) = value else {
        return Err(send_error("headers must be a list of { name, value }"));
    };
    let mut headers = Vec::new();
    for item in list.sequence_values::<Table>() {
        let item = item.map_err(|_| send_error("headers must be a list of { name, value }"))?;
        let name = match item.get::<Option<String>>("name")? {
            Some(name) => name,
            None => item.get(1)?,
        };
        let value: Option<String> = item.get("value")?;
        let value = match value {
            Some(value) => value,
            None => item.get::<Option<String>>(2)?.unwrap_or_default(),
        };
        headers.push((name, value));
    }
    Ok(headers)
}

/// The `dsn` table of `smtp.send`.
fn dsn(table: Table) -> mlua::Result<Dsn> {
    let mut dsn = Dsn {
        to: String::new(),
        reporting: None,
        subject: None,
        text: String::new(),
        recipients: Vec::new(),
        action: Action::Failed,
        status: None,
        diagnostic: None,
        headers: Vec::new(),
        token: None,
    };
    for pair in table.pairs::<String, Value>() {
        let (key, value) = pair?;
        match key.as_str() {
            "to" => dsn.to = text_field(&key, value)?,
            "reporting" => dsn.reporting = Some(text_field(&key, value)?),
            "subject" => dsn.subject = Some(text_field(&key, value)?),
            "text" => dsn.text = text_field(&key, value)?,
            "diagnostic" => dsn.diagnostic = Some(text_field(&key, value)?),
            "token" => dsn.token = Some(text_field(&key, value)?),
            "status" => {
                let status = text_field(&key, value)?;
                if !valid_status(&status) {
                    return Err(send_error(format!(
                        "status must be like \"5.7.1\", got {status:?}"
                    )));
                }
                dsn.status = Some(status);
            }
            "action" => {
                let action = text_field(&key, value)?;
                dsn.action = Action::from_name(&action).ok_or_else(|| {
                    send_error(format!(
                        "action must be failed, delayed, delivered, relayed or expanded, got {action:?}"
                    ))
                })?;
            }
            "recipients" => {
                let Value::Table(list) = value else {
                    return Err(send_error("recipients must be a list of strings"));
                };
                dsn.recipients = list
                    .sequence_values::<String>()
                    .collect::<mlua::Result<_>>()
                    .map_err(|_| send_error("recipients must be a list of strings"))?;
            }
            "headers" => dsn.headers = header_list(value)?,
            _ => return Err(send_error(format!("unknown field {key:?}"))),
        }
    }
    if dsn.to.is_empty() {
        return Err(send_error("to is required"));
    }
    dsn.to = dsn
        .to
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_string();
    Ok(dsn)
}

fn send_options(table: Option<Table>) -> mlua::Result<Option<std::time::Duration>> {
    let Some(table) = table else {
        return Ok(None);
    };
    let mut timeout = None;
    for pair in table.pairs::<String, Value>() {
        let (key, value) = pair?;
        match key.as_str() {
            "timeout" => timeout = args::ttl(&value)?,
            _ => {
                return Err(mlua::Error::runtime(format!(
                    "bad argument #2 to 'send' (unknown option {key:?})"
                )));
            }
        }
    }
    Ok(timeout)
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
    let sender = Arc::clone(&smtp);
    module.set(
        "send",
        lua.create_async_function(move |lua, (table, opts): (Table, Option<Table>)| {
            let smtp = Arc::clone(&sender);
            async move {
                let dsn = dsn(table)?;
                let timeout = send_options(opts)?;
                match smtp.send_dsn(&dsn, timeout).await {
                    Ok(()) => Ok((Value::Boolean(true), None, Value::Nil)),
                    Err(SmtpError::Rejected(reply)) => {
                        Ok((Value::Nil, Some("rejected"), reply_table(&lua, &reply)?))
                    }
                    Err(error) => Ok((Value::Nil, Some(error.code()), Value::Nil)),
                }
            }
        })?,
    )?;
    Ok(module)
}
