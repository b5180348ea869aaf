//! Rechecks between passes: a few pages of each suspect 2 MiB range are read again about
//! once a second, so a range the guest keeps rewriting is known as such whatever the
//! pass interval.
//!
//! A full pass reads a page once per pass (seconds to minutes apart). A guest that
//! rewrites a region with two contents in turn reads the same whenever the pass interval
//! holds an even number of rewrites: the lab's churn guests showed their rewritten ranges
//! as changed in one pass of four to eight, even with a jittered pace, and ksmd merged
//! them before the hints took them out (a burst of 8,000 to 22,000 COW breaks in one run of
//! two). Reads a second apart see every rewrite slower than that.
//!
//! The evidence is a repeat: a quarter of a range's sampled pages each seen rewritten
//! twice or more, the last time within [`FORGET_SECONDS`]. One rewrite (a one-off load, a
//! page the guest zeroes and fills) is not churn; the same page rewritten again is.
//!
//! Which ranges: those with pages that changed lately (the pass saw it), and those with
//! pages read for the first time (nothing is known of them yet, and ksmd may merge them
//! meanwhile; a changed range displaces one of those when the host is full), at most
//! [`MAX_RANGES`] on the host, [`SAMPLES`] pages each, so a round costs a bounded
//! number of page reads (about 4,000) however large the guests are.

use std::collections::BTreeMap;

use super::{
    PAGE,
    account::{Mapping, RANGE_BYTES},
    page_state::{F_PRESENT, F_SEEN, F_ZERO_FRAME, HASH_MASK, PageState},
};
use crate::util::convert::{u32_saturating, usize_of};

/// Pages sampled per range.
pub const SAMPLES: usize = 8;
/// Ranges tracked on the host at most.
pub const MAX_RANGES: usize = 512;
/// A sampled page's rewrites are forgotten after this long without one.
pub const FORGET_SECONDS: f64 = 60.0;
/// Rounds are 0.5 to 1.5 s apart (a low-discrepancy sequence, never in step with a
/// periodic rewrite for long).
const ROUND_MIN_SECONDS: f64 = 0.5;

#[derive(Clone, Copy, Debug, PartialEq)]
struct Sample {
    addr: u64,
    /// Kept 48 bits of the last content seen.
    hash: u64,
    rewrites: u8,
    last_rewrite: f64,
}

impl Sample {
    /// Records a read of content `hash` at `now`.
    fn seen(&mut self, hash: u64, now: f64) {
        if now - self.last_rewrite > FORGET_SECONDS {
            self.rewrites = 0;
        }
        if hash & HASH_MASK != self.hash {
            self.hash = hash & HASH_MASK;
            self.rewrites = self.rewrites.saturating_add(1);
            self.last_rewrite = now;
        }
    }

    fn repeated(&self, now: f64) -> bool {
        self.rewrites >= 2 && now - self.last_rewrite <= FORGET_SECONDS
    }
}

/// What the rechecks found in one range: pages sampled, and of those the ones rewritten
/// twice or more lately.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Evidence {
    pub sampled: u32,
    pub repeated: u32,
}

/// The tracked ranges and their samples.
#[derive(Debug, Default)]
pub struct Rechecks {
    /// (PID, range start) -> samples.
    ranges: BTreeMap<(u32, u64), Vec<Sample>>,
    next_round: f64,
    rounds: u64,
    /// Rounds are this many times further apart than the default (see
    /// [`Rechecks::set_spacing`]).
    spacing: f64,
}

/// Why a range is worth rechecking, weakest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Suspicion {
    None,
    /// Pages read for the first time (a new VM, memory the guest just touched): nothing is
    /// known of them yet, and ksmd may merge them meanwhile.
    New,
    /// Pages changed lately.
    Changed,
}

fn suspicion(pages: &[PageState]) -> Suspicion {
    let present = || pages.iter().filter(|s| s.has(F_PRESENT));
    if present().any(|s| s.changes() > 0 || s.changed()) {
        Suspicion::Changed
    } else if present().any(|s| !s.has(F_SEEN)) {
        Suspicion::New
    } else {
        Suspicion::None
    }
}

