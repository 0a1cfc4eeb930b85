//! One policy file: finding it, running its top level, and checking the table it returns.
//!
//! A policy returns a table whose keys are the stage handlers plus these declarations:
//! `name` (must match the file), `description`, `options` (defaults), `needs` (`"headers"`: have
//! the MTA send headers although nothing visible in the source reads them; `"body"`: have it
//! send the body and keep it for `milter.dkim`, which a policy that requires `milter.dkim` or
//! `milter.dmarc` while it loads, at its top level or in `setup`, gets without declaring it;
//! `"rejected_recipients"`: see recipients the MTA refused itself), `noreply` (stages whose
//! handlers never answer), `macros` (per stage, the macros to ask the MTA for), `setup` (a
//! function run at load with the effective options, to check them or precompute from them; an
//! error there is a load error).

use super::options::{self, Override};
use super::sandbox;
use crate::{
    config::Config,
    stage::{Stage, StageMap},
};
use mlua::{Function, Lua, Table, Value};
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

/// The keys of a policy table other than its stage handlers.
pub const DECLARATION_KEYS: &[&str] = &[
    "name",
    "description",
    "options",
    "needs",
    "noreply",
    "macros",
    "setup",
];
/// The `[policy.NAME]` key that sets the policy's mode rather than an option.
const MODE_KEY: &str = "mode";

/// What `needs` can name. "headers": the MTA sends headers (normally known from the source,
/// see [`mentions_headers`]). "rejected_recipients": recipients the MTA itself refused (unknown
/// users) are passed to rcpt handlers too, with the macro {rcpt_mailer} = "error" (Postfix);
/// they never join ctx.recipients. "body": the MTA sends the body and the session keeps it (up to
/// `[dkim] max_body` bytes) for `milter.dkim` and `milter.dmarc` (normally known from what the
/// policy requires while it loads, see [`sandbox::RequireLog`]). The envelope entries are
/// accepted and change nothing: the envelope is always sent.
const NEEDS: &[&str] = &[
    "headers",
    "body",
    "rejected_recipients",
    "client",
    "helo",
    "sender",
    "recipients",
];

/// Where a policy's source came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A site file, in a configured policy directory.
    Site,
    /// A site file that shadows the stock policy of the same name.
    ShadowsStock,
    /// The stock pack built into the binary.
    Stock,
}

/// A policy's source: its name, file and text.
#[derive(Clone, Debug)]
pub struct PolicySource {
    /// The name in `policies.chain`.
    pub name: String,
    /// The file it was read from (`stock/NAME.lua` for the built-in pack).
    pub path: PathBuf,
    /// The file's text.
    pub text: String,
    /// Site file or stock pack.
    pub origin: Origin,
}

