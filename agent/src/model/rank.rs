//! Ranking of 2 MiB ranges from the scan history and the probes' heat: which ranges are
//! merge candidates, which only churn (keep them out of KSM: every merge there is broken
//! again, costing ksmd CPU and a COW copy), which hold nothing worth merging, and which the
//! scan does not know well enough yet. The next step, the merge policy, acts on these.

use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

pub use crate::heat::{PageHeat, RangeHeatMap};
use crate::scan::account::{RangeCounts, RangeSavings, Report};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RangeClass {
    /// Stable pages with copies elsewhere (or zero pages): merging pays.
    StableDuplicate,
    /// Pages change between scans, or merged pages get written again: exclude from KSM.
    Volatile,
    /// Stable, but nothing in it exists elsewhere: nothing to gain.
    StableUnique,
    /// Not present, or not scanned often enough to say.
    ColdUnknown,
}

impl RangeClass {
    pub const ALL: [RangeClass; 4] = [
        RangeClass::StableDuplicate,
        RangeClass::Volatile,
        RangeClass::StableUnique,
        RangeClass::ColdUnknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RangeClass::StableDuplicate => "stable-duplicate",
            RangeClass::Volatile => "volatile",
            RangeClass::StableUnique => "stable-unique",
            RangeClass::ColdUnknown => "cold-unknown",
        }
    }
}

/// Thresholds of the ranking (fractions of the range's present pages).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankPolicy {
    /// Volatile when pages changed in the last pass plus write-protect faults reach this
    /// share, or the rechecked pages rewritten twice lately do; unknown (no verdict) when
    /// pages changed twice lately do.
    pub volatile_share: f64,
    /// Broken merges count as churn (also before the scan has history) only from this
    /// many in the interval on: the guest undoes what ksmd does there.
    pub cow_breaks_volatile: u32,
    /// A merge candidate when duplicate pages (content found elsewhere on the host,
    /// including the copy that would be kept: the others merge into it) plus zero pages
    /// reach this share.
    pub duplicate_share: f64,
    /// Below this share of pages with a settled history (stable, volatile or zero) the
    /// range is unknown.
    pub known_share: f64,
}

impl Default for RankPolicy {
    fn default() -> Self {
        RankPolicy {
            volatile_share: 0.25,
            cow_breaks_volatile: 8,
            // 64 of 512 pages: 256 KiB saved per 2 MiB range.
            duplicate_share: 0.125,
            known_share: 0.5,
        }
    }
}

