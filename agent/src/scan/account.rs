//! Turns the scanner's per-page history into figures: per VM and per 2 MiB range, what is
//! present, zero, stable, volatile, duplicated, merged, and what merging could still save,
//! split into intra-VM (copies inside one VM) and inter-VM (copies that only another VM
//! holds). Every figure is a sum over pages, so a VM's numbers are the sum of its ranges'.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{
    super::sketch::{MAX_K, Sketch},
    PAGE,
    content::{COPY_BYTES, Copies, Copy, Role},
    page_state::{F_MERGED, F_PRESENT, F_THP, F_ZERO, F_ZERO_FRAME, PageState},
};
use crate::util::convert::{u32_saturating, usize_of};

/// Ranges are 2 MiB (a huge page): the unit the policy can madvise without splitting THPs.
pub const RANGE_BYTES: u64 = 2 << 20;

/// Figures for a set of pages (contract: field names are the JSON of `memfabric scan`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub pages_present: u64,
    /// Pages of zero bytes on frames of their own: what KSM saves by merging them (into
    /// one KSM page, or into the zero page with `use_zero_pages`).
    pub zero_pages: u64,
    /// Pages mapped to the kernel's shared zero page (read, never written): they use no
    /// memory and KSM leaves them alone.
    pub zero_frame_pages: u64,
    /// Of `zero_pages`, those inside transparent huge pages.
    pub zero_thp_pages: u64,
    /// Non-zero pages unchanged for the last `stable_after` scans.
    pub stable_pages: u64,
    /// Pages whose content changed since the previous scan.
    pub volatile_pages: u64,
    /// Stable non-zero pages whose content exists elsewhere (this VM or another).
    pub duplicate_pages: u64,
    /// Σ (group size − 1): pages KSM saves by merging every duplicate group, one copy of
    /// each group kept (charged to the first VM holding it). = intra + inter.
    pub mergeable_duplicate_pages: u64,
    /// Of those, further copies inside the same VM (KSM saves them within the VM alone).
    pub mergeable_intra_pages: u64,
    /// Of those, a VM's first copy of content another VM holds first: saved only by
    /// sharing across VMs (what placement and migration care about).
    pub mergeable_inter_pages: u64,
    /// Pages on KSM frames now.
    pub merged_pages: u64,
    /// Mergeable duplicates KSM has not merged yet, in bytes. = intra + inter.
    pub potential_savings_bytes: u64,
    pub potential_savings_intra_bytes: u64,
    pub potential_savings_inter_bytes: u64,
}

impl Counts {
    /// Pages KSM should end up saving (`pages_sharing + ksm_zero_pages` once it has
    /// converged): every mergeable duplicate, plus zero-filled pages that are not part of a
    /// transparent huge page. Zero-filled subpages of THPs are left out because on the
    /// kernel this was measured on (6.18, `use_zero_pages=0`, QEMU guests with THP-backed
    /// RAM) ksmd merged none of them in 8+ full scans while it merged every other
    /// duplicate (see tests/tests/scan_lab.rs). With `use_zero_pages=1` zero pages map to
    /// the zero page instead of one KSM page, so none of them is kept.
    pub fn predicted_ksm_pages(&self, use_zero_pages: bool) -> u64 {
        let zero = self.zero_pages - self.zero_thp_pages;
        let zero_saved = if use_zero_pages {
            zero
        } else {
            zero.saturating_sub(1)
        };
        self.mergeable_duplicate_pages + zero_saved
    }

