//! The ksmd controller: how fast ksmd should scan, tick by tick.
//!
//! The kernel's choices are both blind to what changed: stock KSM scans 100 pages every
//! 20 ms forever, whether anything is left to merge or not, and the scan-time advisor only
//! re-plans when a full scan ends (a VM that arrives waits for the current scan, then needs
//! two more visits per page before anything merges). This controller scans *fast exactly
//! while merging pays or something changed* and trickles otherwise:
//!
//! - **hot** (a full scan every `hot_scan_seconds`, never slower than `floor_pages_per_sec`):
//!   at start; for `hot_scans` full scans after a new mergeable `mm` or a new VM (KSM needs
//!   one scan to reach it and two visits with an equal checksum per page); while the last
//!   full scan merged something (`merge_gain_pages`) and merging has not converged (see
//!   [`merging_pays`]); after the guests populate new memory
//!   (first-touch write faults); when the page scanner sees more unmerged duplicates than
//!   before; under memory pressure.
//! - **quiet** otherwise: a full scan every `idle_scan_seconds` (120 s), enough to find
//!   content rewritten in place (which no fault reveals) without paying stock's constant
//!   scan. 300 s was tried first: on the `timeline` scenario a guest that loaded 32 MiB of
//!   another guest's data into memory it had already touched went unmerged for the whole
//!   120 s phase (no fault reveals such a write). Each quiet full scan that merged
//!   nothing doubles the period, up to `idle_max_scan_seconds` (600 s): a host that stays
//!   quiet stops paying for looks that find nothing (at 120 s ksmd alone cost 75 % of
//!   stock's CPU on three quiet lab guests), and any trigger starts again from 120 s. The
//!   quiet scan covers what ksmd scans (measured between full scans): with the hints,
//!   only the ranges they left mergeable, not all guest RAM.
//!
//! Both are capped by the ksmd CPU budget: the cost of a page visit is measured (ksmd's
//! CPU time over `pages_scanned`), so `pace x cost <= budget`. The pace is quantized to
//! quarter-octave steps and kept while within 25 % of the last setting, so a steady host
//! sees no knob writes at all (a `sleep_millisecs` write wakes ksmd).

use serde::{Deserialize, Serialize};

/// The controller's settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct KsmdPolicy {
    /// ksmd's CPU budget, a fraction of one core.
    pub ksmd_cpu: f64,
    /// Full-scan period while merging pays.
    pub hot_scan_seconds: f64,
    /// Full-scan period when nothing changed.
    pub idle_scan_seconds: f64,
    /// The quiet period doubles after each full scan that merged nothing, up to this.
    pub idle_max_scan_seconds: f64,
    /// Never slower than this while hot (stock KSM's 100 pages / 20 ms), budget permitting.
    pub floor_pages_per_sec: f64,
    /// Never slower than this at all.
    pub idle_min_pages_per_sec: f64,
    /// Full scans to stay hot after a new `mm` or VM.
    pub hot_scans: u64,
    /// A trigger keeps the controller hot at most this long (unless merges continue).
    pub hot_max_seconds: f64,
    /// A full scan that added this many merged pages (or more) earns another one.
    pub merge_gain_pages: u64,
    /// New guest memory per tick (first-touch write faults, pages) that counts as a change.
    pub guest_write_pages: u64,
    /// More unmerged duplicates than before, by this many pages, counts as a change.
    pub savings_step_pages: u64,
    /// MemAvailable under this fraction of MemTotal: merging pays more, scan fast.
    pub pressure_fraction: f64,
}

impl Default for KsmdPolicy {
    fn default() -> KsmdPolicy {
        KsmdPolicy {
            ksmd_cpu: 0.10,
            hot_scan_seconds: 8.0,
            idle_scan_seconds: 120.0,
            idle_max_scan_seconds: 600.0,
            floor_pages_per_sec: 5000.0,
            idle_min_pages_per_sec: 50.0,
            hot_scans: 3,
            hot_max_seconds: 120.0,
            merge_gain_pages: 256,
            guest_write_pages: 1024,
            savings_step_pages: 2048,
            pressure_fraction: 0.10,
        }
    }
}

