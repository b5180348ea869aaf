//! The page scanner on workload children with known content: D identical pages, U unique,
//! Z zero, R rewritten continuously, their intra/inter split and 2 MiB range classes; and
//! scanning never grows a process's RSS.

use memfabric::actuate::knobs::Knob;
use std::time::Duration;

use memfabric::{
    heat::RangeHeatMap,
    host::pagemap::Pagemap,
    model::rank::{RangeClass, RankPolicy, RankedRange, RankedRanges},
    scan::{PAGE, RANGE_BYTES, RangeCounts, Scanner},
};
use memfabric_tests::{Workload, ksm_fast, privileged, rss_kib, wait_for};
use serial_test::serial;

const WORKLOAD: &str = env!("CARGO_BIN_EXE_memfabric-workload");

fn scan(pids: &[u32], passes: u32) -> memfabric::scan::Report {
    let mut s = Scanner::new(2);
    for i in 0..passes {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(200));
        }
        s.pass(pids).unwrap();
    }
    s.report()
}

/// `v` is `want`, give or take `slack` pages the process itself has elsewhere (its
/// threads' stacks and allocator arenas are anonymous memory too).
fn about(what: &str, v: u64, want: u64, slack: u64) {
    assert!(
        v >= want && v <= want + slack,
        "{what}: {v}, expected {want} (+{slack})"
    );
}

#[test]
#[serial(ksm)] // asserts nothing merged: never alongside a test that merges
fn known_content_is_classified_exactly() {
    if !privileged("known_content_is_classified_exactly") {
        return;
    }
    const D: u64 = 1024;
    const U: u64 = 512;
    const Z: u64 = 512;
    const R: u64 = 1024;
    let mut a = Workload::spawn(WORKLOAD);
    a.cmd(&format!("alloc {D} same"));
    a.cmd(&format!("alloc {U} unique"));
    a.cmd(&format!("alloc {Z} zero"));
    let r = a.cmd(&format!("alloc {R} unique"));
    a.cmd(&format!("churn {r}"));
    // 2 MiB-sized regions for the range classes.
    let dup_region = a.cmd("alloc 2048 same");
    let uni_region = a.cmd("alloc 2048 unique");
    let spans = [
        (a.span(&dup_region), RangeClass::StableDuplicate),
        (a.span(&uni_region), RangeClass::StableUnique),
        (a.span(&r), RangeClass::Volatile),
    ];
    // A second process holding 256 more copies of the same page as a's D group.
    let mut b = Workload::spawn(WORKLOAD);
    b.cmd("alloc 256 same");

    let report = scan(&[a.pid, b.pid], 4);
    let ca = report.per_pid[&a.pid];
    eprintln!(
        "a: {ca:?}\nb: {:?}\ntotal: {:?}",
        report.per_pid[&b.pid], report.total
    );
    about("zero pages", ca.zero_pages, Z, 32);
    about("stable pages", ca.stable_pages, D + U + 4096, 32);
    // The churn thread rewrites R pages every 20 ms; a 1 % tolerance for timing.
    assert!(
        ca.volatile_pages >= R * 99 / 100 && ca.volatile_pages <= R + 32,
        "volatile {}",
        ca.volatile_pages
    );
    // D pages of 0x5a plus the 2048-page region of the same content.
    let d_all = D + 2048;
    about("duplicate pages of a", ca.duplicate_pages, d_all, 16);
    let cb = report.per_pid[&b.pid];
    assert_eq!(cb.duplicate_pages, 256);
    // One copy of the group stays (charged to the lower PID).
    about(
        "mergeable duplicates",
        report.total.mergeable_duplicate_pages,
        d_all + 256 - 1,
        16,
    );
    // Intra/inter: a merges d_all - 1 copies inside itself; b holds 255 further copies
    // of its own and one copy that only exists because a has the content.
    let (lo, hi) = if a.pid < b.pid { (ca, cb) } else { (cb, ca) };
    assert_eq!(hi.mergeable_inter_pages, 1, "higher PID: {hi:?}");
    assert_eq!(
        lo.mergeable_inter_pages, 0,
        "lower PID keeps the copy: {lo:?}"
    );
    about("intra of a", ca.mergeable_intra_pages, d_all - 1, 16);
    assert_eq!(cb.mergeable_intra_pages, 255);
    assert_eq!(
        report.total.merged_pages, 0,
        "the regions were never madvised mergeable, so KSM cannot have merged them"
    );
    assert_eq!(
        report.total.potential_savings_bytes,
        report.total.mergeable_duplicate_pages * PAGE as u64
    );
    assert_eq!(
        report.total.potential_savings_intra_bytes + report.total.potential_savings_inter_bytes,
        report.total.potential_savings_bytes
    );
    assert_eq!(report.total.potential_savings_inter_bytes, PAGE as u64);
    assert!(report.bytes_read > 0);
    assert_eq!(report.state_bytes_per_page, 8);

    // Ranges: a's figures are the sum of its ranges', and the 2 MiB ranges inside each
    // region get the region's class.
    let ranked = RankedRanges::rank(&report, &RangeHeatMap::new(), 0.0, RankPolicy::default());
    let ranges = &ranked.by_pid[&a.pid];
    let sum =
        |f: fn(&RangeCounts) -> u32| ranges.iter().map(|r| u64::from(f(&r.counts))).sum::<u64>();
    assert_eq!(sum(|r| r.stable_pages), ca.stable_pages);
    assert_eq!(sum(|r| r.volatile_pages), ca.volatile_pages);
    assert_eq!(sum(|r| r.duplicate_pages), ca.duplicate_pages);
    for (span, want) in spans {
        for r in inside(span, ranges) {
            assert_eq!(r.class, want, "range {:#x}: {:?}", r.counts.start, r.counts);
        }
    }
}

