//! `milter.srs`: `new` builds a [`Signer`] over the SRS service (SRS forward/reverse, BATV
//! sign/verify, with a rotating secret list and a maximum age); `site` gives the signer of
//! `[srs]` and its domain; `is_srs` and `is_batv` tell the kinds apart. Time comes from the
//! store's clock, which case files move with `advance`. See `docs/lua-api/srs.md`.

use crate::services::{
    srs::{SiteSrs, Srs, SrsError},
    store::Store,
};
use mlua::{Lua, Table, UserData, UserDataMethods};
use std::sync::Arc;

/// Seconds in a day: `max_age` is given in seconds (`milter.duration "21d"`).
const DAY: i64 = 86_400;

/// An SRS/BATV signer as scripts hold it.
pub struct Signer {
    srs: Arc<Srs>,
    store: Arc<dyn Store>,
}

impl Signer {
    fn now(&self) -> i64 {
        self.store.now().div_euclid(1000)
    }
}

/// The address without the angle brackets an MTA may send around it.
fn bare(address: &str) -> &str {
    let address = address.trim();
    address
        .strip_prefix('<')
        .and_then(|a| a.strip_suffix('>'))
        .unwrap_or(address)
}

/// `(value)` on success, `(nil, code)` on failure: how the module's lookups answer.
fn answer(result: Result<String, SrsError>) -> (Option<String>, Option<&'static str>) {
    match result {
        Ok(address) => (Some(address), None),
        Err(error) => (None, Some(error.code())),
    }
}

impl UserData for Signer {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("forward", |_, signer, (sender, alias): (String, String)| {
            Ok(answer(signer.srs.forward(
                bare(&sender),
                &alias,
                signer.now(),
            )))
        });
        methods.add_method("reverse", |_, signer, address: String| {
            Ok(answer(signer.srs.reverse(bare(&address), signer.now())))
        });
        methods.add_method("sign", |_, signer, mailbox: String| {
            Ok(answer(signer.srs.batv_sign(bare(&mailbox), signer.now())))
        });
        methods.add_method("verify", |_, signer, address: String| {
            Ok(answer(signer.srs.batv_verify(bare(&address), signer.now())))
        });
    }
}

/// Reads `new{secrets=, max_age=, hash_length=}`; a bad table raises an error naming the key.
fn signer(options: &Table, store: &Arc<dyn Store>) -> mlua::Result<Signer> {
    let secrets: Vec<String> = options
        .get::<Option<Vec<String>>>("secrets")?
        .unwrap_or_default();
    let max_age: i64 = options.get::<Option<i64>>("max_age")?.unwrap_or(21 * DAY);
    let hash_length: usize = options.get::<Option<usize>>("hash_length")?.unwrap_or(4);
    let days = u32::try_from(max_age.div_euclid(DAY)).unwrap_or(0);
    let srs = Srs::new(&secrets, days, hash_length)
        .map_err(|e| mlua::Error::runtime(format!("milter.srs.new: {e}")))?;
    Ok(Signer {
        srs: Arc::new(srs),
        store: Arc::clone(store),
    })
}

/// Builds the `milter.srs` module; signers read the time from `store`'s clock; `site` is the
/// signer of `[srs]`, if any.
pub fn module(lua: &Lua, store: Arc<dyn Store>, site: Option<Arc<SiteSrs>>) -> mlua::Result<Table> {
    let module = lua.create_table()?;
    let site_store = Arc::clone(&store);
    module.set(
        "site",
        lua.create_function(move |_, ()| {
            let Some(site) = &site else {
                return Ok((None, None));
            };
            let signer = Signer {
                srs: Arc::clone(&site.srs),
                store: Arc::clone(&site_store),
            };
            Ok((Some(signer), Some(site.domain.clone())))
        })?,
    )?;
    module.set(
        "new",
        lua.create_function(move |_, options: Table| signer(&options, &store))?,
    )?;
    module.set(
        "is_srs",
        lua.create_function(|_, address: String| Ok(Srs::is_srs(bare(&address))))?,
    )?;
    module.set(
        "is_batv",
        lua.create_function(|_, address: String| Ok(Srs::is_batv(bare(&address))))?,
    )?;
    Ok(module)
}
