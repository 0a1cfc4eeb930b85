//! Editor stubs: lua-language-server (LuaLS) `---@meta` annotation files for the built-in
//! modules, `ctx`, verdicts and the policy table. They are the files under `stubs/` in the
//! repository, embedded here, and `luamilter stubs DIR` writes them with a `.luarc.json` that
//! points LuaLS at them (see `docs/editor.md`).
//!
//! They cannot drift from the API: the test below builds a sandboxed state as the engine does,
//! requires every module of [`BUILTIN_MODULES`](super::BUILTIN_MODULES), walks what each
//! registers (nested tables too), records what the userdata types (`ctx`, `ctx.client`,
//! verdicts, IP sets) register through their own `add_fields`/`add_methods`, asks the policy
//! loader which keys a policy table may have, and fails listing every registered name without
//! a stub and every stubbed name that is not registered.

use std::{
    io,
    path::{Path, PathBuf},
};

/// One stub file: its path in the stubs directory and its text.
pub struct StubFile {
    /// Path relative to the stubs directory, `/`-separated: `milter/dns.lua`.
    pub path: &'static str,
    /// The file's text.
    pub text: &'static str,
}

macro_rules! stub {
    ($path:literal) => {
        StubFile {
            path: $path,
            text: include_str!(concat!("../../stubs/", $path)),
        }
    };
}

/// Every stub file, laid out so that `require "milter.dns"` resolves to `milter/dns.lua` with
/// LuaLS's default `runtime.path` (`?.lua`, `?/init.lua`). `luamilter/` holds the classes no
/// module returns: `ctx` and the policy table.
pub const FILES: &[StubFile] = &[
    stub!("milter.lua"),
    stub!("milter/log.lua"),
    stub!("milter/dns.lua"),
    stub!("milter/spf.lua"),
    stub!("milter/net.lua"),
    stub!("milter/store.lua"),
    stub!("milter/site.lua"),
    stub!("milter/access.lua"),
    stub!("milter/mime.lua"),
    stub!("milter/smtp.lua"),
    stub!("milter/srs.lua"),
    stub!("milter/dkim.lua"),
    stub!("milter/dmarc.lua"),
    stub!("milter/archive.lua"),
    stub!("luamilter/ctx.lua"),
    stub!("luamilter/policy.lua"),
];

/// The name of the LuaLS project file written beside the stubs.
pub const LUARC: &str = ".luarc.json";

/// A `.luarc.json` that makes LuaLS read the stubs in `library` (an absolute path) and know the
/// sandbox: Lua 5.4, without `io` and `debug`.
pub fn luarc(library: &Path) -> String {
    let config = serde_json::json!({
        "runtime.version": "Lua 5.4",
        "runtime.builtin": { "io": "disable", "debug": "disable" },
        "workspace.library": [library.display().to_string()],
        "workspace.checkThirdParty": false,
    });
    let mut text = serde_json::to_string_pretty(&config).expect("a JSON value serializes");
    text.push('\n');
    text
}

