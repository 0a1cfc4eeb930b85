//! Zone text for the offline DNS (`luamilter test --zone`).
#![no_main]
use libfuzzer_sys::fuzz_target;
use luamilter::services::dns_zone::Zones;

fuzz_target!(|text: &str| {
    let mut zones = Zones::new();
    if zones.add_text(text, None).is_ok() {
        let _ = zones.answer("example.test", hickory_resolver::proto::rr::RecordType::A);
    }
});
