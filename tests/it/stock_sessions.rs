//! Stock policies over what case files cannot write: a second HELO inside a connection, and an
//! SRS round trip where the address the daemon signs is the one the next connection bounces to.

use crate::support::{Mta, TestDaemon, reply_text};
use indymilter_test::{EomAction, Status};
use luamilter::stock;
use std::net::Ipv4Addr;

fn stock_policy(name: &'static str) -> (&'static str, &'static str) {
    (name, stock::get(name).unwrap())
}

#[tokio::test]
async fn a_helo_after_mail_costs_demerits() {
    let d = TestDaemon::start(
        &[stock_policy("helo"), stock_policy("bans")],
        "[policy.bans]\nmax_demerits = 1\n",
    )
    .await;
    let polite = Ipv4Addr::new(203, 0, 113, 70);
    let rude = Ipv4Addr::new(203, 0, 113, 71);

    // HELO, MAIL, and HELO again: 2 demerits, more than max_demerits = 1; the bans policy
    // bans the IP at the next MAIL (before answering it, so the test need not wait).
    let mut c = d.client().await;
    c.connect("mx.rude.example", rude).await.unwrap();
    c.helo("mx.rude.example").await.unwrap();
    assert_eq!(
        c.mail(["<a@rude.example>"]).await.unwrap(),
        Status::Continue
    );
    assert_eq!(c.helo("mx.rude.example").await.unwrap(), Status::Continue);
    assert_eq!(
        c.mail(["<b@rude.example>"]).await.unwrap(),
        Status::Continue
    );
    c.close().await.unwrap();
    // One HELO per connection, and a new one after STARTTLS (before MAIL), cost nothing.
    let mut c = d.client().await;
    c.connect("mx.polite.example", polite).await.unwrap();
    c.helo("mx.polite.example").await.unwrap();
    c.helo("mx.polite.example").await.unwrap();
    assert_eq!(
        c.mail(["<a@polite.example>"]).await.unwrap(),
        Status::Continue
    );
    assert_eq!(
        c.mail(["<b@polite.example>"]).await.unwrap(),
        Status::Continue
    );
    c.close().await.unwrap();

    let mut c = d.client().await;
    let status = c.connect("mx.rude.example", rude).await.unwrap();
    assert_eq!(
        reply_text(&status),
        "550 5.7.1 Banned for dictionary attacks"
    );
    let mut c = d.client().await;
    assert_eq!(
        c.connect("mx.polite.example", polite).await.unwrap(),
        Status::Continue
    );
    d.stop().await;
}

const SRS_CONFIG: &str = r#"
[site]
internal_domains = ["example.org"]
[policy.srs]
secrets = ["round trip secret"]
srs_domain = "fwd.example.org"
bounce_senders = ["postmaster"]
"#;

/// A connection from a mail server outside, 198.51.100.`host`, after its HELO.
async fn remote_mx(d: &TestDaemon, host: u8) -> Mta {
    let mut c = d.client().await;
    c.connect("mx.elsewhere.example", Ipv4Addr::new(198, 51, 100, host))
        .await
        .unwrap();
    c.helo("mx.elsewhere.example").await.unwrap();
    c
}

#[tokio::test]
async fn a_bounce_to_the_address_srs_signed_reaches_the_original_sender() {
    let d = TestDaemon::start(&[stock_policy("srs"), stock_policy("greylist")], SRS_CONFIG).await;

    // Mail the site forwards (re-injected on localhost) leaves with an SRS return path.
    let mut c = d.client().await;
    c.connect("localhost", Ipv4Addr::LOCALHOST).await.unwrap();
    c.helo("localhost").await.unwrap();
    c.mail(["<Alice@Remote.example>"]).await.unwrap();
    c.rcpt(["<alice.fwd@elsewhere.example>"]).await.unwrap();
    c.header("Subject", "forwarded").await.unwrap();
    let (actions, _) = c.eom().await.unwrap();
    let signed = actions
        .actions
        .iter()
        .find_map(|a| match a {
            EomAction::ChangeSender { mail, .. } => Some(mail.to_str().unwrap().to_owned()),
            _ => None,
        })
        .expect("the sender is rewritten");
    assert!(
        signed.starts_with("<SRS0=") && signed.ends_with("=Remote.example=Alice@fwd.example.org>"),
        "{signed}"
    );
    c.close().await.unwrap();

    // Its bounce, from a pseudo-DSN sender that greylisting would otherwise hold, gets in,
    // and is delivered to the original sender.
    let mut c = remote_mx(&d, 90).await;
    c.mail(["<postmaster@elsewhere.example>"]).await.unwrap();
    assert_eq!(c.rcpt([signed.as_str()]).await.unwrap(), Status::Continue);
    let greylisted = c.rcpt(["<alice@example.org>"]).await.unwrap();
    assert!(
        reply_text(&greylisted).starts_with("451-4.7.1 Greylisted"),
        "{greylisted:?}"
    );
    c.header("Subject", "Undelivered Mail Returned to Sender")
        .await
        .unwrap();
    let (actions, _) = c.eom().await.unwrap();
    assert!(actions.has_delete_recipient(signed.as_str()));
    assert!(actions.has_add_recipient("<Alice@Remote.example>", indymilter_test::any()));
    c.close().await.unwrap();

    // An altered signature is refused.
    let first = if signed.as_bytes()[6] == b'A' {
        "B"
    } else {
        "A"
    };
    let forged = format!("<SRS0={first}{}", &signed[7..]);
    let mut c = remote_mx(&d, 91).await;
    c.mail(["<>"]).await.unwrap();
    assert_eq!(
        reply_text(&c.rcpt([forged.as_str()]).await.unwrap()),
        "550 5.7.1 Invalid SRS signature"
    );
    d.stop().await;
}

