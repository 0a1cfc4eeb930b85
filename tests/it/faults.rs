//! Policy faults never become silent accepts and never take the daemon down; limits hold.

use crate::support::{TestDaemon, reply_text};
use indymilter_test::Status;
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

/// Faults chosen by the sender's local part.
const FAULTY: &str = r#"
local milter = require "milter"
return {
  mail = function(ctx, sender)
    local kind = sender:match("^([%w_]+)@")
    if kind == "error" then error("deliberate failure") end
    if kind == "nilindex" then local t = nil; return t.x end
    if kind == "string" then return "reject" end
    if kind == "table" then return { kind = "reject" } end
    if kind == "loop" then while true do end end
    if kind == "pcall_loop" then
      while true do pcall(function() while true do end end) end
    end
    if kind == "sort_loop" then
      local t = {3, 2, 1}
      table.sort(t, function(a, b) while true do end end)
    end
    if kind == "memory" then
      local t = {}
      for i = 1, 1e9 do t[i] = string.rep("x", 1024) .. i end
    end
    if kind == "pcall_memory" then
      pcall(function()
        local t = {}
        for i = 1, 1e9 do t[i] = string.rep("x", 1024) .. i end
      end)
      return nil
    end
    if kind == "badverdict" then return milter.reject{ code = 451 } end
    if kind == "badedit" then ctx:add_header("Bad Name", "x") end
    if kind == "sleep" then milter.sleep(5) end
  end,
  eom = function(ctx) ctx:add_header("X-Reached", "eom") end,
}
"#;

const LIMITS: &str = "[engine]\ntime_limit = \"300ms\"\nmemory_limit_mib = 32\nvms = 1\n";

async fn mail_status(d: &TestDaemon, sender: &str) -> Status {
    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap();
    c.mail([format!("<{sender}>")]).await.unwrap()
}

#[tokio::test]
async fn every_fault_kind_answers_by_the_exception_policy() {
    let d = TestDaemon::start(&[("faulty", FAULTY)], LIMITS).await;
    let tempfail = "451 4.3.0 Temporary policy failure, try again later";
    for kind in [
        "error",
        "nilindex",
        "string",
        "table",
        "loop",
        "pcall_loop",
        "sort_loop",
        "memory",
        "badverdict",
        "badedit",
        "sleep",
    ] {
        let started = Instant::now();
        let status = mail_status(&d, &format!("{kind}@example.org")).await;
        assert_eq!(reply_text(&status), tempfail, "fault kind {kind}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{kind} took {:?}",
            started.elapsed()
        );
    }
    // Still serving, and a healthy message passes.
    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap();
    assert_eq!(
        c.mail(["<fine@example.org>"]).await.unwrap(),
        Status::Continue
    );
    c.rcpt(["<r@example.org>"]).await.unwrap();
    let (actions, _) = c.eom().await.unwrap();
    assert!(actions.has_add_header("X-Reached", "eom"));
    d.stop().await;
}

#[tokio::test]
async fn exception_policy_continue_and_reject() {
    let d = TestDaemon::start(
        &[("faulty", FAULTY)],
        "[engine]\nexception_policy = \"continue\"\n",
    )
    .await;
    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap();
    assert_eq!(
        c.mail(["<error@example.org>"]).await.unwrap(),
        Status::Continue
    );
    c.rcpt(["<r@example.org>"]).await.unwrap();
    let (actions, _) = c.eom().await.unwrap();
    assert!(actions.has_add_header("X-Reached", "eom"));
    d.stop().await;

    let d = TestDaemon::start(
        &[("faulty", FAULTY)],
        "[engine]\nexception_policy = \"reject\"\n",
    )
    .await;
    assert_eq!(
        reply_text(&mail_status(&d, "string@example.org").await),
        "550 5.3.0 Policy failure"
    );
    d.stop().await;
}

