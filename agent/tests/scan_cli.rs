//! `memfabric scan` as an operator runs it: the JSON contract, the ranges, and clear
//! errors for bad input.

use std::process::Command;

use memfabric_harness::privileged;

const MEMFABRIC: &str = env!("CARGO_BIN_EXE_memfabric");

/// The JSON fields `memfabric scan` promises for the whole set, per PID and per range.
const CONTRACT: [&str; 10] = [
    "pages_present",
    "zero_pages",
    "stable_pages",
    "volatile_pages",
    "duplicate_pages",
    "mergeable_duplicate_pages",
    "merged_pages",
    "potential_savings_bytes",
    "potential_savings_intra_bytes",
    "potential_savings_inter_bytes",
];

fn scan(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(MEMFABRIC)
        .arg("scan")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_json_has_every_contract_field_and_the_ranges() {
    if !privileged("the_json_has_every_contract_field_and_the_ranges") {
        return;
    }
    // 4 MiB of this test process, all pages identical: duplicates within one process.
    let block = vec![0x5au8; 4 << 20];
    let pid = std::process::id().to_string();
    let (code, out, err) = scan(&[
        "--pid",
        &pid,
        "--passes",
        "3",
        "--interval-ms",
        "10",
        "--ranges",
        "--json",
    ]);
    std::hint::black_box(&block);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON on stdout");
    let me = &v["per_pid"][&pid];
    for f in CONTRACT {
        assert!(v[f].is_u64(), "total {f} missing: {out}");
        assert!(me[f].is_u64(), "per-PID {f} missing: {out}");
    }
    // The block's 1024 pages are one content (but the first, which holds the allocator's
    // header): about 1022 mergeable, all within this process.
    assert!(
        me["mergeable_duplicate_pages"].as_u64().unwrap() >= 1000,
        "{me}"
    );
    assert_eq!(me["potential_savings_inter_bytes"], 0, "one process: {me}");
    assert_eq!(v["state_bytes_per_page"], 8);
    let ranges = v["ranges"][&pid].as_array().expect("ranges of the PID");
    assert!(!ranges.is_empty());
    let classes = [
        "stable-duplicate",
        "volatile",
        "stable-unique",
        "cold-unknown",
    ];
    for r in ranges {
        assert!(classes.contains(&r["class"].as_str().unwrap()), "{r}");
        for f in CONTRACT.iter().chain(&["cow_breaks"]) {
            assert!(r[f].is_u64(), "range without {f}: {r}");
        }
    }
    // The ranges add up to the process's figures.
    let sum = |f: &str| ranges.iter().map(|r| r[f].as_u64().unwrap()).sum::<u64>();
    for f in [
        "mergeable_duplicate_pages",
        "potential_savings_bytes",
        "stable_pages",
    ] {
        assert_eq!(sum(f), me[f].as_u64().unwrap(), "{f}");
    }
    assert!(
        ranges.iter().any(|r| r["class"] == "stable-duplicate"),
        "the 4 MiB block covers a whole 2 MiB range: {ranges:?}"
    );
}

#[test]
fn an_unknown_pid_is_refused_with_exit_code_2() {
    if !privileged("an_unknown_pid_is_refused_with_exit_code_2") {
        return;
    }
    let (code, _, err) = scan(&["--pid", "99999999"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no process with PID 99999999"), "{err}");
}

#[test]
fn zero_passes_is_refused() {
    let (code, _, err) = scan(&["--pid", "1", "--passes", "0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--passes"), "{err}");
}