    fn add(&mut self, o: &Counts) {
        self.pages_present += o.pages_present;
        self.zero_pages += o.zero_pages;
        self.zero_frame_pages += o.zero_frame_pages;
        self.zero_thp_pages += o.zero_thp_pages;
        self.stable_pages += o.stable_pages;
        self.volatile_pages += o.volatile_pages;
        self.duplicate_pages += o.duplicate_pages;
        self.mergeable_duplicate_pages += o.mergeable_duplicate_pages;
        self.mergeable_intra_pages += o.mergeable_intra_pages;
        self.mergeable_inter_pages += o.mergeable_inter_pages;
        self.merged_pages += o.merged_pages;
        self.potential_savings_bytes += o.potential_savings_bytes;
        self.potential_savings_intra_bytes += o.potential_savings_intra_bytes;
        self.potential_savings_inter_bytes += o.potential_savings_inter_bytes;
    }
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// The figures of one 2 MiB range of a VM's guest RAM (page counts; 512 at most each).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeCounts {
    /// First byte (2 MiB aligned; the range may be cut by its mapping's ends): a guest
    /// address, hidden from documents unless exposed (`/v1/ranges` gives an offset).
    #[serde(default, skip_serializing_if = "crate::addresses::hidden")]
    pub start: u64,
    /// Pages of the range inside the scanned mapping.
    pub pages: u32,
    pub pages_present: u32,
    /// Zero-filled pages on frames of their own (KSM can save them).
    pub zero_pages: u32,
    pub zero_frame_pages: u32,
    pub stable_pages: u32,
    pub volatile_pages: u32,
    /// Pages changed in the last pass or twice within the scanner's change memory (some
    /// of them stable again): what keeps the ranking from calling a range calm.
    #[serde(default)]
    pub churning_pages: u32,
    /// Pages the rechecks between passes read again ([`super::recheck`]; 0 when the range
    /// is not tracked), and of those the ones seen rewritten twice or more lately. Left
    /// out of JSON when 0 (most ranges): a 16 GiB guest's `/v1/ranges` page grew from
    /// 3.8 to 4.1 MiB with them, and past 4 MiB the daemon's RSS with 4 documents in
    /// flight grew by 100 MB instead of 3 (`slow_readers_of_ranges_keep_the_daemon_bounded`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rechecked_pages: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rewritten_again_pages: u32,
    pub duplicate_pages: u32,
    pub mergeable_intra_pages: u32,
    pub mergeable_inter_pages: u32,
    pub merged_pages: u32,
    pub potential_intra_pages: u32,
    pub potential_inter_pages: u32,
}

impl RangeCounts {
    /// The range's savings under the names used for VMs and hosts.
    pub fn savings(&self) -> RangeSavings {
        let page = PAGE as u64;
        let (intra, inter) = (
            u64::from(self.potential_intra_pages) * page,
            u64::from(self.potential_inter_pages) * page,
        );
        RangeSavings {
            mergeable_duplicate_pages: self.mergeable_intra_pages + self.mergeable_inter_pages,
            potential_savings_bytes: intra + inter,
            potential_savings_intra_bytes: intra,
            potential_savings_inter_bytes: inter,
        }
    }

    fn counts(&self) -> Counts {
        let savings = self.savings();
        Counts {
            pages_present: self.pages_present.into(),
            zero_pages: self.zero_pages.into(),
            zero_frame_pages: self.zero_frame_pages.into(),
            zero_thp_pages: 0, // added by the caller, it is not kept per range
            stable_pages: self.stable_pages.into(),
            volatile_pages: self.volatile_pages.into(),
            duplicate_pages: self.duplicate_pages.into(),
            mergeable_duplicate_pages: savings.mergeable_duplicate_pages.into(),
            mergeable_intra_pages: self.mergeable_intra_pages.into(),
            mergeable_inter_pages: self.mergeable_inter_pages.into(),
            merged_pages: self.merged_pages.into(),
            potential_savings_bytes: savings.potential_savings_bytes,
            potential_savings_intra_bytes: savings.potential_savings_intra_bytes,
            potential_savings_inter_bytes: savings.potential_savings_inter_bytes,
        }
    }
}

/// A range's savings under the names `memfabric scan` uses for VMs and hosts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeSavings {
    pub mergeable_duplicate_pages: u32,
    pub potential_savings_bytes: u64,
    pub potential_savings_intra_bytes: u64,
    pub potential_savings_inter_bytes: u64,
}

/// What the last pass found.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    #[serde(flatten)]
    pub total: Counts,
    pub per_pid: BTreeMap<u32, Counts>,
    /// Per PID, its 2 MiB ranges in address order (left out of JSON when empty).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ranges: BTreeMap<u32, Vec<RangeCounts>>,
    /// Calls of `pass` (each over one or more processes).
    pub passes: u32,
    /// Passes over each process, by PID: how much history its pages have.
    pub vm_passes: BTreeMap<u32, u32>,
    pub bytes_read: u64,
    /// Bytes of per-page history kept per tracked page.
    pub state_bytes_per_page: u32,
    /// Distinct stable page contents on the host (entries of the content table).
    pub distinct_stable_contents: u64,
    /// Unchanged scans after which a page counts as stable.
    pub stable_after: u8,
    /// Sketches of the stable non-zero contents, built in the same walk (only when the
    /// fabric asked for them: see [`crate::scan::Scanner::set_sketch_k`]).
    #[serde(skip)]
    pub sketches: Option<Sketches>,
}

