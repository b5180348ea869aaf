//! /proc/PID/ksm_stat and /proc/vmstat text.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = memfabric::host::ksm::KsmStat::parse(&text);
    let _ = memfabric::host::ksm::vmstat_in(&text, "cow_ksm");
});
