//! The TOML config and `--listen`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = memfabric::config::FileConfig::parse(text);
        let _ = text.parse::<memfabric::config::Listen>();
    }
});
