//! The daemon's hand on merge hints: at every new ranking the planner
//! ([`crate::policy::hints`]) decides which ranges of which VM to make mergeable or not,
//! and with `--act hints` (and security domains configured) [`crate::actuate::hints`]
//! carries it out. Otherwise the decisions are published as recommendations, with why.

use std::collections::BTreeMap;

use crate::{
    actuate::hints::{Applied, HintControl, HintError},
    config::Domain,
    host::inventory::Vm,
    model::rank::RankedRanges,
    policy::hints::{HintPlanner, HintPolicy, Sharing, Target, VmRanges},
    scan::RANGE_BYTES,
    wire::{HintOutcome, HintView, HintsStatus, VmPieces},
};

/// Decisions kept for /v1/recommendations.
const RECENT: usize = 256;
/// Injections per ranking at most (each stops its VM for well under a millisecond).
const MAX_PER_RANKING: usize = 64;
/// The longest ksmd's fast scan waits for the hints' first verdict on a VM
/// ([`Hinting::settling`]): a slow scanner must not keep a host unmerged.
const SETTLE_MAX_SECONDS: f64 = 90.0;

/// Mappings the hints may add to one VM's process (each isolated range splits a mapping
/// in up to three): far below `vm.max_map_count` (65,530 by default), and never more than
/// a sixteenth of it. Past it, a hint that could split waits.
const MAX_ADDED_PIECES: u64 = 1024;

/// The process's number of memory mappings (lines of /proc/PID/maps).
fn mapping_count(pid: u32) -> Option<u64> {
    use std::io::BufRead as _;
    let f = std::fs::File::open(format!("/proc/{pid}/maps")).ok()?;
    Some(std::io::BufReader::new(f).split(b'\n').count() as u64)
}

/// How many mappings the hints may add to one VM here.
fn pieces_cap() -> u64 {
    let max_map_count = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(65_530);
    MAX_ADDED_PIECES.min(max_map_count / 16)
}

/// Passes spared beyond the earliest verdict: a volatile verdict needs two passes that see
/// the range rewritten, and rewrites out of step with the scan show in about every other
/// pass (the jittered pace). At one chance in two per pass, two sightings come within the
/// hold 89 % of the time with three to spare, 69 % with one.
const SETTLE_SPARE_PASSES: u32 = 3;

pub struct Hinting {
    planner: HintPlanner,
    control: Option<HintControl>,
    domains: Vec<Domain>,
    last_passes: Option<u32>,
    status: HintsStatus,
    /// When each VM was first seen (for [`SETTLE_MAX_SECONDS`]).
    first_seen: BTreeMap<u32, f64>,
    /// Per VM: its mapping count when first seen, and now.
    mappings: BTreeMap<u32, (u64, u64)>,
    /// Per VM: its scan passes at the last ranking planned on. A VM the scan let rest is
    /// not planned on again until its next pass: the same counts ranked again are no new
    /// evidence, and the planner's streaks count rankings.
    planned_passes: BTreeMap<u32, u32>,
    /// [`pieces_cap`], read once.
    max_added_mappings: u64,
    /// Whether logs and outcomes may carry guest-RAM addresses (`--expose-addresses`).
    expose_addresses: bool,
}

impl Hinting {
    /// `control`: present with `--act hints`. Without domains nothing is ever changed.
    pub fn new(control: Option<HintControl>, domains: Vec<Domain>) -> Hinting {
        let note = match (&control, domains.is_empty()) {
            (None, _) => {
                Some("observing only: hints are recommendations (memfabric run --act hints)".into())
            }
            (Some(_), true) => Some(
                "no [[domain]] in the config: KSM merges across every mergeable mapping of the \
                 host, so memfabric changes no VM until the config says which VMs may share \
                 (hints are recommendations)"
                    .into(),
            ),
            (Some(_), false) => None,
        };
        if let Some(n) = &note
            && control.is_some()
        {
            tracing::warn!("{n}");
        }
        Hinting {
            planner: HintPlanner::new(HintPolicy::default()),
            control,
            last_passes: None,
            first_seen: BTreeMap::new(),
            mappings: BTreeMap::new(),
            planned_passes: BTreeMap::new(),
            max_added_mappings: pieces_cap(),
            expose_addresses: false,
            status: HintsStatus {
                acting: note.is_none(),
                note,
                ..HintsStatus::default()
            },
            domains,
        }
    }