/// Bottom-k sketches of distinct stable non-zero page contents per process, with a large k
/// (kept locally, see [`Sketch::containment`]; the fabric publishes the union of the VMs
/// it may share, which is exact up to this k, and small prefixes).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sketches {
    pub per_pid: BTreeMap<u32, Sketch>,
}

/// One scanned mapping of a process: where it starts and each page's history.
#[derive(Clone, Debug, PartialEq)]
pub struct Mapping {
    pub start: u64,
    pub pages: Vec<PageState>,
}

impl Mapping {
    /// The mapping `[start, start + pages pages)` with the history `known` holds for its
    /// addresses. A VMA that merge hints split (or joined again) keeps its pages'
    /// histories: keyed by the old mapping's place and size, a `madvise` on one range
    /// blanked the whole guest RAM for `stable_after` passes, and the ranking went blind
    /// just when ksmd merged and the churn broke the merges.
    pub fn carried(known: &[Mapping], start: u64, pages: usize) -> Mapping {
        let page = PAGE as u64;
        let end = start + pages as u64 * page;
        let mut m = Mapping {
            start,
            pages: vec![PageState::ABSENT; pages],
        };
        for k in known {
            let k_end = k.start + k.pages.len() as u64 * page;
            let (a, b) = (start.max(k.start), end.min(k_end));
            if a >= b {
                continue;
            }
            let (n, from, to) = (
                usize_of((b - a) / page),
                usize_of((a - k.start) / page),
                usize_of((a - start) / page),
            );
            m.pages[to..to + n].copy_from_slice(&k.pages[from..from + n]);
        }
        m
    }
}

/// Bytes a shard's copies take at most (see [`super::content`]). Above it, contents are
/// attributed in shards (by their hash's top bits), one at a time, each walk over the page
/// histories collecting only its shard's pages: the copies of every stable page at once
/// took 64 MiB at 16 GiB of guests; a whole content table before them 36 MiB, and the
/// daemon peaked (VmHWM) at 163 MiB against 108 MiB at rest.
pub const TABLE_BYTES_MAX: usize = 4 << 20;

/// Shards for `stable` pages (a power of two, so a shard is a hash prefix), each about
/// [`TABLE_BYTES_MAX`] of copies.
fn shards_for(stable: usize) -> u32 {
    let bytes = stable.saturating_mul(COPY_BYTES);
    u32::try_from(bytes.div_ceil(TABLE_BYTES_MAX).next_power_of_two())
        .unwrap_or(1 << 16)
        .clamp(1, 1 << 16)
}

/// Each page of one VM's mappings in address order, with the index of its 2 MiB range
/// among the ranges the walk met (the same order in every walk).
fn walk_pages(maps: &[Mapping], mut f: impl FnMut(usize, u64, PageState)) {
    let (mut index, mut base_seen) = (0usize, None);
    for m in maps {
        for (i, &s) in m.pages.iter().enumerate() {
            let addr = m.start + (i * PAGE) as u64;
            let base = addr & !(RANGE_BYTES - 1);
            match base_seen {
                None => base_seen = Some(base),
                Some(b) if b != base => {
                    index += 1;
                    base_seen = Some(base);
                }
                Some(_) => {}
            }
            f(index, base, s);
        }
    }
}

/// What the content tables held: distinct contents and the largest table's bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct TableStats {
    pub distinct: usize,
    pub shards: u32,
    /// Bytes of the largest shard's table (the most held at once).
    pub allocated_bytes: usize,
}

/// Figures over `procs` (PID order) with duplicates counted across all of them; with
/// `sketches`, each process's sketch too.
pub fn account(
    procs: &BTreeMap<u32, Vec<Mapping>>,
    stable_after: u8,
    sketches: bool,
) -> (Report, TableStats) {
    account_with(procs, stable_after, sketches, None)
}