impl PolicySource {
    /// Finds `NAME.lua` in the first directory that has it, else in the stock pack.
    pub fn find(name: &str, dirs: &[PathBuf]) -> Result<PolicySource, String> {
        let stock = crate::stock::get(name).filter(|_| !name.contains('/'));
        for dir in dirs {
            let path = dir.join(format!("{name}.lua"));
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    return Ok(PolicySource {
                        name: name.to_string(),
                        path,
                        text,
                        origin: if stock.is_some() {
                            Origin::ShadowsStock
                        } else {
                            Origin::Site
                        },
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(format!("{}: cannot read: {e}", path.display())),
            }
        }
        if let Some(text) = stock {
            return Ok(PolicySource {
                name: name.to_string(),
                path: PathBuf::from(format!("stock/{name}.lua")),
                text: text.to_string(),
                origin: Origin::Stock,
            });
        }
        Err(format!(
            "policy {name:?} not found: no {name}.lua in {} nor in the stock pack",
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

/// What a policy declares, the same in every Lua state of a generation.
#[derive(Clone, Debug)]
pub struct PolicyDecl {
    /// Policy name.
    pub name: String,
    /// Source file.
    pub path: PathBuf,
    /// Site file or stock pack.
    pub origin: Origin,
    /// Which stages it handles.
    pub handles: StageMap<bool>,
    /// Stages whose handlers are declared not to answer.
    pub noreply: Vec<Stage>,
    /// Whether it reads headers: its source (or a module it requires) mentions them, or it
    /// declares `needs = { "headers" }`.
    pub reads_headers: bool,
    /// Shadow mode (`[policy.NAME] mode = "shadow"`): its verdicts are logged and counted,
    /// never enforced, and its edits dropped.
    pub shadow: bool,
    /// Whether it wants the recipients the MTA refused itself (`needs` "rejected_recipients").
    pub rejected_recipients: bool,
    /// Whether it reads the message as received (it required `milter.dkim` or `milter.dmarc`
    /// while it loaded, or declares `needs` "body"): headers and body are sent and the body
    /// kept.
    pub reads_body: bool,
    /// Macros to request, per stage.
    pub macros: BTreeMap<Stage, Vec<String>>,
    /// Effective options, rendered for `luamilter check`.
    pub options: BTreeMap<String, String>,
}

/// A policy loaded into one Lua state: its handlers and effective options.
pub struct LoadedPolicy {
    /// Handler per stage.
    pub handlers: StageMap<Option<Function>>,
    /// The options table passed as the last argument of every handler.
    pub options: Table,
}

/// Runs a policy's top level in `lua` and checks its table. Returns every problem found.
pub fn load(
    lua: &Lua,
    source: &PolicySource,
    config: &Config,
) -> Result<(PolicyDecl, LoadedPolicy), Vec<String>> {
    let at = source.path.display().to_string();
    let one = |e: mlua::Error| {
        let line = first_line(&e.to_string());
        if line.contains(sandbox::TIME_LIMIT_MARKER) {
            return vec![format!(
                "{at}: the top level ran longer than engine.time_limit ({:?}); a policy's top level only declares",
                config.engine.time_limit
            )];
        }
        vec![
            line.strip_prefix("runtime error: ")
                .unwrap_or(&line)
                .to_string(),
        ]
    };
    let chunk = sandbox::load_file(lua, &source.path, &source.text).map_err(one)?;
    sandbox::RequireLog::start(lua);
    let returned =
        sandbox::with_time_limit(lua, config.engine.time_limit, || chunk.call::<Value>(()));
    // What setup(opts) requires counts too: the log runs until the policy is loaded.
    let loaded = load_table(lua, source, config, returned.map_err(&one));
    let required = sandbox::RequireLog::finish(lua);
    let (mut decl, policy) = loaded?;
    decl.reads_headers |= required.headers || required.message;
    decl.reads_body |= required.message;
    Ok((decl, policy))
}

/// Checks the table a policy's top level `returned`, computes its effective options and runs
/// its `setup(opts)`.
fn load_table(
    lua: &Lua,
    source: &PolicySource,
    config: &Config,
    returned: Result<Value, Vec<String>>,
) -> Result<(PolicyDecl, LoadedPolicy), Vec<String>> {
    let at = source.path.display().to_string();
    let table = match returned? {
        Value::Table(t) => t,
        other => {
            return Err(vec![format!(
                "{at}: a policy must return a table of handlers, got {}",
                other.type_name()
            )]);
        }
    };
    let mut errors = Vec::new();
    let mut handlers: StageMap<Option<Function>> = StageMap::default();
    let mut declared_options = None;
    let mut setup: Option<Function> = None;
    let mut decl = PolicyDecl {
        name: source.name.clone(),
        path: source.path.clone(),
        origin: source.origin,
        handles: StageMap::default(),
        noreply: Vec::new(),
        reads_headers: mentions_headers(&source.text),
        shadow: false,
        rejected_recipients: false,
        reads_body: false,
        macros: BTreeMap::new(),
        options: BTreeMap::new(),
    };
    for pair in table.pairs::<Value, Value>() {
        let (key, value) = match pair {
            Ok(kv) => kv,
            Err(e) => {
                errors.push(format!("{at}: {e}"));
                continue;
            }
        };
        let Value::String(key) = key else {
            errors.push(format!(
                "{at}: policy table keys must be strings, got a {}",
                key.type_name()
            ));
            continue;
        };
        let key = key.to_string_lossy();
        if let Some(stage) = Stage::from_name(&key) {
            match value {
                Value::Function(f) => {
                    decl.handles[stage] = true;
                    handlers[stage] = Some(f);
                }
                other => errors.push(format!(
                    "{at}: handler '{key}' must be a function, got a {}",
                    other.type_name()
                )),
            }
            continue;
        }
        let result = match key.as_str() {
            "name" => check_name(&value, &source.name),
            "description" => match value {
                Value::String(_) => Ok(()),
                other => Err(format!(
                    "'description' must be a string, got a {}",
                    other.type_name()
                )),
            },
            "options" => match value {
                Value::Table(t) if t.contains_key(MODE_KEY).unwrap_or(false) => Err(format!(
                    "option name '{MODE_KEY}' is reserved: [policy.NAME] {MODE_KEY} sets \
                     shadow or enforce mode"
                )),
                Value::Table(t) => {
                    declared_options = Some(t);
                    Ok(())
                }
                other => Err(format!(
                    "'options' must be a table of defaults, got a {}",
                    other.type_name()
                )),
            },
            "needs" => string_list(&value, "needs").and_then(|items| {
                for item in items {
                    if !NEEDS.contains(&item.as_str()) {
                        return Err(format!(
                            "'needs' entry {item:?} is unknown (known: {})",
                            NEEDS.join(", ")
                        ));
                    }
                    decl.reads_headers |= item == "headers";
                    decl.rejected_recipients |= item == "rejected_recipients";
                    decl.reads_body |= item == "body";
                    decl.reads_headers |= item == "body";
                }
                Ok(())
            }),
            "noreply" => string_list(&value, "noreply").and_then(|items| {
                for item in items {
                    match Stage::from_name(&item) {
                        Some(s) if s.has_reply() && s != Stage::Eom => decl.noreply.push(s),
                        _ => {
                            return Err(format!(
                                "'noreply' entry {item:?} is not a stage that can skip its reply"
                            ));
                        }
                    }
                }
                Ok(())
            }),
            "macros" => parse_macros(&value).map(|m| decl.macros = m),
            "setup" => match value {
                Value::Function(f) => {
                    setup = Some(f);
                    Ok(())
                }
                other => Err(format!(
                    "'setup' must be a function(opts), got a {}",
                    other.type_name()
                )),
            },
            _ => Err(unknown_key_message(&key)),
        };
        if let Err(e) = result {
            errors.push(format!("{at}: {e}"));
        }
    }
    for stage in &decl.noreply {
        if !decl.handles[*stage] {
            errors.push(format!(
                "{at}: 'noreply' names stage '{stage}' but the policy has no {stage} handler"
            ));
        }
    }
    let declared_options = match declared_options {
        Some(t) => t,
        None => lua.create_table().map_err(|e| vec![format!("{at}: {e}")])?,
    };
    let mut overrides: Vec<Override<'_>> = config
        .policy
        .get(&source.name)
        .into_iter()
        .flatten()
        .map(|(k, v)| Override {
            key: k,
            value: v.get_ref(),
            at: config.source.locate(v.span().start),
        })
        .collect();
    // `mode` is the engine's, not an option of the policy.
    if let Some(i) = overrides.iter().position(|o| o.key == MODE_KEY) {
        let mode = overrides.remove(i);
        match mode.value.as_str() {
            Some("enforce") => decl.shadow = false,
            Some("shadow") => decl.shadow = true,
            _ => errors.push(format!(
                "{}: [policy.{}] mode must be \"enforce\" or \"shadow\", got {}",
                mode.at, source.name, mode.value
            )),
        }
    }
    let effective =
        match options::effective_options(lua, &source.name, &declared_options, &overrides) {
            Ok(t) => Some(t),
            Err(mut es) => {
                errors.append(&mut es);
                None
            }
        };
    match effective {
        Some(options) if errors.is_empty() => {
            decl.options = options::describe_options(&options);
            // `setup(opts)` checks the effective options (and may precompute into them) at
            // load, so a bad option is reported by `check` and refused by a reload.
            if let Some(setup) = setup {
                let checked = sandbox::with_time_limit(lua, config.engine.time_limit, || {
                    setup.call::<()>(&options)
                });
                if let Err(e) = checked {
                    let line = first_line(&e.to_string());
                    let line = line.strip_prefix("runtime error: ").unwrap_or(&line);
                    let located = if line.starts_with(&at) {
                        line.to_string()
                    } else {
                        format!("{at}: setup: {line}")
                    };
                    return Err(vec![located]);
                }
            }
            Ok((decl, LoadedPolicy { handlers, options }))
        }
        _ => Err(errors),
    }
}

fn check_name(value: &Value, expected: &str) -> Result<(), String> {
    match value {
        Value::String(s) if s.to_string_lossy() == expected => Ok(()),
        Value::String(s) => Err(format!(
            "'name' is {:?} but the file is {expected}.lua; the chain refers to policies by file name",
            s.to_string_lossy()
        )),
        other => Err(format!(
            "'name' must be a string, got a {}",
            other.type_name()
        )),
    }
}

fn string_list(value: &Value, what: &str) -> Result<Vec<String>, String> {
    let Value::Table(t) = value else {
        return Err(format!(
            "'{what}' must be a list of strings, got a {}",
            value.type_name()
        ));
    };
    t.sequence_values::<String>()
        .collect::<mlua::Result<Vec<_>>>()
        .map_err(|_| format!("'{what}' must be a list of strings"))
}

fn parse_macros(value: &Value) -> Result<BTreeMap<Stage, Vec<String>>, String> {
    let Value::Table(t) = value else {
        return Err(format!(
            "'macros' must be a table like {{ mail = {{\"{{auth_authen}}\"}} }}, got a {}",
            value.type_name()
        ));
    };
    let mut out = BTreeMap::new();
    for pair in t.pairs::<String, Value>() {
        let (stage_name, list) = pair.map_err(|e| format!("'macros': {e}"))?;
        let stage = match Stage::from_name(&stage_name) {
            Some(
                s @ (Stage::Connect
                | Stage::Helo
                | Stage::Mail
                | Stage::Rcpt
                | Stage::Data
                | Stage::Eoh
                | Stage::Eom),
            ) => s,
            _ => {
                return Err(format!(
                    "'macros' key {stage_name:?}: macros can be requested for connect, helo, mail, rcpt, data, eoh and eom"
                ));
            }
        };
        let names = string_list(&list, "macros")?;
        for n in &names {
            if n.is_empty() || n.contains(char::is_whitespace) {
                return Err(format!("'macros' entry {n:?} is not a macro name"));
            }
        }
        out.insert(stage, names);
    }
    Ok(out)
}

fn unknown_key_message(key: &str) -> String {
    let candidates = Stage::ALL
        .iter()
        .map(|s| s.name())
        .chain(DECLARATION_KEYS.iter().copied());
    let best = candidates
        .map(|c| (edit_distance(c, key), c))
        .min()
        .filter(|(d, _)| *d <= 2);
    match best {
        Some((_, c)) => format!("unknown key '{key}' in the policy table (did you mean '{c}'?)"),
        None => format!(
            "unknown key '{key}' in the policy table (stage handlers: {}; declarations: {})",
            Stage::ALL
                .iter()
                .map(|s| s.name())
                .collect::<Vec<_>>()
                .join(", "),
            DECLARATION_KEYS.join(", ")
        ),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Whether Lua source reads message headers: it mentions the word `header` or `headers`
/// (`ctx.headers`, `ctx:header("Subject")`). A mention in a comment only costs the MTA the
/// header packets; `ctx:add_header` and the other edits do not count.
pub fn mentions_headers(source: &str) -> bool {
    source
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|word| word == "header" || word == "headers")
}

/// The first line of a Lua error message (the traceback follows on later lines).
pub fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or("").trim().to_string()
}

/// `file:line` of a Lua function's definition.
pub fn defined_at(f: &Function, path: &Path) -> String {
    match f.info().line_defined {
        Some(line) => format!("{}:{line}", path.display()),
        None => path.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_reads_are_found_in_the_source() {
        assert!(mentions_headers("local s = ctx:header('Subject')"));
        assert!(mentions_headers("for _, h in ipairs(c.headers) do end"));
        assert!(!mentions_headers(
            "ctx:add_header('X-A', '1') ctx:delete_header('X-B')"
        ));
        assert!(!mentions_headers("local headerless, my_headers = 1, 2"));
    }

    #[test]
    fn suggests_the_nearest_key() {
        assert!(unknown_key_message("conect").contains("did you mean 'connect'"));
        assert!(unknown_key_message("optons").contains("did you mean 'options'"));
        assert!(unknown_key_message("zzzzzzzz").contains("stage handlers:"));
    }
}
