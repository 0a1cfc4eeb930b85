//! `ctx`: the session as policies see it (facts read-only, scratch tables, queued edits).
//!
//! One `Ctx` userdata lives per connection. Rust updates its facts before each stage; Lua reads
//! them through field getters, keeps state in `ctx.vars` (per policy, per connection) and
//! `ctx.msg` (shared by all policies, per message), and queues edits that the server applies at
//! end of message.

use crate::{lua_api::verdict::Verdict, services::site::system_hostname, stage::Stage};
use indymilter::Actions;
use mlua::{
    AnyUserData, Lua, MetaMethod, Table, UserData, UserDataFields, UserDataMethods, Value, Variadic,
};
use std::{collections::HashMap, ffi::CString, net::IpAddr};
use tokio::sync::mpsc::UnboundedSender;

/// User value slots of the ctx userdata.
const VARS_SLOT: usize = 1;
const MSG_SLOT: usize = 2;
const CLIENT_SLOT: usize = 3;

/// The connecting client, as the MTA reported it at connect.
#[derive(Clone, Debug, Default)]
pub struct ClientInfo {
    /// The client's host name as the MTA resolved it (`[ip]` when it has none).
    pub hostname: String,
    /// The client's IP address, when it connected over IP.
    pub ip: Option<IpAddr>,
    /// The client's port.
    pub port: Option<u16>,
    /// "inet", "inet6", "unix" or "unknown".
    pub family: &'static str,
    /// The socket path for unix clients.
    pub path: Option<String>,
    /// In `[site] internal_networks`, or authenticated with SMTP AUTH.
    pub internal: bool,
    /// A `[site] trusted_relays` host.
    pub trusted: bool,
    /// This host (127.0.0.0/8, ::1): never a zombie.
    pub localhost: bool,
    /// The session authenticated with SMTP AUTH (known from MAIL on).
    pub authenticated: bool,
    /// The MTA's verified client name, `None` when it has none.
    pub ptr: Option<String>,
    /// No verified name, or one that looks like a dynamic address pool's.
    pub dynamic: bool,
}

impl UserData for ClientInfo {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("hostname", |_, c| Ok(c.hostname.clone()));
        fields.add_field_method_get("ip", |_, c| Ok(c.ip.map(|ip| ip.to_string())));
        fields.add_field_method_get("port", |_, c| Ok(c.port));
        fields.add_field_method_get("family", |_, c| Ok(c.family));
        fields.add_field_method_get("path", |_, c| Ok(c.path.clone()));
        fields.add_field_method_get("internal", |_, c| Ok(c.internal));
        fields.add_field_method_get("trusted", |_, c| Ok(c.trusted));
        fields.add_field_method_get("localhost", |_, c| Ok(c.localhost));
        fields.add_field_method_get("authenticated", |_, c| Ok(c.authenticated));
        fields.add_field_method_get("ptr", |_, c| Ok(c.ptr.clone()));
        fields.add_field_method_get("dynamic", |_, c| Ok(c.dynamic));
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

/// One queued end-of-message edit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Edit {
    /// Append a header.
    AddHeader(String, String),
    /// Insert a header at an index (0 = top).
    InsertHeader(i32, String, String),
    /// Change the index-th (1-based) header of that name; `None` deletes it.
    ChangeHeader(String, i32, Option<String>),
    /// Add a recipient, with optional ESMTP arguments.
    AddRcpt(String, Option<String>),
    /// Remove a recipient.
    DeleteRcpt(String),
    /// Change the envelope sender, with optional ESMTP arguments.
    ChangeSender(String, Option<String>),
    /// Replace the body (appended when queued several times).
    ReplaceBody(Vec<u8>),
    /// Put the message on hold with this reason.
    Quarantine(String),
}

