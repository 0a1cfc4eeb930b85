//! Where a verdict becomes a milter reply, and a queued edit a milter action.

use crate::{lua_api::verdict::Verdict, session::Edit};
use indymilter::{ContextActions, EomActions, SetErrorReply, SmtpReply, Status};

/// The status for `verdict`, with its SMTP reply set on `reply` for a reject or tempfail.
pub fn answer(reply: &mut SmtpReply, verdict: &Verdict) -> Status {
    match verdict {
        Verdict::Continue => Status::Continue,
        Verdict::Accept => Status::Accept,
        Verdict::Discard => Status::Discard,
        Verdict::Reject(r) | Verdict::Tempfail(r) => {
            if let Some(r) = r {
                // The MTA reads the text as sendmail does: `%%` is a `%` (Postfix drops a lone one).
                let lines: Vec<String> = if r.lines.is_empty() {
                    vec![String::new()]
                } else {
                    r.lines.iter().map(|line| line.replace('%', "%%")).collect()
                };
                if let Err(e) = reply.set_error_reply(&r.code, r.xcode.as_deref(), lines) {
                    tracing::error!(error = %e, "invalid SMTP reply; the MTA's default text is used");
                }
            }
            if matches!(verdict, Verdict::Reject(_)) {
                Status::Reject
            } else {
                Status::Tempfail
            }
        }
    }
}

/// Asks the MTA to make one queued edit.
pub async fn apply_edit(actions: &EomActions, edit: &Edit) -> Result<(), indymilter::ActionError> {
    match edit {
        Edit::AddHeader(name, value) => actions.add_header(name.as_str(), value.as_str()).await,
        Edit::InsertHeader(index, name, value) => {
            actions
                .insert_header(*index, name.as_str(), value.as_str())
                .await
        }
        Edit::ChangeHeader(name, index, value) => {
            actions
                .change_header(name.as_str(), *index, value.as_deref())
                .await
        }
        Edit::AddRcpt(addr, None) => actions.add_recipient(addr.as_str()).await,
        Edit::AddRcpt(addr, Some(args)) => {
            actions
                .add_recipient_ext(addr.as_str(), Some(args.as_str()))
                .await
        }
        Edit::DeleteRcpt(addr) => actions.delete_recipient(addr.as_str()).await,
        Edit::ChangeSender(addr, args) => {
            actions.change_sender(addr.as_str(), args.as_deref()).await
        }
        Edit::ReplaceBody(body) => actions.replace_body(body).await,
        Edit::Quarantine(reason) => actions.quarantine(reason.as_str()).await,
    }
}
