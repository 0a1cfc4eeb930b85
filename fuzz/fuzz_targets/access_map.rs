//! The sendmail-format access map.
#![no_main]
use libfuzzer_sys::fuzz_target;
use luamilter::services::access::AccessMap;

fuzz_target!(|text: &str| {
    let mut map = AccessMap::default();
    let _ = map.add_text("fuzz", text);
    let _ = map.lookup("Connect", "192.0.2.1");
});
