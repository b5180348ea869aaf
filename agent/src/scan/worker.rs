//! The daemon's background page scan: one thread, paced to the configured share of a core,
//! scanning the tracked VMs pass after pass and publishing the latest report.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{
    scan::{
        PAGE, Report, Scanner,
        schedule::{PassKind, SAMPLE_ONE_IN, Schedule},
        sleep_unless,
    },
    util::thread_cpu,
};

/// How the scanner took in pages without reading them (see [`super::known`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScanPages {
    /// On the zero page or on a KSM frame whose content was read before.
    pub known: u64,
    /// Calm, outside the pass's rotating sample: taken as unchanged.
    pub sampled_out: u64,
    /// Calm, left out of the sample, then read: a calm page of their chunk changed.
    pub escalated: u64,
}

/// What the scan thread publishes.
#[derive(Clone, Debug, Default)]
pub struct ScanStatus {
    /// Shared, not copied: each refresh of the daemon reads it.
    pub report: Option<Arc<Report>>,
    /// Wall time of the last full pass over every tracked VM.
    pub pass_seconds: f64,
    /// Wall time of the last pass over each VM, by PID.
    pub vm_pass_seconds: std::collections::BTreeMap<u32, f64>,
    pub bytes_read: u64,
    /// Pages taken in without a read, and escalated reads.
    pub pages: ScanPages,
    /// Ranges the rechecks between passes track now.
    pub rechecked_ranges: u64,
    /// Set when the scan thread died (a panic): the daemon reports it on /healthz.
    pub failed: Option<String>,
    /// VMs scanned every round now (new, woken, or their memory moved), and VMs resting.
    pub busy_vms: usize,
    pub quiet_vms: usize,
}

pub struct ScanWorker {
    inbox: Arc<Mutex<Inbox>>,
    status: Arc<Mutex<ScanStatus>>,
    /// The daemon's reads of the status (see [`Reports`]).
    reads: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The text of a caught panic.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Each pass's pace, drawn around the budget: passes of one length sample a page at one
/// interval, and a guest that rewrites a region with two contents in turn at half that
/// interval reads as unchanged in every pass (the lab's churn guests did, and ksmd merged
/// their rewritten ranges). A pace from 0.75 to 1.25 times the budget, with the VMs in a
/// new order each pass, spreads the interval by more than a rewrite period; the average
/// (the harmonic mean of the draws) stays just under the budget.
const PACE_SPREAD: f64 = 0.25;

/// A small generator for the pace and order draws (SplitMix64): nothing depends on their
/// secrecy, only on their spread.
struct Jitter(u64);

impl Jitter {
    fn seeded() -> Jitter {
        // The low 64 bits of the nanoseconds: a seed, not a time.
        let now =
            u64::try_from(crate::util::clock::since_epoch().as_nanos() & u128::from(u64::MAX))
                .unwrap_or_default();
        Jitter(now ^ u64::from(std::process::id()).rotate_left(32))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `budget` times a draw from 1 ± PACE_SPREAD.
    fn pace(&mut self, budget: f64) -> f64 {
        budget * (1.0 - PACE_SPREAD + 2.0 * PACE_SPREAD * self.unit())
    }

    /// Fisher-Yates.
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = crate::util::convert::usize_of(self.next() % (i as u64 + 1));
            v.swap(i, j);
        }
    }
}

/// The rechecks' rounds are at least this many times further apart while every VM is
/// quiet.
const QUIET_RECHECK_SPACING: f64 = 10.0;
/// At most this many times (rounds 12.5 to 37.5 s apart): a rewrite is remembered for
/// [`crate::scan::recheck::FORGET_SECONDS`], and churn is two rewrites seen in a row.
const QUIET_RECHECK_SPACING_MAX: f64 = 25.0;

/// The rechecks' spacing while quiet: their rounds cost at most half the quiet budget (a
/// round reads up to 4,096 pages of suspect ranges, and a large host with many churning
/// ranges had them cost more than the quiet budget that bounds the quiet passes), within
/// [`QUIET_RECHECK_SPACING`] and [`QUIET_RECHECK_SPACING_MAX`]. A round is about
/// `spacing` seconds after the last (0.5 to 1.5 times it).
fn quiet_recheck_spacing(round_cpu: f64, quiet_budget: f64) -> f64 {
    let spacing = round_cpu / (quiet_budget / 2.0);
    if spacing.is_finite() {
        spacing.clamp(QUIET_RECHECK_SPACING, QUIET_RECHECK_SPACING_MAX)
    } else {
        QUIET_RECHECK_SPACING_MAX
    }
}