    /// Lets logs and outcomes carry guest-RAM addresses (`--expose-addresses`).
    pub fn expose_addresses(&mut self, yes: bool) {
        self.expose_addresses = yes;
    }

    /// How the planner may hint `vm`; None: not at all (left alone, or in no domain while
    /// domains are configured). Whether it may share is [`crate::config::may_share`]'s
    /// rule, the fabric's too.
    fn sharing(&self, vm: &Vm) -> Option<Sharing> {
        if vm.merge_off {
            return None;
        }
        if self.domains.is_empty() {
            return Some(Sharing::Ranges);
        }
        match crate::config::may_share(&self.domains, &vm.name, vm.uuid.as_deref())? {
            true => Some(Sharing::Ranges),
            false => Some(Sharing::Never),
        }
    }

    /// Whether ksmd should still hold its fast scan for the hints: they act, and some
    /// mergeable VM they may change has not been ranked often enough for a verdict. A
    /// volatile range is taken out after `stable_after + to_unmergeable_after` passes at
    /// the earliest, and [`SETTLE_SPARE_PASSES`] more are spared; a VM of a domain that
    /// does not share, after one. Merging such a VM fast first means a COW break for every
    /// merged page the verdict takes out again, and, for a domain that must not share,
    /// merging it at all. Each VM holds at most [`SETTLE_MAX_SECONDS`] from when it was
    /// first seen.
    pub fn settling(&mut self, t: f64, vms: &BTreeMap<u32, Vm>, ranked: &RankedRanges) -> bool {
        self.first_seen.retain(|pid, _| vms.contains_key(pid));
        if !self.status.acting {
            return false;
        }
        let ranges_need = u32::from(ranked.stable_after)
            + self.planner.policy().to_unmergeable_after
            + SETTLE_SPARE_PASSES;
        let mut settling = false;
        for (pid, vm) in vms {
            let since = *self.first_seen.entry(*pid).or_insert(t);
            if vm.mergeability != crate::host::inventory::Mergeability::Mergeable {
                continue;
            }
            let need = match self.sharing(vm) {
                None => continue,
                Some(Sharing::Never) => 1,
                Some(Sharing::Ranges) => ranges_need,
            };
            let passes = ranked.vm_passes.get(pid).copied().unwrap_or(0);
            settling |= passes < need && t - since < SETTLE_MAX_SECONDS;
        }
        settling
    }

    /// A VM is gone: nothing of it to put back, nothing to plan.
    pub fn gone(&mut self, pid: u32) {
        if let Some(c) = &mut self.control {
            c.forget(pid);
        }
    }

