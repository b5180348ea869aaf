//! When each VM is scanned next: the scan works while something may have changed and
//! rests when nothing does, so its cost follows what happens on the host, not how much
//! RAM its guests hold.
//!
//! A VM is **busy** when it is new, when the daemon woke it (the probes saw it populate
//! new memory, or its ranking moved: [`Schedule::wake`]) or when its last pass found its
//! present memory grown or shrunk; it stays busy for [`BUSY_PASSES`] passes, scanned every
//! round at the scan's budget. Then it is **quiet**: scanned again only when its share of
//! the quiet budget has paid for its last pass (its pass's CPU times the VMs on the host
//! over the quiet budget), so a quiet host costs the quiet budget whatever its size, and a
//! quiet VM never delays a busy one for long. A guest rewriting memory in place (no fault
//! tells) is seen at the next quiet pass; its COW breaks are seen at once by the probes.
//! A new VM is busy for [`NEW_PASSES`], long enough for the hints to judge it.
//!
//! A new VM whose pass found its memory grown (a guest booting, a process allocating) is
//! **filling**: it stays busy but is read again only after [`FILL_WAIT_SECONDS`], not
//! every round. What a filling guest wrote is rewritten while it boots, so back-to-back
//! passes read it all again for nothing: on the timeline bench a 256 MiB guest's boot
//! cost 1 GB of reads in 20 s, four times its memory.
//!
//! A **new** VM larger than [`SAMPLE_ABOVE_PAGES`] is ranked from a sample first: its
//! first [`SAMPLED_PASSES`] passes read one page in [`SAMPLE_ONE_IN`] (its first verdict
//! in seconds, whatever its size), and rounds with a VM still being sampled scan no other
//! VM, so nothing else on the host delays it.

use std::collections::BTreeMap;

/// Passes a VM stays busy after something changed.
pub const BUSY_PASSES: u32 = 3;
/// Full passes a new VM is busy for: the ranking needs two passes of history and the
/// hints two volatile rankings and some spare before they judge it (ksmd's fast scan waits
/// for that when the hints act), so a new VM is not left to rest before.
pub const NEW_PASSES: u32 = 8;
/// A VM whose pages present moved by more than this share since its last pass is busy.
pub const PRESENT_CHANGE: f64 = 0.02;
/// Sampled passes of a new large VM: enough for a verdict (the ranking needs history from
/// two passes before the third can call a page stable).
pub const SAMPLED_PASSES: u32 = 3;
/// Sampled passes at most, however long a new VM keeps growing.
pub const MAX_SAMPLED_PASSES: u32 = 12;
/// A new VM is sampled first only above this size (4 KiB pages; 1 GiB): smaller ones are
/// read in full in about a second.
pub const SAMPLE_ABOVE_PAGES: u64 = 1 << 18;
/// One page in this many is read in a sampled pass (32 of a 2 MiB range's 512).
pub const SAMPLE_ONE_IN: usize = 16;
/// A new VM whose full pass found its memory grown waits this long for its next pass.
/// Short against the hints' hold of ksmd (90 s per VM), long against a pass of a small
/// VM at the busy pace (a few seconds).
pub const FILL_WAIT_SECONDS: f64 = 8.0;

/// What the next pass over a VM reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassKind {
    Full,
    /// One page in [`SAMPLE_ONE_IN`].
    Sampled,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    /// Busy passes left (0: quiet).
    busy_left: u32,
    /// When a quiet VM is due (seconds on the scan's clock).
    due: f64,
    /// Passes so far.
    passes: u32,
    /// Sampled passes left.
    sampled_left: u32,
    /// Pages present after its last pass.
    present: Option<u64>,
    /// Pages present (sampled) after its last sampled pass.
    sampled_present: Option<u64>,
    /// A busy VM is not read before this (a new VM still filling its memory).
    not_before: f64,
}

impl Slot {
    /// Read every round: busy passes or sampled passes left.
    fn busy(&self) -> bool {
        self.busy_left > 0 || self.sampled_left > 0
    }
}

/// Whether the pages present moved by more than [`PRESENT_CHANGE`] since `then`.
fn moved(then: Option<u64>, now: u64) -> bool {
    then.is_some_and(|then| then.abs_diff(now) as f64 > PRESENT_CHANGE * then.max(now) as f64)
}

/// Each tracked VM's state and when it is due.
#[derive(Debug)]
pub struct Schedule {
    vms: BTreeMap<u32, Slot>,
    /// Fraction of a core the host's quiet VMs may use together.
    quiet_budget: f64,
}

