//! Which 2 MiB ranges of which VM to make mergeable or unmergeable, from the ranking:
//! `volatile` ranges leave KSM (every rewrite of a merged page is a COW break: a copy, a
//! fault, and ksmd merging it again), `stable-duplicate` ranges join it. Pure: the ranking
//! and the time in, decisions with their reasons out.
//!
//! - Hysteresis: a range is made unmergeable after `to_unmergeable_after` rankings as
//!   volatile with no calm one between (an unknown one neither counts nor resets), and mergeable again only after `to_mergeable_after` consecutive
//!   calm (stable-duplicate) ones, doubled each time it was let back in before (up to 64
//!   times): once out of KSM a rewritten page raises no fault, so "calm" cannot be told
//!   from "rewritten with the same bytes", and each readmission costs a burst of COW
//!   breaks (the timeline bench showed the cycle); other classes change nothing. For the
//!   same reason a range memfabric took out also stays out for `readmit_after_seconds`
//!   (10 min), doubled per readmission likewise: a readmission is a blind probe, so it
//!   is made rarely.
//! - A VM whose security domain does not share (or that is in no domain while domains are
//!   configured) is only ever made unmergeable, whole.
//! - A rate limit of changes per VM per minute: a VM is not stopped for an injection more
//!   than that, whatever the ranking does.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::model::rank::RangeClass;

/// What a range should be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Mergeable,
    Unmergeable,
}

/// Why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HintReason {
    /// Volatile for `to_unmergeable_after` rankings in a row.
    Volatile,
    /// Stable duplicates for `to_mergeable_after` rankings in a row.
    StableDuplicate,
    /// Its VM's security domain must not share memory with others.
    DomainDoesNotShare,
}

/// One decision: make `[start, end)` of VM `pid` `target`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HintDecision {
    pub pid: u32,
    pub start: u64,
    pub end: u64,
    pub target: Target,
    pub reason: HintReason,
    /// False when the rate limit held it back (it is decided again next time).
    pub within_rate: bool,
}

/// Tunables.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HintPolicy {
    pub to_unmergeable_after: u32,
    pub to_mergeable_after: u32,
    /// Changes (injections) per VM per minute.
    pub max_changes_per_minute: usize,
    /// The least time a range memfabric made unmergeable stays so (doubled per
    /// readmission, up to 64 times).
    pub readmit_after_seconds: f64,
}

impl Default for HintPolicy {
    fn default() -> Self {
        HintPolicy {
            to_unmergeable_after: 2,
            to_mergeable_after: 3,
            max_changes_per_minute: 12,
            readmit_after_seconds: 600.0,
        }
    }
}

/// How a VM may be hinted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sharing {
    /// Ranges follow the ranking.
    Ranges,
    /// All of its guest RAM unmergeable.
    Never,
}

/// One VM as the policy sees it at a ranking.
#[derive(Clone, Debug)]
pub struct VmRanges {
    pub pid: u32,
    pub sharing: Sharing,
    /// Its guest RAM mappings (what `Never` makes unmergeable).
    pub ram: Vec<(u64, u64)>,
    /// Ranked ranges: (start, end, class), in address order.
    pub ranges: Vec<(u64, u64, RangeClass)>,
}

#[derive(Clone, Copy, Debug, Default)]
struct RangeState {
    /// What memfabric made it (None: untouched).
    applied: Option<Target>,
    volatile_streak: u32,
    calm_streak: u32,
    /// Times it was made mergeable again after memfabric had taken it out.
    readmitted: u32,
    /// When memfabric last made it unmergeable.
    out_since: f64,
}

/// The policy's memory: per VM and range start, streaks and what was applied; per VM the
/// times of its last changes.
#[derive(Debug, Default)]
pub struct HintPlanner {
    policy: HintPolicy,
    ranges: BTreeMap<(u32, u64), RangeState>,
    changes: BTreeMap<u32, VecDeque<f64>>,
    whole: BTreeMap<u32, bool>,
}

impl HintPlanner {
    pub fn new(policy: HintPolicy) -> HintPlanner {
        HintPlanner {
            policy,
            ..HintPlanner::default()
        }
    }

    pub fn policy(&self) -> &HintPolicy {
        &self.policy
    }

    /// Forgets VMs that are gone.
    pub fn retain(&mut self, pids: &[u32]) {
        self.ranges.retain(|(p, _), _| pids.contains(p));
        self.changes.retain(|p, _| pids.contains(p));
        self.whole.retain(|p, _| pids.contains(p));
    }

