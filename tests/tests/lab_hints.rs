//! Merge hints against a real QEMU guest whose operator turned merging off
//! (`-machine mem-merge=off`, what libvirt's `<nosharepages/>` does): the acting daemon
//! (`--act hints`, every guest in a domain that shares) ranks it like any guest, finds
//! stable duplicates in it, and still never makes its RAM mergeable: it says it left the
//! guest alone.

use std::{net::TcpListener, time::Duration};

use memfabric::{
    config::{Act, Config, Domain},
    daemon,
    host::inventory::{VmKind, describe},
};
use memfabric_tests::{TestLab, ksm_fast, privileged, wait_for};
use xtask::lab::{self, Profile, UpOptions};

fn get(port: u16, path: &str) -> Option<serde_json::Value> {
    let mut r = ureq::get(&format!("http://127.0.0.1:{port}{path}"))
        .call()
        .ok()?;
    serde_json::from_str(&r.body_mut().read_to_string().ok()?).ok()
}

#[test]
fn a_guest_whose_operator_turned_merging_off_is_left_alone() {
    if !privileged("a_guest_whose_operator_turned_merging_off_is_left_alone") {
        return;
    }
    let _ksm = ksm_fast();
    let _lab = TestLab::new("lab-hints");
    let guests = lab::up(&UpOptions {
        guests: 1,
        profile: Profile::Static,
        mem_merge: false,
        ..UpOptions::default()
    })
    .expect("booting a lab guest");
    let g = &guests[0];
    let vm = describe(g.pid, VmKind::Qemu).expect("the guest");
    assert!(
        vm.merge_off,
        "mem-merge=off not seen on {}'s command line",
        g.name
    );
    assert!(
        !vm.ram.is_empty() && vm.ram.iter().all(|m| !m.mergeable),
        "QEMU marked RAM mergeable despite mem-merge=off: {:?}",
        vm.ram
    );

    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let state_dir = std::env::temp_dir().join(format!("memfabric-lab-hints-{port}"));
    let cfg = Config {
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        expose_addresses: false,
        pids: Vec::new(),
        matches: Vec::new(),
        refresh: Duration::from_millis(300),
        scan_cpu: 0.5,
        scan_quiet_cpu: 0.05,
        act: vec![Act::Hints],
        ksmd_cpu: 0.1,
        state_dir: state_dir.clone(),
        untrusted_vmm_executables: false,
        vmm_uids: vec![0],
        web: Default::default(),
        domains: vec![Domain {
            name: "lab".into(),
            name_match: Some(regex::Regex::new("^lab-").unwrap()),
            uuids: Vec::new(),
            share: true,
        }],
        keep_hints: false,
        fabric: None,
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let daemon = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(daemon::serve(cfg, async {
                let _ = rx.await;
            }))
    });

    // Long enough for the planner to have made stable duplicates mergeable: classified
    // after stable_after (2) passes, then 3 calm rankings.
    let ranges = || get(port, &format!("/v1/ranges?vm={}", g.pid));
    let judged = wait_for(Duration::from_secs(240), || {
        ranges().is_some_and(|r| {
            r["passes"].as_u64().unwrap_or(0) >= 7
                && r["classes"]["stable-duplicate"].as_u64().unwrap_or(0) > 0
        })
    });
    let r = ranges();
    let status = get(port, "/v1/status").expect("status");
    let hints = &status["hints"];
    let _ = tx.send(());
    daemon.join().unwrap().expect("daemon ended with an error");

    assert!(
        judged,
        "the guest was never ranked with stable duplicates: {r:?}"
    );
    assert_eq!(hints["acting"], true, "{hints}");
    let left: Vec<&str> = hints["left_alone"]
        .as_array()
        .expect("left_alone")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        left.iter()
            .any(|w| w.starts_with(&format!("{} (pid {})", g.name, g.pid))),
        "{hints}"
    );
    assert!(
        !hints["recent"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["pid"].as_u64() == Some(u64::from(g.pid))),
        "a decision for the guest: {hints}"
    );
    assert_eq!(hints["applied_total"], 0, "{hints}");
    let after = describe(g.pid, VmKind::Qemu).expect("the guest");
    assert!(
        after.ram.iter().all(|m| !m.mergeable),
        "its RAM was made mergeable: {:?}",
        after.ram
    );
    let proc_status = std::fs::read_to_string(format!("/proc/{}/status", g.pid)).unwrap();
    assert!(proc_status.contains("TracerPid:\t0"), "{proc_status}");
    assert!(lab::qemu::alive(g));
    let _ = std::fs::remove_dir_all(&state_dir);
}