    /// Plans (and acts) once per new ranking; returns the status to publish.
    pub fn tick(&mut self, t: f64, vms: &BTreeMap<u32, Vm>, ranked: &RankedRanges) -> HintsStatus {
        if self.last_passes == Some(ranked.passes) || ranked.by_pid.is_empty() {
            return self.status();
        }
        self.last_passes = Some(ranked.passes);
        let pids: Vec<u32> = vms.keys().copied().collect();
        self.planner.retain(&pids);
        self.mappings.retain(|pid, _| vms.contains_key(pid));
        self.planned_passes.retain(|pid, _| vms.contains_key(pid));
        let mut inputs = Vec::new();
        self.status.left_alone.clear();
        for (pid, vm) in vms {
            if let Some(why) = left_alone(vm) {
                self.status.left_alone.push(why);
                continue;
            }
            let Some(sharing) = self.sharing(vm) else {
                continue;
            };
            // The RAM as last described (again whenever its mappings move): reading it
            // afresh here, from smaps, walked every page table of every VM at each
            // ranking, two thirds of a quiet daemon's refresh CPU. A process that is no
            // VMM (`--pid`) has no described RAM: its anonymous mappings, from maps.
            let maps = if vm.ram.is_empty() {
                crate::host::maps::targets(*pid).unwrap_or_default()
            } else {
                vm.ram_spans()
            };
            if maps.is_empty() {
                continue;
            }
            if let Some(now) = mapping_count(*pid) {
                let e = self.mappings.entry(*pid).or_insert((now, now));
                e.1 = now;
            }
            let clamp = |s: u64| {
                maps.iter()
                    .find(|(a, b)| s < *b && s + RANGE_BYTES > *a)
                    .map(|(a, b)| (s.max(*a), (s + RANGE_BYTES).min(*b)))
            };
            let passes = ranked.vm_passes.get(pid).copied().unwrap_or(ranked.passes);
            let fresh = self.planned_passes.insert(*pid, passes) != Some(passes);
            let ranges = ranked
                .by_pid
                .get(pid)
                .filter(|_| fresh)
                .map(|list| {
                    list.iter()
                        .filter_map(|r| clamp(r.counts.start).map(|(s, e)| (s, e, r.class)))
                        .collect()
                })
                .unwrap_or_default();
            inputs.push(VmRanges {
                pid: *pid,
                sharing,
                ram: maps,
                ranges,
            });
        }
        let decisions = self.planner.plan(t, &inputs);
        let acting = self.status.acting;
        let mut done = 0;
        let cap = self.max_added_mappings;
        for d in decisions {
            let name = vms.get(&d.pid).map_or_else(String::new, |v| v.name.clone());
            let mut view = HintView {
                vm: name,
                pid: d.pid,
                span: crate::addresses::GuestSpan::new(d.start, d.end),
                target: d.target,
                reason: d.reason,
                outcome: HintOutcome::Recommended,
                stopped_us: None,
            };
            // Each change may split a mapping in three: counted at the worst.
            let split_room = self
                .mappings
                .get(&d.pid)
                .map(|&(first, now)| (now.saturating_sub(first), cap));
            if !d.within_rate {
                view.outcome = HintOutcome::RateLimited;
            } else if acting
                && let Some((added, cap)) = split_room
                && added + 2 > cap
            {
                view.outcome = HintOutcome::Deferred(Some(format!(
                    "the hints added {added} memory mappings to this VM (at most {cap}, far \
                     below vm.max_map_count)"
                )));
                self.status.deferred_total += 1;
                self.planner.failed(&d);
            } else if acting && done < MAX_PER_RANKING {
                let control = self.control.as_mut().expect("acting implies control");
                done += 1;
                match control.apply(d.pid, d.start, d.end, d.target == Target::Mergeable) {
                    Ok(Applied::Injected(stopped)) => {
                        if let Some(m) = self.mappings.get_mut(&d.pid) {
                            m.1 = mapping_count(d.pid).unwrap_or(m.1 + 2);
                        }
                        view.outcome = HintOutcome::Applied;
                        view.stopped_us = Some(stopped.as_secs_f64() * 1e6);
                        self.status.applied_total += 1;
                        self.status.stop_seconds_total += stopped.as_secs_f64();
                    }
                    Ok(Applied::Already) => {
                        view.outcome = HintOutcome::Already;
                        self.status.already_total += 1;
                        self.planner.unchanged(&d);
                    }
                    Err(HintError::Deferred(why)) => {
                        tracing::warn!(
                            "hint {:?} of {} (pid {}) deferred: {why}",
                            d.target,
                            view.vm,
                            d.pid
                        );
                        view.outcome = HintOutcome::Deferred(Some(why.to_string()));
                        self.status.deferred_total += 1;
                        self.planner.failed(&d);
                    }
                    Err(e) => {
                        let e = crate::addresses::shown(&e.to_string(), self.expose_addresses);
                        tracing::warn!(
                            "hint {:?} of {} MiB of {} (pid {}): {e}",
                            d.target,
                            (d.end - d.start) >> 20,
                            view.vm,
                            d.pid
                        );
                        view.outcome = HintOutcome::Failed(e);
                        self.status.failed_total += 1;
                        self.planner.failed(&d);
                    }
                }
            } else if acting {
                self.planner.failed(&d); // over this ranking's budget: next time
                view.outcome = HintOutcome::Deferred(None);
            }
            self.status.recent.push(view);
        }
        let excess = self.status.recent.len().saturating_sub(RECENT);
        self.status.recent.drain(..excess);
        self.status.mapping_pieces = self
            .mappings
            .iter()
            .map(|(pid, &(first, now))| VmPieces {
                vm: vms.get(pid).map_or_else(String::new, |v| v.name.clone()),
                pid: *pid,
                mappings: now,
                added: now.saturating_sub(first),
            })
            .collect();
        self.status()
    }

