//! Hostile Lua through a real daemon: every way out of the sandbox that docs/lua-api/policy.md
//! closes, resource bombs, yields where none may happen, games with shared tables, and a `ctx`
//! kept from one message for another. Each attack is a fault answered by the exception policy,
//! and the next message, on the same Lua state, finds everything as it was.

use crate::support::{TestDaemon, reply_text};
use indymilter_test::Status;
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

/// Attacks chosen by the sender's local part; `probe` checks that nothing changed.
const HOSTILE: &str = r#"
local milter = require "milter"
local attacks = {
  io = function() return io.open("/etc/passwd") end,
  os_execute = function() return os.execute("id") end,
  os_getenv = function() return os.getenv("HOME") end,
  os_exit = function() os.exit(1) end,
  debug = function() return debug.getregistry() end,
  package = function() return package.loadlib("libc.so.6", "system") end,
  coroutine_yield = function() coroutine.yield("accept") end,
  coroutine_async = function() coroutine.wrap(function() milter.sleep(0.01) end)() end,
  coroutine_resume = function()
    local co = coroutine.create(function() milter.sleep(0.01); return 1 end)
    assert(coroutine.resume(co))
  end,
  load = function() return load("return 1") end,
  loadfile = function() return loadfile("/etc/passwd") end,
  dofile = function() return dofile("/etc/passwd") end,
  collectgarbage = function() collectgarbage("stop") end,
  string_dump = function() return string.dump(function() end) end,
  require_path = function() return require "../../etc/passwd" end,
  require_bytecode = function() return require "bytecode" end,
  rep_huge = function() return #string.rep("x", 1 << 40) end,
  rep_memory = function() return #string.rep("x", 1 << 26) end,
  concat_doubling = function() local s = "x"; for _ = 1, 40 do s = s .. s end end,
  table_growth = function() local t = {}; for i = 1, 1e8 do t[i] = i end end,
  recursion = function() local function f(n) return f(n + 1) + 1 end; return f(1) end,
  pcall_recursion = function() local function f() local _, e = pcall(f); error(e, 0) end; f() end,
  gsub_bomb = function() return ("x"):rep(1e6):gsub("x", function() return ("y"):rep(100) end) end,
  yield_in_sort = function() table.sort({ 3, 2, 1 }, function(a, b) milter.sleep(0) return a < b end) end,
  yield_in_gsub = function() ("abc"):gsub(".", function() milter.sleep(0) end) end,
  string_metatable = function() getmetatable("").__index.upper = function() return "pwned" end end,
  string_library = function() string.upper = function() return "pwned" end end,
  global_function = function() tostring = function() return "pwned" end end,
  module_table = function() milter.reject = function() return nil end end,
  finalizer = function() setmetatable({}, { __gc = function() while true do end end }) end,
}

local kept_ctx
return {
  mail = function(ctx, sender)
    local kind = sender:match("^([%w_]+)@")
    if kind == "keep" then kept_ctx = ctx; ctx.msg.secret = "message one"; return end
    if kind == "stale" then return milter.reject{ text = "read " .. tostring(kept_ctx.sender) } end
    if kind == "probe" then
      assert(("x"):upper() == "X", "string metatable changed")
      assert(string.upper("x") == "X", "string library changed")
      assert(tostring(1) == "1", "tostring changed")
      assert(ctx.msg.secret == nil, "ctx.msg leaked between messages")
      return milter.reject{ text = "probe ok" }
    end
    local attack = attacks[kind]
    if attack then attack() end
  end,
}
"#;

const LIMITS: &str =
    "[engine]\ntime_limit = \"500ms\"\nmemory_limit_mib = 32\nvms = 1\nworker_threads = 1\n";

const TEMPFAIL: &str = "451 4.3.0 Temporary policy failure, try again later";

async fn mail(d: &TestDaemon, sender: &str) -> String {
    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::new(192, 0, 2, 1)).await.unwrap();
    let status = c.mail([format!("<{sender}@example.org>")]).await.unwrap();
    if status == Status::Continue {
        "continue".into()
    } else {
        reply_text(&status)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attack_is_a_fault_and_the_next_message_finds_nothing_changed() {
    let dir = tempfile::TempDir::new().unwrap();
    std::fs::write(dir.path().join("bytecode.lua"), b"\x1bLua\x54\x00").unwrap();
    let d = TestDaemon::start_in(dir, &[("hostile", HOSTILE)], LIMITS, "inet:0@127.0.0.1")
        .await
        .unwrap();
    assert_eq!(mail(&d, "probe").await, "550 5.7.1 probe ok");
    let attacks = [
        "io",
        "os_execute",
        "os_getenv",
        "os_exit",
        "debug",
        "package",
        "load",
        "loadfile",
        "dofile",
        "collectgarbage",
        "string_dump",
        "require_path",
        "require_bytecode",
        "rep_huge",
        "rep_memory",
        "concat_doubling",
        "table_growth",
        "recursion",
        "pcall_recursion",
        "gsub_bomb",
        "yield_in_sort",
        "yield_in_gsub",
        "string_metatable",
        "string_library",
        "global_function",
        "module_table",
        "finalizer",
    ];
    let mut failures = Vec::new();
    for attack in attacks {
        let started = Instant::now();
        let answer = mail(&d, attack).await;
        let took = started.elapsed();
        let probe = mail(&d, "probe").await;
        if answer != TEMPFAIL || probe != "550 5.7.1 probe ok" || took > Duration::from_secs(3) {
            failures.push(format!(
                "{attack}: {answer:?} in {took:?}, then probe {probe:?}"
            ));
        }
    }
    // Coroutines are allowed (the library is read-only): one that yields or waits inside a
    // handler changes nothing for the handler's answer.
    for trick in ["coroutine_yield", "coroutine_async", "coroutine_resume"] {
        let answer = mail(&d, trick).await;
        let probe = mail(&d, "probe").await;
        if answer != "continue" || probe != "550 5.7.1 probe ok" {
            failures.push(format!("{trick}: {answer:?}, then probe {probe:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ctx_kept_from_another_message_cannot_be_read() {
    let d = TestDaemon::start(&[("hostile", HOSTILE)], LIMITS).await;
    let mut first = d.client().await;
    first
        .connect("h", Ipv4Addr::new(192, 0, 2, 1))
        .await
        .unwrap();
    assert_eq!(
        first.mail(["<keep@example.org>"]).await.unwrap(),
        Status::Continue
    );
    // The first connection is still open (its message in progress) when another one reads the
    // kept ctx, and when its own next message looks at ctx.msg.
    assert_eq!(mail(&d, "stale").await, TEMPFAIL);
    first.abort().await.unwrap();
    assert_eq!(
        reply_text(&first.mail(["<probe@example.org>"]).await.unwrap()),
        "550 5.7.1 probe ok"
    );
    d.stop().await;
}
