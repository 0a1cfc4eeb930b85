//! The kinds of answer a milter gives to a stage.

use std::fmt;

/// What a milter answered, without the reply text: the daemon's policies answer with one (see
/// `luamilter::lua_api::verdict::Verdict::kind`), and the load generator counts how each
/// message ended with one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VerdictKind {
    /// Stop filtering and accept (the message; the connection at connect and helo).
    Accept,
    /// No objection: the stage goes on.
    Continue,
    /// Refuse with a 5xx (the recipient only at rcpt).
    Reject,
    /// Refuse with a 4xx (the recipient only at rcpt).
    Tempfail,
    /// Accept the message and silently drop it.
    Discard,
}

impl VerdictKind {
    /// The kind's keyword, as policies, logs and reports spell it.
    pub const fn name(self) -> &'static str {
        match self {
            VerdictKind::Accept => "accept",
            VerdictKind::Continue => "continue",
            VerdictKind::Reject => "reject",
            VerdictKind::Tempfail => "tempfail",
            VerdictKind::Discard => "discard",
        }
    }
}

impl fmt::Display for VerdictKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_lua_keywords() {
        use VerdictKind::*;
        let names = [Accept, Continue, Reject, Tempfail, Discard].map(VerdictKind::name);
        assert_eq!(
            names,
            ["accept", "continue", "reject", "tempfail", "discard"]
        );
        assert_eq!(VerdictKind::Tempfail.to_string(), "tempfail");
    }
}
