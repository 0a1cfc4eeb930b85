//! `ctx`: the session as policies see it. A view of the connection's [`Session`](crate::session::Session): facts are
//! read from it, edits are queued into it; nothing here keeps state of its own but the Lua
//! tables policies keep (`ctx.vars` per policy and connection, `ctx.msg` per message).

use crate::{
    services::site::system_hostname,
    session::{Edit, Session, SharedSession, Trace},
    stage::Stage,
};
use mlua::{
    AnyUserData, Lua, MetaMethod, Table, UserData, UserDataFields, UserDataMethods, Value, Variadic,
};
use std::sync::MutexGuard;

/// User value slots of the ctx userdata.
const VARS_SLOT: usize = 1;
const MSG_SLOT: usize = 2;
const CLIENT_SLOT: usize = 3;

/// `ctx`: one per connection and Lua state.
pub struct Ctx {
    session: SharedSession,
    /// The message `ctx.msg` was made for; a new message gets a new table.
    msg_seq: Option<u64>,
}

impl Ctx {
    /// Creates the ctx userdata viewing `session`.
    pub fn create(lua: &Lua, session: SharedSession) -> mlua::Result<AnyUserData> {
        let client = lua.create_userdata(Client(session.clone()))?;
        let ud = lua.create_userdata(Ctx {
            session,
            msg_seq: None,
        })?;
        ud.set_nth_user_value(CLIENT_SLOT, client)?;
        Ok(ud)
    }

    fn require_message(&self, what: &str) -> mlua::Result<()> {
        let stage = self.session.lock().stage();
        match stage {
            Some(s) if s.in_message() => Ok(()),
            _ => Err(mlua::Error::runtime(format!(
                "{what} is not available in stage '{}': edits belong to a message (stages mail to eom)",
                stage_name(stage)
            ))),
        }
    }

    /// The session this ctx views (for modules that read the message as received).
    pub(crate) fn session(&self) -> &SharedSession {
        &self.session
    }

    /// Queues an end-of-message edit, if the stage allows it and the MTA granted it.
    pub(crate) fn queue(&self, what: &str, edit: Edit) -> mlua::Result<()> {
        self.require_message(what)?;
        let needed = edit.required_action();
        let mut session = self.session.lock();
        if !session.negotiated.actions.contains(needed) {
            return Err(mlua::Error::runtime(format!(
                "{what}: the MTA did not grant the milter action {needed:?} on this connection"
            )));
        }
        session.message.edits.push(edit);
        Ok(())
    }

    /// Fails unless the MTA sends headers on this connection.
    fn require_headers_sent(&self, what: &str) -> mlua::Result<()> {
        if self.session.lock().negotiated.sends(Stage::Header) {
            return Ok(());
        }
        Err(mlua::Error::runtime(format!(
            "{what}: the MTA does not send headers on this connection: no policy handles a \
             content stage (data, header, eoh, body) or mentions headers in its source; add \
             needs = {{ \"headers\" }} to the policy"
        )))
    }

    fn headers_table(&self, lua: &Lua) -> mlua::Result<Table> {
        let stage = self.session.lock().stage();
        if !matches!(
            stage,
            Some(Stage::Header | Stage::Eoh | Stage::Body | Stage::Eom)
        ) {
            return Err(mlua::Error::runtime(format!(
                "ctx.headers is not available in stage '{}' (headers arrive from the header stage on)",
                stage_name(stage)
            )));
        }
        self.require_headers_sent("ctx.headers")?;
        let session = live(&self.session)?;
        let headers = &session.message.headers;
        let t = lua.create_table_with_capacity(headers.len(), 0)?;
        for (i, (name, value)) in headers.iter().enumerate() {
            let h = lua.create_table_with_capacity(0, 2)?;
            h.raw_set("name", name.as_str())?;
            h.raw_set("value", value.as_str())?;
            t.raw_set(i + 1, h)?;
        }
        Ok(t)
    }
}

