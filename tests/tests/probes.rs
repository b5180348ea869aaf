//! The probes against real processes and real KSM.

use std::time::Duration;

use memfabric::probes::{LoadOptions, ProbeEvent, ProbeState, Probes};
use memfabric_tests::{Workload, ksm_fast, privileged, vmstat, wait_for};
use serial_test::serial;

const WORKLOAD: &str = env!("CARGO_BIN_EXE_memfabric-workload");

fn load() -> Probes {
    let probes = Probes::load(&LoadOptions::default()).expect("loading probes");
    for s in probes.status() {
        assert!(
            s.attached(),
            "{} on {}: {:?}",
            s.program,
            s.tracepoint,
            s.state
        );
    }
    probes
}

#[test]
fn write_faults_are_counted_for_tracked_processes_only() {
    if !privileged("write_faults_are_counted_for_tracked_processes_only") {
        return;
    }
    const N: u64 = 4096;
    let mut probes = load();
    let mut tracked = Workload::spawn(WORKLOAD);
    let mut untracked = Workload::spawn(WORKLOAD);
    probes.track(tracked.pid).unwrap();

    tracked.cmd(&format!("alloc {N} unique"));
    untracked.cmd(&format!("alloc {N} unique"));

    let s = probes.stats(tracked.pid).unwrap().expect("tracked");
    assert!(s.write_faults >= N, "write faults {} < {N}", s.write_faults);
    assert!(s.mm != 0, "the fault probe learned the process's mm");
    assert_eq!(probes.mm_owner(s.mm), Some(tracked.pid));
    // First-touch faults are not heat: nothing was shared yet.
    assert!(probes.write_heat(tracked.pid).len() < 64);
    assert_eq!(probes.stats(untracked.pid).unwrap(), None);
    assert!(probes.write_heat(untracked.pid).is_empty());

    // Rewriting the same pages: no new faults (already mapped writable), so the counters
    // measure faults, not writes.
    let before = s.write_faults;
    tracked.cmd("touch 0 1024");
    let after = probes.stats(tracked.pid).unwrap().unwrap().write_faults;
    assert!(
        after - before < 64,
        "rewrites faulted {} times",
        after - before
    );
}

#[test]
#[serial(ksm)]
fn ksm_cow_breaks_match_the_kernels_cow_ksm() {
    if !privileged("ksm_cow_breaks_match_the_kernels_cow_ksm") {
        return;
    }
    const N: i64 = 2048;
    const M: u64 = 300;
    // Declared first so it drops last, after the workload died (see ksm_fast).
    let _ksm = ksm_fast();
    let mut probes = load();
    let mut w = Workload::spawn(WORKLOAD);
    probes.track(w.pid).unwrap();
    let region = w.alloc_mergeable(N);
    w.await_merged(N, "the workload");
    let s = probes.stats(w.pid).unwrap().unwrap();
    assert!(
        s.ksm_merges >= N as u64,
        "probe saw {} merges for the process, kernel says {N} pages merged",
        s.ksm_merges
    );

    let cow_before = vmstat("cow_ksm");
    w.cmd(&format!("touch {region} {M}"));
    let cow_delta = vmstat("cow_ksm") - cow_before;
    let after = probes.stats(w.pid).unwrap().unwrap();
    let probe_delta = after.ksm_cow_breaks - s.ksm_cow_breaks;
    let signature_delta = after.write_protect_faults - s.write_protect_faults;
    eprintln!(
        "cow_ksm delta {cow_delta}, probe KSM COW breaks {probe_delta}, \
         write-protect faults {signature_delta}"
    );
    assert!(
        cow_delta >= M,
        "kernel counted {cow_delta} KSM COW breaks < {M}"
    );
    assert!(
        probe_delta >= M,
        "probe counted {probe_delta} KSM COW breaks < {M}"
    );
    assert!(
        probe_delta.abs_diff(cow_delta) <= 3,
        "probe {probe_delta} vs kernel cow_ksm {cow_delta}"
    );
    // One write to each of M merged pages: M write-protect faults, every one of them a
    // KSM COW break (nothing else write-protected these pages).
    assert_eq!(
        signature_delta, probe_delta,
        "write-protect faults vs KSM COW breaks of {M} single writes"
    );
    // Exactly the touched pages are hot now, one write-protect fault and one break each.
    let (start, _) = w.span(&region);
    let touched = start..start + M * 4096;
    let heat = probes.write_heat(w.pid);
    let hot: Vec<_> = heat.iter().filter(|(p, _)| touched.contains(p)).collect();
    assert_eq!(hot.len() as u64, M, "hot pages in the touched range");
    for (page, h) in &hot {
        assert_eq!(
            (h.write_protect_faults, h.cow_breaks),
            (1, 1),
            "page {page:#x}"
        );
    }
    // The heat map carries the exact breaks per page too (the ranking's COW heat).
    let broken: u64 = heat.iter().map(|(_, h)| u64::from(h.cow_breaks)).sum();
    assert_eq!(
        broken, after.ksm_cow_breaks,
        "COW breaks in the heat map vs the process counter"
    );
    let counters = probes.counters().unwrap();
    assert!(counters.ksm_merges >= N as u64);
    assert_eq!(counters.events_dropped, 0);
    drop(w);
}