impl RankPolicy {
    /// The class of range `r` after `passes` scans (`stable_after` of them are needed
    /// before any page can be stable), given the probes' heat over the last interval.
    pub fn classify(
        &self,
        r: &RangeCounts,
        heat: PageHeat,
        passes: u32,
        stable_after: u8,
    ) -> RangeClass {
        // Pages that use memory of their own (zero-frame pages cost nothing).
        let present = f64::from(r.pages_present - r.zero_frame_pages);
        if present == 0.0 {
            return RangeClass::ColdUnknown;
        }
        // A range the scan knows calm (history, three quarters of it stable) whose pages
        // were written while write-protected once each: the guest filled memory that was
        // merged (a load onto recycled pages), one write, until 8 of its pages are written
        // so again. Its faults counted here made it volatile now and the next pass, which
        // reads the new content as changed, made it volatile again: two volatile rankings
        // for one write, and the hints took the range out of KSM for ten minutes (seen in
        // the timeline bench on a range of the guest that loads 32 MiB; likely the cause
        // of one run's 96.4 % of stock's savings). The pass judges it alone; churn shows as
        // pages written twice, or as changed pass after pass.
        let calm = passes > u32::from(stable_after)
            && f64::from(r.stable_pages) >= (1.0 - self.volatile_share) * present;
        let heat = if calm && heat.rewritten_pages < self.cow_breaks_volatile {
            PageHeat::default()
        } else {
            heat
        };
        // Broken merges are the probes' direct evidence, not the scan's: they need no scan
        // history. Waiting for `stable_after` passes first let ksmd and the guest trade
        // thousands of COW breaks while the scanner caught up (a slow first pass on a busy
        // host). Like any churn they must be a share of the range: a few rewritten pages
        // among hundreds of stable duplicates cost a few breaks, while taking the range
        // out of KSM costs all of its sharing (the timeline bench lost 8 MiB that way).
        let cow = f64::from(heat.cow_breaks);
        if heat.cow_breaks >= self.cow_breaks_volatile && cow >= self.volatile_share * present {
            return RangeClass::Volatile;
        }
        // Pages read again between passes and found rewritten twice or more lately: also
        // direct evidence, with no need for the pass's history (see `scan::recheck`).
        let rechecked = f64::from(r.rechecked_pages);
        if r.rewritten_again_pages > 0
            && f64::from(r.rewritten_again_pages) >= self.volatile_share * rechecked
        {
            return RangeClass::Volatile;
        }
        if passes <= u32::from(stable_after) {
            return RangeClass::ColdUnknown;
        }
        // A COW break is also a write-protect fault: counted once.
        let faults = f64::from(heat.write_protect_faults).max(cow);
        if f64::from(r.volatile_pages) + faults >= self.volatile_share * present {
            return RangeClass::Volatile;
        }
        // Rewritten twice lately but read unchanged in this pass: rewrites alternating two
        // contents, sampled in step. No calm verdict (it would reset the planner's count
        // between the passes that do see the rewrites), but no volatile one either: a
        // one-off load onto pages the guest recycled reads the same until it stays put.
        if f64::from(r.churning_pages) + faults >= self.volatile_share * present {
            return RangeClass::ColdUnknown;
        }
        let known = f64::from(r.stable_pages + r.volatile_pages + r.zero_pages);
        if known < self.known_share * present {
            return RangeClass::ColdUnknown;
        }
        // Duplicates, not mergeable pages: a range of kept copies (the first VM holding
        // content others have) counts no mergeable page of its own, yet the others merge
        // into it; keeping it out of KSM would lose a page per group.
        let gain = f64::from(r.duplicate_pages + r.zero_pages);
        if gain >= self.duplicate_share * present {
            RangeClass::StableDuplicate
        } else {
            RangeClass::StableUnique
        }
    }
}

/// One ranked range, as `/v1/ranges` serves it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankedRange {
    pub class: RangeClass,
    #[serde(flatten)]
    pub counts: RangeCounts,
    #[serde(flatten)]
    pub savings: RangeSavings,
    #[serde(flatten)]
    pub heat: PageHeat,
}

/// Ranked ranges of every scanned VM, as of one scan pass.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RankedRanges {
    /// Scan passes done when these were ranked (calls of `pass`; see `vm_passes`).
    pub passes: u32,
    /// Passes over each VM, by PID.
    pub vm_passes: BTreeMap<u32, u32>,
    /// Unchanged passes before a page counts as stable (none is ranked before).
    pub stable_after: u8,
    /// Seconds of probe heat the ranking saw (since the previous ranking).
    pub heat_window_seconds: f64,
    pub policy: RankPolicy,
    pub by_pid: BTreeMap<u32, Vec<RankedRange>>,
}

impl RankedRanges {
    /// Ranks every range of `report` with `heat` (tgid -> range start -> heat over the
    /// last `window_seconds`).
    pub fn rank(
        report: &Report,
        heat: &RangeHeatMap,
        window_seconds: f64,
        policy: RankPolicy,
    ) -> RankedRanges {
        let by_pid = report
            .ranges
            .iter()
            .map(|(pid, ranges)| {
                let vm_heat = heat.get(pid);
                let passes = report.vm_passes.get(pid).copied().unwrap_or(0);
                let ranked = ranges
                    .iter()
                    .map(|r| {
                        let h = vm_heat
                            .and_then(|m| m.get(&r.start))
                            .copied()
                            .unwrap_or_default();
                        RankedRange {
                            class: policy.classify(r, h, passes, report.stable_after),
                            counts: *r,
                            savings: r.savings(),
                            heat: h,
                        }
                    })
                    .collect();
                (*pid, ranked)
            })
            .collect();
        RankedRanges {
            passes: report.passes,
            vm_passes: report.vm_passes.clone(),
            stable_after: report.stable_after,
            heat_window_seconds: window_seconds,
            policy,
            by_pid,
        }
    }

