//! The SPF service against the test zones in `tests/fixtures/zones/spf.test.zone`, directly and
//! through the Lua module.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use luamilter::lua_api;
use luamilter::services::dns::Resolver;
use luamilter::services::spf::{self, Spf, SpfConfig, SpfError, SpfOutcome};
use mlua::Lua;

use crate::dns_server::TestDns;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

pub(crate) fn service(server: &TestDns) -> Spf {
    let config = SpfConfig {
        receiver: Some("mx.receiver.test".into()),
        ..SpfConfig::default()
    };
    Spf::new(server.resolver(), &config).unwrap()
}

pub(crate) async fn check(spf: &Spf, client: &str, sender: &str) -> SpfOutcome {
    spf.check_host(ip(client), sender, "client.example.test")
        .await
}

#[tokio::test]
async fn results_and_mechanisms() {
    let server = TestDns::start().await;
    let spf = service(&server);
    for (client, sender, result, mechanism) in [
        (
            "192.0.2.5",
            "user@pass-ip4.spf.test",
            "pass",
            Some("ip4:192.0.2.0/24"),
        ),
        ("192.0.2.5", "<user@fail.spf.test>", "fail", Some("all")),
        (
            "192.0.2.5",
            "user@softfail.spf.test",
            "softfail",
            Some("all"),
        ),
        ("192.0.2.5", "user@neutral.spf.test", "neutral", Some("all")),
        ("192.0.2.5", "user@nospf.spf.test", "none", None),
        ("192.0.2.5", "user@nothing.spf.test", "none", None),
        (
            "2001:db8::5",
            "user@ip6.spf.test",
            "pass",
            Some("ip6:2001:db8::/32"),
        ),
        ("192.0.2.5", "user@ip6.spf.test", "fail", Some("all")),
        ("192.0.2.20", "user@a.spf.test", "pass", Some("a")),
        ("192.0.2.21", "user@a.spf.test", "fail", Some("all")),
        ("192.0.2.30", "user@mx.spf.test", "pass", Some("mx")),
        (
            "192.0.2.5",
            "user@include.spf.test",
            "pass",
            Some("include:pass-ip4.spf.test"),
        ),
        ("198.51.100.1", "user@include.spf.test", "fail", Some("all")),
        (
            "192.0.2.5",
            "user@redirect.spf.test",
            "pass",
            Some("ip4:192.0.2.0/24"),
        ),
        (
            "198.51.100.1",
            "user@redirect.spf.test",
            "fail",
            Some("all"),
        ),
        ("192.0.2.40", "user@ptr.spf.test", "pass", Some("ptr")),
        ("192.0.2.41", "user@ptr.spf.test", "fail", Some("all")),
        (
            "192.0.2.50",
            "user@exists.spf.test",
            "pass",
            Some("exists:%{i}.allow.spf.test"),
        ),
        ("192.0.2.51", "user@exists.spf.test", "fail", Some("all")),
        (
            "192.0.2.5",
            "alice@macro.spf.test",
            "pass",
            Some("exists:%{l}.users.%{d}"),
        ),
        ("192.0.2.5", "bob@macro.spf.test", "fail", Some("all")),
        (
            "192.0.2.5",
            "user@split.spf.test",
            "pass",
            Some("ip4:192.0.2.0/24"),
        ),
        (
            "::ffff:192.0.2.5",
            "user@pass-ip4.spf.test",
            "pass",
            Some("ip4:192.0.2.0/24"),
        ),
    ] {
        let outcome = check(&spf, client, sender).await;
        assert_eq!(outcome.result, result, "{client} {sender}: {outcome:?}");
        assert_eq!(outcome.mechanism.as_deref(), mechanism, "{client} {sender}");
        assert!(!outcome.guessed);
    }
}

#[tokio::test]
async fn errors() {
    let server = TestDns::start().await;
    let spf = service(&server);
    for (sender, result, problem) in [
        (
            "user@syntax.spf.test",
            "permerror",
            "invalid SPF record found",
        ),
        ("user@loop.spf.test", "permerror", "lookup limit exceeded"),
        (
            "user@void.spf.test",
            "permerror",
            "void lookup limit exceeded",
        ),
        (
            "user@multiple.spf.test",
            "permerror",
            "more than one SPF record found",
        ),
        ("user@temperror.spf.test", "temperror", "DNS lookup failed"),
    ] {
        let outcome = check(&spf, "192.0.2.5", sender).await;
        assert_eq!(outcome.result, result, "{sender}: {outcome:?}");
        assert!(
            outcome.explanation.ends_with(problem),
            "{sender}: {}",
            outcome.explanation
        );
        assert!(
            outcome
                .received_spf
                .contains(&format!("problem=\"{problem}\"")),
            "{}",
            outcome.received_spf
        );
    }
}

