//! The scan's wake-ups: which VMs may have changed since the last tick, so that the page
//! scanner reads them at its full budget again instead of resting (see
//! [`crate::scan::schedule`]). Three signals, all cheap: the probes saw the guest populate
//! new memory (first-touch write faults, KVM guest write faults) or break merges (COW
//! breaks: the ranking turns such ranges volatile from the probes' heat, but ranks only a
//! new pass, so the VM needs one soon), and the VM's ranking moved (a range became or
//! stopped being a merge candidate, or appeared).
//!
//! Not a signal: a range moving among volatile, unknown and stable-unique (none is merged:
//! a churning guest sampled in step flips among them, and waking it for that would keep
//! the scan at its full budget for known churn), nor a range that woke its VM within its
//! last [`REWAKE_PASSES`] passes (it flips in and out of the candidates: the timeline
//! bench's 32 MiB churner, read in step now and then, was woken every two seconds for
//! minutes of its quiet phase, each busy pass flipping a range again).

use std::collections::HashMap;

use crate::model::{
    VmState,
    rank::{RangeClass, RankedRanges},
};

/// First-touch writes since the last tick that wake a VM: 2 MiB of new memory.
pub const NEW_MEMORY_PAGES: u64 = 512;
/// COW breaks since the last tick that wake a VM (the ranking's least for a volatile
/// range).
pub const COW_BREAKS: u64 = 8;

/// Merged pages of one VM beyond which the probes may not know each of them: a VM merged
/// before the daemon tracked it is seeded with at most `KSM_PAGES_SEEDED` of them, and
/// `KSM_PAGES` is shared by every VM. A write to
/// a merged page the probes do not know is a write-protect fault without a COW break:
/// such a VM is woken by write-protect faults instead. On the scale bench's 16 GiB host
/// (half a million merged pages per VM, 65,536 remembered) a merged range that started
/// churning woke nothing, and its VM, resting, was not read again for minutes.
pub const REMEMBERED_MERGES: i64 = memfabric_common::sizes::KSM_PAGES_SEEDED as i64;

/// Passes of its VM after which a range whose move woke it may wake it again.
pub const REWAKE_PASSES: u32 = 16;

/// What the previous ticks saw of each VM.
#[derive(Debug, Default)]
pub struct ScanWakes {
    /// Per VM: its passes and its ranges' classes at its last ranking.
    ranked: HashMap<u32, (u32, HashMap<u64, RangeClass>)>,
    /// Per VM: the ranges whose move woke it, with its passes then.
    woke: HashMap<u32, HashMap<u64, u32>>,
    /// Per VM: its first-touch writes, COW breaks and write-protect faults at the last
    /// tick.
    writes: HashMap<u32, (u64, u64, u64)>,
}

/// Whether a move between two classes may matter to what is merged: a range became or
/// stopped being a merge candidate. Moves among volatile, unknown and stable-unique merge
/// nothing: a guest rewriting memory with two contents in turn, read by passes that fall in
/// step with it now and then, moves among them (measured: holders of 16 GiB whose
/// rewritten ranges went volatile and stable-unique in turn stayed busy for ten minutes).
fn matters(before: RangeClass, after: RangeClass) -> bool {
    before != after
        && (before == RangeClass::StableDuplicate || after == RangeClass::StableDuplicate)
}

impl ScanWakes {
    /// The VMs to wake after this tick's `ranked` ranges and `states`.
    pub fn tick(&mut self, ranked: &RankedRanges, states: &[VmState]) -> Vec<u32> {
        let mut wake = Vec::new();
        for s in states {
            let pid = s.vm.pid;
            // A write-protect fault on a present page of a VMM is, but for rare forks and
            // first writes to the zero page, a COW break: counted as one where the probes
            // cannot know every merged page.
            let unknown_merges = s.ksm.merging_pages > REMEMBERED_MERGES;
            let now = s
                .probes
                .map(|c| (c.new_memory_writes(), c.cow_breaks, c.write_protect_faults));
            let then = now.and_then(|n| self.writes.insert(pid, n));
            // Pages first touched and merges broken since the last tick.
            let (populated, broken) = match (then, now) {
                (Some(a), Some(b)) => (
                    b.0.saturating_sub(a.0),
                    if unknown_merges {
                        b.2.saturating_sub(a.2)
                    } else {
                        b.1.saturating_sub(a.1)
                    },
                ),
                _ => (0, 0),
            };
            let active = populated >= NEW_MEMORY_PAGES || broken >= COW_BREAKS;
            // The ranking is compared every tick, so its baseline stays current.
            let moved = self.moved(pid, ranked);
            if active || moved {
                // Which signal, with its size: what a wake costs (passes over the whole
                // VM) is weighed against what woke it.
                tracing::debug!(
                    "waking the scan of {} (pid {pid}): {}",
                    s.vm.name,
                    if active {
                        format!(
                            "{populated} pages of new memory, {broken} merges broken{}",
                            if unknown_merges {
                                " (write-protect faults)"
                            } else {
                                ""
                            }
                        )
                    } else {
                        "a merge candidate appeared or went".to_owned()
                    }
                );
                wake.push(pid);
            }
        }
        let live: std::collections::HashSet<u32> = states.iter().map(|s| s.vm.pid).collect();
        self.ranked.retain(|p, _| live.contains(p));
        self.writes.retain(|p, _| live.contains(p));
        self.woke.retain(|p, _| live.contains(p));
        wake
    }