/// Up to [`SAMPLES`] pages of a range to read again: those that changed lately first,
/// then present ones spread over the range.
fn pick(start: u64, pages: &[PageState], now: f64) -> Vec<Sample> {
    let readable = |s: &PageState| s.has(F_PRESENT) && !s.has(F_ZERO_FRAME);
    let sample = |i: usize| Sample {
        addr: start + (i * PAGE) as u64,
        hash: pages[i].hash(),
        rewrites: pages[i].changes(),
        last_rewrite: now,
    };
    let mut picked: Vec<usize> = (0..pages.len())
        .filter(|&i| readable(&pages[i]) && pages[i].changes() > 0)
        .take(SAMPLES)
        .collect();
    let step = (pages.len() / SAMPLES).max(1);
    for slot in (0..pages.len()).step_by(step) {
        if picked.len() >= SAMPLES {
            break;
        }
        if let Some(i) = (slot..(slot + step).min(pages.len()))
            .find(|&i| readable(&pages[i]) && !picked.contains(&i))
        {
            picked.push(i);
        }
    }
    picked.sort_unstable();
    picked.into_iter().map(sample).collect()
}

impl Rechecks {
    /// After a full pass over `pid`: updates the samples of its tracked ranges with what
    /// the pass read (a change the pass saw first counts too), drops ranges that went
    /// quiet, and tracks new suspects while there is room.
    pub fn refresh(&mut self, pid: u32, mappings: &[Mapping], now: f64) {
        let mut kept = std::collections::BTreeSet::new();
        for m in mappings {
            let end = m.start + (m.pages.len() * PAGE) as u64;
            let mut base = m.start & !(RANGE_BYTES - 1);
            while base < end {
                let (a, b) = (base.max(m.start), (base + RANGE_BYTES).min(end));
                let pages = &m.pages[usize_of(a - m.start) / PAGE..usize_of(b - m.start) / PAGE];
                let key = (pid, base);
                let why = suspicion(pages);
                let suspect = why != Suspicion::None;
                if let Some(samples) = self.ranges.get_mut(&key) {
                    let mut recent = false;
                    for s in samples.iter_mut() {
                        if let Some(p) = s
                            .addr
                            .checked_sub(a)
                            .map(|o| usize_of(o / PAGE as u64))
                            .and_then(|i| pages.get(i))
                            .filter(|p| p.has(F_PRESENT))
                        {
                            s.seen(p.hash(), now);
                        }
                        recent |= now - s.last_rewrite <= FORGET_SECONDS && s.rewrites > 0;
                    }
                    if suspect || recent {
                        kept.insert(key);
                    } else {
                        self.ranges.remove(&key);
                    }
                } else if suspect && self.room(why) {
                    let samples = pick(a, pages, now);
                    if !samples.is_empty() {
                        self.ranges.insert(key, samples);
                        kept.insert(key);
                    }
                }
                base += RANGE_BYTES;
            }
        }
        // Ranges of this VM no longer in its guest RAM.
        self.ranges.retain(|k, _| k.0 != pid || kept.contains(k));
    }

    /// Whether a range suspected `why` can be tracked: there is room, or (for pages that
    /// changed) a range whose samples have shown no rewrite yet makes room. On a host whose
    /// first pass finds thousands of new ranges, those must not keep out the ones seen
    /// changing.
    fn room(&mut self, why: Suspicion) -> bool {
        if self.ranges.len() < MAX_RANGES {
            return true;
        }
        if why != Suspicion::Changed {
            return false;
        }
        let idle = self
            .ranges
            .iter()
            .find(|(_, samples)| samples.iter().all(|s| s.rewrites == 0))
            .map(|(k, _)| *k);
        idle.is_some_and(|k| self.ranges.remove(&k).is_some())
    }

    /// Forgets every PID not in `pids`.
    pub fn retain(&mut self, pids: &[u32]) {
        self.ranges.retain(|k, _| pids.contains(&k.0));
    }

    /// Whether a round is due at `now`.
    pub fn due(&self, now: f64) -> bool {
        !self.ranges.is_empty() && now >= self.next_round
    }

    /// The time of the next round.
    pub fn next_round(&self) -> f64 {
        self.next_round
    }

    /// The samples to read in a round: per PID, per range, the page addresses.
    pub fn plan(&self) -> BTreeMap<u32, Vec<(u64, Vec<u64>)>> {
        let mut plan: BTreeMap<u32, Vec<(u64, Vec<u64>)>> = BTreeMap::new();
        for (&(pid, start), samples) in &self.ranges {
            plan.entry(pid)
                .or_default()
                .push((start, samples.iter().map(|s| s.addr).collect()));
        }
        plan
    }

