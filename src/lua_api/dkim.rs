//! `milter.dkim`: `verify(ctx)`, `arc(ctx)`, `seal(ctx, results, domain)`,
//! `sign(ctx [, domain])` and `has_key(domain)` over the DKIM service, on the message as received (at eom). See
//! `docs/lua-api/dkim.md`.

use super::ctx::Ctx;
use crate::{
    services::dkim::{ArcCheck, Dkim, SignatureCheck},
    session::Edit,
    stage::Stage,
};
use mlua::{AnyUserData, Lua, Table};
use std::sync::Arc;

/// The message as received, read from `ctx` at end of message.
pub(crate) struct Received {
    /// Headers and kept body, CRLF line ends.
    pub raw: Vec<u8>,
    /// Whether the body was longer than `[dkim] max_body`.
    pub truncated: bool,
    /// The headers, in order.
    pub headers: Vec<(String, String)>,
}

/// Reads the message as received for `function`; only at eom, and only when the session kept
/// the body.
pub(crate) fn received(function: &str, ctx: &AnyUserData) -> mlua::Result<Received> {
    let ctx = ctx.borrow::<Ctx>()?;
    let session = ctx.session().lock();
    if session.stage() != Some(Stage::Eom) {
        return Err(mlua::Error::runtime(format!(
            "{function} is only available at eom (the message is complete only then)"
        )));
    }
    if session.body_limit.is_none() {
        return Err(mlua::Error::runtime(format!(
            "{function}: the body was not kept on this connection: require milter.dkim (or \
             milter.dmarc) when the policy loads, at its top level or in setup, not in a handler"
        )));
    }
    Ok(Received {
        raw: session.raw_message(),
        truncated: session.message.body_truncated,
        headers: session.message.headers.clone(),
    })
}

/// The verification of every signature of the message in `ctx` (neutral without checking when
/// the body was longer than the limit).
pub(crate) async fn verify_message(dkim: &Dkim, message: &Received) -> Vec<SignatureCheck> {
    if message.truncated {
        return Dkim::unverified(&message.raw, "message longer than [dkim] max_body");
    }
    dkim.verify(&message.raw).await
}

/// A list of signature checks as Lua tables.
pub(crate) fn checks_table(lua: &Lua, checks: &[SignatureCheck]) -> mlua::Result<Table> {
    let list = lua.create_table_with_capacity(checks.len(), 0)?;
    for (i, check) in checks.iter().enumerate() {
        let t = lua.create_table_with_capacity(0, 6)?;
        t.set("result", check.result)?;
        t.set("domain", check.domain.as_str())?;
        t.set("selector", check.selector.as_str())?;
        t.set("algorithm", check.algorithm.as_str())?;
        t.set("identity", check.identity.as_str())?;
        t.set("reason", check.reason.as_deref())?;
        list.raw_set(i + 1, t)?;
    }
    Ok(list)
}

/// An async Lua `function(ctx)` that reads the message as received (for `name`'s errors) and
/// hands it to `f`.
fn on_message<F, Fut>(
    lua: &Lua,
    dkim: &Arc<Dkim>,
    name: &'static str,
    f: F,
) -> mlua::Result<mlua::Function>
where
    F: Fn(Lua, Arc<Dkim>, Received) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = mlua::Result<Table>> + Send + 'static,
{
    let dkim = Arc::clone(dkim);
    lua.create_async_function(move |lua, ctx: AnyUserData| {
        let work = received(name, &ctx).map(|message| f(lua, Arc::clone(&dkim), message));
        async move { work?.await }
    })
}

/// Builds the `milter.dkim` module over `dkim`.
pub fn module(lua: &Lua, dkim: Arc<Dkim>) -> mlua::Result<Table> {
    let module = lua.create_table()?;
    let verify = on_message(lua, &dkim, "dkim.verify", |lua, dkim, message| async move {
        checks_table(&lua, &verify_message(&dkim, &message).await)
    })?;
    module.set("verify", verify)?;
    let arc = on_message(lua, &dkim, "dkim.arc", |lua, dkim, message| async move {
        // Most mail has no chain: then the message is not parsed (and its body hashed) again.
        let sealed = (message.headers.iter()).any(|(n, _)| n.eq_ignore_ascii_case("ARC-Seal"));
        let check = if sealed {
            dkim.verify_arc(&message.raw).await
        } else {
            ArcCheck::none()
        };
        let t = lua.create_table()?;
        t.set("result", check.result)?;
        t.set("sets", check.sets)?;
        t.set("reason", check.reason)?;
        Ok(t)
    })?;
    module.set("arc", arc)?;
    let sealing = Arc::clone(&dkim);
    module.set(
        "seal",
        lua.create_async_function(
            move |_, (ctx, results, domain): (AnyUserData, String, String)| {
                let dkim = Arc::clone(&sealing);
                let message = received("dkim.seal", &ctx);
                async move {
                    let message = message?;
                    if message.truncated {
                        return Ok((None, Some("message longer than [dkim] max_body".into())));
                    }
                    match dkim.seal(&domain, &message.raw, &results).await {
                        Ok(set) => {
                            let ctx = ctx.borrow::<Ctx>()?;
                            // Each at the top, last first: ARC-Seal ends up first.
                            for (name, value) in set.into_iter().rev() {
                                ctx.queue("dkim.seal", Edit::InsertHeader(0, name, value))?;
                            }
                            Ok((Some(true), None))
                        }
                        Err(e) => Ok((None, Some(e))),
                    }
                }
            },
        )?,
    )?;
    let keys = Arc::clone(&dkim);
    module.set(
        "has_key",
        lua.create_function(move |_, domain: String| Ok(keys.signs_for(&domain)))?,
    )?;
    module.set(
        "sign",
        lua.create_function(move |_, (ctx, domain): (AnyUserData, Option<String>)| {
            let message = received("dkim.sign", &ctx)?;
            let domain = match domain {
                Some(d) => d,
                None => match crate::services::dmarc::author_domain(&message.headers) {
                    Some(d) => d,
                    None => return Ok((None, Some("no From domain".to_string()))),
                },
            };
            if !dkim.signs_for(&domain) {
                return Ok((None, Some(format!("no [dkim] key for {domain}"))));
            }
            if message.truncated {
                return Ok((
                    None,
                    Some("message longer than [dkim] max_body".to_string()),
                ));
            }
            match dkim.sign(&domain, &message.raw) {
                Ok(value) => {
                    let edit = Edit::InsertHeader(0, "DKIM-Signature".into(), value);
                    ctx.borrow::<Ctx>()?.queue("dkim.sign", edit)?;
                    Ok((Some(true), None))
                }
                Err(e) => Ok((None, Some(e))),
            }
        })?,
    )?;
    Ok(module)
}