#[tokio::test]
async fn a_broken_policy_is_refused_at_start_with_file_and_line() {
    let err = TestDaemon::try_start(
        &[(
            "broken",
            "return {\n  mail = function(ctx)\n    if then\n  end,\n}\n",
        )],
        "",
        "inet:0@127.0.0.1",
    )
    .await
    .err()
    .unwrap();
    assert!(err.contains("broken.lua:3:"), "{err}");
    let err = TestDaemon::try_start(
        &[("typo", "return { conect = function() end }")],
        "",
        "inet:0@127.0.0.1",
    )
    .await
    .err()
    .unwrap();
    assert!(
        err.contains(
            "typo.lua: unknown key 'conect' in the policy table (did you mean 'connect'?)"
        ),
        "{err}"
    );
    let err = TestDaemon::try_start(
        &[("toplevel", "local x = nil\nreturn x.y")],
        "",
        "inet:0@127.0.0.1",
    )
    .await
    .err()
    .unwrap();
    assert!(err.contains("toplevel.lua:2:"), "{err}");
}

#[tokio::test]
async fn sessions_on_one_vm_overlap_while_handlers_await() {
    let policy = r#"
local milter = require "milter"
return { connect = function(ctx) milter.sleep(0.2) end }
"#;
    let d = TestDaemon::start(&[("sleepy", policy)], "[engine]\nvms = 1\n").await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let client = d.client().await;
        tasks.push(tokio::spawn(async move {
            let mut c = client;
            c.connect("h", Ipv4Addr::LOCALHOST).await.unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), Status::Continue);
    }
    let elapsed = started.elapsed();
    // Serially this would take 50 x 200 ms = 10 s.
    assert!(
        elapsed < Duration::from_secs(3),
        "50 sleeping sessions took {elapsed:?}"
    );
    d.stop().await;
}

#[tokio::test]
async fn the_time_limit_covers_the_whole_stage_not_each_policy() {
    let slow = r#"
local milter = require "milter"
return { mail = function(ctx) milter.sleep(0.2) end }
"#;
    let d = TestDaemon::start(
        &[("slow1", slow), ("slow2", slow)],
        "[engine]\ntime_limit = \"300ms\"\n",
    )
    .await;
    let started = Instant::now();
    let status = mail_status(&d, "a@example.org").await;
    assert_eq!(
        reply_text(&status),
        "451 4.3.0 Temporary policy failure, try again later"
    );
    // A limit per handler would have let both 200 ms sleeps finish and the stage pass; the
    // bound below only guards against a hang.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    d.stop().await;
}

#[tokio::test]
async fn a_top_level_that_never_returns_is_stopped() {
    let err = TestDaemon::try_start(
        &[("spin", "while true do end\nreturn {}")],
        "[engine]\ntime_limit = \"300ms\"\n",
        "inet:0@127.0.0.1",
    )
    .await
    .err()
    .unwrap();
    assert!(
        err.contains("spin.lua: the top level ran longer than engine.time_limit"),
        "{err}"
    );
}

#[tokio::test]
async fn a_reused_coroutine_runs_under_its_own_deadline() {
    // One Lua state: after the first call, handlers run on coroutines an earlier one returned
    // from, whose deadline is long past by the time they run again.
    let counting = r#"
return {
  mail = function(ctx, sender)
    if sender:match("^loop@") then while true do end end
    local n = 0
    for i = 1, 200000 do n = n + i end
  end,
}
"#;
    let d = TestDaemon::start(
        &[("counting", counting)],
        "[engine]\ntime_limit = \"500ms\"\nvms = 1\n",
    )
    .await;
    for _ in 0..2 {
        assert_eq!(mail_status(&d, "a@example.org").await, Status::Continue);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(mail_status(&d, "b@example.org").await, Status::Continue);
        assert_eq!(
            reply_text(&mail_status(&d, "loop@example.org").await),
            "451 4.3.0 Temporary policy failure, try again later"
        );
    }
    d.stop().await;
}