impl Edit {
    /// The milter action the MTA must have granted for this edit.
    pub fn required_action(&self) -> Actions {
        match self {
            Edit::AddHeader(..) | Edit::InsertHeader(..) => Actions::ADD_HEADER,
            Edit::ChangeHeader(..) => Actions::CHANGE_HEADER,
            Edit::AddRcpt(_, None) => Actions::ADD_RCPT,
            Edit::AddRcpt(_, Some(_)) => Actions::ADD_RCPT_EXT,
            Edit::DeleteRcpt(_) => Actions::DELETE_RCPT,
            Edit::ChangeSender(..) => Actions::CHANGE_SENDER,
            Edit::ReplaceBody(_) => Actions::REPLACE_BODY,
            Edit::Quarantine(_) => Actions::QUARANTINE,
        }
    }
}

/// The per-connection session state behind `ctx`.
#[derive(Debug, Default)]
pub struct Ctx {
    /// The client for log lines: its IP, or its host name without one.
    pub client: String,
    /// The stage being handled.
    pub stage: Option<Stage>,
    /// HELO/EHLO argument.
    pub helo: Option<String>,
    /// MAIL FROM address without angle brackets ("" for the null sender).
    pub sender: Option<String>,
    /// MAIL FROM ESMTP arguments.
    pub sender_args: Vec<String>,
    /// Recipients accepted so far in this message.
    pub recipients: Vec<String>,
    /// Headers seen so far in this message.
    pub headers: Vec<(String, String)>,
    /// Per stage index: whether the MTA sends that stage on this connection.
    pub sent: [bool; 12],
    /// Macros known at this stage, as the MTA named them.
    pub macros: HashMap<CString, CString>,
    /// Index of the policy whose handler is running (selects `ctx.vars`).
    pub policy: usize,
    /// Edits queued for end of message.
    pub edits: Vec<Edit>,
    /// Actions the MTA granted.
    pub actions: Actions,
    /// Set during eom: asks the server to send a progress notification.
    pub progress: Option<UnboundedSender<()>>,
    /// Offences counted on this connection (`ctx:demerit`).
    pub demerits: u32,
    /// The configured receiver name (`[site] hostname`), if any.
    pub receiver: Option<String>,
    /// A reject held back by `[site] delay_reject`, to be answered at DATA.
    pub delayed: Option<Verdict>,
}

impl Ctx {
    /// Creates the ctx userdata for a new connection with its client facts.
    pub fn create(lua: &Lua, ctx: Ctx, client: ClientInfo) -> mlua::Result<AnyUserData> {
        let ud = lua.create_userdata(ctx)?;
        ud.set_nth_user_value(CLIENT_SLOT, lua.create_userdata(client)?)?;
        Ok(ud)
    }

    /// Starts a new message: forgets the envelope, headers, edits and `ctx.msg` (a fresh table
    /// is made when a policy first uses it).
    pub fn reset_message(ud: &AnyUserData) -> mlua::Result<()> {
        ud.borrow_mut_scoped::<Ctx, _>(|c| {
            c.sender = None;
            c.sender_args.clear();
            c.recipients.clear();
            c.headers.clear();
            c.edits.clear();
        })?;
        ud.set_nth_user_value(MSG_SLOT, Value::Nil)
    }

    /// Marks the session as authenticated (SMTP AUTH): it counts as internal from now on.
    pub fn set_authenticated(ud: &AnyUserData) -> mlua::Result<()> {
        let client: AnyUserData = ud.nth_user_value(CLIENT_SLOT)?;
        client.borrow_mut_scoped::<ClientInfo, _>(|c| {
            c.authenticated = true;
            c.internal = true;
        })
    }

    /// Replaces the macro snapshot, normalising `{name}` to `name`.
    pub fn set_macros(&mut self, macros: HashMap<CString, CString>) {
        self.macros = macros;
    }

    /// A macro by name, with or without braces (the MTA sends one-letter names bare and longer
    /// ones in braces).
    pub fn macro_value(&self, name: &str) -> Option<&str> {
        let bare = strip_braces(name);
        let key = if bare.len() == 1 {
            bare.to_string()
        } else {
            format!("{{{bare}}}")
        };
        let key = CString::new(key).ok()?;
        self.macros
            .get(&key)
            .or_else(|| CString::new(bare).ok().and_then(|k| self.macros.get(&k)))
            .and_then(|v| v.to_str().ok())
    }

