//! `memfabric hint` and `memfabric launch` as an operator runs them.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

const MEMFABRIC: &str = env!("CARGO_BIN_EXE_memfabric");

/// (start, end, mg) of the mapping named `name` in /proc/PID/smaps.
fn mapping(pid: u32, name: &str) -> Option<(u64, u64, bool)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut cur: Option<(u64, u64, bool)> = None;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
        {
            cur = line.ends_with(name).then_some((a, b, false));
        } else if let (Some(c), Some(flags)) = (cur.as_mut(), line.strip_prefix("VmFlags:")) {
            c.2 = flags.split_whitespace().any(|f| f == "mg");
            return cur;
        }
    }
    None
}

#[test]
fn hint_marks_a_range_of_a_running_process() {
    if !memfabric_harness::privileged("hint_marks_a_range_of_a_running_process") {
        return;
    }
    let mut child = Command::new("sleep").arg("600").spawn().unwrap();
    let pid = child.id();
    std::thread::sleep(Duration::from_millis(100));
    let (start, end, mg) = mapping(pid, "[stack]").expect("a stack mapping");
    assert!(!mg);
    let run = |extra: &[&str]| {
        Command::new(MEMFABRIC)
            .args(["hint", "--pid", &pid.to_string(), "--range"])
            .arg(format!("{start:#x}-{end:#x}"))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    };
    let out = run(&["--merge"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("mergeable") && said.contains("stopped"),
        "{said}"
    );
    assert_eq!(mapping(pid, "[stack]").map(|m| m.2), Some(true));
    let out = run(&["--unmerge"]);
    assert!(out.status.success());
    assert_eq!(mapping(pid, "[stack]").map(|m| m.2), Some(false));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("TracerPid:\t0"), "{status}");
    assert!(!status.contains("State:\tt"), "{status}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_process_in_another_user_namespace_is_left_alone() {
    if !memfabric_harness::privileged("a_process_in_another_user_namespace_is_left_alone") {
        return;
    }
    let mut child = Command::new("unshare")
        .args(["--user", "sleep", "600"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("unshare (util-linux)");
    let pid = child.id();
    // unshare execs sleep once the namespace exists.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::fs::read_link(format!("/proc/{pid}/exe"))
        .is_ok_and(|e| !e.to_string_lossy().ends_with("sleep"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "unshare did not exec sleep"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (start, end, _) = mapping(pid, "[stack]").expect("a stack mapping");
    let out = Command::new(MEMFABRIC)
        .args(["hint", "--pid", &pid.to_string(), "--range"])
        .arg(format!("{start:#x}-{end:#x}"))
        .arg("--merge")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("user namespace"), "{err}");
    assert_eq!(
        mapping(pid, "[stack]").map(|m| m.2),
        Some(false),
        "target touched"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn hint_refuses_bad_input_with_exit_2() {
    for args in [
        vec!["hint", "--pid", "4000000", "--all-guest-ram", "--merge"],
        vec!["hint", "--pid", "2", "--range", "0x1000-0x2000", "--merge"],
        vec![
            "hint",
            "--pid",
            "1",
            "--range",
            "0x1000-0x2000",
            "--unmerge",
        ],
        vec!["hint", "--pid", "1", "--range", "0x1001-0x2000", "--merge"],
    ] {
        let out = Command::new(MEMFABRIC).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(!err.is_empty(), "{args:?}");
    }
    let out = Command::new(MEMFABRIC)
        .args(["hint", "--pid", "1", "--merge"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "neither --range nor --all-guest-ram"
    );
}

#[test]
fn launch_turns_merging_on_for_the_program() {
    if !memfabric_harness::privileged("launch_turns_merging_on_for_the_program") {
        return;
    }
    let ksm_stat = |extra: &[&str]| {
        let out = Command::new(MEMFABRIC)
            .arg("launch")
            .args(extra)
            .args(["--", "cat", "/proc/self/ksm_stat"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(ksm_stat(&[]).contains("ksm_merge_any: yes"));
    assert!(ksm_stat(&["--no-merge"]).contains("ksm_merge_any: no"));
    let out = Command::new(MEMFABRIC)
        .args(["launch", "--", "/nonexistent/vmm"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/vmm"));
}
