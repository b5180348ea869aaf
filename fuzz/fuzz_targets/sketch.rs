//! A peer's sketch (fabric): decoded, and if accepted, re-encoded identically.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = memfabric::fabric::sketch::Sketch::decode(data) {
        assert_eq!(s.encode(), data);
    }
});
