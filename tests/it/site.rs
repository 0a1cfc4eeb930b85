//! Site facts, the access map and delayed rejects, through a real milter client.

use crate::support::{TestDaemon, reply_text};
use indymilter::MacroStage;
use indymilter_test::Status;
use std::net::Ipv4Addr;

const FACTS: &str = r#"
local site = require "milter.site"
local access = require "milter.access"
local milter_access = require("milter").access
return {
  eom = function(ctx)
    local c = ctx.client
    ctx:add_header("X-Client", table.concat({
      tostring(c.internal), tostring(c.trusted), tostring(c.localhost),
      tostring(c.authenticated), tostring(c.ptr), tostring(c.dynamic) }, " "))
    ctx:add_header("X-Receiver", ctx.receiver)
    ctx:add_header("X-Site", tostring(site.internal_domain("a.example.net")) .. " " ..
      tostring(site.hello_blacklisted("MX.EXAMPLE.ORG")) .. " " .. tostring(site.internal_mta("192.168.1.10")))
    ctx:add_header("X-Access", tostring(milter_access.lookup("SPF-Neutral", "x@aol.com")) .. " " ..
      tostring(access.lookup("SMTP-Test", "foo@bar.baz.com")))
  end,
}"#;

const SITE: &str = r#"
[site]
hostname = "mx.example.org"
internal_networks = ["192.168.0.0/16"]
trusted_relays = ["198.51.100.7"]
internal_mtas = ["192.168.1.10"]
internal_domains = ["*.example.net"]
hello_blacklist = ["mx.example.org"]
access_file = "access"
[site.access]
"SPF-Neutral:aol.com" = "REJECT"
"#;

async fn facts(
    d: &TestDaemon,
    ip: Ipv4Addr,
    hostname: &str,
    auth: Option<&str>,
) -> indymilter_test::EomActions {
    let mut c = d.client().await;
    c.connect(hostname, ip).await.unwrap();
    if let Some(user) = auth {
        c.macros(MacroStage::Mail, [("{auth_authen}", user)])
            .await
            .unwrap();
    }
    c.mail(["<a@example.com>"]).await.unwrap();
    c.rcpt(["<b@example.org>"]).await.unwrap();
    c.eom().await.unwrap().0
}

#[tokio::test]
async fn policies_see_the_site_facts() {
    // The access file is relative to the config file, in the daemon's directory.
    let tmp = tempfile::TempDir::new().unwrap();
    std::fs::write(
        tmp.path().join("access"),
        "# site access\nSMTP-Test:.baz.com\tWHITELIST\n",
    )
    .unwrap();
    let config = crate::support::write_config(&tmp, "inet:0@127.0.0.1", &[("facts", FACTS)], SITE);
    let d = TestDaemon::start_config(tmp, &config).await.unwrap();
    let a = facts(&d, Ipv4Addr::new(192, 168, 3, 4), "pc.example.org", None).await;
    assert!(
        a.has_add_header("X-Client", "true false false false pc.example.org false"),
        "{:?}",
        a.actions
    );
    assert!(a.has_add_header("X-Receiver", "mx.example.org"));
    assert!(a.has_add_header("X-Site", "true true true"));
    assert!(a.has_add_header("X-Access", "REJECT WHITELIST"));
    let a = facts(&d, Ipv4Addr::new(198, 51, 100, 7), "[198.51.100.7]", None).await;
    assert!(a.has_add_header("X-Client", "false true false false nil true"));
    let a = facts(
        &d,
        Ipv4Addr::new(203, 0, 113, 9),
        "adsl-203-0-113-9.dyn.example.net",
        Some("alice"),
    )
    .await;
    assert!(a.has_add_header(
        "X-Client",
        "true false false true adsl-203-0-113-9.dyn.example.net true"
    ));
    let a = facts(&d, Ipv4Addr::LOCALHOST, "localhost", None).await;
    assert!(a.has_add_header("X-Client", "false false true false localhost false"));
    d.stop().await;
}

const REFUSE_AT_MAIL: &str = r#"
local milter = require "milter"
return {
  mail = function(ctx, sender)
    if sender == "late@example.com" then return milter.reject{ text = "refused" } end
    if sender == "now@example.com" then return milter.reject{ text = "refused now", immediate = true } end
  end,
  rcpt = function(ctx, rcpt)
    ctx.msg.n = (ctx.msg.n or 0) + 1
    if rcpt:match("^unknown") then return milter.reject{ code = 550, xcode = "5.1.1", text = "no such user" } end
    if ctx.delayed then milter.log.info("recipient of a refused sender", rcpt) end
  end,
}"#;