/// /sys/kernel/mm/ksm counters (cumulative where the kernel's are).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KsmCounters {
    pub pages_scanned: u64,
    pub pages_shared: u64,
    pub pages_sharing: u64,
    pub pages_unshared: u64,
    pub pages_volatile: u64,
    pub full_scans: u64,
    pub general_profit: i64,
}

/// What the daemon saw at one tick. Counters are cumulative: the controller takes the
/// differences itself, so a skipped tick loses nothing.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// Seconds on a monotonic clock.
    pub t: f64,
    pub ksm: KsmCounters,
    /// ksmd's CPU seconds since boot.
    pub ksmd_cpu_seconds: f64,
    /// vmstat `cow_ksm`: writes that broke a merge, host-wide.
    pub cow_ksm: u64,
    /// `mm`s that joined KSM since the probes were loaded (`ksm:ksm_enter`).
    pub ksm_enters: u64,
    /// VMs with mergeable RAM that appeared since the daemon started.
    pub vms_arrived: u64,
    /// First-touch write faults of tracked VMs (user faults on pages not present, and KVM
    /// guest write faults) since the daemon started: guests populating memory. Writes to
    /// present pages (COW breaks of churning memory) are left out: re-merging them does
    /// not pay.
    pub guest_writes: u64,
    /// Guest RAM of tracked mergeable VMs, in pages: the scan size before one is measured.
    pub mergeable_pages: u64,
    /// Unmerged duplicate pages the page scanner found (when it runs).
    pub potential_savings_pages: Option<u64>,
    pub mem_available_bytes: u64,
    pub mem_total_bytes: u64,
    /// The merge hints act and have not judged every VM yet: ksmd holds its fast scan
    /// (see [`Reason::HintsSettling`]).
    #[serde(default)]
    pub hints_settling: bool,
}

/// Settings for ksmd.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Knobs {
    pub run: bool,
    pub pages_to_scan: u32,
    pub sleep_millisecs: u32,
}

impl Knobs {
    /// Pages per second these settings ask for (ignoring the scan's own duration).
    pub fn pace(&self) -> f64 {
        if !self.run {
            return 0.0;
        }
        self.pages_to_scan as f64 * 1000.0 / self.sleep_millisecs.max(1) as f64
    }
}

/// Why the controller chose its pace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The first tick: nothing measured yet.
    Starting,
    /// A mergeable `mm` or a VM appeared.
    NewMemory,
    /// The last full scan merged pages: more may follow.
    Merging,
    /// Guests populated new memory.
    GuestsWriting,
    /// The page scanner sees more unmerged duplicates.
    Unmerged,
    /// MemAvailable is low.
    MemoryPressure,
    /// Nothing changed: trickle.
    Quiet,
    /// Hot, but held at the quiet pace while the merge hints have not judged every VM yet:
    /// merging a range the next ranking takes out again costs a COW break per page (the
    /// timeline bench lost thousands in its first 30 s that way). The heat is renewed
    /// when the hold ends; memory pressure is never held.
    HintsSettling,
}

impl Reason {
    pub const ALL: [Reason; 8] = [
        Reason::Starting,
        Reason::NewMemory,
        Reason::Merging,
        Reason::GuestsWriting,
        Reason::Unmerged,
        Reason::MemoryPressure,
        Reason::Quiet,
        Reason::HintsSettling,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Starting => "starting",
            Reason::NewMemory => "new_memory",
            Reason::Merging => "merging",
            Reason::GuestsWriting => "guests_writing",
            Reason::Unmerged => "unmerged",
            Reason::MemoryPressure => "memory_pressure",
            Reason::Quiet => "quiet",
            Reason::HintsSettling => "hints_settling",
        }
    }
}

/// One tick's decision.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub knobs: Knobs,
    pub reason: Reason,
    /// The pace wanted before the budget cap, pages per second.
    pub wanted_pages_per_sec: f64,
    /// What the budget allows at the measured cost, pages per second.
    pub budget_pages_per_sec: f64,
    /// True when the budget cut the wanted pace.
    pub capped: bool,
    /// Measured ksmd CPU per page visit, microseconds.
    pub cost_us_per_page: f64,
}