/// Pages of [start, end) in `pid` that sit on KSM frames now, from kpageflags.
fn ksm_frames(pid: u32, (start, end): (u64, u64)) -> usize {
    let map = Pagemap::open(pid).unwrap();
    let (mut entries, mut flags) = (Vec::new(), Vec::new());
    let mut n = 0;
    for addr in (start..end).step_by(256 * PAGE) {
        let pages = (256 * PAGE as u64).min(end - addr) as usize / PAGE;
        map.read(addr, pages, &mut entries).unwrap();
        map.frame_flags_of(&entries, &mut flags);
        n += flags.iter().filter(|f| f.ksm).count();
    }
    n
}

/// Reading a page must leave KSM's merge of it alone. (`process_vm_readv` does not: its
/// read-only pin unshares non-exclusive anonymous pages; this test failed with it, pass 1
/// saw 0 of 2048 merged pages.)
#[test]
#[serial(ksm)]
fn scanning_never_unmerges_ksm_pages() {
    if !privileged("scanning_never_unmerges_ksm_pages") {
        return;
    }
    const N: usize = 2048;
    let mut ksm = ksm_fast(); // declared first: dropped after the workload died
    let mut w = Workload::spawn(WORKLOAD);
    let region = w.cmd(&format!("alloc {N} same"));
    w.cmd(&format!("mergeable {region}"));
    let span = w.span(&region);
    assert!(
        wait_for(Duration::from_secs(90), || ksm_frames(w.pid, span) == N),
        "KSM merged only {} of {N} pages",
        ksm_frames(w.pid, span)
    );
    // ksmd stops: nothing would merge again what a scan unmerged.
    ksm.set(Knob::Run, "0").unwrap();
    let mut s = Scanner::new(2);
    for pass in 0..3 {
        s.pass(&[w.pid]).unwrap();
        let merged = s.report().per_pid[&w.pid].merged_pages;
        assert_eq!(
            merged, N as u64,
            "pass {pass}: the scan saw {merged} merged pages"
        );
    }
    assert_eq!(
        ksm_frames(w.pid, span),
        N,
        "pages were unmerged by reading them"
    );
}

