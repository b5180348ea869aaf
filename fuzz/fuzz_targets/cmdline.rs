//! A hostile command line: identity (name, UUID) and QEMU's `-m`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let id = memfabric::host::inventory::identity_from_cmdline(data);
    if let Some(name) = id.name {
        assert!(name.chars().count() <= 64 && !name.chars().any(char::is_control));
    }
    let words: Vec<String> = data
        .split(|b| *b == 0)
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    let _ = memfabric::host::inventory::qemu_memory(&words);
});