/// The session, locked, while one of its own handlers runs. A `ctx` a policy kept in a variable
/// and used from another connection's handler (or after its connection closed) is refused
/// rather than showing that connection's facts.
fn live(session: &SharedSession) -> mlua::Result<MutexGuard<'_, Session>> {
    let s = session.lock();
    if s.running.is_none() {
        return Err(mlua::Error::runtime(
            "this ctx belongs to another connection (or one that ended): a ctx is valid only \
             in the handlers of its own connection",
        ));
    }
    Ok(s)
}

fn stage_name(stage: Option<Stage>) -> &'static str {
    stage.map(Stage::name).unwrap_or("none")
}

/// `ctx.client`: the connecting client, a view of the session's client facts.
pub(crate) struct Client(SharedSession);

impl UserData for Client {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        macro_rules! field {
            ($name:literal, |$c:ident| $value:expr) => {
                fields.add_field_method_get($name, |_, client| {
                    let session = live(&client.0)?;
                    let $c = &session.client;
                    Ok($value)
                });
            };
        }
        field!("hostname", |c| c.hostname.clone());
        field!("ip", |c| c.ip.map(|ip| ip.to_string()));
        field!("port", |c| c.port);
        field!("family", |c| c.family);
        field!("path", |c| c.path.clone());
        field!("internal", |c| c.internal);
        field!("trusted", |c| c.trusted);
        field!("localhost", |c| c.localhost);
        field!("authenticated", |c| c.authenticated);
        field!("ptr", |c| c.ptr.clone());
        fields.add_field_method_get("dynamic", |_, client| Ok(live(&client.0)?.client.dynamic()));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::Index, |_, _, key: String| -> mlua::Result<()> {
            Err(mlua::Error::runtime(format!(
                "ctx.client has no field '{key}' (fields: hostname, ip, port, family, path, \
                 internal, trusted, localhost, authenticated, ptr, dynamic)"
            )))
        });
    }
}

/// The table in a user value slot, made on first use (most messages never touch it).
fn slot_table(lua: &Lua, ud: &AnyUserData, slot: usize) -> mlua::Result<Table> {
    match ud.nth_user_value::<Option<Table>>(slot)? {
        Some(t) => Ok(t),
        None => {
            let t = lua.create_table()?;
            ud.set_nth_user_value(slot, &t)?;
            Ok(t)
        }
    }
}

/// ESMTP arguments given as a string or a list of strings, joined for the milter protocol.
fn esmtp_args(args: Option<Value>) -> mlua::Result<Option<String>> {
    match args {
        None | Some(Value::Nil) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.to_str()?.to_string())),
        Some(Value::Table(t)) => {
            let parts = t
                .sequence_values::<String>()
                .collect::<mlua::Result<Vec<_>>>()?;
            Ok((!parts.is_empty()).then(|| parts.join(" ")))
        }
        Some(other) => Err(mlua::Error::runtime(format!(
            "ESMTP arguments must be a string or a list of strings, got {}",
            other.type_name()
        ))),
    }
}

fn check_header_name(what: &str, name: &str) -> mlua::Result<()> {
    let valid = !name.is_empty() && name.bytes().all(|b| (33..=126).contains(&b) && b != b':');
    if valid {
        Ok(())
    } else {
        Err(mlua::Error::runtime(format!(
            "{what}: invalid header name {name:?}"
        )))
    }
}

fn check_index(what: &str, index: i64, min: i64) -> mlua::Result<i32> {
    i32::try_from(index)
        .ok()
        .filter(|i| i64::from(*i) >= min)
        .ok_or_else(|| {
            mlua::Error::runtime(format!("{what}: index must be at least {min}, got {index}"))
        })
}