/// [`account`], in `shards` shards when given (a power of two).
fn account_with(
    procs: &BTreeMap<u32, Vec<Mapping>>,
    stable_after: u8,
    sketches: bool,
    shards: Option<u32>,
) -> (Report, TableStats) {
    let stable = |s: PageState| {
        s.has(F_PRESENT)
            && !s.has(F_ZERO)
            && !s.has(F_ZERO_FRAME)
            && s.unchanged() >= u16::from(stable_after)
    };
    // Every figure that needs no content table, range by range.
    let mut per_vm: Vec<(Vec<RangeCounts>, u64)> = Vec::with_capacity(procs.len());
    let mut stable_pages = 0usize;
    for maps in procs.values() {
        let mut ranges: Vec<RangeCounts> = Vec::new();
        let mut zero_thp = 0u64;
        walk_pages(maps, |index, base, s| {
            if ranges.len() == index {
                ranges.push(RangeCounts {
                    start: base,
                    ..Default::default()
                });
            }
            let r = &mut ranges[index];
            r.pages += 1;
            if !s.has(F_PRESENT) {
                return;
            }
            r.pages_present += 1;
            if s.has(F_MERGED) {
                r.merged_pages += 1;
            }
            if s.has(F_ZERO_FRAME) {
                r.zero_frame_pages += 1;
                return;
            }
            if s.has(F_ZERO) {
                r.zero_pages += 1;
                zero_thp += u64::from(s.has(F_THP));
                return;
            }
            if s.churning() {
                r.churning_pages += 1;
            }
            if stable(s) {
                r.stable_pages += 1;
                stable_pages += 1;
            } else if s.changed() {
                r.volatile_pages += 1;
            }
        });
        per_vm.push((ranges, zero_thp));
    }
    // Duplicates, shard by shard: a content's copies all fall in one shard, collected in
    // VM (PID) order and sorted, so roles are what one pass over every page gives. A shard
    // is sized for its share of the stable pages (contents spread evenly over hashes).
    let shards = shards.unwrap_or_else(|| shards_for(stable_pages));
    let shift = 64 - shards.trailing_zeros();
    let shard_of = |h: u64| {
        if shards == 1 {
            0
        } else {
            u32::try_from(h >> shift).unwrap_or(u32::MAX)
        }
    };
    let mut stats = TableStats {
        shards,
        ..Default::default()
    };
    let mut vm_sketches: Vec<Option<Sketch>> = procs
        .values()
        .map(|_| sketches.then(|| Sketch::new(MAX_K)))
        .collect();
    let per_shard = stable_pages / shards as usize;
    let mut copies = Copies::with_capacity(per_shard + per_shard / 16 + 64);
    for shard in 0..shards {
        copies.clear();
        for (vm, maps) in procs.values().enumerate() {
            let vm = u32_saturating(vm);
            walk_pages(maps, |index, _, s| {
                if stable(s) && shard_of(s.hash()) == shard {
                    copies.push(Copy {
                        hash: s.hash(),
                        vm,
                        range: u32_saturating(index),
                        merged: s.has(F_MERGED),
                    });
                }
            });
        }
        stats.allocated_bytes = stats.allocated_bytes.max(copies.allocated_bytes());
        stats.distinct += copies.attribute(|c, a| {
            let vm = usize_of(u64::from(c.vm));
            // The first copy in a VM is one distinct content of it; further copies are
            // counted for the migration estimate.
            if let Some(vs) = vm_sketches[vm].as_mut() {
                if a.role == Role::Intra {
                    vs.repeat(c.hash);
                } else {
                    vs.insert(c.hash);
                }
            }
            if !a.duplicate {
                return;
            }
            let r = &mut per_vm[vm].0[usize_of(u64::from(c.range))];
            r.duplicate_pages += 1;
            match a.role {
                Role::Kept => {}
                Role::Inter => r.mergeable_inter_pages += 1,
                Role::Intra => r.mergeable_intra_pages += 1,
            }
            // Not merged yet and not the copy that stays: merging would still save it.
            // When a copy elsewhere is already a KSM page, even the kept copy can merge
            // into it (counted as inter: the KSM page may be in another VM).
            if !c.merged && (a.role != Role::Kept || a.any_merged) {
                match a.role {
                    Role::Intra => r.potential_intra_pages += 1,
                    _ => r.potential_inter_pages += 1,
                }
            }
        });
    }
    let mut report = Report {
        stable_after,
        distinct_stable_contents: stats.distinct as u64,
        ..Default::default()
    };
    let mut all_sketches = sketches.then(Sketches::default);
    for ((&pid, (ranges, zero_thp)), vs) in procs.keys().zip(per_vm).zip(vm_sketches) {
        let mut c = Counts::default();
        for r in &ranges {
            c.add(&r.counts());
        }
        c.zero_thp_pages = zero_thp;
        report.total.add(&c);
        report.per_pid.insert(pid, c);
        report.ranges.insert(pid, ranges);
        if let (Some(vs), Some(all)) = (vs, all_sketches.as_mut()) {
            all.per_pid.insert(pid, vs);
        }
    }
    report.sketches = all_sketches;
    (report, stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_or_joined_mapping_keeps_its_pages_history() {
        let p = PAGE as u64;
        let st = |i: u64| PageState::new(i << 16, F_PRESENT, u16::try_from(i).unwrap());
        let whole = Mapping {
            start: 100 * p,
            pages: (0..10).map(st).collect(),
        };
        // madvise on pages 3..6 splits the VMA in three.
        let known = [whole.clone()];
        let parts = [
            Mapping::carried(&known, 100 * p, 3),
            Mapping::carried(&known, 103 * p, 3),
            Mapping::carried(&known, 106 * p, 4),
        ];
        assert_eq!(parts[1].pages, (3..6).map(st).collect::<Vec<_>>());
        assert_eq!(parts[2].pages, (6..10).map(st).collect::<Vec<_>>());
        // Put back: joined again, every page's history intact.
        assert_eq!(Mapping::carried(&parts, 100 * p, 10), whole);
        // Grown past what was known: the new pages start blank.
        let grown = Mapping::carried(&known, 98 * p, 14);
        assert_eq!(grown.pages[..2], [PageState::ABSENT; 2]);
        assert_eq!(grown.pages[2..12], whole.pages[..]);
        assert_eq!(grown.pages[12..], [PageState::ABSENT; 2]);
    }
    use crate::scan::page_state::{F_SEEN, PageState};

    fn account_in(procs: &BTreeMap<u32, Vec<Mapping>>, shards: u32) -> (Report, TableStats) {
        account_with(procs, 2, true, Some(shards))
    }

    #[test]
    fn shards_keep_each_table_within_its_bytes() {
        assert_eq!(shards_for(0), 1);
        assert_eq!(shards_for(100_000), 1);
        // 16 GiB of stable pages: 4 Mi copies, 16 bytes each: 64 MiB, 16 shards.
        assert_eq!(shards_for(4 << 20), 16);
        for n in [1usize << 20, 3 << 20, 50 << 20] {
            let per = n.div_ceil(shards_for(n) as usize);
            assert!(
                per * COPY_BYTES <= TABLE_BYTES_MAX,
                "{n}: {per} copies a shard"
            );
        }
    }

    fn page(hash: u64, flags: u8, unchanged: u16) -> PageState {
        PageState::new(hash << 16, flags | F_PRESENT | F_SEEN, unchanged)
    }

    /// One mapping per process: (PID, start, pages).
    fn procs(list: Vec<(u32, u64, Vec<PageState>)>) -> BTreeMap<u32, Vec<Mapping>> {
        list.into_iter()
            .map(|(pid, start, pages)| (pid, vec![Mapping { start, pages }]))
            .collect()
    }

    #[test]
    fn churning_pages_include_stable_ones_that_changed_twice_lately() {
        let rescan = |hashes: &[u64]| {
            hashes
                .iter()
                .fold(PageState::ABSENT, |s, h| s.rescanned(h << 16, 0))
        };
        let procs = procs(vec![(
            10,
            0x4000_0000,
            vec![
                // a, b, a, a, a: stable now, churning still.
                rescan(&[1, 2, 1, 1, 1]),
                // Loaded once: stable, not churning.
                rescan(&[3, 4, 4, 4, 4]),
                // Changed in the last pass: volatile and churning.
                rescan(&[5, 5, 5, 5, 6]),
            ],
        )]);
        let (r, _) = account(&procs, 2, false);
        let range = r.ranges[&10][0];
        assert_eq!(
            (
                range.stable_pages,
                range.volatile_pages,
                range.churning_pages
            ),
            (2, 1, 2)
        );
    }

    #[test]
    fn splits_savings_into_intra_and_inter() {
        // PID 10: content A twice, B once, one zero page, one volatile page.
        // PID 20: content A once, B twice (one of them already merged), one unique.
        let procs = procs(vec![
            (
                10,
                0x4000_0000,
                vec![
                    page(1, 0, 5),
                    page(1, 0, 5),
                    page(2, 0, 5),
                    page(0, F_ZERO, 5),
                    page(3, 0, 0),
                ],
            ),
            (
                20,
                0x4000_0000 + RANGE_BYTES - 2 * PAGE as u64,
                vec![
                    page(1, 0, 5),
                    page(2, F_MERGED, 5),
                    page(2, 0, 5),
                    page(4, 0, 5),
                ],
            ),
        ]);
        let (r, table) = account_in(&procs, 1);
        // Stable contents only: 1, 2 and 4 (3 is volatile).
        assert_eq!((table.distinct, table.shards), (3, 1));
        // Counted in shards, every figure is the same.
        let (sharded, stats) = account_in(&procs, 16);
        assert_eq!(stats.shards, 16);
        assert_eq!(stats.distinct, 3);
        assert_eq!(sharded.per_pid, r.per_pid);
        assert_eq!(sharded.ranges, r.ranges);
        assert_eq!(sharded.sketches, r.sketches);
        // Sketches from the same walk: PID 10 holds contents 1 and 2, PID 20 holds 1, 2
        // and 4.
        let sk = r.sketches.as_ref().expect("asked for");
        assert_eq!(sk.per_pid[&10].distinct(), 2.0);
        assert_eq!(sk.per_pid[&20].distinct(), 3.0);
        assert_eq!(sk.per_pid[&10].union(&sk.per_pid[&20]).distinct(), 3.0);
        assert_eq!(sk.per_pid[&20].containment(&sk.per_pid[&10]).pages, 2.0);
        let a = r.per_pid[&10];
        assert_eq!(
            (
                a.pages_present,
                a.zero_pages,
                a.stable_pages,
                a.volatile_pages
            ),
            (5, 1, 3, 1)
        );
        assert_eq!(a.duplicate_pages, 3);
        // A: kept + intra; B: kept (but B has a KSM page elsewhere, so it can still merge).
        assert_eq!((a.mergeable_intra_pages, a.mergeable_inter_pages), (1, 0));
        assert_eq!(a.potential_savings_intra_bytes, PAGE as u64);
        assert_eq!(a.potential_savings_inter_bytes, PAGE as u64);
        let b = r.per_pid[&20];
        assert_eq!(b.duplicate_pages, 3);
        // A: inter; B: inter (merged) + intra.
        assert_eq!((b.mergeable_intra_pages, b.mergeable_inter_pages), (1, 2));
        assert_eq!(b.merged_pages, 1);
        // Not merged yet: A's copy (inter) and B's second copy (intra).
        assert_eq!(b.potential_savings_inter_bytes, PAGE as u64);
        assert_eq!(b.potential_savings_intra_bytes, PAGE as u64);
        // Σ (group size − 1): A 3−1, B 3−1.
        assert_eq!(r.total.mergeable_duplicate_pages, 4);
        // n − max(merged, 1) per group: A 2, B 2.
        assert_eq!(r.total.potential_savings_bytes, 4 * PAGE as u64);
        // PID 20's mapping straddles a 2 MiB boundary: two ranges, 2 and 2 pages.
        let ranges = &r.ranges[&20];
        assert_eq!(ranges.len(), 2);
        assert_eq!((ranges[0].pages, ranges[1].pages), (2, 2));
        assert_eq!(ranges[1].start, 0x4000_0000 + RANGE_BYTES);
        assert_eq!(r.ranges[&10].len(), 1);
    }

    #[test]
    fn prediction_counts_duplicates_and_non_thp_zero_pages() {
        let c = Counts {
            mergeable_duplicate_pages: 100,
            zero_pages: 50,
            zero_thp_pages: 20,
            ..Default::default()
        };
        // 30 zero pages outside THPs: one KSM page keeps them, or the zero page does.
        assert_eq!(c.predicted_ksm_pages(false), 129);
        assert_eq!(c.predicted_ksm_pages(true), 130);
        assert_eq!(Counts::default().predicted_ksm_pages(false), 0);
    }
}