#[tokio::test]
async fn delayed_rejects_arrive_at_data() {
    let d = TestDaemon::start(
        &[("refuse", REFUSE_AT_MAIL)],
        "[site]\ndelay_reject = true\n",
    )
    .await;
    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::new(192, 0, 2, 5)).await.unwrap();
    assert_eq!(
        c.mail(["<late@example.com>"]).await.unwrap(),
        Status::Continue
    );
    // Recipients are still accepted (and logged); policies still refuse bad ones.
    assert_eq!(c.rcpt(["<b@example.org>"]).await.unwrap(), Status::Continue);
    assert_eq!(
        reply_text(&c.rcpt(["<unknown1@example.org>"]).await.unwrap()),
        "550 5.1.1 no such user"
    );
    assert_eq!(c.rcpt(["<c@example.org>"]).await.unwrap(), Status::Continue);
    assert_eq!(reply_text(&c.data().await.unwrap()), "550 5.7.1 refused");
    // The next message of the connection is not affected; immediate rejects are not held.
    assert_eq!(
        reply_text(&c.mail(["<now@example.com>"]).await.unwrap()),
        "550 5.7.1 refused now"
    );
    assert_eq!(
        c.mail(["<fine@example.com>"]).await.unwrap(),
        Status::Continue
    );
    c.rcpt(["<b@example.org>"]).await.unwrap();
    assert_eq!(c.data().await.unwrap(), Status::Continue);
    d.stop().await;

    // Without delay_reject the reject comes at MAIL.
    let d = TestDaemon::start(&[("refuse", REFUSE_AT_MAIL)], "").await;
    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::new(192, 0, 2, 5)).await.unwrap();
    assert_eq!(
        reply_text(&c.mail(["<late@example.com>"]).await.unwrap()),
        "550 5.7.1 refused"
    );
    d.stop().await;
}

const REFUSE_AT_CONNECT: &str = r#"
local milter = require "milter"
return {
  connect = function(ctx, host, ip) return milter.reject{ text = "go away " .. ip } end,
}"#;

#[tokio::test]
async fn a_held_connect_reject_is_canceled_by_smtp_auth() {
    let d = TestDaemon::start(
        &[("refuse", REFUSE_AT_CONNECT)],
        "[site]\ndelay_reject = true\n",
    )
    .await;
    let mut c = d.client().await;
    assert_eq!(
        c.connect("h", Ipv4Addr::new(192, 0, 2, 6)).await.unwrap(),
        Status::Continue
    );
    c.mail(["<a@example.com>"]).await.unwrap();
    c.rcpt(["<b@example.org>"]).await.unwrap();
    assert_eq!(
        reply_text(&c.data().await.unwrap()),
        "550 5.7.1 go away 192.0.2.6"
    );

    let mut c = d.client().await;
    c.connect("h", Ipv4Addr::new(192, 0, 2, 6)).await.unwrap();
    c.macros(MacroStage::Mail, [("{auth_authen}", "alice")])
        .await
        .unwrap();
    c.mail(["<a@example.com>"]).await.unwrap();
    c.rcpt(["<b@example.org>"]).await.unwrap();
    assert_eq!(c.data().await.unwrap(), Status::Continue);
    d.stop().await;
}

/// Regression (issue 13, bug 3): after a held reject was answered at DATA, the next message on
/// the connection still saw `ctx.delayed`, so the stock greylist exempted it.
#[tokio::test]
async fn a_held_reject_answered_at_data_is_gone_for_the_next_message() {
    let refuse = r#"
local milter = require "milter"
return {
  connect = function(ctx, host, ip)
    if host == "bad.example" then return milter.reject{ text = "connection refused" } end
  end,
  mail = function(ctx, sender)
    if sender == "late@example.com" then return milter.reject{ text = "sender refused" } end
  end,
}"#;
    let report = r#"
local milter = require "milter"
return {
  rcpt = function(ctx, rcpt)
    if ctx.delayed then return end
    return milter.tempfail{ text = "greylisted " .. rcpt }
  end,
}"#;
    let d = TestDaemon::start(
        &[("refuse", refuse), ("report", report)],
        "[site]\ndelay_reject = true\n",
    )
    .await;
    for (host, sender, answer) in [
        (
            "good.example",
            "late@example.com",
            "550 5.7.1 sender refused",
        ),
        (
            "bad.example",
            "a@example.com",
            "550 5.7.1 connection refused",
        ),
    ] {
        let mut c = d.client().await;
        c.connect(host, Ipv4Addr::new(192, 0, 2, 8)).await.unwrap();
        c.mail([format!("<{sender}>")]).await.unwrap();
        // The held reject exempts the recipient from the tempfail, and answers at DATA.
        assert_eq!(c.rcpt(["<b@example.org>"]).await.unwrap(), Status::Continue);
        assert_eq!(reply_text(&c.data().await.unwrap()), answer);
        c.abort().await.unwrap();
        // The next message of the connection has nothing held: its recipient is tempfailed.
        c.mail(["<fine@example.com>"]).await.unwrap();
        assert_eq!(
            reply_text(&c.rcpt(["<c@example.org>"]).await.unwrap()),
            "451 4.7.1 greylisted c@example.org",
            "after a reject held at {sender}"
        );
    }
    d.stop().await;
}