/// `ctx.verdicts`: the final verdicts enforced so far for the message (shadow verdicts and
/// "continue" left out), each `{ stage, policy, action, verdict }`.
fn verdicts_table(lua: &Lua, trace: &Trace) -> mlua::Result<Table> {
    let given = trace
        .steps
        .iter()
        .filter(|step| !step.shadow && step.verdict != "continue");
    lua.create_sequence_from(
        given
            .map(|step| {
                let action = step.verdict.split([' ', ':']).next().unwrap_or_default();
                let t = lua.create_table()?;
                t.set("stage", step.stage.as_str())?;
                t.set("policy", step.policy.as_str())?;
                t.set("action", action)?;
                t.set("verdict", step.verdict.as_str())?;
                Ok(t)
            })
            .collect::<mlua::Result<Vec<_>>>()?,
    )
}

impl UserData for Ctx {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        macro_rules! field {
            ($name:literal, |$lua:ident, $s:ident| $value:expr) => {
                fields.add_field_method_get($name, |$lua, c| {
                    let $s = live(&c.session)?;
                    $value
                });
            };
        }
        field!("stage", |_lua, s| Ok(stage_name(s.stage())));
        field!("helo", |_lua, s| Ok(s.helo.clone()));
        field!("sender", |_lua, s| Ok(s.message.sender.clone()));
        field!("sender_args", |lua, s| {
            lua.create_sequence_from(s.message.sender_args.iter().map(String::as_str))
        });
        field!("recipients", |lua, s| {
            lua.create_sequence_from(s.message.recipients.iter().map(String::as_str))
        });
        field!("recipient_args", |lua, s| {
            lua.create_sequence_from(
                s.message
                    .recipient_args
                    .iter()
                    .map(|args| lua.create_sequence_from(args.iter().map(String::as_str)))
                    .collect::<mlua::Result<Vec<_>>>()?,
            )
        });
        field!("demerits", |_lua, s| Ok(s.demerits));
        field!("receiver", |_lua, s| {
            Ok(s.receiver
                .clone()
                .or_else(|| s.macro_value("j"))
                .unwrap_or_else(system_hostname))
        });
        field!("delayed", |_lua, s| Ok(s
            .delayed()
            .map(|d| d.verdict.clone())));
        field!("verdicts", |lua, s| verdicts_table(lua, &s.message.trace));
        field!("queue_id", |_lua, s| Ok(s.macro_value("i")));
        field!("auth", |_lua, s| {
            Ok(s.macro_value("auth_authen").filter(|a| !a.is_empty()))
        });
        fields.add_field_method_get("headers", |lua, c| c.headers_table(lua));
        fields.add_field_function_get("client", |_, ud| ud.nth_user_value::<Value>(CLIENT_SLOT));
        fields.add_field_function_get("msg", |lua, ud| {
            let (seq, current) = {
                let ctx = ud.borrow::<Ctx>()?;
                let seq = live(&ctx.session)?.message.seq;
                (seq, ctx.msg_seq == Some(seq))
            };
            if current && let Some(t) = ud.nth_user_value::<Option<Table>>(MSG_SLOT)? {
                return Ok(t);
            }
            let t = lua.create_table()?;
            ud.set_nth_user_value(MSG_SLOT, &t)?;
            ud.borrow_mut::<Ctx>()?.msg_seq = Some(seq);
            Ok(t)
        });
        fields.add_field_function_get("vars", |lua, ud| {
            let policy = live(&ud.borrow::<Ctx>()?.session)?
                .running
                .map_or(0, |(_, policy)| policy);
            let root = slot_table(lua, &ud, VARS_SLOT)?;
            match root.raw_get::<Option<Table>>(policy)? {
                Some(t) => Ok(t),
                None => {
                    let t = lua.create_table()?;
                    root.raw_set(policy, &t)?;
                    Ok(t)
                }
            }
        });
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method(
            "demerit",
            |_, c, (n, reason): (Option<u32>, Option<String>)| {
                let n = n.unwrap_or(1);
                let mut s = live(&c.session)?;
                s.demerits = s.demerits.saturating_add(n);
                tracing::debug!(
                    client = %s.client.label(),
                    demerits = s.demerits,
                    added = n,
                    reason = reason.as_deref().unwrap_or(""),
                    "demerit"
                );
                Ok(s.demerits)
            },
        );
        methods.add_method("macro", |_, c, name: String| {
            Ok(live(&c.session)?.macro_value(&name))
        });
        methods.add_method("header", |_, c, (name, n): (String, Option<usize>)| {
            c.require_headers_sent("ctx:header")?;
            let n = n.unwrap_or(1).max(1);
            Ok(live(&c.session)?
                .message
                .headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(&name))
                .nth(n - 1)
                .map(|(_, v)| v.clone()))
        });
        methods.add_method("add_header", |_, c, (name, value): (String, String)| {
            check_header_name("ctx:add_header", &name)?;
            c.queue("ctx:add_header", Edit::AddHeader(name, value))
        });
        methods.add_method(
            "insert_header",
            |_, c, (index, name, value): (i64, String, String)| {
                check_header_name("ctx:insert_header", &name)?;
                let index = check_index("ctx:insert_header", index, 0)?;
                c.queue("ctx:insert_header", Edit::InsertHeader(index, name, value))
            },
        );
        methods.add_method(
            "change_header",
            |_, c, (name, index, value): (String, i64, Option<String>)| {
                check_header_name("ctx:change_header", &name)?;
                let index = check_index("ctx:change_header", index, 1)?;
                c.queue("ctx:change_header", Edit::ChangeHeader(name, index, value))
            },
        );
        methods.add_method(
            "delete_header",
            |_, c, (name, index): (String, Option<i64>)| {
                check_header_name("ctx:delete_header", &name)?;
                let index = check_index("ctx:delete_header", index.unwrap_or(1), 1)?;
                c.queue("ctx:delete_header", Edit::ChangeHeader(name, index, None))
            },
        );
        methods.add_method("add_rcpt", |_, c, (addr, args): (String, Option<Value>)| {
            let args = esmtp_args(args)?;
            c.queue("ctx:add_rcpt", Edit::AddRcpt(addr, args))
        });
        methods.add_method("delete_rcpt", |_, c, addr: String| {
            c.queue("ctx:delete_rcpt", Edit::DeleteRcpt(addr))
        });
        methods.add_method(
            "change_sender",
            |_, c, (addr, args): (String, Option<Value>)| {
                let args = esmtp_args(args)?;
                c.queue("ctx:change_sender", Edit::ChangeSender(addr, args))
            },
        );
        methods.add_method("replace_body", |_, c, body: mlua::LuaString| {
            c.queue(
                "ctx:replace_body",
                Edit::ReplaceBody(body.as_bytes().to_vec()),
            )
        });
        methods.add_method("quarantine", |_, c, reason: String| {
            c.queue("ctx:quarantine", Edit::Quarantine(reason))
        });
        methods.add_method("progress", |_, c, ()| {
            let s = c.session.lock();
            match (&s.progress, s.stage()) {
                (Some(tx), Some(Stage::Eom)) => {
                    // The receiver lives as long as the eom call; a closed channel means eom ended.
                    let _ = tx.send(());
                    Ok(())
                }
                (_, stage) => Err(mlua::Error::runtime(format!(
                    "ctx:progress is only available in stage 'eom', not '{}'",
                    stage_name(stage)
                ))),
            }
        });
        methods.add_meta_method(
            MetaMethod::Index,
            |_, _, key: Variadic<Value>| -> mlua::Result<()> {
                let key = key
                    .first()
                    .map(|k| k.to_string().unwrap_or_default())
                    .unwrap_or_default();
                Err(mlua::Error::runtime(format!(
                    "ctx has no field or method '{key}'"
                )))
            },
        );
    }
}