    /// Records a round's read of the page at `addr` of range `(pid, start)`.
    pub fn observe(&mut self, pid: u32, start: u64, addr: u64, hash: u64, now: f64) {
        if let Some(s) = self
            .ranges
            .get_mut(&(pid, start))
            .and_then(|v| v.iter_mut().find(|s| s.addr == addr))
        {
            s.seen(hash, now);
        }
    }

    /// Ends a round begun at `now`: schedules the next one.
    pub fn round_done(&mut self, now: f64) {
        self.rounds += 1;
        // Fractional parts of multiples of the golden ratio: spread over [0, 1).
        let spread = (self.rounds as f64 * 0.618_033_988_749_895).fract();
        self.next_round = now + (ROUND_MIN_SECONDS + spread) * self.spacing.max(1.0);
    }

    /// Rounds `factor` (>= 1) times further apart from the next one on; a round already
    /// scheduled later than the new spacing allows (the host just got busy) is brought
    /// forward.
    pub fn set_spacing(&mut self, factor: f64, now: f64) {
        let factor = if factor.is_finite() {
            factor.max(1.0)
        } else {
            1.0
        };
        let latest = now + (ROUND_MIN_SECONDS + 1.0) * factor;
        self.next_round = self.next_round.min(latest);
        self.spacing = factor;
    }

    /// Drops a PID that could not be read (it exited).
    pub fn forget(&mut self, pid: u32) {
        self.ranges.retain(|k, _| k.0 != pid);
    }

    /// What the rechecks found in range `(pid, start)` as of `now`.
    pub fn evidence(&self, pid: u32, start: u64, now: f64) -> Evidence {
        self.ranges
            .get(&(pid, start))
            .map(|v| Evidence {
                sampled: u32_saturating(v.len()),
                repeated: u32_saturating(v.iter().filter(|s| s.repeated(now)).count()),
            })
            .unwrap_or_default()
    }

