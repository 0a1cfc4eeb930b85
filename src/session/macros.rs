//! The MTA's macros while a stage is decided. indymilter keeps them for the connection and
//! lends them to each callback; instead of copying them all into the session at every stage (a
//! map of owned strings rebuilt per stage, whether or not a policy reads one), the server lends
//! them on to the handlers it runs: [`lend`] makes them readable on this thread during each poll
//! of the stage's future ([`crate::lent`]), for that session only, and
//! [`Session::macro_value`](super::Session::macro_value) reads them there.

use crate::lent;
use indymilter::Macros;
use std::{ffi::CString, future::Future};

scoped_tls::scoped_thread_local!(static LENT: Macros);
// Which session `LENT` belongs to (see `session_key`), so that a `ctx` used from another
// connection's handler does not read this one's macros.
scoped_tls::scoped_thread_local!(static LENT_TO: usize);

/// Runs `stage` (pinned, see [`lent::lend`]) with `macros` readable for the session with key
/// `session` (see [`session_key`]) during each of its polls.
pub fn lend<'a, F: Future + Unpin + 'a>(
    macros: &'a Macros,
    session: &'a usize,
    stage: F,
) -> impl Future<Output = F::Output> + 'a {
    lent::lend(&LENT, macros, lent::lend(&LENT_TO, session, stage))
}

/// What identifies a session for [`lend`]: its address, stable while it is shared.
pub fn session_key(session: &super::Session) -> usize {
    std::ptr::from_ref(session) as usize
}

/// The value of macro `name` (with or without braces, as [`normalized`] takes it) when the
/// macros are lent to `session`.
pub(super) fn lent_value(session: usize, name: &str) -> Option<String> {
    if !LENT.is_set() || !LENT_TO.is_set() || LENT_TO.with(|to| *to != session) {
        return None;
    }
    let (name, bare) = normalized(name)?;
    LENT.with(|macros| {
        macros
            .get(&name)
            .or_else(|| bare.and_then(|bare| macros.get(&bare)))
            .and_then(|value| value.to_str().ok())
            .map(str::to_string)
    })
}

/// The name the MTA sends for macro `name`, which may be given with or without braces: one
/// letter bare (`i`; indymilter also finds `{i}` under it), longer names in braces
/// (`{auth_authen}`); with the bare form of a longer name as a second guess.
fn normalized(name: &str) -> Option<(CString, Option<CString>)> {
    let bare = name
        .strip_prefix('{')
        .and_then(|n| n.strip_suffix('}'))
        .unwrap_or(name);
    if bare.len() == 1 {
        return Some((CString::new(bare).ok()?, None));
    }
    Some((
        CString::new(format!("{{{bare}}}")).ok()?,
        CString::new(bare).ok(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_looked_up_as_the_mta_sends_them() {
        let name = |n: &str| normalized(n).map(|(a, b)| (a.into_string().unwrap(), b));
        assert_eq!(name("i"), Some(("i".into(), None)));
        assert_eq!(name("{i}"), Some(("i".into(), None)));
        let (braced, bare) = name("auth_authen").unwrap();
        assert_eq!(braced, "{auth_authen}");
        assert_eq!(bare.unwrap().to_str().unwrap(), "auth_authen");
        assert_eq!(name("{auth_authen}").unwrap().0, "{auth_authen}");
        assert_eq!(name("nul\0"), None);
    }

    #[test]
    fn nothing_is_lent_outside_a_stage() {
        assert_eq!(lent_value(1, "i"), None);
    }
}