/// Cost of a page visit assumed before one is measured: stock KSM used 4.2 s of ksmd CPU
/// for ~2.1 M page visits in the lab benchmark (2 us).
const PRIOR_COST_S: f64 = 2e-6;
const MAX_PAGES_TO_SCAN: f64 = 100_000.0;
/// A quiet ksmd's scan is taken as measured when under this share of all guest RAM.
const QUIET_SCAN_SHARE: f64 = 0.75;

/// The controller's memory between ticks.
#[derive(Clone, Debug)]
pub struct KsmdController {
    policy: KsmdPolicy,
    prev: Option<Observation>,
    hot_until_scans: u64,
    hot_deadline: f64,
    hot_reason: Reason,
    /// (full_scans, pages_sharing, pages_scanned) at the last full-scan boundary.
    boundary: Option<(u64, u64, u64)>,
    scan_pages: Option<f64>,
    cost: f64,
    savings_seen: u64,
    last: Option<Decision>,
    /// Hot but held for the hints (renewed when released).
    held: bool,
    /// Full scans while quiet since the last trigger: the quiet period's doublings.
    quiet_scans: u64,
    /// The last full scan ended while quiet: the next one is made wholly while quiet.
    quiet_boundary: bool,
    /// Pages of the last full scan made wholly while quiet, since the last trigger.
    quiet_scan_pages: Option<f64>,
    /// Pages the last full scan merged (`pages_sharing` gained), once one was measured.
    last_gain: Option<u64>,
}

impl KsmdController {
    pub fn new(policy: KsmdPolicy) -> KsmdController {
        KsmdController {
            policy,
            prev: None,
            hot_until_scans: 0,
            hot_deadline: f64::NEG_INFINITY,
            hot_reason: Reason::Quiet,
            boundary: None,
            scan_pages: None,
            cost: PRIOR_COST_S,
            savings_seen: 0,
            last: None,
            held: false,
            quiet_scans: 0,
            quiet_boundary: false,
            quiet_scan_pages: None,
            last_gain: None,
        }
    }

    pub fn policy(&self) -> &KsmdPolicy {
        &self.policy
    }

    /// The last decision, if any.
    pub fn last(&self) -> Option<&Decision> {
        self.last.as_ref()
    }

    /// Hot for `scans` more full scans (and at most `hot_max_seconds`) from `obs`.
    fn heat(&mut self, obs: &Observation, reason: Reason, scans: u64) {
        let until = obs.ksm.full_scans + scans;
        if !self.is_hot(obs) || until >= self.hot_until_scans {
            self.hot_reason = reason;
        }
        self.hot_until_scans = self.hot_until_scans.max(until);
        self.hot_deadline = self.hot_deadline.max(obs.t + self.policy.hot_max_seconds);
        self.quiet_scans = 0;
        self.quiet_boundary = false;
        self.quiet_scan_pages = None;
    }

    /// The quiet full-scan period: `idle_scan_seconds`, doubled per quiet full scan
    /// since the last trigger, at most `idle_max_scan_seconds`.
    fn quiet_period(&self) -> f64 {
        let p = &self.policy;
        let doublings = i32::try_from(self.quiet_scans.min(16)).unwrap_or(16);
        (p.idle_scan_seconds * 2f64.powi(doublings))
            .min(p.idle_max_scan_seconds.max(p.idle_scan_seconds))
    }

    fn is_hot(&self, obs: &Observation) -> bool {
        obs.ksm.full_scans < self.hot_until_scans && obs.t < self.hot_deadline
    }

    /// Pages ksmd can visit per second within the budget.
    fn budget_pace(&self) -> f64 {
        self.policy.ksmd_cpu / self.cost
    }

    /// The lowest pace a hot controller may choose: the floor, unless the budget is lower.
    pub fn hot_floor(&self) -> f64 {
        self.policy.floor_pages_per_sec.min(self.budget_pace())
    }