#[tokio::test]
async fn timeout_is_temperror() {
    let server = TestDns::silent().await;
    let resolver = Arc::new(Resolver::new(&server.config(Duration::from_millis(200))).unwrap());
    let spf = Spf::new(resolver, &SpfConfig::default()).unwrap();
    let outcome = check(&spf, "192.0.2.5", "user@pass-ip4.spf.test").await;
    assert_eq!(outcome.result, "temperror");
    // viaspf reports a failed record lookup as "DNS lookup failed", whatever the reason.
    assert!(
        outcome.explanation.contains("DNS lookup"),
        "{}",
        outcome.explanation
    );
}

#[tokio::test]
async fn whole_evaluation_timeout_is_temperror() {
    let server = TestDns::with_delay(Duration::from_millis(300)).await;
    let config = SpfConfig {
        timeout: Duration::from_millis(100),
        ..SpfConfig::default()
    };
    let spf = Spf::new(server.resolver(), &config).unwrap();
    let outcome = check(&spf, "192.0.2.5", "user@pass-ip4.spf.test").await;
    assert_eq!(outcome.result, "temperror", "{outcome:?}");
}

#[tokio::test]
async fn explanation_from_exp_modifier() {
    let server = TestDns::start().await;
    let spf = service(&server);
    let outcome = check(&spf, "192.0.2.5", "user@exp.spf.test").await;
    assert_eq!(outcome.result, "fail");
    assert_eq!(
        outcome.explanation,
        "192.0.2.5 is not allowed to send for exp.spf.test"
    );
    let outcome = check(&spf, "192.0.2.5", "user@fail.spf.test").await;
    assert_eq!(
        outcome.explanation,
        "domain of user@fail.spf.test does not designate 192.0.2.5 as permitted sender"
    );
}