/// Pages on a KSM frame whose content was read once are not read again, and they account
/// exactly as if they had been: two scanners, one reading every page and one skipping
/// known frames, report the same figures pass after pass over merged, unique and zero
/// memory; the skipping one reads the merged region once. With the content of a merged
/// page changed (a write breaks COW onto a new frame), the change is seen in the next pass.
#[test]
#[serial(ksm)]
fn known_frames_are_not_read_again_and_account_the_same() {
    if !privileged("known_frames_are_not_read_again_and_account_the_same") {
        return;
    }
    const N: usize = 2048;
    let mut ksm = ksm_fast();
    let mut w = Workload::spawn(WORKLOAD);
    let merged = w.cmd(&format!("alloc {N} same"));
    w.cmd(&format!("mergeable {merged}"));
    w.cmd(&format!("alloc {N} unique"));
    let span = w.span(&merged);
    assert!(
        wait_for(Duration::from_secs(90), || ksm_frames(w.pid, span) == N),
        "KSM merged only {} of {N} pages",
        ksm_frames(w.pid, span)
    );
    ksm.set(Knob::Run, "0").unwrap();
    let (mut all, mut skip) = (Scanner::new(2), Scanner::new(2));
    all.set_skip_known(false);
    let mut read = [0u64; 2];
    for pass in 0..4 {
        for (i, s) in [&mut all, &mut skip].into_iter().enumerate() {
            let before = s.bytes_read();
            s.pass(&[w.pid]).unwrap();
            read[i] = s.bytes_read() - before;
        }
        let (a, b) = (all.report(), skip.report());
        assert_eq!(
            a.per_pid[&w.pid], b.per_pid[&w.pid],
            "pass {pass}: the figures differ"
        );
        assert_eq!(a.per_pid[&w.pid].merged_pages, N as u64);
        if pass > 0 {
            // The merged region (one KSM frame, read once) is skipped, but for the
            // occasional check; the unique pages are read.
            let merged_bytes = (N * PAGE) as u64;
            assert!(
                read[1] + merged_bytes * 3 / 4 <= read[0],
                "pass {pass}: read {} with skipping, {} without",
                read[1],
                read[0]
            );
        }
    }
    let (stats, frames) = skip.known_stats();
    assert!(stats.skipped >= 3 * (N as u64) * 3 / 4, "{stats:?}");
    assert_eq!(stats.mismatched, 0, "{stats:?}");
    // One KSM frame per max_page_sharing sharers holds the merged region.
    let per_frame: usize = std::fs::read_to_string("/sys/kernel/mm/ksm/max_page_sharing")
        .map_or(256, |v| v.trim().parse().unwrap_or(256));
    assert_eq!(frames, N.div_ceil(per_frame), "KSM frames remembered");
    // A write to a merged page breaks COW onto a frame of its own: the next pass reads it.
    w.cmd(&format!("touch {merged} 16"));
    skip.pass(&[w.pid]).unwrap();
    all.pass(&[w.pid]).unwrap();
    let (a, b) = (all.report(), skip.report());
    assert_eq!(a.per_pid[&w.pid], b.per_pid[&w.pid]);
    assert_eq!(b.per_pid[&w.pid].merged_pages, (N - 16) as u64);
}

/// Calm memory (unchanged for a pass, at most one change lately) is read from a rotating sample of
/// one page in eight, and accounts as if it had been read. A block rewritten at once is seen whole in
/// the very pass whose sample first sees it (the chunks it touched are read in full then),
/// and a page written after a merge (its KSM frame gone) is read at once.
#[test]
#[serial(ksm)]
fn calm_chunks_are_sampled_and_a_rewrite_is_read_whole_in_the_pass_that_sees_it() {
    if !privileged("calm_chunks_are_sampled_and_a_rewrite_is_read_whole_in_the_pass_that_sees_it") {
        return;
    }
    use memfabric::scan::page_state::{CALM_AFTER, SAMPLE_ONE_IN};
    const N: usize = 4096;
    const BLOCK: usize = 512;
    let mut w = Workload::spawn(WORKLOAD);
    let region = w.cmd(&format!("alloc {N} unique"));
    let (mut all, mut skip) = (Scanner::new(2), Scanner::new(2));
    all.set_skip_known(false);
    for _ in 0..=CALM_AFTER {
        all.pass(&[w.pid]).unwrap();
        skip.pass(&[w.pid]).unwrap();
    }
    let mut read = [0u64; 2];
    for _ in 0..SAMPLE_ONE_IN {
        for (i, s) in [&mut all, &mut skip].into_iter().enumerate() {
            let before = s.bytes_read();
            s.pass(&[w.pid]).unwrap();
            read[i] += s.bytes_read() - before;
        }
        assert_eq!(all.report().per_pid[&w.pid], skip.report().per_pid[&w.pid]);
    }
    assert!(
        read[1] * 4 <= read[0],
        "calm pages were read: {} bytes with sampling, {} without",
        read[1],
        read[0]
    );
    // A block rewritten: the next pass of each sees all of it.
    w.cmd(&format!("touch {region} {BLOCK}"));
    all.pass(&[w.pid]).unwrap();
    skip.pass(&[w.pid]).unwrap();
    let (a, b) = (all.report(), skip.report());
    assert_eq!(a.per_pid[&w.pid].volatile_pages, BLOCK as u64);
    assert_eq!(a.per_pid[&w.pid], b.per_pid[&w.pid]);
    let stats = skip.known_stats().0;
    assert!(
        stats.escalated >= (BLOCK - BLOCK / SAMPLE_ONE_IN) as u64,
        "{stats:?}"
    );
}