    /// Fails unless the MTA sends the stage that carries `what` (negotiation skips stages no
    /// policy handles or declares in `needs`).
    fn require_sent(&self, what: &str) -> mlua::Result<()> {
        let (stage, need) = match what {
            "ctx.client" => (Stage::Connect, "client"),
            "ctx.helo" => (Stage::Helo, "helo"),
            "ctx.sender" | "ctx.sender_args" => (Stage::Mail, "sender"),
            "ctx.recipients" => (Stage::Rcpt, "recipients"),
            _ => (Stage::Header, "headers"),
        };
        if self.sent[stage.index()] {
            return Ok(());
        }
        Err(mlua::Error::runtime(format!(
            "{what}: the MTA does not send the {stage} stage on this connection; add a {stage} \
             handler or `needs = {{ \"{need}\" }}` to the policy"
        )))
    }

    fn stage_name(&self) -> &'static str {
        self.stage.map(Stage::name).unwrap_or("none")
    }

    fn require_message(&self, what: &str) -> mlua::Result<()> {
        match self.stage {
            Some(s) if s.in_message() => Ok(()),
            _ => Err(mlua::Error::runtime(format!(
                "{what} is not available in stage '{}': edits belong to a message (stages mail to eom)",
                self.stage_name()
            ))),
        }
    }

    fn queue(&mut self, what: &str, edit: Edit) -> mlua::Result<()> {
        self.require_message(what)?;
        let needed = edit.required_action();
        if !self.actions.contains(needed) {
            return Err(mlua::Error::runtime(format!(
                "{what}: the MTA did not grant the milter action {needed:?} on this connection"
            )));
        }
        self.edits.push(edit);
        Ok(())
    }

    fn headers_table(&self, lua: &Lua) -> mlua::Result<Table> {
        match self.stage {
            Some(Stage::Header | Stage::Eoh | Stage::Body | Stage::Eom) => {}
            _ => {
                return Err(mlua::Error::runtime(format!(
                    "ctx.headers is not available in stage '{}' (headers arrive from the header stage on)",
                    self.stage_name()
                )));
            }
        }
        self.require_sent("ctx.headers")?;
        let t = lua.create_table_with_capacity(self.headers.len(), 0)?;
        for (i, (name, value)) in self.headers.iter().enumerate() {
            let h = lua.create_table_with_capacity(0, 2)?;
            h.raw_set("name", name.as_str())?;
            h.raw_set("value", value.as_str())?;
            t.raw_set(i + 1, h)?;
        }
        Ok(t)
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

fn strip_braces(name: &str) -> &str {
    name.strip_prefix('{')
        .and_then(|n| n.strip_suffix('}'))
        .unwrap_or(name)
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

impl UserData for Ctx {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("stage", |_, c| Ok(c.stage_name()));
        fields.add_field_method_get("helo", |_, c| {
            c.require_sent("ctx.helo")?;
            Ok(c.helo.clone())
        });
        fields.add_field_method_get("sender", |_, c| {
            c.require_sent("ctx.sender")?;
            Ok(c.sender.clone())
        });
        fields.add_field_method_get("sender_args", |lua, c| {
            c.require_sent("ctx.sender_args")?;
            lua.create_sequence_from(c.sender_args.iter().map(String::as_str))
        });
        fields.add_field_method_get("recipients", |lua, c| {
            c.require_sent("ctx.recipients")?;
            lua.create_sequence_from(c.recipients.iter().map(String::as_str))
        });
        fields.add_field_method_get("headers", |lua, c| c.headers_table(lua));
        fields.add_field_method_get("demerits", |_, c| Ok(c.demerits));
        fields.add_field_method_get("receiver", |_, c| {
            Ok(c.receiver
                .clone()
                .or_else(|| c.macro_value("j").map(str::to_string))
                .unwrap_or_else(system_hostname))
        });
        fields.add_field_method_get("delayed", |_, c| Ok(c.delayed.clone()));
        fields.add_field_method_get("queue_id", |_, c| {
            Ok(c.macro_value("i").map(str::to_string))
        });
        fields.add_field_method_get("auth", |_, c| {
            Ok(c.macro_value("auth_authen")
                .filter(|a| !a.is_empty())
                .map(str::to_string))
        });
        fields.add_field_function_get("client", |_, ud| {
            ud.borrow::<Ctx>()?.require_sent("ctx.client")?;
            ud.nth_user_value::<Value>(CLIENT_SLOT)
        });
        fields.add_field_function_get("msg", |lua, ud| slot_table(lua, &ud, MSG_SLOT));
        fields.add_field_function_get("vars", |lua, ud| {
            let policy = ud.borrow::<Ctx>()?.policy;
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
        methods.add_method_mut(
            "demerit",
            |_, c, (n, reason): (Option<u32>, Option<String>)| {
                let n = n.unwrap_or(1);
                c.demerits = c.demerits.saturating_add(n);
                tracing::info!(
                    client = %c.client,
                    demerits = c.demerits,
                    added = n,
                    reason = reason.as_deref().unwrap_or(""),
                    "demerit"
                );
                Ok(c.demerits)
            },
        );
        methods.add_method("macro", |_, c, name: String| {
            Ok(c.macro_value(&name).map(str::to_string))
        });
        methods.add_method("header", |_, c, (name, n): (String, Option<usize>)| {
            c.require_sent("ctx:header")?;
            let n = n.unwrap_or(1).max(1);
            Ok(c.headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(&name))
                .nth(n - 1)
                .map(|(_, v)| v.clone()))
        });
        methods.add_method_mut("add_header", |_, c, (name, value): (String, String)| {
            check_header_name("ctx:add_header", &name)?;
            c.queue("ctx:add_header", Edit::AddHeader(name, value))
        });
        methods.add_method_mut(
            "insert_header",
            |_, c, (index, name, value): (i64, String, String)| {
                check_header_name("ctx:insert_header", &name)?;
                let index = check_index("ctx:insert_header", index, 0)?;
                c.queue("ctx:insert_header", Edit::InsertHeader(index, name, value))
            },
        );
        methods.add_method_mut(
            "change_header",
            |_, c, (name, index, value): (String, i64, Option<String>)| {
                check_header_name("ctx:change_header", &name)?;
                let index = check_index("ctx:change_header", index, 1)?;
                c.queue("ctx:change_header", Edit::ChangeHeader(name, index, value))
            },
        );
        methods.add_method_mut(
            "delete_header",
            |_, c, (name, index): (String, Option<i64>)| {
                check_header_name("ctx:delete_header", &name)?;
                let index = check_index("ctx:delete_header", index.unwrap_or(1), 1)?;
                c.queue("ctx:delete_header", Edit::ChangeHeader(name, index, None))
            },
        );
        methods.add_method_mut("add_rcpt", |_, c, (addr, args): (String, Option<Value>)| {
            let args = esmtp_args(args)?;
            c.queue("ctx:add_rcpt", Edit::AddRcpt(addr, args))
        });
        methods.add_method_mut("delete_rcpt", |_, c, addr: String| {
            c.queue("ctx:delete_rcpt", Edit::DeleteRcpt(addr))
        });
        methods.add_method_mut(
            "change_sender",
            |_, c, (addr, args): (String, Option<Value>)| {
                let args = esmtp_args(args)?;
                c.queue("ctx:change_sender", Edit::ChangeSender(addr, args))
            },
        );
        methods.add_method_mut("replace_body", |_, c, body: mlua::LuaString| {
            c.queue(
                "ctx:replace_body",
                Edit::ReplaceBody(body.as_bytes().to_vec()),
            )
        });
        methods.add_method_mut("quarantine", |_, c, reason: String| {
            c.queue("ctx:quarantine", Edit::Quarantine(reason))
        });
        methods.add_method("progress", |_, c, ()| match (&c.progress, c.stage) {
            (Some(tx), Some(Stage::Eom)) => {
                // The receiver lives as long as the eom call; a closed channel means eom ended.
                let _ = tx.send(());
                Ok(())
            }
            _ => Err(mlua::Error::runtime(format!(
                "ctx:progress is only available in stage 'eom', not '{}'",
                c.stage_name()
            ))),
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