#[tokio::test]
async fn received_spf_header() {
    let server = TestDns::start().await;
    let spf = service(&server);
    let outcome = check(&spf, "192.0.2.5", "User@Pass-IP4.spf.test").await;
    assert_eq!(
        outcome.received_spf,
        "pass (mx.receiver.test: domain of User@pass-ip4.spf.test designates 192.0.2.5 as permitted sender) \
         client-ip=192.0.2.5; envelope-from=\"User@pass-ip4.spf.test\"; helo=client.example.test; \
         receiver=mx.receiver.test; identity=mailfrom; mechanism=\"ip4:192.0.2.0/24\""
    );
    let quoted = check(&spf, "2001:db8::5", "\"john doe\"@ip6.spf.test").await;
    assert_eq!(quoted.result, "pass");
    assert!(
        quoted
            .received_spf
            .contains(r#"client-ip="2001:db8::5"; envelope-from="\"john doe\"@ip6.spf.test";"#),
        "{}",
        quoted.received_spf
    );
}

#[tokio::test]
async fn null_sender_checks_postmaster_at_helo() {
    let server = TestDns::start().await;
    let spf = service(&server);
    for null in ["<>", ""] {
        let outcome = spf
            .check_host(ip("192.0.2.60"), null, "helo.spf.test")
            .await;
        assert_eq!(outcome.result, "pass", "{outcome:?}");
        assert!(
            outcome.explanation.contains("postmaster@helo.spf.test"),
            "{}",
            outcome.explanation
        );
        assert!(
            outcome
                .received_spf
                .contains("envelope-from=\"\"; helo=helo.spf.test;"),
            "{}",
            outcome.received_spf
        );
    }
    let outcome = spf.check_host(ip("192.0.2.60"), "<>", "[192.0.2.60]").await;
    assert_eq!(
        outcome.result, "none",
        "an address literal HELO gives no identity to check"
    );
}

#[tokio::test]
async fn invalid_sender_is_none() {
    let server = TestDns::start().await;
    let spf = service(&server);
    for sender in ["<postmaster>", "not an address", "user@-bad-.test"] {
        assert_eq!(
            check(&spf, "192.0.2.5", sender).await.result,
            "none",
            "{sender}"
        );
    }
}

#[tokio::test]
async fn helo_checks() {
    let server = TestDns::start().await;
    let spf = service(&server);
    let pass = spf.check_helo(ip("192.0.2.60"), "helo.spf.test").await;
    assert_eq!(
        (pass.result, pass.mechanism.as_deref()),
        ("pass", Some("a"))
    );
    assert!(
        pass.received_spf.contains("identity=helo"),
        "{}",
        pass.received_spf
    );
    assert!(
        !pass.received_spf.contains("envelope-from"),
        "{}",
        pass.received_spf
    );
    assert_eq!(
        spf.check_helo(ip("192.0.2.61"), "helo.spf.test")
            .await
            .result,
        "fail"
    );
    assert_eq!(
        spf.check_helo(ip("192.0.2.61"), "nospf.spf.test")
            .await
            .result,
        "none"
    );
    assert_eq!(
        spf.check_helo(ip("192.0.2.61"), "[192.0.2.61]")
            .await
            .result,
        "none"
    );
}

#[tokio::test]
async fn best_guess() {
    let server = TestDns::start().await;
    let spf = service(&server);
    let helo = "client.example.test";
    let pass = spf
        .best_guess(ip("192.0.2.71"), "user@nospf.spf.test", helo)
        .await;
    assert_eq!(
        (pass.result, pass.mechanism.as_deref(), pass.guessed),
        ("pass", Some("a/24"), true)
    );
    assert!(
        pass.received_spf
            .starts_with("pass (mx.receiver.test: best guess: domain of"),
        "{}",
        pass.received_spf
    );
    let mx = spf
        .best_guess(ip("192.0.2.30"), "user@nospf.spf.test", helo)
        .await;
    assert_eq!(mx.result, "pass");
    let neutral = spf
        .best_guess(ip("203.0.113.9"), "user@nospf.spf.test", helo)
        .await;
    assert_eq!((neutral.result, neutral.guessed), ("neutral", true));
    let nxdomain = spf
        .best_guess(ip("203.0.113.9"), "user@nothing.spf.test", helo)
        .await;
    assert_eq!((nxdomain.result, nxdomain.guessed), ("neutral", true));
    let published = spf
        .best_guess(ip("192.0.2.71"), "user@fail.spf.test", helo)
        .await;
    assert_eq!(
        (published.result, published.guessed),
        ("fail", false),
        "a published record wins"
    );
    let temp = spf
        .best_guess(ip("192.0.2.71"), "user@x.servfail.test", helo)
        .await;
    assert_eq!((temp.result, temp.guessed), ("temperror", false));
    let strict = "v=spf1 a -all".parse().unwrap();
    let fail = spf
        .best_guess_with(ip("192.0.2.71"), "user@nospf.spf.test", helo, &strict)
        .await;
    assert_eq!((fail.result, fail.guessed), ("fail", true));
    assert_eq!(
        "v=spf1 bogus".parse::<spf::GuessRecord>(),
        Err(SpfError::InvalidGuessRecord("v=spf1 bogus".into()))
    );
    let bad = SpfConfig {
        best_guess: "nonsense".into(),
        ..SpfConfig::default()
    };
    assert!(Spf::new(server.resolver(), &bad).is_err());
}

#[test]
fn config_from_toml() {
    let config: SpfConfig = toml::from_str(
        "max_lookups = 5\ntimeout = \"3s\"\nreceiver = \"mx.example\"\nbest_guess = \"v=spf1 a mx ?all\"",
    )
    .unwrap();
    assert_eq!(config.max_lookups, 5);
    assert_eq!(config.max_void_lookups, 2);
    assert_eq!(config.timeout, Duration::from_secs(3));
    assert!(toml::from_str::<SpfConfig>("max_lookup = 5").is_err());
}

#[tokio::test]
async fn lua_module() {
    let server = TestDns::start().await;
    let lua = Lua::new();
    lua.globals()
        .set(
            "spf",
            lua_api::spf::module(&lua, Arc::new(service(&server))).unwrap(),
        )
        .unwrap();
    let result: String = lua
        .load(
            r#"
            local out = {}
            local function add(r) out[#out + 1] = table.concat({r.result, tostring(r.mechanism), tostring(r.guessed)}, ",") end
            local r = spf.check_host("192.0.2.5", "user@pass-ip4.spf.test", "client.example.test")
            add(r)
            assert(r.received_spf:find("^pass %(mx.receiver.test: "), r.received_spf)
            r = spf.check_host("192.0.2.5", "user@exp.spf.test", "client.example.test")
            add(r); out[#out + 1] = r.explanation
            add(spf.check_host("192.0.2.60", nil, "helo.spf.test"))
            add(spf.check_helo("192.0.2.60", "helo.spf.test"))
            add(spf.check_host("192.0.2.5", "user@loop.spf.test", "client.example.test"))
            add(spf.best_guess("192.0.2.71", "user@nospf.spf.test", "client.example.test"))
            add(spf.best_guess("192.0.2.71", "user@nospf.spf.test", "client.example.test", "v=spf1 -all"))
            local ok, err = pcall(spf.best_guess, "192.0.2.71", "u@nospf.spf.test", "h", "v=spf1 bogus")
            out[#out + 1] = tostring(ok) .. " " .. tostring(err):match("bad argument #4 to 'best_guess'")
            ok, err = pcall(spf.check_helo, "bogus", "h")
            out[#out + 1] = tostring(ok) .. " " .. tostring(err):match("bad argument #1 to 'check_helo'")
            return table.concat(out, "\n")
            "#,
        )
        .into_function()
        .unwrap()
        .call_async(())
        .await
        .unwrap();
    assert_eq!(
        result,
        "pass,ip4:192.0.2.0/24,false\nfail,all,false\n192.0.2.5 is not allowed to send for exp.spf.test\n\
         pass,a,false\npass,a,false\npermerror,nil,false\npass,a/24,true\nfail,all,true\n\
         false bad argument #4 to 'best_guess'\nfalse bad argument #1 to 'check_helo'"
    );
}
