//! Captured messages (`luamilter test MESSAGE`, replay) and their Received headers.
#![no_main]
use libfuzzer_sys::fuzz_target;
use luamilter::offline::message::{Message, Received};

fuzz_target!(|bytes: &[u8]| {
    let _ = Message::parse(bytes);
    let _ = Received::parse(&String::from_utf8_lossy(bytes));
});
