//! The VM lab end to end: a real QEMU guest whose memory KSM really merges.

use std::time::Duration;

use memfabric_tests::{TestLab, ksm_fast, ksm_stat, privileged, wait_for};
use xtask::lab::{self, Profile, UpOptions};

#[test]
fn a_static_guest_gets_merged_and_lab_down_leaves_nothing_running() {
    if !privileged("a_static_guest_gets_merged_and_lab_down_leaves_nothing_running") {
        return;
    }
    let _ksm = ksm_fast();
    let _lab = TestLab::new("lab-test");
    let guests = lab::up(&UpOptions {
        guests: 1,
        profile: Profile::Static,
        ..UpOptions::default()
    })
    .expect("booting a lab guest");
    let g = &guests[0];
    assert_eq!(lab::guests(), guests, "recorded in the state file");
    let id = memfabric::host::inventory::identity(g.pid);
    assert_eq!(id.name.as_deref(), Some("lab-1"));
    assert_eq!(id.uuid.as_deref(), Some(g.uuid.as_str()));

    // 64 MiB of a repeating pattern inside the guest: thousands of identical pages.
    let merged = wait_for(Duration::from_secs(120), || {
        ksm_stat(g.pid, "ksm_merging_pages") > 4096
    });
    let merging = ksm_stat(g.pid, "ksm_merging_pages");

    // Its guest RAM: QEMU marks it mergeable itself (mem-merge defaults to on).
    let ram = memfabric::host::inventory::describe(g.pid, memfabric::host::inventory::VmKind::Qemu)
        .expect("the guest")
        .ram;
    assert!(
        !ram.is_empty() && ram.iter().all(|m| m.mergeable),
        "{ram:?}"
    );
    let (start, end) = (ram[0].span.start, ram[0].span.end);
    let mg = || {
        memfabric::host::inventory::describe(g.pid, memfabric::host::inventory::VmKind::Qemu)
            .map(|v| v.ram.iter().all(|m| m.mergeable))
    };
    let untraced_and_running = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", g.pid)).unwrap();
        assert!(status.contains("TracerPid:\t0"), "{status}");
        assert!(!status.contains("State:\tt"), "{status}");
        assert!(lab::qemu::alive(g));
    };
    // QEMU's own switch over QMP: the backend's `merge`, off and on again.
    let backends = memfabric::actuate::qmp::set_guest_merge(g.pid, false).expect("QMP off");
    assert!(backends.iter().any(|b| b == "pc.ram"), "{backends:?}");
    assert_eq!(mg(), Some(false), "merge off over QMP left mg");
    memfabric::actuate::qmp::set_guest_merge(g.pid, true).expect("QMP on");
    assert_eq!(mg(), Some(true));
    // The same through ptrace injection into the running QEMU (a TCG vCPU thread busy,
    // the main loop in ppoll).
    use memfabric::actuate::inject::{Advice, madvise};
    let t = Duration::from_secs(2);
    let off = madvise(g.pid, start, end, Advice::Unmergeable, t).expect("injected unmerge");
    assert_eq!(mg(), Some(false));
    untraced_and_running();
    let on = madvise(g.pid, start, end, Advice::Mergeable, t).expect("injected merge");
    assert_eq!(mg(), Some(true));
    untraced_and_running();
    eprintln!(
        "lab guest: QEMU stopped {:.0} us (unmerge) and {:.0} us (merge) for the injections",
        off.stopped.as_secs_f64() * 1e6,
        on.stopped.as_secs_f64() * 1e6
    );
    // KSM merges it again.
    assert!(
        wait_for(Duration::from_secs(120), || ksm_stat(
            g.pid,
            "ksm_merging_pages"
        ) > 4096),
        "the guest was not merged again after the hints"
    );
    assert_eq!(lab::down().unwrap(), 1);
    assert!(merged, "KSM merged only {merging} pages of the guest");
    // (A just-killed QEMU may linger a moment as a zombie until init reaps it.)
    assert!(!lab::qemu::alive(g), "guest still running");
    assert_eq!(lab::down().unwrap(), 0, "down is safe to run twice");
    assert!(lab::guests().is_empty());
}