    /// Measured (or assumed) ksmd CPU seconds per page visit.
    pub fn cost_per_page(&self) -> f64 {
        self.cost
    }

    /// Takes one observation, returns the settings for ksmd.
    pub fn decide(&mut self, obs: &Observation) -> Decision {
        let p = self.policy;
        match self.prev.replace(obs.clone()) {
            None => self.heat(obs, Reason::Starting, p.hot_scans),
            Some(prev) => self.learn(&prev, obs),
        }
        let mut hot = self.is_hot(obs);
        if (hot || self.held) && obs.hints_settling && !pressure(&p, obs) {
            self.held = true;
            hot = false;
        } else if std::mem::take(&mut self.held) {
            // Released: the trigger's scans and deadline start now, not when it fired.
            self.heat(obs, self.hot_reason, p.hot_scans);
            hot = self.is_hot(obs);
        }
        // Hot: the last scan's size, or all mergeable guest RAM if larger (a new VM is
        // not in the last scan). Quiet: what ksmd scanned in a quiet full scan since the
        // last trigger, when well under all guest RAM (the hints took ranges out); a
        // measure near it is taken as all of it, so that its noise moves no knob.
        let all = obs.mergeable_pages as f64;
        let scan = match self.quiet_scan_pages {
            Some(measured) if !hot && measured < QUIET_SCAN_SHARE * all => measured,
            _ => self.scan_pages.unwrap_or(0.0).max(all),
        }
        .max(1.0);
        let (wanted, reason) = if hot {
            (
                (scan / p.hot_scan_seconds).max(p.floor_pages_per_sec),
                self.hot_reason,
            )
        } else {
            (
                (scan / self.quiet_period()).max(p.idle_min_pages_per_sec),
                if self.held {
                    Reason::HintsSettling
                } else {
                    Reason::Quiet
                },
            )
        };
        let budget = self.budget_pace();
        let mut pace = quantize(wanted);
        if hot {
            // Quantizing must not take a hot pace under the floor.
            pace = pace.max(self.hot_floor());
        }
        pace = pace.min(budget);
        // Hysteresis: keep the last setting while it is close and within the budget.
        if let Some(last) = &self.last {
            let lp = last.knobs.pace();
            let floor = if hot { self.hot_floor() } else { 0.0 };
            if last.reason == reason
                && lp <= budget
                && lp >= floor
                && (pace / lp.max(1e-9)).log2().abs() < 0.33
            {
                pace = lp;
            }
        }
        let knobs = if let Some(last) = self.last.filter(|l| l.knobs.pace() == pace) {
            last.knobs
        } else {
            knobs_for(pace, budget)
        };
        let d = Decision {
            knobs,
            reason,
            wanted_pages_per_sec: wanted,
            budget_pages_per_sec: budget,
            capped: wanted > budget,
            cost_us_per_page: self.cost * 1e6,
        };
        self.last = Some(d);
        d
    }