    /// Whether a new ranking of `pid` moved a range in a way that matters.
    fn moved(&mut self, pid: u32, ranked: &RankedRanges) -> bool {
        let (Some(ranges), Some(&passes)) = (ranked.by_pid.get(&pid), ranked.vm_passes.get(&pid))
        else {
            return false;
        };
        if self.ranked.get(&pid).is_some_and(|(p, _)| *p == passes) {
            return false;
        }
        let now: HashMap<u64, RangeClass> =
            ranges.iter().map(|r| (r.counts.start, r.class)).collect();
        let woke = self.woke.entry(pid).or_default();
        woke.retain(|_, then| passes.saturating_sub(*then) < REWAKE_PASSES);
        let mut moved = false;
        if let Some((_, before)) = self.ranked.get(&pid) {
            for (start, c) in &now {
                if before.get(start).is_none_or(|b| matters(*b, *c)) && !woke.contains_key(start) {
                    woke.insert(*start, passes);
                    moved = true;
                }
            }
        }
        self.ranked.insert(pid, (passes, now));
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        host::inventory::Vm,
        model::{VmProbeCounters, rank::RankedRange},
        scan::RangeCounts,
    };

    fn state(pid: u32, first_touch: u64) -> VmState {
        let mut s = VmState::new(Vm::guest(pid));
        s.probes = Some(VmProbeCounters {
            write_faults: first_touch + 100,
            write_protect_faults: 100,
            ..VmProbeCounters::default()
        });
        s
    }

    fn ranked(pid: u32, passes: u32, classes: &[RangeClass]) -> RankedRanges {
        let ranges = classes
            .iter()
            .enumerate()
            .map(|(i, c)| RankedRange {
                class: *c,
                counts: RangeCounts {
                    start: (i as u64) << 21,
                    ..RangeCounts::default()
                },
                savings: Default::default(),
                heat: Default::default(),
            })
            .collect();
        RankedRanges {
            passes,
            vm_passes: [(pid, passes)].into(),
            by_pid: [(pid, ranges)].into(),
            ..RankedRanges::default()
        }
    }

    /// Recorded ticks: new memory, broken merges and a moved candidate wake the VM; known
    /// churn flipping between volatile and unknown, write-protect faults without a break
    /// and an unchanged ranking do not.
    #[test]
    fn new_memory_and_moved_candidates_wake_and_known_churn_does_not() {
        use RangeClass::*;
        let mut w = ScanWakes::default();
        let r1 = ranked(7, 3, &[StableDuplicate, Volatile, StableUnique]);
        assert!(
            w.tick(&r1, &[state(7, 1000)]).is_empty(),
            "first look: baselines"
        );
        // The same ranking again, a few writes: nothing.
        assert!(w.tick(&r1, &[state(7, 1100)]).is_empty());
        // 2 MiB of first touches since the last tick: woken.
        assert_eq!(w.tick(&r1, &[state(7, 1100 + 512)]), [7]);
        // Write-protect faults are no new memory.
        let mut churn = state(7, 1612);
        let p = churn.probes.as_mut().unwrap();
        (p.write_protect_faults, p.write_faults) = (5100, 1612 + 5100);
        assert!(w.tick(&r1, &[churn.clone()]).is_empty());
        // Broken merges: woken (the ranking needs a pass to see their heat).
        churn.probes.as_mut().unwrap().cow_breaks = 8;
        assert_eq!(w.tick(&r1, &[churn.clone()]), [7]);
        // A VM with more merged pages than the probes remember: write-protect faults
        // stand for the breaks they could not see.
        churn.ksm.merging_pages = REMEMBERED_MERGES + 1;
        assert!(w.tick(&r1, &[churn.clone()]).is_empty());
        churn.probes.as_mut().unwrap().write_protect_faults += 8;
        assert_eq!(w.tick(&r1, &[churn]), [7]);
        // Known churn flipping volatile -> unknown -> stable-unique: nothing.
        let r2 = ranked(7, 4, &[StableDuplicate, ColdUnknown, StableUnique]);
        assert!(w.tick(&r2, &[state(7, 1612)]).is_empty());
        let r2b = ranked(7, 5, &[StableDuplicate, StableUnique, StableUnique]);
        assert!(w.tick(&r2b, &[state(7, 1612)]).is_empty());
        let r2 = ranked(7, 6, &[StableDuplicate, ColdUnknown, StableUnique]);
        assert!(w.tick(&r2, &[state(7, 1612)]).is_empty());
        // A candidate turned volatile: woken, once.
        let r3 = ranked(7, 7, &[Volatile, ColdUnknown, StableUnique]);
        assert_eq!(w.tick(&r3, &[state(7, 1612)]), [7]);
        assert!(w.tick(&r3, &[state(7, 1612)]).is_empty());
        // A new range appeared: woken.
        let r4 = ranked(7, 8, &[Volatile, ColdUnknown, StableUnique, StableUnique]);
        assert_eq!(w.tick(&r4, &[state(7, 1612)]), [7]);
        // The first range flips into the candidates and out again, pass after pass: it
        // woke the VM at pass 7, so it wakes it again only REWAKE_PASSES passes later.
        let flips = |p: u32| {
            let first = if p.is_multiple_of(2) {
                StableDuplicate
            } else {
                Volatile
            };
            ranked(7, p, &[first, ColdUnknown, StableUnique, StableUnique])
        };
        for p in 9..7 + REWAKE_PASSES {
            assert!(w.tick(&flips(p), &[state(7, 1612)]).is_empty(), "pass {p}");
        }
        let p = 7 + REWAKE_PASSES;
        assert_eq!(w.tick(&flips(p), &[state(7, 1612)]), [7], "pass {p}");
        assert!(w.tick(&flips(p + 1), &[state(7, 1612)]).is_empty());
        // Gone: forgotten (a new process with its PID starts from a baseline).
        assert!(w.tick(&r4, &[]).is_empty());
        assert!(w.woke.is_empty());
        assert!(w.tick(&r4, &[state(7, 99_999)]).is_empty());
    }
}
