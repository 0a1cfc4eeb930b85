//! Delivery status notifications (RFC 3464) as MIME messages, built with `mail-builder`:
//! a `multipart/report; report-type=delivery-status` of three parts, a human-readable
//! `text/plain`, the `message/delivery-status` fields (per message: `Reporting-MTA`,
//! `Arrival-Date`; per recipient: `Final-Recipient`, `Action`, `Status`, `Diagnostic-Code`) and
//! the original message's header as `text/rfc822-headers` (RFC 6522).
//!
//! [`crate::services::smtp::Smtp::send_dsn`] submits the result; nothing here does I/O. Every
//! input is bounded ([`MAX_TEXT`], [`MAX_HEADERS`], [`MAX_RECIPIENTS`]) and the fields of the
//! delivery-status part are reduced to one line of printable ASCII, so nothing a policy passes
//! can add a header or a field.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use mail_builder::MessageBuilder;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::date::Date;
use mail_builder::headers::raw::Raw;
use mail_builder::mime::MimePart;

/// Bytes of the human-readable text kept; longer text is cut.
pub const MAX_TEXT: usize = 64 * 1024;
/// Bytes of the original header kept; header fields past it are left out.
pub const MAX_HEADERS: usize = 64 * 1024;
/// Per-recipient blocks at most.
pub const MAX_RECIPIENTS: usize = 100;
/// Characters kept of one delivery-status field value (diagnostic, subject, ...).
const MAX_FIELD: usize = 900;

/// The `Action` of a DSN (RFC 3464 §2.3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The message could not be delivered.
    Failed,
    /// Not delivered yet; still trying (the classic milter's warnings).
    Delayed,
    /// Delivered.
    Delivered,
    /// Relayed to a system that does not send DSNs.
    Relayed,
    /// Delivered and forwarded to several addresses.
    Expanded,
}

impl Action {
    /// The field value, `"failed"`, `"delayed"`, ...
    pub fn name(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed",
            Action::Expanded => "expanded",
        }
    }

    /// The action named `name` (lowercase), if any.
    pub fn from_name(name: &str) -> Option<Action> {
        Some(match name {
            "failed" => Action::Failed,
            "delayed" => Action::Delayed,
            "delivered" => Action::Delivered,
            "relayed" => Action::Relayed,
            "expanded" => Action::Expanded,
            _ => return None,
        })
    }

    /// The status used when none is given: 5.0.0, 4.0.0 or 2.0.0.
    fn default_status(self) -> &'static str {
        match self {
            Action::Failed => "5.0.0",
            Action::Delayed => "4.0.0",
            _ => "2.0.0",
        }
    }

    fn default_subject(self) -> &'static str {
        match self {
            Action::Failed => "Delivery Status Notification (Failure)",
            Action::Delayed => "Delivery Status Notification (Delay)",
            _ => "Delivery Status Notification (Success)",
        }
    }
}

/// A DSN to send: who gets it, what it says about which recipients, and the original header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dsn {
    /// The DSN's recipient: the original message's envelope sender.
    pub to: String,
    /// The reporting MTA's name (`Reporting-MTA: dns; …`, `From: MAILER-DAEMON@…`), usually
    /// the receiver's host name; `None` takes the service's EHLO name.
    pub reporting: Option<String>,
    /// The `Subject`; `None` takes "Delivery Status Notification (Failure|Delay|Success)".
    pub subject: Option<String>,
    /// The human-readable first part.
    pub text: String,
    /// The original recipients the report is about; empty means `to` (RFC 3464 needs one).
    pub recipients: Vec<String>,
    /// The `Action` of every per-recipient block.
    pub action: Action,
    /// The `Status` (`"5.7.1"`); `None` takes the action's default (5.0.0, 4.0.0, 2.0.0).
    pub status: Option<String>,
    /// `Diagnostic-Code: smtp; …`, when given.
    pub diagnostic: Option<String>,
    /// The original header fields, in order, as (name, value).
    pub headers: Vec<(String, String)>,
    /// An address (an SRS address of `to`, as the classic milter made) written as the
    /// `Message-ID` and in `X-Mailer`, so that a bounce of this DSN quotes it; `None`: a
    /// unique Message-ID.
    pub token: Option<String>,
}

