//! The scanner's prediction against what KSM then achieves, on real lab guests.

use std::time::Duration;

use memfabric::scan::Scanner;
use memfabric_tests::{privileged, wait_for};
use xtask::{
    ksm,
    lab::{self, Profile, UpOptions},
};

#[test]
fn predicted_savings_match_what_ksm_achieves() {
    if !privileged("predicted_savings_match_what_ksm_achieves") {
        return;
    }
    let state = std::env::temp_dir().join(format!("memfabric-scan-lab-{}", std::process::id()));
    // SAFETY: the only test in this binary; no other thread reads the environment now.
    unsafe { std::env::set_var("MEMFABRIC_LAB_STATE", &state) };
    struct Down;
    impl Drop for Down {
        fn drop(&mut self) {
            let _ = lab::down();
        }
    }

    // KSM stays off while the scanner predicts; declared before the guests so that they
    // are gone before it restores the settings.
    let mut ksm = ksm::KsmSession::begin().unwrap();
    ksm.set("run", "0").unwrap();
    let guests = lab::up(&UpOptions {
        guests: 2,
        profile: Profile::Static,
        ..UpOptions::default()
    })
    .expect("booting lab guests");
    let _down = Down;
    let pids: Vec<u32> = guests.iter().map(|g| g.pid).collect();

    // Predict before KSM runs.
    let mut scanner = Scanner::new(2);
    for i in 0..3 {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(500));
        }
        scanner.pass(&pids).unwrap();
    }
    let r = scanner.report();
    let use_zero_pages = ksm::read_u64("use_zero_pages") == 1;
    let predicted = r.total.predicted_ksm_pages(use_zero_pages);

    // Then let KSM do it, until it converges.
    for (knob, value) in [
        ("pages_to_scan", "1000"),
        ("sleep_millisecs", "20"),
        ("run", "1"),
    ] {
        ksm.set(knob, value).unwrap();
    }
    let achieved = || ksm::read_u64("pages_sharing") + ksm::read_u64("ksm_zero_pages");
    // Converged: unchanged over the last 3 full scans (and at least 8 scans done).
    let start_scans = ksm::read_u64("full_scans");
    let mut history: Vec<(u64, u64)> = Vec::new();
    let converged = wait_for(Duration::from_secs(240), || {
        let scans = ksm::read_u64("full_scans") - start_scans;
        let now = achieved();
        history.push((scans, now));
        let before = history
            .iter()
            .rev()
            .find(|(s, _)| *s + 3 <= scans)
            .map(|(_, a)| *a);
        std::thread::sleep(Duration::from_millis(500));
        scans >= 8 && before == Some(now)
    });
    let got = achieved();
    eprintln!("scan: {:?}", r.total);
    eprintln!(
        "predicted {predicted} pages ({} mergeable duplicates, {} zero of which {} in THPs), \
         KSM achieved {got} ({:+.2} %)",
        r.total.mergeable_duplicate_pages,
        r.total.zero_pages,
        r.total.zero_thp_pages,
        100.0 * (got as f64 - predicted as f64) / predicted.max(1) as f64
    );
    assert!(converged, "KSM did not converge");
    let err = (got as f64 - predicted as f64).abs() / predicted.max(1) as f64;
    assert!(
        err <= 0.05,
        "prediction {predicted} vs KSM {got}: {:.1} % apart",
        err * 100.0
    );
    drop(_down);
    let _ = std::fs::remove_dir_all(&state);
}