    fn status(&self) -> HintsStatus {
        HintsStatus {
            changed_ranges: self.control.as_ref().map_or(0, |c| c.changed() as u64),
            ..self.status.clone()
        }
    }

    /// Puts every hinted range back (unless `--keep-hints`); at shutdown. Logs what it
    /// did: what could not be put back (or waits for memory) at warning level, a journal
    /// that could not be written as an error (the next start tries again).
    pub fn finish(&mut self) {
        let Some(c) = self.control.as_mut() else {
            return;
        };
        let expose = self.expose_addresses;
        match c.restore() {
            Ok(r) if !r.failed.is_empty() || !r.deferred.is_empty() => {
                let r = crate::addresses::shown(&r.to_string(), expose);
                tracing::warn!("merge hints: {r}; the next start tries again");
            }
            Ok(r) => tracing::info!("merge hints: {r}"),
            Err(e) => tracing::error!(
                "restoring merge hints: {e} (what is journaled is put back at the next start)"
            ),
        }
    }
}

/// Why a VM is never hinted, if it is not: its operator turned merging off on the QEMU
/// command line (`mem-merge=off`, libvirt's `<nosharepages/>`, a backend's `merge=off`).
/// Making its RAM mergeable would override that choice, and it is unmergeable already.
fn left_alone(vm: &Vm) -> Option<String> {
    vm.merge_off.then(|| {
        format!(
            "{} (pid {}): its command line turns merging off (mem-merge=off or merge=off): \
             the operator's choice, left alone",
            vm.name, vm.pid
        )
    })
}