/// Why a [`Dsn`] cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DsnError {
    /// An address or name that cannot go into the message.
    #[error("invalid {0}: {1:?}")]
    Invalid(&'static str, String),
}

/// A status code `class.subject.detail` (RFC 3463): class 2, 4 or 5, then 1–3 and 1–3 digits.
pub fn valid_status(status: &str) -> bool {
    let parts: Vec<&str> = status.split('.').collect();
    parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && parts[1..]
            .iter()
            .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
}

/// An address fit for an envelope and an address header: `local@domain`, no space, control,
/// angle bracket or comma.
pub fn valid_address(address: &str) -> bool {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.is_empty()
        && address.len() <= 320
        && !address.contains(|c: char| {
            c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | ',' | ';')
        })
}

/// A host name fit for `Reporting-MTA: dns; …` and `MAILER-DAEMON@…`.
fn valid_host(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'[' | b']' | b':')
        })
}

/// One line of printable ASCII, at most [`MAX_FIELD`] characters: anything else becomes `?`,
/// line breaks a space.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\r' | '\n' | '\t' => ' ',
            c if c.is_ascii() && !c.is_ascii_control() => c,
            _ => '?',
        })
        .take(MAX_FIELD)
        .collect::<String>()
        .trim()
        .to_string()
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A Message-ID unique in this process and over restarts: time, a counter, the reporting MTA.
fn message_id(reporting: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{}.{}.{}.dsn@{reporting}",
        now.as_secs(),
        now.subsec_nanos(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// The original header as `text/rfc822-headers`: each field `Name: value` (folded lines kept,
/// line ends made CRLF), stopping before [`MAX_HEADERS`] bytes.
fn header_block(headers: &[(String, String)]) -> String {
    let mut block = String::new();
    for (name, value) in headers {
        let name = name.trim();
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
            continue;
        }
        let value = value.replace("\r\n", "\n").replace('\r', "\n");
        let mut field = format!("{name}:");
        for (i, line) in value.split('\n').enumerate() {
            if i > 0 {
                field.push_str("\r\n");
                if !line.starts_with([' ', '\t']) {
                    field.push(' ');
                }
            } else if !line.starts_with([' ', '\t']) {
                field.push(' ');
            }
            field.push_str(line);
        }
        field.push_str("\r\n");
        if block.len() + field.len() > MAX_HEADERS {
            break;
        }
        block.push_str(&field);
    }
    block
}

impl Dsn {
    /// The `Status` to report: the given one, else the action's default.
    pub fn status(&self) -> &str {
        self.status
            .as_deref()
            .unwrap_or_else(|| self.action.default_status())
    }

    /// Checks the addresses, the status and the reporting name; `reporting` is the name used
    /// when [`Dsn::reporting`] is `None`.
    pub fn check(&self, reporting: &str) -> Result<(), DsnError> {
        if !valid_address(&self.to) {
            return Err(DsnError::Invalid("address", self.to.clone()));
        }
        if let Some(bad) = self.recipients.iter().find(|r| !valid_address(r)) {
            return Err(DsnError::Invalid("recipient", bad.clone()));
        }
        if self.recipients.len() > MAX_RECIPIENTS {
            return Err(DsnError::Invalid(
                "recipients",
                format!("{} (at most {MAX_RECIPIENTS})", self.recipients.len()),
            ));
        }
        if !valid_status(self.status()) {
            return Err(DsnError::Invalid("status", self.status().to_string()));
        }
        if let Some(token) = self.token.as_deref().filter(|t| !valid_address(t)) {
            return Err(DsnError::Invalid("token", token.to_string()));
        }
        let reporting = self.reporting.as_deref().unwrap_or(reporting);
        if !valid_host(reporting) {
            return Err(DsnError::Invalid("reporting", reporting.to_string()));
        }
        Ok(())
    }

    /// The `message/delivery-status` body: the per-message block, then one block per
    /// recipient, CRLF line ends, printable ASCII only.
    pub fn delivery_status(&self, reporting: &str, arrival: &str) -> String {
        let mut fields = format!("Reporting-MTA: dns; {reporting}\r\nArrival-Date: {arrival}\r\n");
        let to = [self.to.clone()];
        let recipients = if self.recipients.is_empty() {
            &to[..]
        } else {
            &self.recipients[..]
        };
        for recipient in recipients {
            fields.push_str(&format!(
                "\r\nFinal-Recipient: rfc822; {}\r\nAction: {}\r\nStatus: {}\r\n",
                one_line(recipient),
                self.action.name(),
                self.status()
            ));
            if let Some(diagnostic) = &self.diagnostic {
                fields.push_str(&format!(
                    "Diagnostic-Code: smtp; {}\r\n",
                    one_line(diagnostic)
                ));
            }
        }
        fields
    }

    /// The whole message, ready for `DATA`. Call [`Dsn::check`] first: names and addresses
    /// are not checked again here.
    pub fn build(&self, reporting: &str) -> Vec<u8> {
        let reporting = self.reporting.as_deref().unwrap_or(reporting);
        let now = Date::now();
        let status = self.delivery_status(reporting, &now.to_rfc822());
        let headers = header_block(&self.headers);
        let headers_encoding = if headers.is_ascii() { "7bit" } else { "8bit" };
        let mut text = cut(&self.text, MAX_TEXT)
            .replace("\r\n", "\n")
            .replace('\r', "\n")
            .replace('\n', "\r\n");
        if text.is_empty() {
            text = format!(
                "This is the mail system at {reporting}.\r\n\r\nYour message to the recipients \
                 below: {} ({}).\r\n",
                self.action.name(),
                self.status()
            );
        }
        let report = MimePart::new(
            ContentType::new("multipart/report").attribute("report-type", "delivery-status"),
            vec![
                MimePart::new("text/plain", text),
                MimePart::new("message/delivery-status", status.into_bytes())
                    .transfer_encoding("7bit"),
                MimePart::new("text/rfc822-headers", headers.into_bytes())
                    .transfer_encoding(headers_encoding),
            ],
        );
        let subject = match &self.subject {
            Some(subject) => cut(subject, MAX_FIELD).replace(['\r', '\n'], " "),
            None => self.action.default_subject().to_string(),
        };
        let mailer_daemon = format!("MAILER-DAEMON@{reporting}");
        let mut builder = MessageBuilder::new()
            .from(("Mail Delivery System", mailer_daemon.as_str()))
            .to(self.to.as_str())
            .subject(subject)
            .date(now)
            .header("Auto-Submitted", Raw::new("auto-replied"));
        builder = match &self.token {
            Some(token) => builder
                .message_id(token.as_str())
                .header("X-Mailer", Raw::new(format!("luamilter <{token}>"))),
            None => builder.message_id(message_id(reporting)),
        };
        builder.body(report).write_to_vec().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_addresses() {
        for good in ["5.7.1", "4.0.0", "2.1.5", "5.123.456"] {
            assert!(valid_status(good), "{good}");
        }
        for bad in ["", "5.7", "6.0.0", "5.7.1.1", "5.a.1", "5.1234.1"] {
            assert!(!valid_status(bad), "{bad}");
        }
        assert!(valid_address("a@b.example"));
        for bad in [
            "",
            "a",
            "@b",
            "a@",
            "a b@c",
            "a@b\r\nRCPT",
            "<a@b>",
            "a@b,c@d",
        ] {
            assert!(!valid_address(bad), "{bad:?}");
        }
    }

    #[test]
    fn fields_stay_on_one_line() {
        assert_eq!(one_line(" a\r\nX-Evil: 1\té "), "a  X-Evil: 1 ?");
        assert_eq!(one_line(&"x".repeat(5000)).len(), MAX_FIELD);
        assert_eq!(cut("héllo", 2), "h");
    }

    #[test]
    fn header_block_folds_and_skips() {
        let headers = vec![
            ("Subject".to_string(), " hi".to_string()),
            ("Bad Name".to_string(), "x".to_string()),
            ("Received".to_string(), "from a\n\tby b".to_string()),
        ];
        assert_eq!(
            header_block(&headers),
            "Subject: hi\r\nReceived: from a\r\n\tby b\r\n"
        );
    }
}