    /// Updates the cost, the scan size and the triggers from what changed since `prev`.
    fn learn(&mut self, prev: &Observation, obs: &Observation) {
        let p = self.policy;
        let scanned = obs.ksm.pages_scanned.saturating_sub(prev.ksm.pages_scanned);
        let cpu = (obs.ksmd_cpu_seconds - prev.ksmd_cpu_seconds).max(0.0);
        if scanned >= 2000 && cpu.is_finite() {
            let c = (cpu / scanned as f64).clamp(1e-8, 1e-3);
            self.cost = 0.7 * self.cost + 0.3 * c;
        }
        if obs.ksm.full_scans > prev.ksm.full_scans {
            let (fs, ps) = (obs.ksm.full_scans, obs.ksm.pages_scanned);
            // Full scans made wholly while quiet (begun at a quiet boundary) double the
            // period; reset below when one merged (or anything else triggers).
            let mut whole = 0;
            if self.is_hot(prev) {
                self.quiet_boundary = false;
            } else {
                whole = fs - prev.ksm.full_scans - u64::from(!self.quiet_boundary);
                self.quiet_scans += whole;
                self.quiet_boundary = true;
            }
            if let Some((bfs, bsharing, bps)) = self.boundary
                && fs > bfs
            {
                let size = ps.saturating_sub(bps) as f64 / (fs - bfs) as f64;
                self.scan_pages = Some(size);
                // Measured at the quiet pace, the boundaries' ticks hold few pages: a
                // precise size (a hot scan's, seen at 2 s ticks, was off by a third).
                if whole > 0 {
                    self.quiet_scan_pages = Some(size);
                }
                let gain = obs.ksm.pages_sharing.saturating_sub(bsharing);
                if merging_pays(gain, self.last_gain, p.merge_gain_pages) {
                    self.heat(obs, Reason::Merging, 1);
                }
                self.last_gain = Some(gain);
            }
            self.boundary = Some((fs, obs.ksm.pages_sharing, ps));
        }
        if obs.ksm_enters > prev.ksm_enters || obs.vms_arrived > prev.vms_arrived {
            self.heat(obs, Reason::NewMemory, p.hot_scans);
        }
        if obs.guest_writes.saturating_sub(prev.guest_writes) >= p.guest_write_pages {
            self.heat(obs, Reason::GuestsWriting, 2);
        }
        if let Some(s) = obs.potential_savings_pages {
            if s >= self.savings_seen + p.savings_step_pages {
                self.heat(obs, Reason::Unmerged, 2);
                self.savings_seen = s;
            } else if s < self.savings_seen {
                self.savings_seen = s;
            }
        }
        if pressure(&p, obs) {
            self.heat(obs, Reason::MemoryPressure, 1);
        }
    }
}

/// Whether a full scan that merged `gain` pages earns another hot one. KSM's merging
/// converges fast: once a scan merged under a quarter of what the one before merged, the
/// next merged next to nothing in every trace of the timeline bench (78,161 pages, then
/// 3,051, then none; 72,140, 15,936, 4; 67,826, 15,938, none; 25,258, 2,432, none), and
/// that hot scan cost as much ksmd CPU as the one before (0.24-0.30 s). So a falling gain
/// earns another hot scan only while it is at least a quarter of the previous one (and
/// `min_gain`); a growing or steady gain always does. What a cut scan would have merged
/// is merged by the quiet scan.
fn merging_pays(gain: u64, previous: Option<u64>, min_gain: u64) -> bool {
    gain >= min_gain && previous.is_none_or(|prev| gain.saturating_mul(4) >= prev)
}

/// MemAvailable under the policy's fraction of MemTotal.
fn pressure(p: &KsmdPolicy, obs: &Observation) -> bool {
    obs.mem_total_bytes > 0
        && (obs.mem_available_bytes as f64) < p.pressure_fraction * obs.mem_total_bytes as f64
}

/// Rounds a pace up to quarter-octave steps (19 %), so that small input noise does not
/// move it.
fn quantize(pace: f64) -> f64 {
    if !(pace.is_finite() && pace > 0.0) {
        return 1.0;
    }
    (2f64).powf((pace.log2() * 4.0).ceil() / 4.0)
}

/// Settings for `pace`: ~100 pages per wake-up at low paces (a longer sleep), 20 ms sleeps
/// from 5,000 pages/s up. Never above `cap` pages per second.
fn knobs_for(pace: f64, cap: f64) -> Knobs {
    let sleep = ((100_000.0 / pace.max(1e-3)) / 10.0).round() * 10.0;
    let sleep = sleep.clamp(20.0, 1000.0);
    let mut pages = (pace * sleep / 1000.0).ceil().clamp(1.0, MAX_PAGES_TO_SCAN);
    if pages * 1000.0 / sleep > cap && pages > 1.0 {
        pages = (cap * sleep / 1000.0).floor().max(1.0);
    }
    Knobs {
        run: true,
        pages_to_scan: crate::util::convert::u32_of_f64(pages),
        sleep_millisecs: crate::util::convert::u32_of_f64(sleep),
    }
}

#[cfg(test)]
mod tests;
