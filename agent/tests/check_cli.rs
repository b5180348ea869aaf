//! `memfabric check` as an operator runs it: real probes, real kernel.

use std::process::Command;

use memfabric_harness::privileged;

const MEMFABRIC: &str = env!("CARGO_BIN_EXE_memfabric");

#[test]
fn check_attaches_every_probe() {
    if !privileged("check_attaches_every_probe") {
        return;
    }
    let out = Command::new(MEMFABRIC).arg("check").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for tp in [
        "exceptions:page_fault_user",
        "kvm:kvm_page_fault",
        "ksm:ksm_merge_with_ksm_page",
        "sched:sched_process_exit",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.contains(tp))
            .unwrap_or_else(|| panic!("{tp}: {stdout}"));
        assert!(line.contains("attached"), "{line}");
        let insns: u32 = line.split_whitespace().last().unwrap().parse().unwrap();
        assert!(insns > 0, "{line}");
    }
}

#[test]
fn check_names_a_tracepoint_that_does_not_exist() {
    if !privileged("check_names_a_tracepoint_that_does_not_exist") {
        return;
    }
    let out = Command::new(MEMFABRIC)
        .args([
            "check",
            "--tracepoint",
            "page_fault_user=exceptions:no_such_fault",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stderr.contains("probes not attached: exceptions:no_such_fault"),
        "{stderr}"
    );
    assert!(
        stdout.contains("tracepoint exceptions:no_such_fault does not exist"),
        "{stdout}"
    );
}

#[test]
fn check_rejects_malformed_overrides() {
    // Parsing happens before anything privileged: runs everywhere.
    let out = Command::new(MEMFABRIC)
        .args(["check", "--tracepoint", "page_fault_user"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("expected CATEGORY:NAME"), "{stderr}");
}