/// Hints that act on VMs named `guest` (one sharing domain), journaling in a fresh state
/// directory named after `test` (removed by the caller): for the loop's tests.
#[cfg(test)]
pub(crate) fn acting_on_guest(test: &str) -> (Hinting, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("memfabric-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let lock = crate::actuate::StateLock::acquire(&dir, None, |_| {}).unwrap();
    let (control, _) = HintControl::begin(std::sync::Arc::new(lock), false).unwrap();
    let domain = Domain {
        name: "tenants".into(),
        name_match: Some(regex::Regex::new("^guest$").unwrap()),
        uuids: vec![],
        share: true,
    };
    (Hinting::new(Some(control), vec![domain]), dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        host::inventory::Mergeability,
        model::rank::{RangeClass, RankedRange},
        scan::account::RangeCounts,
    };

    /// A ranking at pass `passes` with one volatile range of `pid` at `start`.
    fn one_volatile(pid: u32, start: u64, passes: u32) -> RankedRanges {
        RankedRanges {
            passes,
            by_pid: [(
                pid,
                vec![RankedRange {
                    class: RangeClass::Volatile,
                    counts: RangeCounts {
                        start,
                        ..RangeCounts::default()
                    },
                    savings: Default::default(),
                    heat: Default::default(),
                }],
            )]
            .into(),
            ..RankedRanges::default()
        }
    }

    /// `buf` as a VM's described guest RAM.
    fn ram_at(buf: &[u8]) -> Vec<crate::host::inventory::RamMapping> {
        let start = buf.as_ptr() as u64;
        vec![crate::host::inventory::RamMapping {
            span: crate::addresses::GuestSpan::new(start, start + buf.len() as u64),
            backing: "private-anonymous".into(),
            mergeable: false,
        }]
    }

    /// A guest whose QEMU command line turns merging off is never hinted, whatever its
    /// ranges do; the same guest without it is.
    #[test]
    fn operator_merge_off_is_left_alone() {
        // A real anonymous mapping of this process stands for guest RAM.
        let ram = vec![1u8; 8 << 20];
        let start = (ram.as_ptr() as u64).next_multiple_of(RANGE_BYTES);
        let ranked = |passes: u32| one_volatile(std::process::id(), start, passes);
        for merge_off in [true, false] {
            let vm = Vm {
                guest_memory_bytes: 8 << 20,
                mergeability: Mergeability::NotMarked,
                merge_off,
                ram: ram_at(&ram),
                ..Vm::guest(std::process::id())
            };
            let vms = [(vm.pid, vm)].into();
            let mut h = Hinting::new(None, vec![]);
            let mut status = HintsStatus::default();
            for pass in 1..=4 {
                status = h.tick(f64::from(pass) * 10.0, &vms, &ranked(pass));
            }
            if merge_off {
                assert!(status.recent.is_empty(), "{:?}", status.recent);
                assert_eq!(status.left_alone.len(), 1);
                assert!(status.left_alone[0].contains("mem-merge=off"));
            } else {
                assert!(status.left_alone.is_empty());
                assert!(
                    status
                        .recent
                        .iter()
                        .any(|d| d.target == Target::Unmergeable && d.span.start == start),
                    "{:?}",
                    status.recent
                );
            }
        }
        drop(ram);
    }

    /// A VM the scan let rest is ranked again with its old counts whenever a neighbour's
    /// pass makes a new ranking: those rankings are no new evidence and count nothing; its
    /// own next pass does.
    #[test]
    fn rankings_without_a_new_pass_of_the_vm_count_nothing() {
        let ram = vec![1u8; 8 << 20];
        let start = (ram.as_ptr() as u64).next_multiple_of(RANGE_BYTES);
        let pid = std::process::id();
        let vm = Vm {
            guest_memory_bytes: 8 << 20,
            ram: ram_at(&ram),
            ..Vm::guest(pid)
        };
        let vms = [(pid, vm)].into();
        let ranked = |passes: u32, vm_passes: u32| RankedRanges {
            vm_passes: [(pid, vm_passes)].into(),
            ..one_volatile(pid, start, passes)
        };
        let mut h = Hinting::new(None, vec![]);
        let unmerge = |s: &HintsStatus| {
            s.recent
                .iter()
                .any(|d| d.target == Target::Unmergeable && d.span.start == start)
        };
        // Volatile in its pass 5, then ranked four more times (others' passes) unchanged.
        for (i, passes) in (10..15).enumerate() {
            let status = h.tick(i as f64, &vms, &ranked(passes, 5));
            assert!(!unmerge(&status), "one volatile pass is no verdict");
        }
        // Its own next pass: the second volatile ranking.
        let status = h.tick(10.0, &vms, &ranked(15, 6));
        assert!(unmerge(&status), "{:?}", status.recent);
        drop(ram);
    }

    /// A VM whose process the hints already gave the most mappings they may add gets no
    /// change that could split another: the decision waits, and says why.
    #[test]
    fn hints_stop_splitting_mappings_at_the_cap() {
        let ram = vec![1u8; 8 << 20];
        let start = (ram.as_ptr() as u64).next_multiple_of(RANGE_BYTES);
        let pid = std::process::id();
        let (mut h, dir) = acting_on_guest("pieces");
        // As if the hints had added more mappings than they may (this process has fewer
        // than the real cap). Counted from zero, not from `now - 10`: the other tests of
        // this process map and unmap memory meanwhile, and a count that fell by one made
        // this test flaky.
        let now = mapping_count(pid).unwrap();
        assert!(now > 20, "{now} mappings");
        h.max_added_mappings = 11;
        h.mappings.insert(pid, (0, now));
        let vm = Vm {
            guest_memory_bytes: 8 << 20,
            ram: ram_at(&ram),
            ..Vm::guest(pid)
        };
        let vms = [(pid, vm)].into();
        let ranked = |passes: u32| one_volatile(pid, start, passes);
        let mut status = HintsStatus::default();
        for pass in 1..=4 {
            status = h.tick(f64::from(pass) * 10.0, &vms, &ranked(pass));
        }
        let d = status
            .recent
            .iter()
            .find(|d| d.target == Target::Unmergeable && d.span.start == start)
            .expect("a decision for the volatile range");
        assert!(
            d.outcome
                .to_string()
                .starts_with("deferred: the hints added"),
            "{}",
            d.outcome
        );
        assert_eq!(status.applied_total, 0);
        assert!(status.deferred_total >= 1, "{}", status.deferred_total);
        assert!(status.mapping_pieces[0].added >= 10);
        assert!((1..=65_530 / 16).contains(&pieces_cap()));
        drop(h);
        drop(ram);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// ksmd's fast scan waits until the acting hints could judge every mergeable VM they
    /// may change, and never longer than the cap.
    #[test]
    fn ksmd_waits_for_the_first_verdicts_only() {
        let dir = std::env::temp_dir().join(format!("memfabric-settle-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let lock = crate::actuate::StateLock::acquire(&dir, None, |_| {}).unwrap();
        let (control, _) = HintControl::begin(std::sync::Arc::new(lock), false).unwrap();
        let domain = |name: &str, re: &str, share| Domain {
            name: name.into(),
            name_match: Some(regex::Regex::new(re).unwrap()),
            uuids: vec![],
            share,
        };
        let mut h = Hinting::new(
            Some(control),
            vec![
                domain("tenants", "^a$", true),
                domain("vault", "^v$", false),
            ],
        );
        let vm = |pid, name: &str, merge_off| Vm {
            name: name.into(),
            merge_off,
            ..Vm::guest(pid)
        };
        let ranked = |passes: &[(u32, u32)]| RankedRanges {
            vm_passes: passes.iter().copied().collect(),
            stable_after: 2,
            ..RankedRanges::default()
        };
        let vms =
            |list: Vec<Vm>| -> BTreeMap<u32, Vm> { list.into_iter().map(|v| (v.pid, v)).collect() };
        // A shareable VM needs stable_after + 2 + SETTLE_SPARE_PASSES (7) passes; one of a
        // domain that does not share, one. VMs in no domain and guests whose operator
        // turned merging off hold nothing.
        let host = vms(vec![
            vm(1, "a", false),
            vm(2, "v", false),
            vm(3, "b", false),
            vm(4, "a", true),
        ]);
        assert!(h.settling(0.0, &host, &ranked(&[])));
        assert!(h.settling(5.0, &host, &ranked(&[(1, 6), (2, 1)])));
        assert!(h.settling(6.0, &host, &ranked(&[(1, 7), (2, 0)])));
        assert!(!h.settling(7.0, &host, &ranked(&[(1, 7), (2, 1)])));
        // A VM that arrives later holds again, at most SETTLE_MAX_SECONDS.
        let mut later = host.clone();
        later.insert(5, vm(5, "a", false));
        let judged = ranked(&[(1, 9), (2, 9)]);
        assert!(h.settling(100.0, &later, &judged));
        assert!(h.settling(100.0 + SETTLE_MAX_SECONDS - 1.0, &later, &judged));
        assert!(!h.settling(100.0 + SETTLE_MAX_SECONDS, &later, &judged));
        // Not acting (no control): nothing is held.
        let mut watching = Hinting::new(None, vec![]);
        assert!(!watching.settling(0.0, &host, &ranked(&[])));
        drop(h);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