/// A report is built in full only after a pass that changed a figure: a pass that found
/// every page as it was reuses the last report (pass counts brought up to date), and it
/// equals what a full build gives; a rewrite has the next one built in full again.
#[test]
#[serial(ksm)]
fn a_report_is_rebuilt_only_when_a_figure_changed() {
    if !privileged("a_report_is_rebuilt_only_when_a_figure_changed") {
        return;
    }
    let mut w = Workload::spawn(WORKLOAD);
    w.cmd("alloc 2048 same");
    let region = w.cmd("alloc 2048 unique");
    let mut s = Scanner::new(2);
    // New: built. Unchanged once: every figure as it was (reused). Stable after two
    // unchanged passes: built. Then nothing changes: reused.
    for (pass, built) in [
        (1, (1, 0)),
        (2, (1, 1)),
        (3, (2, 1)),
        (4, (2, 2)),
        (5, (2, 3)),
    ] {
        s.pass(&[w.pid]).unwrap();
        let r = s.next_report();
        assert_eq!(s.reports_built(), built, "pass {pass}");
        assert_eq!(*r, s.report(), "pass {pass}: what a full build says");
        assert_eq!(r.vm_passes[&w.pid], pass);
    }
    w.cmd(&format!("touch {region} 16"));
    s.pass(&[w.pid]).unwrap();
    let rebuilt = s.next_report();
    assert_eq!(s.reports_built(), (3, 3), "a rewrite: built in full");
    assert_eq!(rebuilt.per_pid[&w.pid].volatile_pages, 16);
    assert_eq!(*rebuilt, s.report());
}

#[test]
fn scanning_never_faults_pages_in() {
    if !privileged("scanning_never_faults_pages_in") {
        return;
    }
    let mut w = Workload::spawn(WORKLOAD);
    w.cmd("sparse 8192"); // 32 MiB mapped, half of it never touched
    let before = rss_kib(w.pid);
    let report = scan(&[w.pid], 3);
    let after = rss_kib(w.pid);
    assert!(report.per_pid[&w.pid].pages_present >= 4096);
    assert!(
        after <= before + 64,
        "RSS grew from {before} kB to {after} kB while scanning"
    );
}

#[test]
fn an_unknown_pid_is_an_error() {
    if !privileged("an_unknown_pid_is_an_error") {
        return;
    }
    let err = Scanner::new(2).pass(&[99_999_999]).unwrap_err().to_string();
    assert!(err.contains("no process with PID 99999999"), "{err}");
}

/// The ranked ranges wholly inside `[start, end)`; there must be one.
fn inside((start, end): (u64, u64), ranges: &[RankedRange]) -> Vec<&RankedRange> {
    let whole: Vec<_> = ranges
        .iter()
        .filter(|r| r.counts.start >= start && r.counts.start + RANGE_BYTES <= end)
        .collect();
    assert!(
        !whole.is_empty(),
        "no whole 2 MiB range in {start:#x}..{end:#x}"
    );
    whole
}

