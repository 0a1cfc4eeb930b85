//! The stock policy pack, compiled into the binary from `policies/`. A file of the same name
//! in a configured policy directory shadows a stock policy.

include!(concat!(env!("OUT_DIR"), "/stock.rs"));

/// The stock source named `name` (`"spf"`, `"lib/util"`), if the pack has one.
pub fn get(name: &str) -> Option<&'static str> {
    STOCK
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, source)| *source)
}

/// The names of the stock policies (top-level files; `lib/` holds shared modules).
pub fn policy_names() -> impl Iterator<Item = &'static str> {
    STOCK.iter().map(|(n, _)| *n).filter(|n| !n.contains('/'))
}

/// The stock message template named `name` (`"neutral"`, `"quarantine"`), if the pack has one.
pub fn template(name: &str) -> Option<&'static str> {
    STOCK_TEMPLATES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, text)| *text)
}
