//! MAIL FROM / RCPT TO addresses: what parses prints back as the same address.
#![no_main]
use libfuzzer_sys::fuzz_target;
use luamilter::services::net::{parse_address, split};

fuzz_target!(|text: &str| {
    let _ = split(text);
    if let Ok(address) = parse_address(text) {
        assert_eq!(parse_address(&format!("<{}>", address.address())).ok(), Some(address));
    }
});