    /// One ranking at time `t` (seconds): the decisions, adjacent ranges of one VM with the
    /// same target and reason joined. Decisions within the rate are taken as applied; call
    /// [`HintPlanner::failed`] for those that could not be.
    pub fn plan(&mut self, t: f64, vms: &[VmRanges]) -> Vec<HintDecision> {
        let mut out = Vec::new();
        for vm in vms {
            let mut wanted: Vec<(u64, u64, Target, HintReason)> = Vec::new();
            match vm.sharing {
                Sharing::Never => {
                    if self.whole.get(&vm.pid) != Some(&true) {
                        for &(s, e) in &vm.ram {
                            wanted.push((
                                s,
                                e,
                                Target::Unmergeable,
                                HintReason::DomainDoesNotShare,
                            ));
                        }
                    }
                }
                Sharing::Ranges => {
                    for &(s, e, class) in &vm.ranges {
                        let st = self.ranges.entry((vm.pid, s)).or_default();
                        match class {
                            RangeClass::Volatile => {
                                st.volatile_streak += 1;
                                st.calm_streak = 0;
                            }
                            RangeClass::StableDuplicate => {
                                st.calm_streak += 1;
                                st.volatile_streak = 0;
                            }
                            RangeClass::StableUnique => {
                                st.volatile_streak = 0;
                                st.calm_streak = 0;
                            }
                            // Not knowing is no evidence either way: a page rewritten
                            // every few seconds reads as changed in one pass and as not
                            // yet settled in the next, so resetting here let churn that
                            // the scan sees only every other pass stay in KSM for ever.
                            RangeClass::ColdUnknown => st.calm_streak = 0,
                        }
                        if st.volatile_streak >= self.policy.to_unmergeable_after
                            && st.applied != Some(Target::Unmergeable)
                        {
                            wanted.push((s, e, Target::Unmergeable, HintReason::Volatile));
                        } else if st.calm_streak
                            >= self.policy.to_mergeable_after << st.readmitted.min(6)
                            && st.applied != Some(Target::Mergeable)
                            && (st.applied.is_none()
                                || t - st.out_since
                                    >= self.policy.readmit_after_seconds
                                        * f64::from(1u32 << st.readmitted.min(6)))
                        {
                            wanted.push((s, e, Target::Mergeable, HintReason::StableDuplicate));
                        }
                    }
                }
            }
            // Join neighbours.
            let mut joined: Vec<(u64, u64, Target, HintReason)> = Vec::new();
            for w in wanted {
                match joined.last_mut() {
                    Some(last) if last.1 == w.0 && last.2 == w.2 && last.3 == w.3 => last.1 = w.1,
                    _ => joined.push(w),
                }
            }
            let recent = self.changes.entry(vm.pid).or_default();
            while recent.front().is_some_and(|&c| c <= t - 60.0) {
                recent.pop_front();
            }
            for (start, end, target, reason) in joined {
                let within_rate = recent.len() < self.policy.max_changes_per_minute;
                if within_rate {
                    recent.push_back(t);
                    if reason == HintReason::DomainDoesNotShare {
                        self.whole.insert(vm.pid, true);
                    }
                    for (_, st) in self.ranges.range_mut((vm.pid, start)..(vm.pid, end)) {
                        if target == Target::Mergeable && st.applied == Some(Target::Unmergeable) {
                            st.readmitted += 1;
                        }
                        if target == Target::Unmergeable {
                            st.out_since = t;
                        }
                        st.applied = Some(target);
                    }
                }
                out.push(HintDecision {
                    pid: vm.pid,
                    start,
                    end,
                    target,
                    reason,
                    within_rate,
                });
            }
        }
        out
    }

    /// A decision found its range already as decided (a new VM made mergeable whole at
    /// launch, its calm ranges "made" mergeable): no injection stopped the VM, so it does
    /// not count against the VM's rate. Counted, such no-ops of a new VM's first rankings
    /// used up its changes for the minute and held back the volatile verdicts behind them
    /// (the timeline bench's lab-4: dozens of rate-limited decisions).
    pub fn unchanged(&mut self, d: &HintDecision) {
        // The latest entry: one of this ranking's, all at the same time.
        if let Some(recent) = self.changes.get_mut(&d.pid) {
            recent.pop_back();
        }
    }

    /// A decision could not be carried out: it is decided again next time.
    pub fn failed(&mut self, d: &HintDecision) {
        if d.reason == HintReason::DomainDoesNotShare {
            self.whole.insert(d.pid, false);
        }
        for (_, st) in self.ranges.range_mut((d.pid, d.start)..(d.pid, d.end)) {
            st.applied = None;
        }
    }
}

#[cfg(test)]
mod tests;