#[tokio::test]
async fn a_message_without_headers_reaches_eom_when_data_and_headers_are_sent() {
    let policy = r#"
return {
  eom = function(ctx) ctx:add_header("X-Headers", tostring(#ctx.headers)) end,
}"#;
    let d = TestDaemon::start(&[("p", policy)], "[site]\ndelay_reject = true\n").await;
    let mut c = d.client().await;
    c.mail(["<a@example.com>"]).await.unwrap();
    c.rcpt(["<b@example.org>"]).await.unwrap();
    c.data().await.unwrap();
    c.eoh().await.unwrap();
    let (actions, _) = c.eom().await.unwrap();
    assert!(actions.has_add_header("X-Headers", "0"));
    d.stop().await;
}

/// Regression (issue 13): `milter.site.read_list` read any file on the machine, which undid
/// the sandbox without `io`. It now reads only in the config file's directory and the policy
/// directories, symlinks resolved, and answers `nil, "outside"` for anything else.
#[tokio::test]
async fn read_list_reads_only_in_the_config_and_policy_dirs() {
    // root/etc: the config file; root/policies: the policy dir; root/outside: neither.
    let root = tempfile::TempDir::new().unwrap();
    let dir = |name: &str| root.path().join(name);
    for name in ["etc", "policies", "outside"] {
        std::fs::create_dir(dir(name)).unwrap();
    }
    std::fs::write(dir("etc/config-list"), "# words\nfrom the config dir\n").unwrap();
    std::fs::write(dir("policies/policy-list"), "from the policy dir\n").unwrap();
    std::fs::write(dir("outside/secret"), "secret\n").unwrap();
    std::os::unix::fs::symlink(dir("outside/secret"), dir("etc/link")).unwrap();
    let policy_list = dir("policies/policy-list").display().to_string();
    let paths = [
        ("config-list", "from the config dir"),
        (policy_list.as_str(), "from the policy dir"),
        ("../policies/policy-list", "from the policy dir"),
        ("absent", "nil missing"),
        ("/etc/passwd", "nil outside"),
        ("../outside/secret", "nil outside"),
        ("../../../../../../../../../etc/shadow", "nil outside"),
        ("link", "nil outside"),
    ];
    let policy = format!(
        r#"
local site = require "milter.site"
local paths = {{ {} }}
return {{
  eom = function(ctx)
    for _, path in ipairs(paths) do
      local list, err = site.read_list(path)
      ctx:add_header("X-List", path .. " " .. (list and table.concat(list, ",") or "nil " .. err))
    end
  end,
}}"#,
        paths
            .iter()
            .map(|(path, _)| format!("{path:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    std::fs::write(dir("policies/reader.lua"), policy).unwrap();
    let config = dir("etc/luamilter.toml");
    std::fs::write(
        &config,
        format!(
            "[milter]\nlisten = \"inet:0@127.0.0.1\"\ncontrol_socket = {:?}\n[policies]\ndirs = [\"../policies\"]\nchain = [\"reader\"]\n[store]\npath = {:?}\n",
            dir("etc/ctl.sock"),
            dir("etc/store.db"),
        ),
    )
    .unwrap();
    let d = TestDaemon::start_config(root, &config).await.unwrap();
    let mut c = d.client().await;
    c.mail(["<a@example.com>"]).await.unwrap();
    c.rcpt(["<b@example.org>"]).await.unwrap();
    let (actions, _) = c.eom().await.unwrap();
    for (path, expected) in paths {
        assert!(
            actions.has_add_header("X-List", format!("{path} {expected}").as_str()),
            "{path}: {:?}",
            actions.actions
        );
    }
    d.stop().await;
}