/// Writes every stub file into `dir` (created if missing, files replaced), then `.luarc.json`
/// naming `dir` by its absolute path. Returns the paths written.
pub fn write(dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    let mut written = Vec::with_capacity(FILES.len() + 1);
    for file in FILES {
        let path = dir.join(file.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, file.text)?;
        written.push(path);
    }
    let path = dir.join(LUARC);
    std::fs::write(&path, luarc(&dir))?;
    written.push(path);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::Config,
        engine::{
            policy::{self, Origin, PolicySource},
            sandbox,
        },
        lua_api::{
            BUILTIN_MODULES, ctx, srs,
            verdict::{Verdict, VerdictKind},
        },
        services::{Services, net::IpSet},
        stage::Stage,
    };
    use mlua::{Lua, Table, UserData, Value};
    use std::{
        collections::{BTreeMap, BTreeSet},
        sync::Arc,
    };

    /// What a name is, as registered or as stubbed.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Kind {
        /// A function called with `.`: `dns.a(name)`.
        Function,
        /// A method called with `:`: `ctx:header(name)`.
        Method,
        /// A value: a string, a boolean, a field of a userdata or of a table.
        Value,
        /// A nested module table: `milter.log`, stubbed as `milter.log = require "milter.log"`.
        Module(String),
    }

    /// The names one `---@class` of the stubs documents.
    #[derive(Debug, Default)]
    struct Class {
        members: BTreeMap<String, Kind>,
        /// Where the class is declared, for messages.
        at: String,
    }

    /// What the stub files declare.
    #[derive(Debug, Default)]
    struct Stubs {
        classes: BTreeMap<String, Class>,
        /// `---@alias` of string literals: the literals.
        aliases: BTreeMap<String, BTreeSet<String>>,
        /// Per file, the class of the local it returns.
        returns: BTreeMap<String, String>,
    }

    /// The first word of `text` (up to a space, `(`, `:` or `<`).
    fn word(text: &str) -> &str {
        let end = text
            .find(|c: char| c.is_whitespace() || matches!(c, '(' | ':' | '<'))
            .unwrap_or(text.len());
        &text[..end]
    }

    /// String literals of a union type `"a"|"b"`, or `None` when it is anything else.
    fn literals(union: &str) -> Option<BTreeSet<String>> {
        union
            .split('|')
            .map(|part| {
                let part = part.trim();
                part.strip_prefix('"')
                    .and_then(|p| p.strip_suffix('"'))
                    .map(str::to_string)
            })
            .collect()
    }

    /// Reads the declarations of the stub files: `---@class` with its `---@field`s, the local a
    /// class annotates (`local dns = {}`), `function dns.a(`, `function Ctx:header(`,
    /// `milter.log = require "milter.log"`, `---@alias` and `return dns`. Anything it does not
    /// understand outside comments fails, so the stubs stay in the shapes it checks.
    fn parse(files: &[StubFile]) -> Stubs {
        let mut stubs = Stubs::default();
        for file in files {
            let mut locals: BTreeMap<&str, String> = BTreeMap::new();
            let mut class: Option<String> = None;
            for (n, line) in file.text.lines().enumerate() {
                let at = format!("stubs/{}:{}", file.path, n + 1);
                let line = line.trim_end();
                if let Some(rest) = line.strip_prefix("---@class ") {
                    let name = word(rest).to_string();
                    let previous = stubs.classes.insert(
                        name.clone(),
                        Class {
                            members: BTreeMap::new(),
                            at: at.clone(),
                        },
                    );
                    assert!(previous.is_none(), "{at}: class {name} declared twice");
                    class = Some(name);
                } else if let Some(rest) = line.strip_prefix("---@field ") {
                    let Some(name) = &class else {
                        panic!("{at}: ---@field outside a ---@class block");
                    };
                    let field = word(rest);
                    let ty = rest[field.len()..].trim_start();
                    let kind = if ty.starts_with("fun(") {
                        Kind::Function
                    } else {
                        Kind::Value
                    };
                    let field = field.trim_end_matches('?').to_string();
                    let members = &mut stubs.classes.get_mut(name).unwrap().members;
                    assert!(
                        members.insert(field.clone(), kind).is_none(),
                        "{at}: {name}.{field} stubbed twice"
                    );
                } else if let Some(rest) = line.strip_prefix("---@alias ") {
                    class = None;
                    let name = word(rest);
                    if let Some(set) = literals(&rest[name.len()..]) {
                        stubs.aliases.insert(name.to_string(), set);
                    }
                } else if line.starts_with("---") {
                    // Documentation or another annotation: the block goes on.
                } else if line.is_empty() || line.starts_with("--") {
                    class = None;
                } else if let Some(rest) = line.strip_prefix("local ") {
                    let (var, value) = rest.split_once(" = ").unwrap_or((rest, ""));
                    assert_eq!(
                        value, "{}",
                        "{at}: a stub local is a table: local {var} = {{}}"
                    );
                    let owner = class
                        .take()
                        .unwrap_or_else(|| panic!("{at}: local {var} follows no ---@class"));
                    locals.insert(var, owner);
                } else if let Some(rest) = line.strip_prefix("function ") {
                    let (var, method, rest) = match rest.split_once(['.', ':']) {
                        Some((var, tail)) => (var, rest.as_bytes()[var.len()] == b':', tail),
                        None => panic!("{at}: a stub function belongs to a class: {line}"),
                    };
                    let name = word(rest).to_string();
                    assert!(
                        rest[name.len()..].starts_with('(') && line.ends_with(" end"),
                        "{at}: expected `function {var}.name(args) end`: {line}"
                    );
                    let owner = locals
                        .get(var)
                        .unwrap_or_else(|| panic!("{at}: {var} is no class local of this file"));
                    let kind = if method { Kind::Method } else { Kind::Function };
                    let members = &mut stubs.classes.get_mut(owner).unwrap().members;
                    assert!(
                        members.insert(name.clone(), kind).is_none(),
                        "{at}: {owner}.{name} stubbed twice"
                    );
                    class = None;
                } else if let Some(var) = line.strip_prefix("return ") {
                    let owner = locals.get(var).unwrap_or_else(|| {
                        panic!("{at}: a stub module returns its class local, not {var}")
                    });
                    stubs.returns.insert(file.path.to_string(), owner.clone());
                } else if let Some((target, value)) = line.split_once(" = ") {
                    let (var, name) = target
                        .split_once('.')
                        .unwrap_or_else(|| panic!("{at}: expected `{target}` to be var.name"));
                    let owner = locals
                        .get(var)
                        .unwrap_or_else(|| panic!("{at}: {var} is no class local of this file"));
                    let module = value
                        .strip_prefix("require \"")
                        .and_then(|m| m.strip_suffix('"'))
                        .unwrap_or_else(|| {
                            panic!("{at}: a stub assignment is `{var}.{name} = require \"module\"`")
                        });
                    let members = &mut stubs.classes.get_mut(owner).unwrap().members;
                    members.insert(name.to_string(), Kind::Module(module.to_string()));
                    class = None;
                } else {
                    panic!("{at}: not a shape the stub check reads: {line}");
                }
            }
        }
        stubs
    }

    /// The names a userdata type registers, recorded by running its own `add_fields` and
    /// `add_methods` against this registry instead of mlua's.
    #[derive(Debug, Default)]
    struct Registered {
        fields: BTreeSet<String>,
        methods: BTreeSet<String>,
    }

    impl Registered {
        fn of<T: UserData>() -> Registered {
            let mut registered = Registered::default();
            T::add_fields(&mut registered);
            T::add_methods(&mut registered);
            registered
        }

        fn field(&mut self, name: impl Into<String>) {
            self.fields.insert(name.into());
        }

        fn method(&mut self, name: impl Into<String>) {
            self.methods.insert(name.into());
        }
    }

    // Metamethods (`__index`, `__tostring`) and setters are not names a policy reads.
    impl<T> mlua::UserDataFields<T> for Registered {
        fn add_field<V>(&mut self, name: impl Into<String>, _: V) {
            self.field(name);
        }
        fn add_field_method_get<M, R>(&mut self, name: impl Into<String>, _: M) {
            self.field(name);
        }
        fn add_field_method_set<M, A>(&mut self, _: impl Into<String>, _: M) {}
        fn add_field_function_get<F, R>(&mut self, name: impl Into<String>, _: F) {
            self.field(name);
        }
        fn add_field_function_set<F, A>(&mut self, _: impl Into<String>, _: F) {}
        fn add_meta_field<V>(&mut self, _: impl Into<String>, _: V) {}
        fn add_meta_field_with<F, R>(&mut self, _: impl Into<String>, _: F) {}
    }

    impl<T> mlua::UserDataMethods<T> for Registered {
        fn add_method<M, A, R>(&mut self, name: impl Into<String>, _: M) {
            self.method(name);
        }
        fn add_method_mut<M, A, R>(&mut self, name: impl Into<String>, _: M) {
            self.method(name);
        }
        fn add_async_method<M, A, MR, R>(&mut self, name: impl Into<String>, _: M) {
            self.method(name);
        }
        fn add_async_method_mut<M, A, MR, R>(&mut self, name: impl Into<String>, _: M) {
            self.method(name);
        }
        fn add_function<F, A, R>(&mut self, name: impl Into<String>, _: F) {
            self.method(name);
        }
        fn add_function_mut<F, A, R>(&mut self, name: impl Into<String>, _: F) {
            self.method(name);
        }
        fn add_async_function<F, A, FR, R>(&mut self, name: impl Into<String>, _: F) {
            self.method(name);
        }
        fn add_meta_method<M, A, R>(&mut self, _: impl Into<String>, _: M) {}
        fn add_meta_method_mut<M, A, R>(&mut self, _: impl Into<String>, _: M) {}
        fn add_async_meta_method<M, A, MR, R>(&mut self, _: impl Into<String>, _: M) {}
        fn add_async_meta_method_mut<M, A, MR, R>(&mut self, _: impl Into<String>, _: M) {}
        fn add_meta_function<F, A, R>(&mut self, _: impl Into<String>, _: F) {}
        fn add_meta_function_mut<F, A, R>(&mut self, _: impl Into<String>, _: F) {}
        fn add_async_meta_function<F, A, FR, R>(&mut self, _: impl Into<String>, _: F) {}
    }

    /// The userdata types scripts see, with the class that stubs each. A test below checks that
    /// the crate implements `UserData` for these and no others.
    fn userdata() -> Vec<(&'static str, &'static str, Registered)> {
        vec![
            ("Ctx", "luamilter.Ctx", Registered::of::<ctx::Ctx>()),
            (
                "Client",
                "luamilter.Client",
                Registered::of::<ctx::Client>(),
            ),
            ("Verdict", "luamilter.Verdict", Registered::of::<Verdict>()),
            ("IpSet", "luamilter.IpSet", Registered::of::<IpSet>()),
            (
                "Signer",
                "luamilter.SrsSigner",
                Registered::of::<srs::Signer>(),
            ),
        ]
    }

    /// The parsed stubs and a sandboxed state as the engine makes one, over real services
    /// (the SQLite store in a temp dir).
    struct Fixture {
        stubs: Stubs,
        runtime: tokio::runtime::Runtime,
        lua: Lua,
        config: Config,
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let dir = tempfile::tempdir().unwrap();
            let config = Config::parse("", Some(dir.path().join("luamilter.toml"))).unwrap();
            let services = {
                let _in = runtime.enter();
                Arc::new(Services::start(&config).unwrap())
            };
            let lua = sandbox::new_state(64 << 20, vec![], services, Arc::default()).unwrap();
            Fixture {
                stubs: parse(FILES),
                runtime,
                lua,
                config,
                dir,
            }
        }

        /// What the policy loader says about a policy whose file is `source`.
        fn load_errors(&self, source: &str) -> String {
            let source = PolicySource {
                name: "probe".into(),
                path: self.dir.path().join("probe.lua"),
                text: source.into(),
                origin: Origin::Site,
            };
            match policy::load(&self.lua, &source, &self.config) {
                Ok(_) => panic!("the probe policy loaded: {}", source.text),
                Err(errors) => errors.join("\n"),
            }
        }
    }

    /// Every file below `dir`, recursively.
    fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files.extend(files_under(&path));
            } else {
                files.push(path);
            }
        }
        files
    }

    fn kind_name(kind: &Kind) -> String {
        match kind {
            Kind::Function => "a function".into(),
            Kind::Method => "a method".into(),
            Kind::Value => "a value".into(),
            Kind::Module(m) => format!("the module {m}"),
        }
    }

    /// What a table holds: for a read-only proxy (the sandbox serves built-in modules so), the
    /// table behind it; `Table::pairs` sees only raw contents, which a proxy does not have.
    fn contents(table: &Table) -> Table {
        table
            .metatable()
            .and_then(|meta| meta.raw_get::<Table>("__index").ok())
            .filter(|_| table.raw_len() == 0)
            .unwrap_or_else(|| table.clone())
    }

    /// Compares what `table` holds (registered at `path`) with the stub class `class`.
    fn compare_table(
        path: &str,
        table: &Table,
        class: &str,
        stubs: &Stubs,
        problems: &mut Vec<String>,
    ) {
        let Some(stub) = stubs.classes.get(class) else {
            problems.push(format!(
                "{path}: registered, but no ---@class {class} stubs it"
            ));
            return;
        };
        let mut seen = BTreeSet::new();
        let table = contents(table);
        for pair in table.pairs::<String, Value>() {
            let (key, value) = pair.unwrap();
            let name = format!("{path}.{key}");
            let (registered, what) = match &value {
                Value::Function(_) => (Some(Kind::Function), "a function"),
                Value::Table(_) => (None, "a table"),
                _ => (Some(Kind::Value), "a value"),
            };
            match (stub.members.get(&key), &value) {
                (None, _) => problems.push(format!(
                    "{name}: registered ({what}), no stub in class {class} ({})",
                    stub.at
                )),
                (Some(Kind::Module(module)), Value::Table(nested)) => {
                    compare_table(&name, nested, module, stubs, problems);
                }
                (Some(kind), _) if Some(kind) == registered.as_ref() => {}
                (Some(kind), _) => problems.push(format!(
                    "{name}: registered as {what}, stubbed as {} in class {class}",
                    kind_name(kind)
                )),
            }
            seen.insert(key);
        }
        for name in stub.members.keys().filter(|k| !seen.contains(*k)) {
            problems.push(format!(
                "{path}.{name}: stubbed in class {class} ({}), not registered",
                stub.at
            ));
        }
    }

    /// Compares a userdata type's registered fields and methods with its stub class.
    fn compare_userdata(class: &str, registered: &Registered, stubs: &Stubs) -> Vec<String> {
        let mut problems = Vec::new();
        let Some(stub) = stubs.classes.get(class) else {
            return vec![format!("no ---@class {class} in the stubs")];
        };
        let live = registered
            .fields
            .iter()
            .map(|f| (f, Kind::Value))
            .chain(registered.methods.iter().map(|m| (m, Kind::Method)));
        let mut seen = BTreeSet::new();
        for (name, kind) in live {
            match stub.members.get(name) {
                None => problems.push(format!(
                    "{class}.{name}: registered ({}), not stubbed ({})",
                    kind_name(&kind),
                    stub.at
                )),
                Some(stubbed) if *stubbed != kind => problems.push(format!(
                    "{class}.{name}: registered as {}, stubbed as {}",
                    kind_name(&kind),
                    kind_name(stubbed)
                )),
                Some(_) => {}
            }
            seen.insert(name.clone());
        }
        for name in stub.members.keys().filter(|k| !seen.contains(*k)) {
            problems.push(format!(
                "{class}.{name}: stubbed ({}), not registered",
                stub.at
            ));
        }
        problems
    }

    /// Compares a set the API accepts with what the stubs declare for it.
    fn compare_set(
        what: &str,
        accepted: &BTreeSet<String>,
        stubbed: &BTreeSet<String>,
    ) -> Vec<String> {
        let mut problems: Vec<String> = accepted
            .difference(stubbed)
            .map(|n| format!("{what}: {n:?} accepted, not stubbed"))
            .collect();
        problems.extend(
            stubbed
                .difference(accepted)
                .map(|n| format!("{what}: {n:?} stubbed, not accepted")),
        );
        problems
    }

    /// The words of a list like "a, b, c and d" or "a, b".
    fn word_list(text: &str) -> BTreeSet<String> {
        text.replace(" and ", ", ")
            .split(',')
            .map(|w| w.trim().to_string())
            .filter(|w| !w.is_empty())
            .collect()
    }

    /// The text of `message` between `start` and the next `end`.
    fn between<'a>(message: &'a str, start: &str, end: char) -> &'a str {
        let from = message
            .find(start)
            .unwrap_or_else(|| panic!("the message changed: no {start:?} in {message:?}"))
            + start.len();
        let rest = &message[from..];
        &rest[..rest.find(end).unwrap_or(rest.len())]
    }

    fn members(stubs: &Stubs, class: &str) -> BTreeSet<String> {
        stubs.classes[class].members.keys().cloned().collect()
    }

    fn alias(stubs: &Stubs, name: &str) -> BTreeSet<String> {
        stubs
            .aliases
            .get(name)
            .unwrap_or_else(|| panic!("no ---@alias {name} of string literals in the stubs"))
            .clone()
    }

    #[test]
    fn every_registered_name_has_a_stub_and_every_stub_a_registered_name() {
        let fixture = Fixture::new();
        let (stubs, lua) = (&fixture.stubs, &fixture.lua);
        let mut problems = Vec::new();

        // The modules `require` serves, each stubbed by the file its name resolves to in LuaLS.
        for module in BUILTIN_MODULES {
            let file = format!("{}.lua", module.replace('.', "/"));
            match stubs.returns.get(&file) {
                Some(class) if class == module => {}
                Some(class) => {
                    problems.push(format!("stubs/{file} returns class {class}, not {module}"))
                }
                None => problems.push(format!(
                    "require {module:?}: no stubs/{file} returning its class"
                )),
            }
            let table: Table = lua
                .load(format!("return require {module:?}"))
                .eval()
                .unwrap();
            compare_table(module, &table, module, stubs, &mut problems);
        }
        let modules: BTreeSet<&str> = BUILTIN_MODULES.iter().copied().collect();
        for (file, class) in &stubs.returns {
            if !modules.contains(class.as_str()) {
                problems.push(format!("stubs/{file}: module {class} is not built in"));
            }
        }

        // ctx, ctx.client, verdicts, IP sets.
        for (_, class, registered) in userdata() {
            problems.extend(compare_userdata(class, &registered, stubs));
        }

        // The policy table: stage handlers (functions) and the loader's declarations.
        let message = fixture.load_errors("return { zzzzzzzzzzzz = true }");
        let handlers = word_list(between(&message, "stage handlers: ", ';'));
        let stages: BTreeSet<String> = Stage::ALL.iter().map(|s| s.name().into()).collect();
        assert_eq!(handlers, stages, "the loader's stage handlers");
        let declarations = word_list(between(&message, "declarations: ", ')'));
        let accepted: BTreeSet<String> = handlers.union(&declarations).cloned().collect();
        problems.extend(compare_set(
            "luamilter.Policy",
            &accepted,
            &members(stubs, "luamilter.Policy"),
        ));
        for (name, kind) in &stubs.classes["luamilter.Policy"].members {
            let function = handlers.contains(name) || name == "setup";
            if function != (*kind == Kind::Function) {
                problems.push(format!(
                    "luamilter.Policy.{name}: stubbed as {}",
                    kind_name(kind)
                ));
            }
        }
        let message = fixture.load_errors("return { needs = { 'zzz' } }");
        problems.extend(compare_set(
            "luamilter.Need",
            &word_list(between(&message, "known: ", ')')),
            &alias(stubs, "luamilter.Need"),
        ));
        let message = fixture.load_errors("return { macros = { zzz = {} } }");
        problems.extend(compare_set(
            "luamilter.Macros",
            &word_list(between(&message, "requested for ", '\n')),
            &members(stubs, "luamilter.Macros"),
        ));
        let noreply = Stage::ALL
            .iter()
            .filter(|s| s.has_reply() && **s != Stage::Eom)
            .map(|s| s.name().to_string())
            .collect();
        problems.extend(compare_set(
            "luamilter.NoreplyStage",
            &noreply,
            &alias(stubs, "luamilter.NoreplyStage"),
        ));
        problems.extend(compare_set(
            "luamilter.Stage",
            &stages,
            &alias(stubs, "luamilter.Stage"),
        ));
        let kinds = [
            VerdictKind::Accept,
            VerdictKind::Continue,
            VerdictKind::Reject,
            VerdictKind::Tempfail,
            VerdictKind::Discard,
        ];
        // A new kind breaks this match until it is listed above too.
        let _listed = |kind: VerdictKind| match kind {
            VerdictKind::Accept
            | VerdictKind::Continue
            | VerdictKind::Reject
            | VerdictKind::Tempfail
            | VerdictKind::Discard => (),
        };
        problems.extend(compare_set(
            "luamilter.VerdictKind",
            &kinds.iter().map(|k| k.name().to_string()).collect(),
            &alias(stubs, "luamilter.VerdictKind"),
        ));

        // The reply table of milter.reject{}: the fields its error names.
        let message = lua
            .load("require('milter').reject{ zzz = 1 }")
            .exec()
            .unwrap_err()
            .to_string();
        problems.extend(compare_set(
            "luamilter.Reply",
            &word_list(between(&message, "(use ", ')')),
            &members(stubs, "luamilter.Reply"),
        ));

        problems.sort();
        assert!(
            problems.is_empty(),
            "the stubs (stubs/, docs/editor.md) and the registered API differ:\n  {}",
            problems.join("\n  ")
        );
    }

    /// Tables the functions return: every key of a sample is a field of its stub class.
    #[test]
    fn returned_tables_have_only_stubbed_fields() {
        let fixture = Fixture::new();
        let (stubs, lua, runtime) = (&fixture.stubs, &fixture.lua, &fixture.runtime);
        let samples = [
            (
                "luamilter.Address",
                r#"return require("milter.net").parse_address("<a@b.example>")"#,
            ),
            (
                "luamilter.Mailbox",
                r#"return require("milter.mime").addresses('Team: "N" <a@b.example>;')[1]"#,
            ),
            (
                "luamilter.SpfResult",
                r#"return require("milter.spf").check_helo("192.0.2.1", "[192.0.2.1]")"#,
            ),
            (
                "luamilter.ListEntry",
                r#"local store = require "milter.store"
                   assert(store.ban("ip", "192.0.2.1", "probe", "1h"))
                   return store.banned("ip", "192.0.2.1")"#,
            ),
        ];
        let mut problems = Vec::new();
        for (class, chunk) in samples {
            let table: Table = runtime
                .block_on(lua.load(chunk).eval_async())
                .unwrap_or_else(|e| panic!("{class} sample: {e}"));
            let stubbed = members(stubs, class);
            for pair in table.pairs::<String, Value>() {
                let (key, _) = pair.unwrap();
                if !stubbed.contains(&key) {
                    problems.push(format!("{class}.{key}: returned, not stubbed"));
                }
            }
        }
        // The options store.greylist takes: every stubbed one is accepted.
        for option in members(stubs, "luamilter.GreylistOptions") {
            let chunk = format!(
                r#"return require("milter.store").greylist("192.0.2.9", "a@b.example",
                     "c@d.example", {{ {option} = 1 }})"#
            );
            if let Err(e) = runtime.block_on(lua.load(chunk).exec_async()) {
                problems.push(format!("luamilter.GreylistOptions.{option}: refused: {e}"));
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    /// Every `UserData` type of the crate is in [`userdata`], so none escapes the check.
    #[test]
    fn every_userdata_type_is_checked() {
        let mut found = BTreeSet::new();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        for path in files_under(&src) {
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            for line in std::fs::read_to_string(&path).unwrap().lines() {
                let Some(rest) = line.trim_start().strip_prefix("impl ") else {
                    continue;
                };
                let rest = rest.strip_prefix("mlua::").unwrap_or(rest);
                if let Some(name) = rest.strip_prefix("UserData for ") {
                    found.insert(word(name).to_string());
                }
            }
        }
        let checked: BTreeSet<String> = userdata().iter().map(|(t, ..)| t.to_string()).collect();
        assert_eq!(
            found, checked,
            "UserData types in src/ vs. the ones the stub check covers"
        );
    }

    /// Every file under `stubs/` is embedded, and only those.
    #[test]
    fn every_stub_file_is_embedded() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("stubs");
        let found: BTreeSet<String> = files_under(&root)
            .iter()
            .map(|path| {
                let relative = path.strip_prefix(&root).unwrap();
                relative.to_string_lossy().replace('\\', "/")
            })
            .collect();
        let embedded: BTreeSet<String> = FILES.iter().map(|f| f.path.to_string()).collect();
        assert_eq!(found, embedded, "files in stubs/ vs. stubs::FILES");
    }

    #[test]
    fn the_check_reads_what_it_is_meant_to() {
        let stubs = parse(&[StubFile {
            path: "milter/x.lua",
            text: "---@meta\n\n---@alias luamilter.X \"a\"|\"b\"\n\n---Doc.\n---@class milter.x\n---@field version string the version\n---@field f? fun(a: string): string\nlocal x = {}\n\n---@param a string\nfunction x.g(a) end\n\nx.log = require \"milter.log\"\n\n---@class luamilter.Y\nlocal Y = {}\n\nfunction Y:m() end\n\nreturn x\n",
        }]);
        let x = &stubs.classes["milter.x"].members;
        assert_eq!(x["version"], Kind::Value);
        assert_eq!(x["f"], Kind::Function);
        assert_eq!(x["g"], Kind::Function);
        assert_eq!(x["log"], Kind::Module("milter.log".into()));
        assert_eq!(stubs.classes["luamilter.Y"].members["m"], Kind::Method);
        assert_eq!(stubs.returns["milter/x.lua"], "milter.x");
        assert_eq!(
            stubs.aliases["luamilter.X"],
            BTreeSet::from(["a".to_string(), "b".to_string()])
        );
    }
}