/// CPU seconds of unused budget the scan may bank while resting.
const CREDIT_MAX: f64 = 5.0;

/// The budget the scan left unused (a token bucket): a new VM's sampled passes spend it at
/// once instead of at the pace, so a new VM is ranked in seconds, while the average stays
/// within the budget. At most [`CREDIT_MAX`] is banked, and a new VM may borrow as much
/// again ahead (a sampled pass is a sixteenth of a full one: a 4 GiB VM's three cost about
/// a second), so a busy host that just spent its credit still ranks a newcomer at once;
/// past that debt sampled passes are paced too, so VMs arriving by the dozen wait their
/// turn instead of taking a core.
struct Credit {
    seconds: f64,
    at: Instant,
    cpu: f64,
}

impl Credit {
    fn new(cpu: f64) -> Credit {
        Credit {
            seconds: 0.0,
            at: Instant::now(),
            cpu,
        }
    }

    /// Banks `budget` of the wall time since the last update, less the CPU spent.
    fn update(&mut self, budget: f64, cpu: f64) {
        let wall = self.at.elapsed().as_secs_f64();
        self.seconds = (self.seconds + wall * budget - (cpu - self.cpu)).min(CREDIT_MAX);
        (self.at, self.cpu) = (Instant::now(), cpu);
    }

    /// Whether a burst may start: the bank is not more than [`CREDIT_MAX`] in debt.
    fn may_burst(&self) -> bool {
        self.seconds > -CREDIT_MAX
    }
}

/// When the report is built. It walks every page of every VM (1.2 s of CPU at 16 GiB of
/// guests with a hash table, a third of that sorted: either way more than a new 4 GiB VM's
/// sampled pass, 0.2 s; and 17 % of the busy scan thread's CPU in the lab when it was built
/// after every round), and the daemon reads it once per refresh:
/// a report is built after a round only when the daemon read the last one, or when the
/// host goes quiet (the last busy round's figures stay published); a new VM's sampled
/// passes build none until its series ends (its first verdict comes from the last).
#[derive(Default)]
struct Reports {
    /// Rounds ran since the report was last built.
    pending: bool,
    /// The daemon's reads of the status when the last report was published (None: none
    /// was yet, the first is built at once).
    reads_then: Option<u64>,
}

impl Reports {
    /// Whether a report is due now; `reads`: the daemon's reads so far, `busy`: a VM is
    /// still busy, `sampling`: a new VM's sampled series is under way.
    fn due(&self, reads: &AtomicU64, busy: bool, sampling: bool) -> bool {
        let read = self
            .reads_then
            .is_none_or(|then| reads.load(Ordering::Relaxed) > then);
        self.pending && !sampling && (!busy || read)
    }

    fn published(&mut self, status: &mut ScanStatus, report: Arc<Report>, reads: &AtomicU64) {
        status.report = Some(report);
        self.pending = false;
        self.reads_then = Some(reads.load(Ordering::Relaxed));
    }
}

/// What the daemon hands the scan thread.
#[derive(Default)]
struct Inbox {
    targets: Vec<u32>,
    /// VMs in which something may have changed since the last look.
    wakes: Vec<u32>,
}

