//! luamilter.toml.
#![no_main]
use libfuzzer_sys::fuzz_target;
use luamilter::config::Config;

fuzz_target!(|text: &str| {
    let _ = Config::parse(text, None);
});
