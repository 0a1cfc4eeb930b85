//! `milter.dmarc`: `check(ctx [, inputs])` over the DMARC service, and
//! `organizational_domain(name)`. See `docs/lua-api/dmarc.md`.

use super::dkim::{checks_table, received, verify_message};
use crate::services::{
    dkim::Dkim,
    dmarc::{self, DmarcInput},
    dns::Resolver,
};
use mlua::{AnyUserData, Lua, ObjectLike, Table, Value};
use std::sync::Arc;

/// The SPF result and domain: `inputs.spf`, else what the spf policy published in `ctx.msg.spf`
/// (`official` result, checked `domain`).
fn spf_input(inputs: Option<&Table>, msg: &Table) -> mlua::Result<Option<(String, String)>> {
    let given: Option<Table> = match inputs {
        Some(t) => t.get("spf")?,
        None => None,
    };
    let (result, domain) = match given {
        Some(t) => (t.get::<Option<String>>("result")?, t.get("domain")?),
        None => match msg.get::<Option<Table>>("spf")? {
            Some(t) => (t.get::<Option<String>>("official")?, t.get("domain")?),
            None => (None, None),
        },
    };
    Ok(result.zip(domain))
}

/// Builds the `milter.dmarc` module.
pub fn module(lua: &Lua, resolver: Arc<Resolver>, dkim: Arc<Dkim>) -> mlua::Result<Table> {
    let module = lua.create_table()?;
    module.set(
        "organizational_domain",
        lua.create_function(|_, name: String| Ok(dmarc::organizational_domain(&name)))?,
    )?;
    module.set(
        "check",
        lua.create_async_function(move |lua, (ctx, inputs): (AnyUserData, Option<Table>)| {
            let (resolver, dkim) = (Arc::clone(&resolver), Arc::clone(&dkim));
            async move {
                let message = received("dmarc.check", &ctx)?;
                let msg: Table = ctx.get("msg")?;
                let spf = spf_input(inputs.as_ref(), &msg)?;
                let given: Option<Table> = match &inputs {
                    Some(t) => t.get("dkim")?,
                    None => msg.get("dkim")?,
                };
                let signatures = match given {
                    Some(t) => t,
                    None => {
                        let t = checks_table(&lua, &verify_message(&dkim, &message).await)?;
                        msg.set("dkim", &t)?;
                        t
                    }
                };
                let mut dkim_pass = Vec::new();
                for sig in signatures.sequence_values::<Table>() {
                    let sig = sig?;
                    if sig.get::<Option<String>>("result")?.as_deref() == Some("pass") {
                        dkim_pass.push(sig.get::<String>("domain")?);
                    }
                }
                let sample = match inputs.as_ref().map(|t| t.get::<Option<f64>>("sample")) {
                    Some(Ok(Some(place))) if (0.0..100.0).contains(&place) => place,
                    Some(Ok(Some(place))) => {
                        return Err(mlua::Error::runtime(format!(
                            "dmarc.check: inputs.sample must be in [0, 100), got {place}"
                        )));
                    }
                    Some(Err(e)) => return Err(e),
                    _ => dmarc::sample_of(
                        &ctx.get::<Option<String>>("queue_id")?.unwrap_or_default(),
                    ),
                };
                let input = DmarcInput {
                    from_domain: dmarc::author_domain(&message.headers).unwrap_or_default(),
                    spf,
                    dkim_pass,
                    sample,
                };
                let outcome = dmarc::check(&resolver, &input).await;
                let t = lua.create_table()?;
                t.set("result", outcome.result)?;
                t.set("policy", outcome.policy)?;
                t.set("published", outcome.published)?;
                t.set("pct", outcome.pct)?;
                t.set("sampled", outcome.sampled)?;
                t.set("domain", outcome.domain)?;
                t.set("org_domain", outcome.org_domain)?;
                t.set("record_domain", outcome.record_domain)?;
                let alignment = lua.create_table()?;
                alignment.set("spf", outcome.spf_aligned)?;
                alignment.set("dkim", outcome.dkim_aligned)?;
                alignment.set("aspf", outcome.modes.0)?;
                alignment.set("adkim", outcome.modes.1)?;
                t.set("alignment", alignment)?;
                t.set("rua", lua.create_sequence_from(outcome.rua)?)?;
                t.set(
                    "spf",
                    match &input.spf {
                        Some((result, _)) => Value::String(lua.create_string(result)?),
                        None => Value::Nil,
                    },
                )?;
                Ok(t)
            }
        })?,
    )?;
    Ok(module)
}