/// Real-world bounces that a package ships: the corpus of flufl.bounce (Mailman's bounce
/// detectors; Debian's python3-flufl.bounce, installed by tests/setup.sh): DSNs and the
/// free-form bounces of many MTAs.
const BOUNCE_CORPUS: &str = "/usr/lib/python3/dist-packages/flufl/bounce/tests/data";

/// A corpus bounce with CRLF line ends, and the same with each quoted `Message-ID:` line of
/// its body (the returned message's header) carrying `token` (`None` when its body quotes no
/// Message-ID), with whether a report line `Action:` other than `failed` comes before the first
/// such line (a delay warning, which the srs policy does not count).
type CorpusBounce = (Vec<u8>, Option<(Vec<u8>, bool)>);

fn corpus_bounce(raw: &[u8], token: &str) -> Option<CorpusBounce> {
    let text = String::from_utf8_lossy(raw)
        .replace("\r\n", "\n")
        .replace('\n', "\r\n");
    let end = text.find("\r\n\r\n")? + 4;
    let (head, body) = text.split_at(end);
    let mut quoted = false;
    let mut not_failed = false;
    let mut lines = Vec::new();
    for line in body.split("\r\n") {
        let lower = line.to_ascii_lowercase();
        if let Some(action) = lower.strip_prefix("action:")
            && !quoted
            && action.split_whitespace().last() != Some("failed")
        {
            not_failed = true;
        }
        if lower.starts_with("message-id:") && line.contains('<') {
            quoted = true;
            lines.push(format!("Message-ID: <{token}>"));
        } else {
            lines.push(line.to_string());
        }
    }
    let signed = quoted.then(|| {
        let signed = format!("{head}{}", lines.join("\r\n"));
        (signed.into_bytes(), not_failed)
    });
    Some((text.into_bytes(), signed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_world_bounces_quoting_our_token_are_discarded_and_the_others_pass() {
    let d = TestDaemon::start(
        &[stock_policy("srs")],
        "[srs]\nsecrets = [\"corpus secret\"]\ndomain = \"fwd.example.org\"\n",
    )
    .await;
    let srs = luamilter::services::srs::Srs::new(&["corpus secret".into()], 21, 4).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut files: Vec<_> = std::fs::read_dir(BOUNCE_CORPUS)
        .unwrap_or_else(|e| panic!("{BOUNCE_CORPUS} (tests/setup.sh installs it): {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    let ip = Ipv4Addr::new(198, 51, 100, 25);
    let (mut recognized, mut delays) = (0, 0);
    for (i, file) in files.iter().enumerate() {
        let victim = format!("victim{i}@remote.example");
        let token = srs.forward(&victim, "fwd.example.org", now).unwrap();
        let name = file.display();
        let (plain, signed) = corpus_bounce(&std::fs::read(file).unwrap(), &token)
            .unwrap_or_else(|| panic!("{name}: no header block"));
        let (_, status) = crate::content::send(&d, &plain, ip, "<>").await;
        assert_eq!(status, Status::Continue, "{name} as it was");
        let Some((signed, delay)) = signed else {
            continue;
        };
        let (_, status) = crate::content::send(&d, &signed, ip, "<>").await;
        if delay {
            delays += 1;
            assert_eq!(status, Status::Continue, "{name}: a delay warning");
        } else {
            recognized += 1;
            assert_eq!(status, Status::Discard, "{name} quoting {token}");
        }
    }
    assert!(
        recognized >= 15 && delays >= 1,
        "{recognized} recognized, {delays} delay warnings of {} samples",
        files.len()
    );
    d.stop().await;
}
