//! Creating a Lua state that policies may run in: a library allow-list, no file or process
//! access, `require` limited to built-in modules and the policy directories, a memory cap,
//! `pcall`/`xpcall` that cannot swallow the time limit, and the standard library and built-in
//! modules read-only.

use crate::{
    lua_api,
    services::{Services, site::Site},
};
use mlua::{
    HookTriggers, Lua, LuaOptions, StdLib, Table, Value, VmState, chunk::ChunkMode, debug::Debug,
};
use std::{
    path::PathBuf,
    sync::{
        Arc, LazyLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// Instructions between two checks of the time limit inside running Lua code.
const HOOK_INTERVAL: u32 = 1000;

/// A deadline shared with the hook of a coroutine: the hook is installed once per coroutine
/// (installing one costs an allocation and a registry write) and each call sets the deadline.
#[derive(Clone)]
pub struct Deadline(Arc<AtomicU64>);

/// The origin of [`Deadline`]'s clock.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

impl Deadline {
    /// A deadline at `at`.
    pub fn new(at: Instant) -> Deadline {
        let deadline = Deadline(Arc::new(AtomicU64::new(0)));
        deadline.set(at);
        deadline
    }

    /// Moves the deadline to `at`.
    pub fn set(&self, at: Instant) {
        let nanos = at.saturating_duration_since(*EPOCH).as_nanos();
        self.0
            .store(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn passed(&self) -> bool {
        let nanos = self.0.load(Ordering::Relaxed);
        EPOCH.elapsed() >= Duration::from_nanos(nanos)
    }
}

/// The instruction-count hook that enforces `deadline`: once past it, every check raises the
/// time-limit error again, so a `pcall` that catches one cannot keep the code running.
pub fn deadline_hook(
    deadline: Deadline,
) -> (
    HookTriggers,
    impl Fn(&Lua, &Debug) -> mlua::Result<VmState> + Send + 'static,
) {
    let hook = move |_: &Lua, _: &Debug| {
        if deadline.passed() {
            Err(mlua::Error::runtime(TIME_LIMIT_MARKER))
        } else {
            Ok(VmState::Continue)
        }
    };
    (
        HookTriggers::new().every_nth_instruction(HOOK_INTERVAL),
        hook,
    )
}

/// Runs `f` (code on the state's main thread, such as a policy's top level) under a time limit.
pub fn with_time_limit<R>(
    lua: &Lua,
    limit: Duration,
    f: impl FnOnce() -> mlua::Result<R>,
) -> mlua::Result<R> {
    let (triggers, hook) = deadline_hook(Deadline::new(Instant::now() + limit));
    lua.set_hook(triggers, hook)?;
    let result = f();
    lua.remove_hook();
    result
}

/// Marker carried by the error the time-limit hook raises; the `pcall` wrappers re-raise it.
pub const TIME_LIMIT_MARKER: &str = "luamilter: time limit exceeded";

const LOADED_KEY: &str = "luamilter.loaded";

/// Lua prelude run in every state: `os` reduced to time functions, `print` sent to the log, and
/// `pcall`/`xpcall` that pass the time-limit and out-of-memory errors on instead of catching
/// them (a policy cannot recover from either; the exception policy answers).
const PRELUDE: &str = r#"
local raw_pcall, raw_xpcall, error, tostring, find = pcall, xpcall, error, tostring, string.find
local MARK = ...
local function is_limit(e)
  local text = tostring(e)
  return find(text, MARK, 1, true) ~= nil or find(text, "not enough memory", 1, true) ~= nil
end
local function check(ok, ...)
  if not ok and is_limit((...)) then error((...), 0) end
  return ok, ...
end
pcall = function(f, ...) return check(raw_pcall(f, ...)) end
xpcall = function(f, handler, ...)
  return check(raw_xpcall(f, function(e)
    if is_limit(e) then return e end
    return handler(e)
  end, ...))
end
local os_time, os_clock, os_date, os_difftime = os.time, os.clock, os.date, os.difftime
os = { time = os_time, clock = os_clock, date = os_date, difftime = os_difftime }

-- Shared tables are read-only: one policy cannot change the standard library or a built-in
-- module under the others, or for later messages. A read-only table is an empty proxy (so
-- assigning any key reaches __newindex) whose metatable is hidden; rawset refuses proxies.
local raw_rawset, raw_setmetatable, rawget, next, type = rawset, setmetatable, rawget, next, type
local proxies = raw_setmetatable({}, { __mode = "k" })
local function read_only(t, name)
  if type(t) ~= "table" or proxies[t] then return t end
  for k, v in next, t do
    if type(v) == "table" then raw_rawset(t, k, read_only(v, name .. "." .. tostring(k))) end
  end
  local proxy = raw_setmetatable({}, {
    __index = t,
    __newindex = function(_, k)
      error(("%s is read-only: cannot set %s"):format(name, tostring(k)), 2)
    end,
    __pairs = function() return next, t, nil end,
    __len = function() return #t end,
    __metatable = false,
  })
  proxies[proxy] = true
  return proxy
end
-- The globals the sandbox provides are read-only too; a policy may still add globals of its own.
local G, builtins = _G, {}
rawset = function(t, k, v)
  if proxies[t] or (t == G and builtins[k] ~= nil) then
    error("rawset: the table is read-only", 2)
  end
  return raw_rawset(t, k, v)
end
-- Finalizers would run outside any handler (when the state closes, no time limit applies):
-- refused, like to-be-closed variables' __close they are not needed in a policy.
setmetatable = function(t, mt)
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
    error("setmetatable: __gc metamethods are not allowed in policies", 2)
  end
  return raw_setmetatable(t, mt)
end
for _, name in ipairs { "string", "table", "math", "utf8", "os", "coroutine" } do
  _G[name] = read_only(_G[name], name)
end
local string_meta = getmetatable("")
string_meta.__index = string
string_meta.__metatable = false
for k, v in next, G do builtins[k] = v end
for k in next, builtins do raw_rawset(G, k, nil) end
raw_setmetatable(G, {
  __index = builtins,
  __newindex = function(t, k, v)
    if builtins[k] ~= nil then error(("the global %s is read-only"):format(tostring(k)), 2) end
    raw_rawset(t, k, v)
  end,
  __metatable = false,
})
return read_only
"#;

/// Registry key of the prelude's `read_only(table, name)`, applied to built-in modules.
const READ_ONLY_KEY: &str = "luamilter.read_only";

/// `print` in a policy writes an info line to the log (policies have no standard output).
fn print_to_log(lua: &Lua) -> mlua::Result<mlua::Function> {
    lua.create_function(|_, parts: mlua::Variadic<Value>| {
        let text: Vec<String> = parts
            .iter()
            .map(|v| v.to_string().unwrap_or_else(|_| v.type_name().to_string()))
            .collect();
        tracing::info!(target: "luamilter::policy", "{}", text.join("\t"));
        Ok(())
    })
}

/// Creates a sandboxed state with a memory limit and a `require` that serves the built-in
/// modules over `services` and searches `dirs` for the rest.
pub fn new_state(
    memory_limit: usize,
    dirs: Vec<PathBuf>,
    services: Arc<Services>,
    site: Arc<Site>,
) -> mlua::Result<Lua> {
    // `coroutine` too: mlua's async functions need it, and loaded here it is made read-only.
    let libs = StdLib::TABLE
        | StdLib::STRING
        | StdLib::UTF8
        | StdLib::MATH
        | StdLib::OS
        | StdLib::COROUTINE;
    let lua = Lua::new_with(libs, LuaOptions::new())?;
    let globals = lua.globals();
    for name in ["dofile", "loadfile", "load", "collectgarbage"] {
        globals.raw_set(name, Value::Nil)?;
    }
    globals
        .get::<Table>("string")?
        .raw_set("dump", Value::Nil)?;
    lua.set_named_registry_value(LOADED_KEY, lua.create_table()?)?;
    globals.raw_set("require", require_function(&lua, dirs, services, site)?)?;
    globals.raw_set("print", print_to_log(&lua)?)?;
    let read_only: mlua::Function = lua
        .load(PRELUDE)
        .set_name("=luamilter prelude")
        .call(TIME_LIMIT_MARKER)?;
    lua.set_named_registry_value(READ_ONLY_KEY, read_only)?;

    lua.set_memory_limit(memory_limit)?;
    Ok(lua)
}

/// Loads a Lua source file as text (bytecode refused) with the chunk name `@path`, so every
/// error message reads `path:line:`.
pub fn load_file(lua: &Lua, path: &std::path::Path, source: &str) -> mlua::Result<mlua::Function> {
    lua.load(source)
        .set_name(format!("@{}", path.display()))
        .set_mode(ChunkMode::Text)
        .into_function()
}

fn require_function(
    lua: &Lua,
    dirs: Vec<PathBuf>,
    services: Arc<Services>,
    site: Arc<Site>,
) -> mlua::Result<mlua::Function> {
    lua.create_function(move |lua, name: String| {
        let first_nested = RequireLog::note(lua, &name);
        let loaded: Table = lua.named_registry_value(LOADED_KEY)?;
        if let Some(v) = loaded.raw_get::<Option<Value>>(name.as_str())? {
            return Ok(v);
        }
        let value = match lua_api::builtin_module(lua, &name, &services, &site) {
            Some(module) => lua
                .named_registry_value::<mlua::Function>(READ_ONLY_KEY)?
                .call((module?, name.as_str()))?,
            None => {
                let (value, mentions) = require_file(lua, &dirs, &name)?;
                RequireLog::loaded(lua, &name, mentions, first_nested);
                value
            }
        };
        loaded.raw_set(name.as_str(), &value)?;
        Ok(value)
    })
}

/// What `require` served while a policy loaded (its top level and its `setup(opts)`), so that a
/// policy whose module reads headers counts as reading them, and one that loaded `milter.dkim`
/// or `milter.dmarc` (itself or through a module) gets the message. Kept in the Lua state's app
/// data.
#[derive(Default)]
pub struct RequireLog {
    /// Whether a policy is loading: what handlers require is not logged.
    active: bool,
    /// Module names required since [`RequireLog::start`], in order (cached ones too).
    names: Vec<String>,
    /// What each file module loaded so far reads: its source, and what it required while
    /// loading.
    file_modules: std::collections::HashMap<String, Required>,
}

/// The built-in modules that read the message as received: a policy that requires one of them
/// while it loads has the MTA send headers and body, and the session keep the body.
pub const MESSAGE_MODULES: &[&str] = &["milter.dkim", "milter.dmarc"];

/// What a policy, or a module, required while it loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Required {
    /// A file module it required mentions headers.
    pub headers: bool,
    /// One of [`MESSAGE_MODULES`].
    pub message: bool,
}

impl RequireLog {
    /// Starts logging the requires of a policy's top level.
    pub fn start(lua: &Lua) {
        match lua.app_data_mut::<RequireLog>() {
            Some(mut log) => {
                log.names.clear();
                log.active = true;
            }
            None => {
                lua.set_app_data(RequireLog {
                    active: true,
                    ..RequireLog::default()
                });
            }
        }
    }

    /// Stops logging; what was required since `start`.
    pub fn finish(lua: &Lua) -> Required {
        let Some(mut log) = lua.app_data_mut::<RequireLog>() else {
            return Required::default();
        };
        log.active = false;
        let names = std::mem::take(&mut log.names);
        log.reads(&names)
    }

    /// What the modules `names` read.
    fn reads(&self, names: &[String]) -> Required {
        names.iter().fold(Required::default(), |acc, name| {
            let file = self.file_modules.get(name).copied().unwrap_or_default();
            Required {
                headers: acc.headers || file.headers,
                message: acc.message || file.message || MESSAGE_MODULES.contains(&name.as_str()),
            }
        })
    }

    /// Logs a `require` of `name` made while a policy loads; returns the log position of what
    /// it requires in turn.
    fn note(lua: &Lua, name: &str) -> usize {
        match lua.app_data_mut::<RequireLog>() {
            Some(mut log) if log.active => {
                log.names.push(name.to_string());
                log.names.len()
            }
            _ => 0,
        }
    }

    /// Records a file module loaded: it reads headers when its source mentions them, and
    /// whatever a module it required (logged from `nested` on) reads.
    fn loaded(lua: &Lua, name: &str, mentions: bool, nested: usize) {
        if let Some(mut log) = lua.app_data_mut::<RequireLog>() {
            let from = nested.min(log.names.len());
            let inherited = log.reads(&log.names[from..]);
            let reads = Required {
                headers: mentions || inherited.headers,
                message: inherited.message,
            };
            log.file_modules.insert(name.to_string(), reads);
        }
    }
}

/// Loads a module from the policy directories or the stock pack; also tells whether its source
/// mentions headers.
fn require_file(lua: &Lua, dirs: &[PathBuf], name: &str) -> mlua::Result<(Value, bool)> {
    let valid = !name.is_empty()
        && name.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        });
    if !valid {
        return Err(mlua::Error::runtime(format!(
            "require: invalid module name {name:?}"
        )));
    }
    let stem = name.replace('.', "/");
    let relative = format!("{stem}.lua");
    let found = dirs
        .iter()
        .map(|dir| dir.join(&relative))
        .find_map(|path| {
            std::fs::read_to_string(&path)
                .ok()
                .map(|source| (path, source))
        })
        .or_else(|| {
            crate::stock::get(&stem).map(|source| {
                (
                    PathBuf::from(format!("stock/{relative}")),
                    source.to_string(),
                )
            })
        });
    if let Some((path, source)) = found {
        let value: Value = load_file(lua, &path, &source)?.call(name)?;
        let value = if value.is_nil() {
            Value::Boolean(true)
        } else {
            value
        };
        return Ok((value, super::policy::mentions_headers(&source)));
    }
    Err(mlua::Error::runtime(format!(
        "require: module {name:?} not found (built-in modules: {}; searched {relative} in {})",
        lua_api::BUILTIN_MODULES.join(", "),
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sandboxed state whose store lives in a temp dir (kept alive by the returned guard).
    fn state(dirs: Vec<PathBuf>) -> (Lua, tempfile::TempDir, tokio::runtime::Runtime) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let config = crate::config::Config::parse("", Some(tmp.path().join("c.toml"))).unwrap();
        let services = {
            let _in = runtime.enter();
            Arc::new(Services::start(&config).unwrap())
        };
        (
            new_state(64 << 20, dirs, services, Arc::default()).unwrap(),
            tmp,
            runtime,
        )
    }

    #[test]
    fn dangerous_globals_are_gone_and_shared_tables_read_only() {
        let (lua, _tmp, _rt) = state(vec![]);
        let missing: bool = lua
            .load("return io == nil and debug == nil and load == nil and dofile == nil and loadfile == nil and string.dump == nil and os.execute == nil and os.getenv == nil and package == nil and collectgarbage == nil")
            .eval()
            .unwrap();
        assert!(missing);
        for change in [
            "string.upper = nil",
            "rawset(string, 'upper', nil)",
            "tostring = nil",
            "getmetatable('').__index = {}",
            "coroutine.wrap = nil",
            "require('milter').reject = nil",
            "setmetatable({}, { __gc = function() end })",
        ] {
            let err = lua.load(change).exec().unwrap_err();
            assert!(
                err.to_string().contains("read-only")
                    || err.to_string().contains("__gc")
                    || err.to_string().contains("attempt to index a boolean"),
                "{change}: {err}"
            );
        }
        let own: i64 = lua.load("my_global = 2; return my_global").eval().unwrap();
        assert_eq!(own, 2, "a policy may still add globals of its own");
        let t: i64 = lua.load("return os.time()").eval().unwrap();
        assert!(t > 1_600_000_000);
    }

    #[test]
    fn milter_fill_replaces_placeholders_in_strings_and_lines() {
        let (lua, _tmp, _rt) = state(vec![]);
        let out: String = lua
            .load(
                r#"local m = require "milter"
local one = m.fill("{user} may not use {sender}{missing}.", { user = "bob", sender = "<a@b>" })
local many = m.fill({ "a {n}", "b {n}" }, { n = 2 })
return one .. "|" .. table.concat(many, "|")"#,
            )
            .eval()
            .unwrap();
        assert_eq!(out, "bob may not use <a@b>.|a 2|b 2");
    }

    #[test]
    fn bytecode_is_refused() {
        let (lua, _tmp, _rt) = state(vec![]);
        let err = load_file(&lua, std::path::Path::new("x.lua"), "\x1bLua").unwrap_err();
        assert!(err.to_string().contains("binary chunk"), "{err}");
    }

    #[test]
    fn pcall_passes_the_time_limit_error_on() {
        let (lua, _tmp, _rt) = state(vec![]);
        let f = lua
            .create_function(|_, ()| -> mlua::Result<()> {
                Err(mlua::Error::runtime(TIME_LIMIT_MARKER))
            })
            .unwrap();
        lua.globals().set("limit", f).unwrap();
        let err = lua
            .load("local ok = pcall(limit) return 'caught'")
            .eval::<String>()
            .unwrap_err();
        assert!(err.to_string().contains(TIME_LIMIT_MARKER), "{err}");
        let caught: String = lua
            .load("local ok, e = pcall(error, 'other') return e")
            .eval()
            .unwrap();
        assert_eq!(caught, "other");
        let handled: String = lua
            .load(
                "local ok, e = xpcall(error, function(e) return 'handled ' .. e end, 'x') return e",
            )
            .eval()
            .unwrap();
        assert_eq!(handled, "handled x");
    }

    #[test]
    fn require_finds_builtin_and_policy_dir_modules() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("lib")).unwrap();
        std::fs::write(dir.path().join("lib/util.lua"), "return { answer = 42 }").unwrap();
        let (lua, _tmp, _rt) = state(vec![dir.path().to_path_buf()]);
        let n: i64 = lua
            .load("return require('lib.util').answer")
            .eval()
            .unwrap();
        assert_eq!(n, 42);
        let same: bool = lua
            .load("return require('milter') == require('milter')")
            .eval()
            .unwrap();
        assert!(same);
        let err = lua.load("require('../etc/passwd')").exec().unwrap_err();
        assert!(err.to_string().contains("invalid module name"), "{err}");
        let err = lua.load("require('nope')").exec().unwrap_err();
        assert!(err.to_string().contains("not found"), "{err}");
    }
}