    /// Ranges tracked now.
    pub fn tracked(&self) -> usize {
        self.ranges.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: u64 = 0x4000_0000;

    /// A 2 MiB mapping whose pages were read twice with contents `hash(i)`, and pages
    /// `changed` with a new content in the second read.
    fn mapping(changed: &[usize]) -> Mapping {
        let pages = (0..512)
            .map(|i| {
                let s = PageState::ABSENT.rescanned((i as u64 + 1) << 16, 0);
                if changed.contains(&i) {
                    s.rescanned((i as u64 + 1000) << 16, 0)
                } else {
                    s.rescanned((i as u64 + 1) << 16, 0)
                }
            })
            .collect();
        Mapping {
            start: START,
            pages,
        }
    }

    fn addr(i: usize) -> u64 {
        START + (i * PAGE) as u64
    }

    #[test]
    fn tracks_changed_and_new_ranges_only() {
        let mut r = Rechecks::default();
        r.refresh(1, &[mapping(&[])], 0.0);
        assert_eq!(r.tracked(), 0, "a calm range read twice is not rechecked");
        // Read once so far: new, so tracked, with samples spread over the range.
        let fresh = Mapping {
            start: START,
            pages: (0..512)
                .map(|i| PageState::ABSENT.rescanned((i as u64 + 1) << 16, 0))
                .collect(),
        };
        r.refresh(2, &[fresh], 0.0);
        let plan = r.plan();
        let samples = &plan[&2][0].1;
        assert_eq!(samples.len(), SAMPLES);
        assert_eq!((samples[0], samples[7]), (addr(0), addr(448)));
        // Changed pages are sampled first.
        r.refresh(3, &[mapping(&[100, 101])], 0.0);
        let plan = r.plan();
        assert!(plan[&3][0].1.contains(&addr(100)) && plan[&3][0].1.contains(&addr(101)));
        // Gone from the host: forgotten.
        r.retain(&[3]);
        assert_eq!(r.tracked(), 1);
    }

    #[test]
    fn changed_ranges_displace_idle_new_ones_when_full() {
        let mut r = Rechecks::default();
        let fresh = |start: u64| Mapping {
            start,
            pages: (0..512)
                .map(|i| PageState::ABSENT.rescanned((i as u64 + 1) << 16, 0))
                .collect(),
        };
        let new: Vec<Mapping> = (0..MAX_RANGES as u64)
            .map(|i| fresh(START + i * RANGE_BYTES))
            .collect();
        r.refresh(1, &new, 0.0);
        assert_eq!(r.tracked(), MAX_RANGES);
        // Another VM's new range waits for room; its changed one takes an idle range's.
        r.refresh(2, &[fresh(START)], 0.0);
        assert!(!r.plan().contains_key(&2));
        r.refresh(2, &[mapping(&[3])], 0.0);
        assert_eq!(r.tracked(), MAX_RANGES);
        assert_eq!(r.plan()[&2].len(), 1);
    }

    #[test]
    fn repeats_are_evidence_and_a_one_off_is_not() {
        let mut r = Rechecks::default();
        r.refresh(1, &[mapping(&[])], 0.0);
        // Tracked because page 5 changed once (a one-off, as the pass saw it).
        r.refresh(1, &[mapping(&[5])], 1.0);
        let samples: Vec<u64> = r.plan()[&1][0].1.clone();
        assert_eq!(samples.len(), SAMPLES);
        let content = |a: u64, v: u64| (a ^ v) << 16;
        // Every page rewritten once (a load): no repeat, no evidence.
        for &a in &samples {
            r.observe(1, START, a, content(a, 1), 2.0);
        }
        r.round_done(2.0);
        assert_eq!(
            r.evidence(1, START, 2.0).repeated,
            1,
            "only page 5, changed before"
        );
        // Read unchanged again: still nothing new.
        for &a in &samples {
            r.observe(1, START, a, content(a, 1), 3.0);
        }
        assert_eq!(r.evidence(1, START, 3.0).repeated, 1);
        // Rewritten once more (churn): every sample repeats.
        for &a in &samples {
            r.observe(1, START, a, content(a, 2), 4.0);
        }
        let e = r.evidence(1, START, 4.0);
        assert_eq!((e.sampled, e.repeated), (8, 8));
        // Forgotten a while after the last rewrite.
        assert_eq!(r.evidence(1, START, 4.0 + FORGET_SECONDS + 1.0).repeated, 0);
        // ... and so is the count: one more rewrite after the quiet is a first again.
        for &a in &samples {
            r.observe(1, START, a, content(a, 3), 4.0 + FORGET_SECONDS + 2.0);
        }
        assert_eq!(r.evidence(1, START, 4.0 + FORGET_SECONDS + 2.0).repeated, 0);
    }

    #[test]
    fn a_change_the_pass_sees_first_counts_once() {
        let mut r = Rechecks::default();
        r.refresh(1, &[mapping(&[7])], 0.0);
        let a = addr(7);
        assert!(
            r.plan()[&1][0].1.contains(&a),
            "the changed page is sampled"
        );
        // The pass reads a new content before any round does: a second rewrite.
        let mut m = mapping(&[7]);
        m.pages[7] = m.pages[7].rescanned(0xabc << 16, 0);
        r.refresh(1, std::slice::from_ref(&m), 1.0);
        // A round then reads that same content, and the next pass too: nothing more.
        r.observe(1, START, a, 0xabc << 16, 1.5);
        r.refresh(1, &[m], 2.0);
        let sample = r.ranges[&(1, START)].iter().find(|s| s.addr == a);
        assert_eq!(
            sample.map(|s| s.rewrites),
            Some(2),
            "its change before, the pass's"
        );
    }

    #[test]
    fn rounds_are_spread_between_half_a_second_and_one_and_a_half() {
        let mut r = Rechecks::default();
        let mut gaps = Vec::new();
        let mut t = 0.0;
        for _ in 0..200 {
            r.round_done(t);
            gaps.push(r.next_round() - t);
            t = r.next_round();
        }
        assert!(gaps.iter().all(|g| (0.5..1.5).contains(g)));
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        assert!((0.95..1.05).contains(&mean), "{mean}");
    }

    #[test]
    fn a_quiet_host_spaces_rounds_out_and_a_busy_one_brings_the_next_forward() {
        let mut r = Rechecks::default();
        r.set_spacing(10.0, 0.0);
        r.round_done(0.0);
        let quiet = r.next_round();
        assert!((5.0..15.0).contains(&quiet), "{quiet}");
        // Busy again at t = 1: the next round within 1.5 s, not at the quiet time.
        r.set_spacing(1.0, 1.0);
        assert!(r.next_round() <= 2.5, "{}", r.next_round());
        r.round_done(3.0);
        assert!((3.5..4.5).contains(&r.next_round()));
    }
}
