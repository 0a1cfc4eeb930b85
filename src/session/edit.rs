//! Edits a policy queues during a message, applied by the MTA at end of message.

use indymilter::Actions;

/// One queued end-of-message edit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Edit {
    /// Append a header.
    AddHeader(String, String),
    /// Insert a header at an index (0 = top).
    InsertHeader(i32, String, String),
    /// Change the index-th (1-based) header of that name; `None` deletes it.
    ChangeHeader(String, i32, Option<String>),
    /// Add a recipient, with optional ESMTP arguments.
    AddRcpt(String, Option<String>),
    /// Remove a recipient.
    DeleteRcpt(String),
    /// Change the envelope sender, with optional ESMTP arguments.
    ChangeSender(String, Option<String>),
    /// Replace the body (appended when queued several times).
    ReplaceBody(Vec<u8>),
    /// Put the message on hold with this reason.
    Quarantine(String),
}

impl Edit {
    /// The milter action the MTA must have granted for this edit.
    pub fn required_action(&self) -> Actions {
        match self {
            Edit::AddHeader(..) | Edit::InsertHeader(..) => Actions::ADD_HEADER,
            Edit::ChangeHeader(..) => Actions::CHANGE_HEADER,
            Edit::AddRcpt(_, None) => Actions::ADD_RCPT,
            Edit::AddRcpt(_, Some(_)) => Actions::ADD_RCPT_EXT,
            Edit::DeleteRcpt(_) => Actions::DELETE_RCPT,
            Edit::ChangeSender(..) => Actions::CHANGE_SENDER,
            Edit::ReplaceBody(_) => Actions::REPLACE_BODY,
            Edit::Quarantine(_) => Actions::QUARANTINE,
        }
    }
}
