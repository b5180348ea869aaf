//! The scanner on real lab guests: its prediction against what KSM then achieves, the
//! intra/inter split, merged pages against ksm_stat, and a guest's RSS while it is read.

use memfabric::actuate::knobs::Knob;
use std::time::Duration;

use memfabric::scan::Scanner;
use memfabric_tests::{TestLab, privileged, rss_kib, wait_for};
use xtask::{
    ksm,
    lab::{self, Profile, UpOptions},
};

#[test]
fn predicted_savings_match_what_ksm_achieves() {
    if !privileged("predicted_savings_match_what_ksm_achieves") {
        return;
    }
    // KSM stays off while the scanner predicts; the session is declared before the lab so
    // that the guests are gone before it restores the settings.
    let mut ksm = ksm::KsmSession::begin().unwrap();
    ksm.set(Knob::Run, "0").unwrap();
    let _lab = TestLab::new("scan-lab");
    let guests = lab::up(&UpOptions {
        guests: 2,
        profile: Profile::Static,
        ..UpOptions::default()
    })
    .expect("booting lab guests");
    let pids: Vec<u32> = guests.iter().map(|g| g.pid).collect();

    // Predict before KSM runs.
    let rss_before: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
    let mut scanner = Scanner::new(2);
    for i in 0..3 {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(500));
        }
        scanner.pass(&pids).unwrap();
    }
    let r = scanner.report();
    // Reading never faults guest RAM in: a third of each guest's RAM is not present, and
    // scanning would add all of it (~80 MiB) to the QEMU process's RSS.
    for (pid, before) in pids.iter().zip(rss_before) {
        let after = rss_kib(*pid);
        eprintln!("guest {pid}: RSS {before} kB before 3 scan passes, {after} kB after");
        assert!(
            after <= before + 4096,
            "guest {pid}: RSS grew from {before} kB to {after} kB while scanning"
        );
    }
    let use_zero_pages = ksm::read_u64("use_zero_pages") == 1;
    let predicted = r.total.predicted_ksm_pages(use_zero_pages);

    // Then let KSM do it, until it converges.
    for (knob, value) in [
        (Knob::PagesToScan, "1000"),
        (Knob::SleepMillisecs, "20"),
        (Knob::Run, "1"),
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

    // Intra/inter on real guests: the lower PID keeps the first copies, the other guest's
    // copies of content the first one holds are inter-VM; each guest's split adds up.
    let (lo, hi) = (pids[0].min(pids[1]), pids[0].max(pids[1]));
    let (clo, chi) = (r.per_pid[&lo], r.per_pid[&hi]);
    eprintln!(
        "intra/inter mergeable pages: pid {lo} {}/{}, pid {hi} {}/{}",
        clo.mergeable_intra_pages,
        clo.mergeable_inter_pages,
        chi.mergeable_intra_pages,
        chi.mergeable_inter_pages
    );
    assert_eq!(clo.mergeable_inter_pages, 0);
    assert!(
        chi.mergeable_inter_pages > 0,
        "the guests share a kernel and data"
    );
    for c in [clo, chi] {
        assert_eq!(
            c.mergeable_intra_pages + c.mergeable_inter_pages,
            c.mergeable_duplicate_pages
        );
    }

    // After KSM converged the scanner sees its merges: merged pages per guest as the
    // kernel counts them (ksm_stat), and almost nothing left to save.
    scanner.pass(&pids).unwrap();
    let after = scanner.report();
    for pid in &pids {
        let kernel = memfabric::host::ksm::KsmStat::read(*pid).merging_pages as u64;
        let seen = after.per_pid[pid].merged_pages;
        eprintln!("pid {pid}: scanner sees {seen} merged pages, ksm_stat {kernel}");
        assert!(
            seen.abs_diff(kernel) as f64 <= 0.02 * kernel as f64 + 16.0,
            "pid {pid}: scanner {seen} merged pages vs ksm_stat {kernel}"
        );
    }
    let left = after.total.potential_savings_bytes;
    eprintln!(
        "potential savings before KSM {} MiB, after {} MiB",
        r.total.potential_savings_bytes >> 20,
        left >> 20
    );
    assert!(
        left <= r.total.potential_savings_bytes / 20,
        "KSM converged but {left} bytes are still reported mergeable"
    );
}