impl Schedule {
    pub fn new(quiet_budget: f64) -> Schedule {
        Schedule {
            vms: BTreeMap::new(),
            quiet_budget: quiet_budget.clamp(1e-4, 1.0),
        }
    }

    /// The VMs to scan from now on: new ones are busy (and due at once); gone ones are
    /// forgotten. `size_pages`: a new VM's guest RAM, for the choice of a sampled start.
    pub fn retain(&mut self, pids: &[u32], size_pages: impl Fn(u32) -> u64) {
        self.vms.retain(|p, _| pids.contains(p));
        for &pid in pids {
            self.vms.entry(pid).or_insert_with(|| Slot {
                busy_left: NEW_PASSES,
                due: 0.0,
                passes: 0,
                sampled_left: if size_pages(pid) > SAMPLE_ABOVE_PAGES {
                    SAMPLED_PASSES
                } else {
                    0
                },
                present: None,
                sampled_present: None,
                not_before: 0.0,
            });
        }
    }

    /// Something may have changed in `pid`: busy again (scanned in the next round).
    pub fn wake(&mut self, pid: u32) {
        if let Some(s) = self.vms.get_mut(&pid) {
            s.busy_left = s.busy_left.max(BUSY_PASSES);
        }
    }

    /// The VMs due at `now`, each with what its pass reads: VMs being sampled alone when
    /// there are any (a new VM's first verdict waits for nothing else), else the busy VMs
    /// and the quiet ones whose time has come. Never-scanned VMs first.
    pub fn due(&self, now: f64) -> Vec<(u32, PassKind)> {
        let sampling: Vec<_> = self
            .vms
            .iter()
            .filter(|(_, s)| s.sampled_left > 0)
            .map(|(p, _)| (*p, PassKind::Sampled))
            .collect();
        if !sampling.is_empty() {
            return sampling;
        }
        let mut due: Vec<_> = self
            .vms
            .iter()
            .filter(|(_, s)| {
                if s.busy_left > 0 {
                    s.not_before <= now
                } else {
                    s.due <= now
                }
            })
            .map(|(p, s)| (*p, s.passes))
            .collect();
        due.sort_by_key(|(_, passes)| *passes > 0);
        due.into_iter().map(|(p, _)| (p, PassKind::Full)).collect()
    }

    /// Whether `pid` is scheduled (it was a target at the last [`Schedule::retain`]).
    pub fn tracks(&self, pid: u32) -> bool {
        self.vms.contains_key(&pid)
    }

    /// Whether `pid` was never scanned.
    pub fn is_new(&self, pid: u32) -> bool {
        self.vms.get(&pid).is_some_and(|s| s.passes == 0)
    }

    /// Whether a new VM's sampled series is under way.
    pub fn sampling(&self) -> bool {
        self.vms.values().any(|s| s.sampled_left > 0)
    }

    /// Whether any VM is busy (the scan runs at its full budget).
    pub fn busy(&self) -> bool {
        self.vms.values().any(Slot::busy)
    }

    /// VMs busy and quiet now.
    pub fn counts(&self) -> (usize, usize) {
        let busy = self.vms.values().filter(|s| s.busy()).count();
        (busy, self.vms.len() - busy)
    }

    /// When the next VM falls due: a quiet one's time, or a filling one's wait (None:
    /// none waits).
    pub fn next_due(&self) -> Option<f64> {
        self.vms
            .values()
            .filter_map(|s| match (s.busy(), s.sampled_left > 0) {
                (false, _) => Some(s.due),
                (true, false) => Some(s.not_before),
                (true, true) => None,
            })
            .min_by(f64::total_cmp)
    }

    /// `pid` could not be scanned (it exited, or its memory could not be read): due again
    /// at `at`, quiet, so a VM that fails is not retried in a loop.
    pub fn retry_later(&mut self, pid: u32, at: f64) {
        if let Some(s) = self.vms.get_mut(&pid) {
            (s.busy_left, s.sampled_left, s.due) = (0, 0, at);
        }
    }

    /// `cpu` seconds were spent while the host was quiet outside any VM's pass (the
    /// rechecks' rounds): every quiet VM's next pass is put off by the time the quiet
    /// budget takes to pay for them.
    pub fn defer(&mut self, cpu: f64) {
        if cpu <= 0.0 {
            return;
        }
        let by = cpu / self.quiet_budget;
        for s in self.vms.values_mut() {
            if !s.busy() {
                s.due += by;
            }
        }
    }