    /// Ranges of `pid` per class (every class present, zeros included).
    pub fn class_counts(&self, pid: u32) -> Option<BTreeMap<RangeClass, u32>> {
        let ranges = self.by_pid.get(&pid)?;
        let mut counts: BTreeMap<RangeClass, u32> =
            RangeClass::ALL.iter().map(|c| (*c, 0)).collect();
        for r in ranges {
            *counts.entry(r.class).or_default() += 1;
        }
        Some(counts)
    }
}

/// `later - earlier` per range: the heat of one interval.
pub fn heat_since(later: &RangeHeatMap, earlier: &RangeHeatMap) -> RangeHeatMap {
    later
        .iter()
        .map(|(tgid, ranges)| {
            let before = earlier.get(tgid);
            let delta = ranges
                .iter()
                .map(|(start, h)| {
                    let b = before
                        .and_then(|m| m.get(start))
                        .copied()
                        .unwrap_or_default();
                    (*start, h.since(b))
                })
                .filter(|(_, h)| *h != PageHeat::default())
                .collect();
            (*tgid, delta)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(present: u32, stable: u32, volatile: u32, zero: u32, duplicate: u32) -> RangeCounts {
        RangeCounts {
            pages: 512,
            pages_present: present,
            stable_pages: stable,
            volatile_pages: volatile,
            // Changed in the last pass: churning too.
            churning_pages: volatile,
            zero_pages: zero,
            duplicate_pages: duplicate,
            ..Default::default()
        }
    }

    #[test]
    fn classes() {
        let p = RankPolicy::default();
        let cool = PageHeat::default();
        let c = |r: RangeCounts, h: PageHeat| p.classify(&r, h, 5, 2);
        assert_eq!(
            c(range(512, 500, 0, 0, 400), cool),
            RangeClass::StableDuplicate
        );
        assert_eq!(
            c(range(512, 300, 0, 200, 0), cool),
            RangeClass::StableDuplicate
        );
        assert_eq!(c(range(512, 500, 0, 0, 10), cool), RangeClass::StableUnique);
        // Stable in this pass but rewritten twice lately (a/b rewrites sampled in step, or
        // a load onto recycled pages): no verdict either way.
        let churned = RangeCounts {
            churning_pages: 200,
            ..range(512, 500, 0, 0, 400)
        };
        assert_eq!(c(churned, cool), RangeClass::ColdUnknown);
        // The first VM's copies of content other VMs hold: nothing mergeable of its own,
        // but the others merge into it.
        let kept = RangeCounts {
            mergeable_intra_pages: 0,
            mergeable_inter_pages: 0,
            merged_pages: 512,
            ..range(512, 512, 0, 0, 512)
        };
        assert_eq!(c(kept, cool), RangeClass::StableDuplicate);
        assert_eq!(c(range(512, 200, 300, 0, 100), cool), RangeClass::Volatile);
        // Stable to the scan, but the guest breaks the merges between scans, page after
        // page again.
        let hot = PageHeat {
            write_protect_faults: 128,
            cow_breaks: 128,
            rewritten_pages: 64,
        };
        assert_eq!(c(range(512, 500, 0, 0, 400), hot), RangeClass::Volatile);
        // The same breaks, each page's first: one write onto merged memory, judged by the
        // pass alone (which reads the new content as changed next).
        let once = PageHeat {
            rewritten_pages: 0,
            ..hot
        };
        assert_eq!(
            c(range(512, 500, 0, 0, 400), once),
            RangeClass::StableDuplicate
        );
        assert_eq!(c(range(512, 200, 300, 0, 100), once), RangeClass::Volatile);
        // A few broken merges among hundreds of stable duplicates: sharing pays more.
        let few = PageHeat {
            write_protect_faults: 8,
            cow_breaks: 8,
            rewritten_pages: 8,
        };
        assert_eq!(
            c(range(512, 500, 0, 0, 400), few),
            RangeClass::StableDuplicate
        );
        // Nothing present, or too little history.
        assert_eq!(c(range(0, 0, 0, 0, 0), cool), RangeClass::ColdUnknown);
        assert_eq!(c(range(512, 100, 0, 0, 100), cool), RangeClass::ColdUnknown);
        assert_eq!(
            p.classify(&range(512, 500, 0, 0, 400), cool, 2, 2),
            RangeClass::ColdUnknown
        );
        // Broken merges need no scan history: volatile from the first pass on.
        assert_eq!(
            p.classify(&range(512, 0, 0, 0, 0), hot, 1, 2),
            RangeClass::Volatile
        );
        // Rechecked pages rewritten again between passes: volatile from the first pass on,
        // though this pass read the range unchanged; one such page of eight is not enough.
        let rewritten = |again| RangeCounts {
            rechecked_pages: 8,
            rewritten_again_pages: again,
            ..range(512, 500, 0, 0, 400)
        };
        assert_eq!(p.classify(&rewritten(2), cool, 1, 2), RangeClass::Volatile);
        assert_eq!(c(rewritten(1), cool), RangeClass::StableDuplicate);
        // Write faults alone, without history, could be a guest populating memory.
        let populating = PageHeat {
            write_protect_faults: 500,
            cow_breaks: 0,
            rewritten_pages: 0,
        };
        assert_eq!(
            p.classify(&range(512, 0, 0, 0, 0), populating, 1, 2),
            RangeClass::ColdUnknown
        );
    }

    #[test]
    fn each_vm_is_ranked_by_its_own_passes() {
        // The daemon scans VMs one at a time: the global pass count runs ahead of a VM
        // that joined late, whose pages cannot be stable yet.
        let mut report = Report {
            passes: 10,
            stable_after: 2,
            ..Default::default()
        };
        report.ranges.insert(1, vec![range(512, 500, 0, 0, 400)]);
        report.ranges.insert(2, vec![range(512, 500, 0, 0, 400)]);
        report.vm_passes.insert(1, 8);
        report.vm_passes.insert(2, 2);
        let r = RankedRanges::rank(&report, &RangeHeatMap::new(), 1.0, RankPolicy::default());
        assert_eq!(r.by_pid[&1][0].class, RangeClass::StableDuplicate);
        assert_eq!(r.by_pid[&2][0].class, RangeClass::ColdUnknown);
        let counts = r.class_counts(2).unwrap();
        assert_eq!(counts[&RangeClass::ColdUnknown], 1);
        assert_eq!(counts[&RangeClass::Volatile], 0);
        assert_eq!(r.class_counts(3), None);
    }

    #[test]
    fn heat_of_an_interval_is_the_difference_of_two_readings() {
        let reading = |wp: u32, cow: u32| -> RangeHeatMap {
            let mut m = RangeHeatMap::new();
            m.entry(7).or_default().insert(
                0x20_0000,
                PageHeat {
                    write_protect_faults: wp,
                    cow_breaks: cow,
                    rewritten_pages: wp / 10,
                },
            );
            m
        };
        // Faults and breaks: differences; pages written twice: the later count.
        let d = heat_since(&reading(30, 10), &reading(12, 4));
        assert_eq!(
            d[&7][&0x20_0000],
            PageHeat {
                write_protect_faults: 18,
                cow_breaks: 6,
                rewritten_pages: 3,
            }
        );
        // No change: no entry. The LRU forgot pages: no negative heat.
        assert!(heat_since(&reading(5, 1), &reading(5, 1))[&7].is_empty());
        assert_eq!(
            heat_since(&reading(1, 0), &reading(5, 1))[&7].get(&0x20_0000),
            None
        );
    }

    #[test]
    fn class_names_are_the_documented_ones() {
        let names: Vec<String> = RangeClass::ALL
            .iter()
            .map(|c| {
                serde_json::to_value(c)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            names,
            [
                "stable-duplicate",
                "volatile",
                "stable-unique",
                "cold-unknown"
            ]
        );
        for c in RangeClass::ALL {
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
    }
}
