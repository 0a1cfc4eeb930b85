//! `milter.spf`: `check_host`, `check_helo` and `best_guess` over the SPF service, each an async
//! function returning a table (`result`, `explanation`, `mechanism`, `received_spf`,
//! `guessed`). See `docs/lua-api/spf.md`.

use super::args;
use crate::services::spf::{Spf, SpfError, SpfOutcome};
use mlua::{Lua, Table};
use std::sync::Arc;

fn outcome_table(lua: &Lua, outcome: SpfOutcome) -> mlua::Result<Table> {
    let table = lua.create_table()?;
    table.set("result", outcome.result)?;
    table.set("explanation", outcome.explanation)?;
    table.set("mechanism", outcome.mechanism)?;
    table.set("received_spf", outcome.received_spf)?;
    table.set("guessed", outcome.guessed)?;
    Ok(table)
}

/// Builds the `milter.spf` module over `spf`.
pub fn module(lua: &Lua, spf: Arc<Spf>) -> mlua::Result<Table> {
    let module = lua.create_table()?;
    let service = spf.clone();
    module.set(
        "check_host",
        lua.create_async_function(
            move |lua, (ip, sender, helo): (String, Option<String>, Option<String>)| {
                let spf = service.clone();
                async move {
                    let ip = args::ip("check_host", 1, &ip)?;
                    let outcome = spf
                        .check_host(
                            ip,
                            sender.as_deref().unwrap_or(""),
                            helo.as_deref().unwrap_or(""),
                        )
                        .await;
                    outcome_table(&lua, outcome)
                }
            },
        )?,
    )?;
    let service = spf.clone();
    module.set(
        "check_helo",
        lua.create_async_function(move |lua, (ip, helo): (String, Option<String>)| {
            let spf = service.clone();
            async move {
                let ip = args::ip("check_helo", 1, &ip)?;
                outcome_table(
                    &lua,
                    spf.check_helo(ip, helo.as_deref().unwrap_or("")).await,
                )
            }
        })?,
    )?;
    module.set(
        "best_guess",
        lua.create_async_function(
            move |lua,
                  (ip, sender, helo, record): (
                String,
                Option<String>,
                Option<String>,
                Option<String>,
            )| {
                let spf = spf.clone();
                async move {
                    let ip = args::ip("best_guess", 1, &ip)?;
                    let record = record
                        .map(|text| {
                            text.parse().map_err(|e: SpfError| {
                                mlua::Error::runtime(format!(
                                    "bad argument #4 to 'best_guess' ({e})"
                                ))
                            })
                        })
                        .transpose()?;
                    let (sender, helo) = (
                        sender.as_deref().unwrap_or(""),
                        helo.as_deref().unwrap_or(""),
                    );
                    let outcome = match &record {
                        Some(record) => spf.best_guess_with(ip, sender, helo, record).await,
                        None => spf.best_guess(ip, sender, helo).await,
                    };
                    outcome_table(&lua, outcome)
                }
            },
        )?,
    )?;
    Ok(module)
}