#[test]
fn exit_of_a_tracked_process_removes_it_from_the_maps() {
    if !privileged("exit_of_a_tracked_process_removes_it_from_the_maps") {
        return;
    }
    let mut probes = load();
    let mut w = Workload::spawn(WORKLOAD);
    let pid = w.pid;
    probes.track(pid).unwrap();
    w.cmd("alloc 64 unique");
    let mm = probes.stats(pid).unwrap().unwrap().mm;
    assert_ne!(mm, 0);
    w.exit();

    let mut exit = None;
    assert!(
        wait_for(Duration::from_secs(10), || {
            for ev in probes.wait_events(Duration::from_millis(200)) {
                let ProbeEvent::Exit { tgid, stats } = ev;
                if tgid == pid {
                    exit = Some(stats);
                }
            }
            exit.is_some()
        }),
        "no exit event for {pid}"
    );
    let final_stats = exit.unwrap();
    assert!(final_stats.write_faults >= 64, "{final_stats:?}");
    assert_eq!(probes.stats(pid).unwrap(), None);
    assert_eq!(probes.mm_owner(mm), None);
    assert!(probes.write_heat(pid).is_empty());
    assert!(probes.tracked().unwrap().iter().all(|(t, _)| *t != pid));
}

#[test]
fn a_missing_tracepoint_is_named_and_the_rest_still_attach() {
    if !privileged("a_missing_tracepoint_is_named_and_the_rest_still_attach") {
        return;
    }
    let mut opts = LoadOptions::default();
    opts.add_override("kvm_page_fault=kvm:no_such_tracepoint")
        .unwrap();
    let probes = Probes::load(&opts).unwrap();
    for s in probes.status() {
        if s.program == "kvm_page_fault" {
            let ProbeState::Unavailable(why) = &s.state else {
                panic!("expected unavailable, got {:?}", s.state);
            };
            assert!(why.contains("kvm:no_such_tracepoint"), "{why}");
        } else {
            assert!(s.attached(), "{}: {:?}", s.program, s.state);
        }
    }
    assert!(!probes.all_attached());
}

#[test]
fn bad_input_gets_clear_errors() {
    if !privileged("bad_input_gets_clear_errors") {
        return;
    }
    let mut probes = load();
    // PIDs above pid_max (4194304 at most) never exist.
    let err = probes.track(99_999_999).unwrap_err().to_string();
    assert!(err.contains("no process with PID 99999999"), "{err}");
    let mut opts = LoadOptions::default();
    let err = opts
        .add_override("page_fault_user")
        .unwrap_err()
        .to_string();
    assert!(err.contains("CATEGORY:NAME"), "{err}");
    let err = opts.add_override("nope=a:b").unwrap_err().to_string();
    assert!(err.contains("unknown probe program"), "{err}");
}