/// A region rewritten with two contents in turn is volatile from the rechecks between
/// passes, whatever the passes read; a region written once after the first pass, and a
/// calm one, are not rewritten again.
#[test]
fn rechecks_between_passes_see_repeated_rewrites() {
    if !privileged("rechecks_between_passes_see_repeated_rewrites") {
        return;
    }
    let mut w = Workload::spawn(WORKLOAD);
    let flip = w.cmd("alloc 1024 same");
    let once = w.cmd("alloc 1024 unique");
    let calm = w.cmd("alloc 1024 same");
    // Slower than the rounds (0.5 to 1.5 s apart): each round sees at most one rewrite.
    w.cmd(&format!("flip {flip} 2000"));
    let spans = [w.span(&flip), w.span(&once), w.span(&calm)];
    let mut s = Scanner::new(2);
    s.pass(&[w.pid]).unwrap();
    s.idle(Duration::from_secs(3));
    w.cmd(&format!("touch {once} 1024"));
    s.idle(Duration::from_secs(6));
    s.pass(&[w.pid]).unwrap();
    let report = s.report();
    let ranked = RankedRanges::rank(&report, &RangeHeatMap::new(), 0.0, RankPolicy::default());
    // (rechecked, rewritten again) per region: the flipped one, about four rewrites in the
    // 9 s, all seen; the one rewritten once, still tracked (it changed) but no repeat; the
    // calm one, calm in both passes, no longer tracked.
    let want = [(8, 8), (8, 0), (0, 0)];
    for (i, (span, want)) in spans.into_iter().zip(want).enumerate() {
        for r in inside(span, &ranked.by_pid[&w.pid]) {
            let c = r.counts;
            eprintln!("region {i}: {c:?} {:?}", r.class);
            assert_eq!((c.rechecked_pages, c.rewritten_again_pages), want, "{c:?}");
            if i == 0 {
                assert_eq!(r.class, RangeClass::Volatile);
            }
        }
    }
}

/// A sampled pass (a new large VM's first ones) reads one page in 16 and ranks each range
/// as full passes do: duplicated, unique and churning regions get the same classes.
#[test]
fn sampled_passes_read_a_sixteenth_and_rank_like_full_ones() {
    if !privileged("sampled_passes_read_a_sixteenth_and_rank_like_full_ones") {
        return;
    }
    use memfabric::scan::schedule::{SAMPLE_ONE_IN, SAMPLED_PASSES};
    let mut w = Workload::spawn(WORKLOAD);
    let dup = w.cmd("alloc 4096 same");
    let uni = w.cmd("alloc 4096 unique");
    let churn = w.cmd("alloc 4096 unique");
    w.cmd(&format!("churn {churn}"));
    let spans = [
        (w.span(&dup), RangeClass::StableDuplicate),
        (w.span(&uni), RangeClass::StableUnique),
        (w.span(&churn), RangeClass::Volatile),
    ];
    let (mut full, mut sampled) = (Scanner::new(2), Scanner::new(2));
    for i in 0..SAMPLED_PASSES {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(200));
        }
        full.pass(&[w.pid]).unwrap();
        sampled.pass_sampled(&[w.pid], SAMPLE_ONE_IN).unwrap();
    }
    let rank = |s: &Scanner| {
        RankedRanges::rank(
            &s.report(),
            &RangeHeatMap::new(),
            0.0,
            RankPolicy::default(),
        )
    };
    let (a, b) = (rank(&full), rank(&sampled));
    for (span, want) in spans {
        for (ra, rb) in inside(span, &a.by_pid[&w.pid])
            .into_iter()
            .zip(inside(span, &b.by_pid[&w.pid]))
        {
            assert_eq!(
                (ra.class, rb.class),
                (want, want),
                "{:?} / {:?}",
                ra.counts,
                rb.counts
            );
            // 32 of the range's 512 pages.
            assert_eq!(rb.counts.pages_present, ra.counts.pages_present / 16);
        }
    }
    let (fa, fb) = (full.bytes_read(), sampled.bytes_read());
    assert!(
        fb * 12 <= fa,
        "sampled passes read {fb} bytes, full ones {fa}"
    );
}