/// Round after round over the VMs the schedule says are due, until `stop` (see
/// [`schedule`](crate::scan::schedule)): busy VMs every round at the budget's pace, quiet
/// ones on their share of the quiet budget, a new large VM sampled first. The report is
/// built before the status lock is taken (it walks every page: holding the lock meanwhile
/// froze `/metrics`), and every sleep ends early at shutdown.
fn scan_loop(
    inbox: &Mutex<Inbox>,
    status: &Mutex<ScanStatus>,
    reads: &AtomicU64,
    stop: &Arc<AtomicBool>,
    budgets: (f64, f64),
    sketches: bool,
) {
    let (budget, quiet_budget) = budgets;
    let mut scanner = Scanner::new(2);
    scanner.set_sketches(sketches);
    scanner.set_cancel(stop.clone());
    let mut schedule = Schedule::new(quiet_budget);
    let mut jitter = Jitter::seeded();
    let epoch = Instant::now();
    let now = || epoch.elapsed().as_secs_f64();
    let mut credit = Credit::new(thread_cpu());
    let mut reports = Reports::default();
    while !stop.load(Ordering::Relaxed) {
        credit.update(budget, thread_cpu());
        let (targets, wakes) = inbox
            .lock()
            .map(|mut i| (i.targets.clone(), std::mem::take(&mut i.wakes)))
            .unwrap_or_default();
        if targets.is_empty() {
            sleep_unless(Some(stop), Duration::from_millis(500));
            continue;
        }
        scanner.retain(&targets);
        schedule.retain(&targets, guest_pages);
        for pid in wakes {
            schedule.wake(pid);
        }
        // A round's report left for the daemon's next read (or for the host going quiet).
        if reports.due(reads, schedule.busy(), schedule.sampling()) {
            let (report, cpu) = report_charged(&mut scanner, &mut schedule);
            if let Ok(mut s) = status.lock() {
                reports.published(&mut s, report, reads);
            }
            crate::util::release_freed_memory();
            if schedule.busy() {
                // Paid at the busy pace, as a round's report is.
                scanner.idle(Duration::from_secs_f64(cpu / budget));
            }
        }
        let mut due = schedule.due(now());
        if due.is_empty() {
            let wait = schedule
                .next_due()
                .map_or(1.0, |d| (d - now()).clamp(0.01, 1.0));
            if schedule.busy() {
                // A new VM filling its memory waits for its next pass: the rechecks go
                // on at the busy spacing and pay for themselves at the busy pace.
                scanner.set_recheck_spacing(1.0);
                scanner.idle(Duration::from_secs_f64(wait));
                continue;
            }
            // Quiet: rest until a VM falls due, looking for wakes every second. The
            // rechecks' rounds go on, spaced out, and their CPU puts every quiet VM's
            // next pass off, so the thread holds the quiet budget.
            scanner.set_recheck_spacing(quiet_recheck_spacing(
                scanner.recheck_round_cpu(),
                quiet_budget,
            ));
            let rechecks = scanner.idle_unpaced(Duration::from_secs_f64(wait));
            // The rechecks' rounds meanwhile are paid from the quiet budget too.
            schedule.defer(rechecks);
            continue;
        }
        let busy = schedule.busy();
        scanner.set_recheck_spacing(if busy {
            1.0
        } else {
            quiet_recheck_spacing(scanner.recheck_round_cpu(), quiet_budget)
        });
        // A new order each round, never-scanned VMs first.
        jitter.shuffle(&mut due);
        due.sort_by_key(|(pid, _)| !schedule.is_new(*pid));
        let pace = jitter.pace(budget);
        // A new VM's sampled passes, on banked (or borrowed) budget: unpaced.
        let burst = credit.may_burst() && due.iter().all(|(_, k)| *k == PassKind::Sampled);
        scanner.set_budget(if burst { 1.0 } else { pace });
        let t = Instant::now();
        let cpu0 = thread_cpu();
        let mut scanned = Vec::with_capacity(due.len());
        for (pid, kind) in due {
            // A VM that arrived meanwhile does not wait behind the rest of a busy round
            // (four 4 GiB VMs take 90 s at 5 %): the round ends here, and the next one
            // starts with the newcomer (sampled first when large).
            let arrived = || {
                inbox
                    .lock()
                    .is_ok_and(|i| i.targets.iter().any(|p| !schedule.tracks(*p)))
            };
            if !scanned.is_empty() && arrived() {
                break;
            }
            let (started, cpu, read) = (Instant::now(), thread_cpu(), scanner.bytes_read());
            let done = match kind {
                PassKind::Full => scanner.pass(&[pid]),
                PassKind::Sampled => scanner.pass_sampled(&[pid], SAMPLE_ONE_IN),
            };
            match done {
                Ok(()) => {
                    let cpu = thread_cpu() - cpu;
                    tracing::debug!(
                        "pass of {pid} ({kind:?}): {:.1} ms of CPU, {:.1} MiB read",
                        cpu * 1e3,
                        (scanner.bytes_read() - read) as f64 / f64::from(1 << 20)
                    );
                    scanned.push((pid, kind, cpu, started.elapsed()));
                }
                // It exited mid-scan (the next refresh drops it), or could not be read:
                // tried again in a second, not in a loop.
                Err(e) => {
                    tracing::debug!("scan of {pid} skipped: {e}");
                    schedule.retry_later(pid, now() + 1.0);
                }
            }
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if scanned.is_empty() {
            continue;
        }
        for (pid, kind, cpu, _) in &scanned {
            let present = scanner.present_pages(*pid);
            let draw = 1.0 - PACE_SPREAD + 2.0 * PACE_SPREAD * jitter.unit();
            schedule.scanned(*pid, *kind, now(), *cpu, present, draw);
        }
        reports.pending = true;
        let report = reports
            .due(reads, schedule.busy(), schedule.sampling())
            .then(|| report_charged(&mut scanner, &mut schedule).0);
        if let Ok(mut s) = status.lock() {
            if let Some(report) = report {
                reports.published(&mut s, report, reads);
            }
            s.pass_seconds = t.elapsed().as_secs_f64();
            s.vm_pass_seconds.retain(|p, _| targets.contains(p));
            for (pid, _, _, wall) in &scanned {
                s.vm_pass_seconds.insert(*pid, wall.as_secs_f64());
            }
            s.bytes_read = scanner.bytes_read();
            let (known, _) = scanner.known_stats();
            s.pages = ScanPages {
                known: known.skipped,
                sampled_out: known.kept,
                escalated: known.escalated,
            };
            s.rechecked_ranges = scanner.rechecked_ranges() as u64;
            (s.busy_vms, s.quiet_vms) = schedule.counts();
        }
        // This round's content table and the report it replaced are freed by now.
        crate::util::release_freed_memory();
        if busy {
            // The chunks are paced as they go; what the round spent outside them (mapping
            // lookups, the report) is paid back here, so the average holds the budget. At
            // least a second between busy rounds, even for tiny VMs, bursts too: a new VM
            // still filling its memory is sampled again while it grows, at most
            // MAX_SAMPLED_PASSES times, and unpaced passes a few milliseconds apart spent
            // them all in the two seconds a 4 GiB process took to fill (its first verdict
            // then waited 98 s for full passes). The rechecks' rounds go on meanwhile.
            // The rechecks' rounds inside the pacing waits are in the thread's CPU and
            // their lengthened waits in the elapsed time: owed in full, less that time.
            let owed = if burst {
                Duration::ZERO
            } else {
                Duration::from_secs_f64((thread_cpu() - cpu0) / pace)
            };
            scanner.idle(owed.max(Duration::from_secs(1)).saturating_sub(t.elapsed()));
        }
    }
}

/// A new report, and its CPU seconds. While all VMs are quiet its CPU puts their next
/// passes off, as the rechecks' does; while one is busy the caller paces it.
fn report_charged(scanner: &mut Scanner, schedule: &mut Schedule) -> (Arc<Report>, f64) {
    let cpu = thread_cpu();
    let report = scanner.next_report();
    let cpu = thread_cpu() - cpu;
    tracing::debug!("report built: {:.1} ms of CPU", cpu * 1e3);
    if !schedule.busy() {
        schedule.defer(cpu);
    }
    (report, cpu)
}

/// Pages of a VM's guest RAM (mapped, present or not); 0 when its maps cannot be read.
fn guest_pages(pid: u32) -> u64 {
    crate::host::maps::targets(pid).map_or(0, |ranges| {
        ranges.iter().map(|(s, e)| (e - s) / PAGE as u64).sum()
    })
}

impl ScanWorker {
    /// Starts the thread; `budget` is the fraction of one core it may use while a VM is
    /// busy, `quiet_budget` while all are quiet (at most `budget`); `sketches`: the
    /// reports carry content sketches (for the fabric). A panic in it is caught and
    /// published (`ScanStatus::failed`), never silent.
    pub fn start(budget: f64, quiet_budget: f64, sketches: bool) -> ScanWorker {
        let budget = budget.clamp(0.001, 1.0);
        let quiet_budget = quiet_budget.clamp(0.0001, budget);
        let inbox: Arc<Mutex<Inbox>> = Arc::default();
        let status: Arc<Mutex<ScanStatus>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let reads: Arc<AtomicU64> = Arc::default();
        let (p, st, sp, rd) = (inbox.clone(), status.clone(), stop.clone(), reads.clone());
        let thread = std::thread::Builder::new()
            .name("memfabric-scan".into())
            .spawn(move || {
                let body = std::panic::AssertUnwindSafe(|| {
                    scan_loop(&p, &st, &rd, &sp, (budget, quiet_budget), sketches);
                });
                if let Err(panic) = std::panic::catch_unwind(body) {
                    let msg = panic_text(panic.as_ref());
                    tracing::error!("the scan thread died: {msg}");
                    st.lock().unwrap_or_else(|e| e.into_inner()).failed = Some(msg);
                }
            })
            .expect("spawning the scan thread");
        ScanWorker {
            inbox,
            status,
            reads,
            stop,
            thread: Some(thread),
        }
    }

    /// The VMs to scan from now on.
    pub fn set_targets(&self, pids: Vec<u32>) {
        if let Ok(mut i) = self.inbox.lock() {
            i.targets = pids;
        }
    }

    /// Something may have changed in these VMs (new memory, a ranking that moved): they
    /// are scanned at the full budget again (see [`Schedule::wake`]).
    pub fn wake(&self, pids: &[u32]) {
        if let Ok(mut i) = self.inbox.lock() {
            i.wakes.extend_from_slice(pids);
        }
    }

    /// The latest status; the scan builds its next report for the next call (see
    /// [`Reports`]).
    pub fn status(&self) -> ScanStatus {
        self.reads.fetch_add(1, Ordering::Relaxed);
        // A poisoned lock still holds the last status (and the failure).
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for ScanWorker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paces_spread_around_the_budget_and_average_under_it() {
        let mut j = Jitter(7);
        let paces: Vec<f64> = (0..10_000).map(|_| j.pace(0.05)).collect();
        assert!(paces.iter().all(|p| (0.0375..0.0625).contains(p)));
        // Pass lengths go as 1 / pace: the CPU over many passes is the harmonic mean.
        let harmonic = paces.len() as f64 / paces.iter().map(|p| 1.0 / p).sum::<f64>();
        assert!((0.048..0.05).contains(&harmonic), "{harmonic}");
        // Spread over the whole interval, not bunched.
        let low = paces.iter().filter(|p| **p < 0.05).count();
        assert!((4_500..5_500).contains(&low), "{low}");
    }

    #[test]
    fn credit_banks_unused_budget_up_to_a_cap_and_bursts_borrow_at_most_as_much() {
        let mut c = Credit::new(0.0);
        c.at -= Duration::from_secs(200);
        // 200 s at 5 %: 10 s, capped at 5; no CPU spent.
        c.update(0.05, 0.0);
        assert!((c.seconds - CREDIT_MAX).abs() < 1e-3 && c.may_burst());
        // A burst of 6 s of CPU borrows 1 s: a newcomer may still burst.
        c.update(0.05, 6.0);
        assert!(c.seconds < 0.0 && c.may_burst());
        // 5 s more: in debt by the cap, paced until part of it is paid back.
        c.update(0.05, 11.0);
        assert!(!c.may_burst(), "{}", c.seconds);
        c.at -= Duration::from_secs(40);
        c.update(0.05, 11.0);
        assert!(c.may_burst(), "{}", c.seconds);
    }

    #[test]
    fn a_report_is_built_once_read_or_when_the_host_goes_quiet_never_mid_sampling() {
        let reads = AtomicU64::new(0);
        let mut r = Reports::default();
        assert!(
            !r.due(&reads, true, false),
            "no round since: nothing to build"
        );
        r.pending = true;
        assert!(r.due(&reads, true, false), "the first report at once");
        assert!(!r.due(&reads, true, true), "not while a new VM is sampled");
        let mut status = ScanStatus::default();
        r.published(&mut status, Arc::default(), &reads);
        assert!(status.report.is_some());
        r.pending = true;
        assert!(
            !r.due(&reads, true, false),
            "busy, the last one not read yet"
        );
        assert!(
            r.due(&reads, false, false),
            "the host goes quiet: published"
        );
        reads.fetch_add(1, Ordering::Relaxed);
        assert!(r.due(&reads, true, false), "read: the next one is built");
        assert!(!r.due(&reads, false, true));
    }

    #[test]
    fn quiet_rechecks_take_at_most_half_the_quiet_budget_within_bounds() {
        // 1 ms a round at 0.05 % of a core: ten times apart is 0.01 %, within half of it.
        assert_eq!(quiet_recheck_spacing(0.001, 0.0005), QUIET_RECHECK_SPACING);
        // 4 ms: 16 times apart holds 0.025 %.
        assert!((quiet_recheck_spacing(0.004, 0.0005) - 16.0).abs() < 1e-9);
        // 12 ms (4,096 pages): at most 25 times apart, whatever the budget.
        assert_eq!(
            quiet_recheck_spacing(0.012, 0.0005),
            QUIET_RECHECK_SPACING_MAX
        );
        assert_eq!(quiet_recheck_spacing(0.0, 0.0), QUIET_RECHECK_SPACING_MAX);
    }

    #[test]
    fn shuffles_are_permutations_in_changing_orders() {
        let mut j = Jitter(11);
        let mut orders = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let mut v = vec![1, 2, 3, 4];
            j.shuffle(&mut v);
            let mut sorted = v.clone();
            sorted.sort();
            assert_eq!(sorted, [1, 2, 3, 4]);
            orders.insert(v);
        }
        assert_eq!(
            orders.len(),
            24,
            "every order of four comes up in 200 draws"
        );
    }
}
