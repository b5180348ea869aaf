//! The pure joins of the loop: each VM's state this tick (its KSM figures, scan counts,
//! range classes and probe rates: [`VmState`]) and the ranking of a new scan pass with the
//! probes' heat since the last one ([`Ranking`], [`rank`]). The published document built
//! from them is `wire::StatusV1` (a layer above: model does not use it).

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use serde::{Deserialize, Serialize};

use crate::{
    heat::RangeHeatMap,
    host::{inventory::Vm, ksm::KsmStat},
    scan::Report,
};

pub mod rank;

use rank::{RangeClass, RankPolicy, RankedRanges, heat_since};

/// Counters the probes keep for one VM (absent when the probes are not loaded).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmProbeCounters {
    pub read_faults: u64,
    pub write_faults: u64,
    pub write_protect_faults: u64,
    pub cow_breaks: u64,
    pub kvm_faults: u64,
    pub kvm_write_faults: u64,
    pub ksm_merges: u64,
}

impl VmProbeCounters {
    /// Writes that populated new memory: first-touch write faults (a write fault that was
    /// no write-protect fault) and KVM's guest write faults. Writes to present pages (COW
    /// breaks of churning memory) are no new memory.
    pub fn new_memory_writes(&self) -> u64 {
        self.write_faults.saturating_sub(self.write_protect_faults) + self.kvm_write_faults
    }
}

#[cfg(feature = "ebpf")]
impl From<memfabric_common::TgidStats> for VmProbeCounters {
    fn from(s: memfabric_common::TgidStats) -> Self {
        VmProbeCounters {
            read_faults: s.read_faults,
            write_faults: s.write_faults,
            write_protect_faults: s.write_protect_faults,
            cow_breaks: s.ksm_cow_breaks,
            kvm_faults: s.kvm_faults,
            kvm_write_faults: s.kvm_write_faults,
            ksm_merges: s.ksm_merges + s.ksm_zero_merges,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmState {
    #[serde(flatten)]
    pub vm: Vm,
    pub ksm: KsmStat,
    pub probes: Option<VmProbeCounters>,
    /// The page scanner's last figures for this VM (absent until a pass completed).
    pub scan: Option<crate::scan::Counts>,
    /// Wall time of the scanner's last pass over this VM (absent until one completed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan_pass_seconds: Option<f64>,
    /// How many of the VM's 2 MiB ranges fall in each class (absent until ranked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_classes: Option<BTreeMap<RangeClass, u32>>,
    /// Rates over the last refresh interval.
    pub write_faults_per_sec: f64,
    pub cow_breaks_per_sec: f64,
}

impl VmState {
    /// A VM as first seen: no KSM, scan or probe figures yet.
    pub fn new(vm: Vm) -> VmState {
        VmState {
            vm,
            ksm: KsmStat::default(),
            probes: None,
            scan: None,
            scan_pass_seconds: None,
            range_classes: None,
            write_faults_per_sec: 0.0,
            cow_breaks_per_sec: 0.0,
        }
    }
}

/// Where scan results and probe heat are joined: the scanned ranges ranked once per scan
/// pass, with the probes' write heat of the interval since the previous ranking.
pub struct Ranking {
    policy: RankPolicy,
    heat_before: RangeHeatMap,
    heat_since: Instant,
    pub ranked: Arc<RankedRanges>,
}

impl Default for Ranking {
    fn default() -> Ranking {
        Ranking {
            policy: RankPolicy::default(),
            heat_before: RangeHeatMap::new(),
            heat_since: Instant::now(),
            ranked: Arc::default(),
        }
    }
}

impl Ranking {
    /// Ranks `report` if it is newer than the last ranked one; `heat` reads the probes'
    /// cumulative heat per range (only called when there is something to rank).
    pub fn update(&mut self, report: &Report, heat: impl FnOnce() -> RangeHeatMap) {
        if report.passes == self.ranked.passes {
            return;
        }
        let heat = heat();
        let window = heat_since(&heat, &self.heat_before);
        let seconds = self.heat_since.elapsed().as_secs_f64();
        self.heat_before = heat;
        self.heat_since = Instant::now();
        self.ranked = Arc::new(RankedRanges::rank(report, &window, seconds, self.policy));
    }
}
