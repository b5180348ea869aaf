//! A peer's summary (fabric): decoded, and if accepted, re-encoded identically.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = memfabric::fabric::summary::Summary::decode(data) {
        assert_eq!(s.encode(), data);
    }
});
