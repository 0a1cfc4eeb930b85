//! The net service: IP sets ([`IpSet`]), envelope address parsing ([`parse_address`],
//! [`split`]) and the dynamic-PTR heuristic ([`looks_dynamic`]). Pure computation: nothing here
//! does I/O.

mod address;
mod dynamic;
mod ipset;

pub(crate) use address::dot_atom_or_quoted;
pub use address::{Address, AddressError, parse_address, split};
pub use dynamic::looks_dynamic;
pub use ipset::{IpSet, IpSetError};
