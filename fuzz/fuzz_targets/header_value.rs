//! Header values: RFC 2047 words and address lists.
#![no_main]
use libfuzzer_sys::fuzz_target;
use luamilter::services::mime;

fuzz_target!(|bytes: &[u8]| {
    let _ = mime::decode(bytes);
    let _ = mime::addresses(bytes);
});
