//! Proves the Postfix harness: a private Postfix talks to a tiny milter built here directly on
//! indymilter, and swaks sends mail through it.
//!
//! The milter rejects `bad@test.example` at MAIL with a two-line 550 5.7.1 reply, quarantines
//! mail from `quarantine@test.example`, and adds `X-Test: yes` to every message at eom.

use std::{
    fs,
    os::unix::{fs::PermissionsExt, net::UnixListener},
    path::Path,
    thread::{self, JoinHandle},
    time::Duration,
};

use indymilter::{
    Actions, Callbacks, Config, ContextActions, EitherListener, SetErrorReply, Status,
};
use tokio::sync::watch;

use crate::support::postfix::{Postfix, Stage, e2e_ready};

const BAD_SENDER: &str = "bad@test.example";
const QUARANTINE_SENDER: &str = "quarantine@test.example";
const GOOD_SENDER: &str = "good@test.example";
const RECIPIENT: &str = "user@test.example";
const REJECT_TEXT: [&str; 2] = [
    "Sender bad@test.example is not welcome here",
    "See the site policy",
];
const WAIT: Duration = Duration::from_secs(30);

/// A bound, not yet served, milter socket.
type StdListener = EitherListener<std::net::TcpListener, UnixListener>;

/// The test milter, served on its own thread and runtime so the blocking harness cannot stall it.
struct TestMilter {
    /// The socket in Postfix's `smtpd_milters` syntax.
    socket: String,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl TestMilter {
    /// Serves on a free loopback TCP port.
    fn start_inet() -> TestMilter {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind milter");
        let addr = listener.local_addr().expect("milter address");
        let socket = format!("inet:{}:{}", addr.ip(), addr.port());
        Self::spawn(socket, EitherListener::Tcp(listener))
    }

    /// Serves on a UNIX socket at `path`, made connectable for Postfix's unprivileged smtpd.
    fn start_unix(path: &Path) -> TestMilter {
        let listener = UnixListener::bind(path).expect("bind milter");
        fs::set_permissions(path, fs::Permissions::from_mode(0o666)).expect("chmod socket");
        let socket = format!("unix:{}", path.display());
        Self::spawn(socket, EitherListener::Unix(listener))
    }

    fn spawn(socket: String, listener: StdListener) -> TestMilter {
        let (stop, stopped) = watch::channel(false);
        let thread = thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("milter runtime");
            rt.block_on(serve(listener, stopped));
        });
        TestMilter {
            socket,
            stop,
            thread: Some(thread),
        }
    }

    /// Closes the listener and waits (bounded) for open sessions to end.
    fn stop(&mut self) {
        self.stop.send_replace(true);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("test milter thread panicked");
        }
    }
}

impl Drop for TestMilter {
    fn drop(&mut self) {
        // Not joined here: joining while a failed test unwinds could hide the failure.
        self.stop.send_replace(true);
    }
}

async fn serve(listener: StdListener, stopped: watch::Receiver<bool>) {
    let listener = match listener {
        EitherListener::Tcp(l) => {
            l.set_nonblocking(true).expect("nonblocking");
            EitherListener::Tcp(tokio::net::TcpListener::from_std(l).expect("tokio listener"))
        }
        EitherListener::Unix(l) => {
            l.set_nonblocking(true).expect("nonblocking");
            EitherListener::Unix(tokio::net::UnixListener::from_std(l).expect("tokio listener"))
        }
    };
    let config = Config {
        actions: Actions::ADD_HEADER | Actions::QUARANTINE,
        ..Config::default()
    };
    let stop_requested = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let run = indymilter::run(
        listener,
        callbacks(),
        config,
        stop_requested(stopped.clone()),
    );
    tokio::select! {
        result = run => result.expect("test milter failed"),
        () = async {
            stop_requested(stopped).await;
            tokio::time::sleep(WAIT).await;
        } => panic!("test milter sessions still open {WAIT:?} after stop"),
    }
}

/// Per-connection data: the current message's sender as indymilter gives it (`<addr>`).
fn callbacks() -> Callbacks<String> {
    Callbacks::new()
        .on_mail(|cx, args| {
            Box::pin(async move {
                let sender = args[0].to_string_lossy().into_owned();
                if sender == format!("<{BAD_SENDER}>") {
                    cx.reply
                        .set_error_reply("550", Some("5.7.1"), REJECT_TEXT)
                        .expect("valid reply");
                    return Status::Reject;
                }
                cx.data = Some(sender);
                Status::Continue
            })
        })
        .on_eom(|cx| {
            Box::pin(async move {
                if cx.actions.add_header("X-Test", "yes").await.is_err() {
                    return Status::Tempfail;
                }
                if cx.data.as_deref() == Some(&format!("<{QUARANTINE_SENDER}>"))
                    && cx.actions.quarantine("test milter").await.is_err()
                {
                    return Status::Tempfail;
                }
                Status::Continue
            })
        })
}

