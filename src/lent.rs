//! Values lent to a future for each of its polls: a reference made readable through a
//! thread-local ([`scoped_tls`]) while the future runs on this thread, and never after. The
//! server lends the MTA's macros and the log fields of a stage this way to the Lua handlers it
//! runs (Lua code runs only inside those polls), which costs no copy and no allocation.

use scoped_tls::ScopedKey;
use std::{
    future::{Future, poll_fn},
    pin::Pin,
};

/// Runs `future` with `value` set in `key` during each of its polls. The future is `Unpin`:
/// a large one is pinned in place by the caller (`std::pin::pin!`) and lent as `Pin<&mut _>`,
/// so that it is not moved again.
pub fn lend<'a, T: 'static, F: Future + Unpin + 'a>(
    key: &'static ScopedKey<T>,
    value: &'a T,
    mut future: F,
) -> impl Future<Output = F::Output> + 'a {
    poll_fn(move |cx| key.set(value, || Pin::new(&mut future).poll(cx)))
}