#[test]
fn an_idle_process_gets_its_mm_learnt_without_faulting() {
    if !privileged("an_idle_process_gets_its_mm_learnt_without_faulting") {
        return;
    }
    let mut probes = load();
    let mut w = Workload::spawn(WORKLOAD);
    w.cmd("alloc 64 unique"); // populated before it is tracked, like a long-running VM
    probes.track(w.pid).unwrap();
    assert!(
        probes.mm_learning(),
        "learner attached while the mm is unknown"
    );
    w.cmd("touch 0 1"); // runs and sleeps again, without a page fault
    assert!(
        wait_for(Duration::from_secs(5), || {
            probes.stats(w.pid).unwrap().is_some_and(|s| s.mm != 0)
        }),
        "mm not learnt"
    );
    let s = probes.stats(w.pid).unwrap().unwrap();
    assert_eq!(
        s.write_faults, 0,
        "learnt from a context switch, not a fault"
    );
    assert_eq!(probes.mm_owner(s.mm), Some(w.pid));
    probes.refresh_mm_learning().unwrap();
    assert!(
        !probes.mm_learning(),
        "learner detached once every mm is known"
    );
}

/// A COW break KVM resolves (a guest write: GUP with FOLL_WRITE) raises no user page fault;
/// `kvm:kvm_unmap_hva_range` on the writing thread catches it. This machine's /dev/kvm
/// cannot boot a stock guest, but KVM_CREATE_VM works: a VM in the workload makes KVM's
/// MMU notifier watch its mm, and writes through /proc/self/mem take the same GUP path.
#[test]
#[serial(ksm)]
fn kvm_cow_breaks_without_a_user_fault_are_counted() {
    if !privileged("kvm_cow_breaks_without_a_user_fault_are_counted") {
        return;
    }
    if !std::path::Path::new("/dev/kvm").exists() {
        panic!("/dev/kvm is missing: this test needs KVM (modprobe kvm_intel or kvm_amd)");
    }
    const N: i64 = 1024;
    const M: u64 = 200;
    let _ksm = ksm_fast();
    let mut probes = load();
    let mut w = Workload::spawn(WORKLOAD);
    w.cmd("kvm");
    probes.track(w.pid).unwrap();
    let region = w.alloc_mergeable(N);
    w.await_merged(N, "the workload");
    let before = probes.stats(w.pid).unwrap().unwrap();
    let kvm_before = probes.counters().unwrap().kvm_cow_breaks;
    let cow_before = vmstat("cow_ksm");
    w.cmd(&format!("memwrite {region} {M}"));
    let cow_delta = vmstat("cow_ksm") - cow_before;
    let after = probes.stats(w.pid).unwrap().unwrap();
    let breaks = after.ksm_cow_breaks - before.ksm_cow_breaks;
    let via_kvm = probes.counters().unwrap().kvm_cow_breaks - kvm_before;
    eprintln!("cow_ksm +{cow_delta}, memfabric +{breaks} (through KVM's notifier: {via_kvm})");
    assert!(
        cow_delta >= M,
        "the kernel counted {cow_delta} COW breaks < {M}"
    );
    assert_eq!(
        after.write_protect_faults, before.write_protect_faults,
        "writes through GUP raised user page faults"
    );
    assert!(
        breaks.abs_diff(cow_delta) <= 2 && via_kvm == breaks,
        "memfabric {breaks} (kvm {via_kvm}) vs kernel {cow_delta}"
    );
    // Plain user writes in the same process are still counted once, not twice.
    let before = probes.stats(w.pid).unwrap().unwrap();
    let cow_before = vmstat("cow_ksm");
    w.cmd(&format!("touch {region} {N}"));
    let cow_delta = vmstat("cow_ksm") - cow_before;
    let after = probes.stats(w.pid).unwrap().unwrap();
    let breaks = after.ksm_cow_breaks - before.ksm_cow_breaks;
    assert!(
        breaks.abs_diff(cow_delta) <= 2,
        "user writes: memfabric {breaks} vs kernel {cow_delta}"
    );
    drop(w);
}