/// A running milter and a Postfix instance using it, or `None` when e2e tests are skipped.
fn setup() -> Option<(TestMilter, Postfix)> {
    if !e2e_ready() {
        return None;
    }
    let milter = TestMilter::start_inet();
    let postfix = Postfix::start(&milter.socket).expect("start private postfix");
    Some((milter, postfix))
}

#[test]
fn bad_sender_gets_the_milter_multiline_5xx_at_mail_from() {
    let Some((_milter, postfix)) = setup() else {
        return;
    };
    let sent = postfix
        .send(BAD_SENDER, RECIPIENT, &[], "never delivered\n")
        .unwrap();
    let mail = sent.reply(Stage::Mail).expect("a reply to MAIL FROM");
    // Postfix relays the milter's lines with the enhanced code repeated on each one.
    assert_eq!(
        mail.lines,
        [
            format!("550-5.7.1 {}", REJECT_TEXT[0]),
            format!("550 5.7.1 {}", REJECT_TEXT[1]),
        ],
        "{}",
        sent.transcript
    );
    assert_eq!(mail.code(), 550);
    assert_eq!(sent.exit_code, 23, "{}", sent.transcript);
    assert!(sent.reply(Stage::Rcpt).is_none(), "{}", sent.transcript);
}

#[test]
fn accepted_mail_is_delivered_with_the_milter_header() {
    let Some((_milter, postfix)) = setup() else {
        return;
    };
    let marker = "accepted-mail-marker-4711";
    let sent = postfix
        .send(
            GOOD_SENDER,
            RECIPIENT,
            &[("Subject", marker), ("X-Extra", "from the test")],
            "first line\nsecond line\n",
        )
        .unwrap();
    assert_eq!(sent.exit_code, 0, "{}", sent.transcript);
    assert_eq!(sent.reply(Stage::Mail).map(|r| r.code()), Some(250));
    assert_eq!(sent.reply(Stage::Dot).map(|r| r.code()), Some(250));
    let delivered = postfix
        .wait_delivered(|m| m.contains(marker), WAIT)
        .unwrap_or_else(|| panic!("not delivered; mail log:\n{}", postfix.maillog()));
    let (headers, body) = delivered
        .split_once("\n\n")
        .expect("a header/body separator");
    let headers: Vec<&str> = headers.lines().collect();
    assert!(headers.contains(&"X-Test: yes"), "{delivered}");
    assert!(headers.contains(&"X-Extra: from the test"), "{delivered}");
    assert!(
        headers.contains(&"Delivered-To: user@test.example"),
        "{delivered}"
    );
    assert!(body.starts_with("first line\nsecond line\n"), "{delivered}");
}

#[test]
fn quarantined_mail_lands_in_the_hold_queue() {
    let Some((_milter, postfix)) = setup() else {
        return;
    };
    let sent = postfix
        .send(QUARANTINE_SENDER, RECIPIENT, &[], "hold me\n")
        .unwrap();
    assert_eq!(sent.exit_code, 0, "{}", sent.transcript);
    let queue_id = sent.queue_id().expect("a queue id in the 250 reply");
    let held = postfix.hold_queue().unwrap();
    let message = held
        .iter()
        .find(|m| m.id == queue_id)
        .unwrap_or_else(|| panic!("{queue_id} not held: {held:?}\n{}", postfix.maillog()));
    assert!(message.held);
    assert_eq!(message.sender, QUARANTINE_SENDER);
    assert_eq!(message.recipients, [RECIPIENT]);
}

#[test]
fn stopped_milter_means_4xx_at_mail_from() {
    let Some((mut milter, postfix)) = setup() else {
        return;
    };
    let before = postfix
        .send(GOOD_SENDER, RECIPIENT, &[], "milter up\n")
        .unwrap();
    assert_eq!(before.exit_code, 0, "{}", before.transcript);
    milter.stop();
    let after = postfix
        .send(GOOD_SENDER, RECIPIENT, &[], "milter down\n")
        .unwrap();
    let mail = after.reply(Stage::Mail).expect("a reply to MAIL FROM");
    assert_eq!(mail.code(), 451, "{}", after.transcript);
    assert!(mail.lines[0].starts_with("451 4.7.1 "), "{:?}", mail.lines);
    assert_eq!(after.reply(Stage::Helo).map(|r| r.code()), Some(250));
    assert_eq!(after.exit_code, 23, "{}", after.transcript);
}

#[test]
fn unix_socket_milter_is_reached() {
    if !e2e_ready() {
        return;
    }
    // Postfix's smtpd runs as the `postfix` user: the directory must be searchable by it.
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let milter = TestMilter::start_unix(&dir.path().join("milter.sock"));
    let postfix = Postfix::start(&milter.socket).expect("start private postfix");
    let sent = postfix
        .send(BAD_SENDER, RECIPIENT, &[], "never delivered\n")
        .unwrap();
    let mail = sent.reply(Stage::Mail).expect("a reply to MAIL FROM");
    assert_eq!(
        mail.code(),
        550,
        "{}\n{}",
        sent.transcript,
        postfix.maillog()
    );
}
