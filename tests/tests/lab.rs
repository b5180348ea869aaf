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
    let id = memfabric::inventory::identity(g.pid);
    assert_eq!(id.name.as_deref(), Some("lab-1"));
    assert_eq!(id.uuid.as_deref(), Some(g.uuid.as_str()));

    // 64 MiB of a repeating pattern inside the guest: thousands of identical pages.
    let merged = wait_for(Duration::from_secs(120), || {
        ksm_stat(g.pid, "ksm_merging_pages") > 4096
    });
    let merging = ksm_stat(g.pid, "ksm_merging_pages");
    assert_eq!(lab::down().unwrap(), 1);
    assert!(merged, "KSM merged only {merging} pages of the guest");
    // (A just-killed QEMU may linger a moment as a zombie until init reaps it.)
    assert!(!lab::qemu::alive(g), "guest still running");
    assert_eq!(lab::down().unwrap(), 0, "down is safe to run twice");
    assert!(lab::guests().is_empty());
}