    /// `pid` was scanned (`kind`), ending at `now`, for `cpu` seconds of CPU, and has
    /// `present` pages present. `draw` (0.75 to 1.25) spreads quiet intervals so that no
    /// periodic rewrite stays in step with them.
    pub fn scanned(
        &mut self,
        pid: u32,
        kind: PassKind,
        now: f64,
        cpu: f64,
        present: u64,
        draw: f64,
    ) {
        let vms = self.vms.len().max(1) as f64;
        let quiet_budget = self.quiet_budget;
        let Some(s) = self.vms.get_mut(&pid) else {
            return;
        };
        s.passes = s.passes.saturating_add(1);
        if kind == PassKind::Sampled {
            // A VM still filling its memory (a guest booting, a process allocating) is
            // sampled again from the start: a verdict on half its memory is no verdict.
            let grew = moved(s.sampled_present, present);
            s.sampled_present = Some(present);
            // The pass that saw the growth is the first of a new series.
            s.sampled_left = if grew && s.passes < MAX_SAMPLED_PASSES {
                SAMPLED_PASSES - 1
            } else {
                s.sampled_left.saturating_sub(1)
            };
            // Its first full passes follow (busy); its sampled counts do not compare.
            s.busy_left = NEW_PASSES;
            s.present = None;
            return;
        }
        let changed = moved(s.present, present);
        // A new VM still filling waits before its next read (see the module doc). A
        // known VM whose memory moved (a balloon, a hot-plug) is read again at once.
        let filling = changed && s.present.is_some_and(|then| present > then);
        s.not_before = if filling && s.passes <= NEW_PASSES {
            now + FILL_WAIT_SECONDS
        } else {
            0.0
        };
        s.present = Some(present);
        s.busy_left = if changed {
            BUSY_PASSES
        } else {
            s.busy_left.saturating_sub(1)
        };
        // Its share of the quiet budget pays for this pass before the next one.
        s.due = now + cpu.max(0.0) * vms / quiet_budget * draw;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: u64 = 1000;

    fn pids(d: &[(u32, PassKind)]) -> Vec<u32> {
        d.iter().map(|(p, _)| *p).collect()
    }

    /// `n` full passes over `pid`, one a second from `from`, each of `cpu` seconds and
    /// `present` pages.
    fn full_passes(s: &mut Schedule, pid: u32, from: f64, n: u32, cpu: f64, present: u64) {
        for i in 0..n {
            s.scanned(pid, PassKind::Full, from + f64::from(i), cpu, present, 1.0);
        }
    }

    #[test]
    fn a_vm_is_busy_for_its_first_passes_then_rests_on_its_share_of_the_quiet_budget() {
        let mut s = Schedule::new(0.005);
        s.retain(&[1, 2], |_| SMALL);
        assert_eq!(pids(&s.due(0.0)), [1, 2]);
        for i in 0..NEW_PASSES {
            assert!(s.busy());
            let t = f64::from(i);
            s.scanned(1, PassKind::Full, t, 0.01, 100, 1.0);
            s.scanned(2, PassKind::Full, t, 0.01, 100, 1.0);
        }
        assert!(!s.busy());
        assert_eq!(s.counts(), (0, 2));
        // 0.01 s of CPU, two VMs sharing 0.5 % of a core: due 4 s after its last pass.
        let last = f64::from(NEW_PASSES - 1);
        assert!(s.due(last + 3.9).is_empty());
        assert_eq!(pids(&s.due(last + 4.1)), [1, 2]);
        assert!((s.next_due().unwrap() - (last + 4.0)).abs() < 1e-9);
    }

    #[test]
    fn a_wake_or_moved_memory_makes_a_quiet_vm_busy_and_new_vms_go_first() {
        let mut s = Schedule::new(0.005);
        s.retain(&[1], |_| SMALL);
        full_passes(&mut s, 1, 0.0, NEW_PASSES, 1.0, 100);
        assert!(s.due(10.0).is_empty(), "quiet for 200 s");
        s.wake(1);
        assert_eq!(pids(&s.due(10.0)), [1]);
        full_passes(&mut s, 1, 10.0, BUSY_PASSES, 1.0, 100);
        assert!(!s.busy());
        // Present memory grew by 5 %: busy again without a wake.
        s.wake(1);
        full_passes(&mut s, 1, 20.0, 3, 1.0, 105);
        assert!(s.busy(), "the move restarts the busy passes");
        // A new VM comes first in the round; a gone one is forgotten.
        s.retain(&[1, 7], |_| SMALL);
        assert_eq!(pids(&s.due(23.0)), [7, 1]);
        s.retain(&[7], |_| SMALL);
        assert_eq!(pids(&s.due(23.0)), [7]);
        s.wake(1);
        assert_eq!(pids(&s.due(23.0)), [7], "waking a gone VM does nothing");
    }

    #[test]
    fn a_new_vm_filling_its_memory_waits_between_passes_a_known_one_does_not() {
        let mut s = Schedule::new(0.005);
        s.retain(&[1], |_| SMALL);
        s.scanned(1, PassKind::Full, 0.0, 0.1, 100, 1.0);
        assert_eq!(pids(&s.due(1.0)), [1], "the first pass sets no baseline");
        // Grown by half: filling, busy, but not read before FILL_WAIT_SECONDS.
        s.scanned(1, PassKind::Full, 1.0, 0.1, 150, 1.0);
        assert!(s.busy());
        assert!(s.due(1.0 + FILL_WAIT_SECONDS - 0.1).is_empty());
        assert!((s.next_due().unwrap() - (1.0 + FILL_WAIT_SECONDS)).abs() < 1e-9);
        assert_eq!(pids(&s.due(1.0 + FILL_WAIT_SECONDS)), [1]);
        // Filled: the next passes follow at once until it rests.
        s.scanned(1, PassKind::Full, 10.0, 0.1, 150, 1.0);
        assert_eq!(pids(&s.due(10.0)), [1]);
        full_passes(&mut s, 1, 11.0, NEW_PASSES, 0.1, 150);
        assert!(!s.busy());
        // A known VM whose memory grows (a balloon deflating) is read again at once.
        s.wake(1);
        s.scanned(1, PassKind::Full, 100.0, 0.1, 300, 1.0);
        assert_eq!(pids(&s.due(100.0)), [1]);
    }

    #[test]
    fn a_new_large_vm_is_sampled_alone_then_read_in_full() {
        let mut s = Schedule::new(0.005);
        s.retain(&[1], |_| SMALL);
        full_passes(&mut s, 1, 0.0, NEW_PASSES, 0.1, 100);
        s.wake(1);
        s.retain(&[1, 2], |p| if p == 2 { 1 << 20 } else { SMALL });
        for i in 0..SAMPLED_PASSES {
            // The busy small VM waits while the large one is sampled.
            assert_eq!(s.due(10.0), [(2, PassKind::Sampled)]);
            s.scanned(2, PassKind::Sampled, 10.0 + f64::from(i), 0.1, 1 << 16, 1.0);
        }
        let due = s.due(20.0);
        assert_eq!(due, [(1, PassKind::Full), (2, PassKind::Full)]);
        // The sampled counts are no baseline: the first full pass's 16x is no move.
        full_passes(&mut s, 2, 20.0, NEW_PASSES, 0.1, 1 << 20);
        assert_eq!(s.counts(), (1, 1), "VM 1 still busy (woken), VM 2 quiet");
    }

    #[test]
    fn rest_time_cpu_puts_quiet_passes_off_and_a_growing_new_vm_is_sampled_again() {
        let mut s = Schedule::new(0.01);
        s.retain(&[1], |_| SMALL);
        full_passes(&mut s, 1, 0.0, NEW_PASSES, 0.01, 100);
        let due = s.next_due().unwrap();
        // 0.02 s of rechecks at 1 % of a core: 2 s later.
        s.defer(0.02);
        assert!((s.next_due().unwrap() - due - 2.0).abs() < 1e-9);
        // A large new VM still allocating: sampled again while its sample grows.
        s.retain(&[1, 2], |p| if p == 2 { 1 << 20 } else { SMALL });
        let mut sampled = 0;
        for present in [1000, 2000, 3000, 3000, 3000, 3000] {
            if s.due(50.0).first() == Some(&(2, PassKind::Sampled)) {
                s.scanned(2, PassKind::Sampled, 50.0, 0.1, present, 1.0);
                sampled += 1;
            }
        }
        assert_eq!(sampled, 5, "two growing passes, then three steady ones");
        assert!(s.due(50.0).contains(&(2, PassKind::Full)));
    }

    #[test]
    fn a_vm_that_cannot_be_scanned_is_retried_later_not_in_a_loop() {
        let mut s = Schedule::new(0.01);
        s.retain(&[1], |_| 1 << 20);
        s.retry_later(1, 5.0);
        assert!(s.due(4.9).is_empty());
        assert_eq!(s.due(5.0), [(1, PassKind::Full)]);
    }
}
