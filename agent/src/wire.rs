//! The documents the daemon publishes: [`StatusV1`] is what `/v1/status` serves, what
//! `/metrics` is encoded from and what the CLI (`status`, `top`, `watch`) reads back. Its
//! parts come from the model (each VM's [`VmState`]), from the controllers (the ksmd
//! decision, the merge hints) and from the probes; the fields are a contract (the
//! contract tests pin them).

use std::{collections::BTreeMap, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::{
    host::ksm::KsmHost,
    model::{
        VmState,
        rank::{RangeClass, RankPolicy, RankedRange, RankedRanges},
    },
};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeSummary {
    pub attached: Vec<String>,
    pub missing: Vec<String>,
    pub events_dropped: u64,
    /// Inserts the probes could not make: into `KSM_PAGES` (a merge whose COW break will
    /// be missed) and into `WRITE_HEAT` (write heat lost).
    #[serde(default)]
    pub ksm_pages_insert_failed: u64,
    #[serde(default)]
    pub heat_insert_failed: u64,
    /// Merges of processes no tracked process owns (as far as the probes knew).
    #[serde(default)]
    pub ksm_merges_untracked: u64,
    /// Of those, remembered while some tracked process's mm was still unknown.
    #[serde(default)]
    pub ksm_merges_unowned: u64,
    /// Remembered merges that turned out to be a freed and reused mm's (no COW break).
    #[serde(default)]
    pub ksm_pages_stale: u64,
    /// Pages found already merged when their process was tracked, and remembered.
    #[serde(default)]
    pub merged_pages_seeded: u64,
    /// COW breaks caught through KVM's MMU notifier (guest writes: no user page fault).
    #[serde(default)]
    pub kvm_cow_breaks: u64,
    /// `mm` owners the probes could not remember (`MM_OWNER` full): that process's merges
    /// count as untracked.
    #[serde(default)]
    pub mm_owner_insert_failed: u64,
    /// Probe runs that ended early on a failed read (the event not counted).
    #[serde(default)]
    pub probe_errors: u64,
}

/// Everything the daemon knows, as of `taken_at_unix_ms`: the document of `/v1/status`
/// (version 1 of it: fields may be added with defaults, never renamed or removed; a change
/// that breaks readers is a `StatusV2` at `/v2/status`), also read back by the CLI.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusV1 {
    pub version: String,
    pub taken_at_unix_ms: u64,
    pub ksm: KsmHost,
    pub vms: Vec<VmState>,
    pub probes: ProbeSummary,
    /// Seconds the last scan round took (the VMs due then: every busy VM and the quiet ones
    /// whose turn had come; 0: none yet or scanning off).
    pub scan_pass_seconds: f64,
    pub scan_bytes_total: u64,
    /// Pages the scanner took in without reading them, and calm pages read anyway because
    /// a calm page of their 1 MiB chunk changed (totals since the daemon started).
    #[serde(default)]
    pub scan_pages: crate::scan::worker::ScanPages,
    /// 2 MiB ranges whose sample pages the scanner reads again between passes (suspected
    /// of churn, or new).
    #[serde(default)]
    pub scan_rechecked_ranges: u64,
    /// VMs the scanner reads every round now (new, woken by new memory or a moved
    /// ranking) and VMs it rests on (read on their share of the quiet budget).
    #[serde(default)]
    pub scan_busy_vms: u64,
    #[serde(default)]
    pub scan_quiet_vms: u64,
    /// The ksmd controller: its decision and whether memfabric applies it (absent when
    /// the host has no KSM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ksmd: Option<KsmdStatus>,
    /// Merge hints: what the planner decided and what was done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hints: Option<HintsStatus>,
    /// CPU seconds the daemon has used, every thread (the scanner included).
    #[serde(default)]
    pub agent_cpu_seconds: f64,
    /// Set when the page scanner's thread died: /healthz fails with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan_failed: Option<String>,
    /// VMs the probes could not track (their map was full): monitored without probes.
    #[serde(default)]
    pub track_failures: u64,
    /// Processes named like a VMM whose executable is not trusted (not root-owned, or
    /// writable by others): not taken for VMs.
    #[serde(default)]
    pub untrusted_vmm_processes: u64,
    /// /proc reads that failed for another reason than a process's exit (such VMs are
    /// kept as they were, not taken as gone).
    #[serde(default)]
    pub proc_read_errors: u64,
    /// The ranked 2 MiB ranges per VM, served by `/v1/ranges` (not part of /v1/status:
    /// a large host has hundreds of thousands).
    #[serde(skip)]
    pub ranges: Arc<RankedRanges>,
}

/// The ksmd controller as the daemon runs it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KsmdStatus {
    /// True when memfabric writes the decision to ksmd (`--act ksmd`); false when it
    /// only recommends it.
    pub steering: bool,
    pub decision: crate::policy::Decision,
    /// Decisions taken, by reason, since the daemon started.
    pub decisions_total: BTreeMap<crate::policy::Reason, u64>,
    /// ksmd's CPU budget, a fraction of one core.
    pub ksmd_cpu_budget: f64,
    /// ksmd's CPU over the last tick, a fraction of one core.
    pub ksmd_cpu_recent: f64,
    /// CPU seconds the controller itself has used (observe, decide, act).
    pub controller_cpu_seconds: f64,
    /// The last error applying a decision (a knob write the kernel refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// One merge-hint decision and what became of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HintView {
    pub vm: String,
    pub pid: u32,
    /// Guest-RAM addresses: hidden from every document unless the daemon runs with
    /// `--expose-addresses` (`bytes` is always served).
    #[serde(flatten)]
    pub span: crate::addresses::GuestSpan,
    pub target: crate::policy::hints::Target,
    pub reason: crate::policy::hints::HintReason,
    /// What became of it (served as `applied`, `already` (nothing to do), `recommended`
    /// (not acting), `rate-limited`,
    /// `deferred` (next ranking), `failed: ...`.
    pub outcome: HintOutcome,
    /// How long the VM was stopped for the injection.
    pub stopped_us: Option<f64>,
}

/// One VM's mapping count (see [`HintsStatus::mapping_pieces`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPieces {
    pub vm: String,
    pub pid: u32,
    pub mappings: u64,
    pub added: u64,
}

/// Merge hints as of the last ranking.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HintsStatus {
    /// Whether memfabric changes VMs (`--act hints` with domains configured).
    pub acting: bool,
    /// Why not, when it does not.
    pub note: Option<String>,
    pub applied_total: u64,
    pub already_total: u64,
    pub failed_total: u64,
    /// Unmerges that waited because the host or the VM's cgroup lacked the memory.
    #[serde(default)]
    pub deferred_total: u64,
    /// Time VMs spent stopped for injections.
    pub stop_seconds_total: f64,
    /// Mapping pieces memfabric changed and will put back.
    pub changed_ranges: u64,
    /// VMs never hinted, and why (e.g. their operator turned merging off).
    #[serde(default)]
    pub left_alone: Vec<String>,
    /// Per VM the hints may change: its process's memory mappings, and how many more
    /// than when memfabric first saw it (each isolated hint splits a mapping).
    #[serde(default)]
    pub mapping_pieces: Vec<VmPieces>,
    /// The latest decisions, oldest first.
    pub recent: Vec<HintView>,
}

/// One page of `/v1/ranges`: a VM's ranked 2 MiB ranges in address order, with the
/// ranking's policy and heat window.
#[derive(Debug, Serialize)]
pub struct RangesPageV1<'a> {
    pub vm: &'a str,
    pub pid: u32,
    /// Scan passes over the VM so far.
    pub passes: Option<u32>,
    pub heat_window_seconds: f64,
    pub policy: RankPolicy,
    pub classes: Option<&'a BTreeMap<RangeClass, u32>>,
    /// Ranges of the VM in all, the first one on this page, and the next page's.
    pub total: usize,
    pub offset: usize,
    pub next_offset: Option<usize>,
    pub ranges: Vec<RangeRow<'a>>,
}

/// One range of a [`RangesPageV1`]: its figures, and with addresses hidden its offset
/// into the guest RAM (the VM's mappings laid end to end; null when it lies in none).
#[derive(Debug, Serialize)]
pub struct RangeRow<'a> {
    #[serde(flatten)]
    pub range: &'a RankedRange,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<Option<u64>>,
}

/// What became of one hint decision. Served as the strings the API has always carried:
/// the kind ([`HintOutcome::kind`]), then `: ` and the detail for a deferral or failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HintOutcome {
    /// Not acting: what memfabric would do.
    Recommended,
    /// Over the planner's rate limit for the VM.
    RateLimited,
    Applied,
    /// The range already was as decided: nothing to do.
    Already,
    /// Left for a later ranking: why (none: this ranking's injection budget was spent).
    Deferred(Option<String>),
    Failed(String),
}

impl HintOutcome {
    /// Every kind, in the order metrics list them.
    pub const KINDS: [&'static str; 6] = [
        "recommended",
        "rate-limited",
        "applied",
        "already",
        "deferred",
        "failed",
    ];

    /// The kind alone (a metric label's value).
    pub fn kind(&self) -> &'static str {
        match self {
            HintOutcome::Recommended => "recommended",
            HintOutcome::RateLimited => "rate-limited",
            HintOutcome::Applied => "applied",
            HintOutcome::Already => "already",
            HintOutcome::Deferred(_) => "deferred",
            HintOutcome::Failed(_) => "failed",
        }
    }
}

impl std::fmt::Display for HintOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HintOutcome::Deferred(Some(why)) | HintOutcome::Failed(why) => {
                write!(f, "{}: {why}", self.kind())
            }
            _ => f.write_str(self.kind()),
        }
    }
}

impl std::str::FromStr for HintOutcome {
    type Err = String;

    fn from_str(s: &str) -> Result<HintOutcome, String> {
        let (kind, detail) = match s.split_once(": ") {
            Some((k, d)) => (k, Some(d.to_owned())),
            None => (s, None),
        };
        Ok(match (kind, detail) {
            ("recommended", None) => HintOutcome::Recommended,
            ("rate-limited", None) => HintOutcome::RateLimited,
            ("applied", None) => HintOutcome::Applied,
            ("already", None) => HintOutcome::Already,
            ("deferred", why) => HintOutcome::Deferred(why),
            ("failed", Some(why)) => HintOutcome::Failed(why),
            _ => return Err(format!("unknown hint outcome {s:?}")),
        })
    }
}

impl Serialize for HintOutcome {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HintOutcome {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<HintOutcome, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hint_outcomes_are_served_as_they_always_were() {
        for (o, text) in [
            (HintOutcome::Recommended, "recommended"),
            (HintOutcome::RateLimited, "rate-limited"),
            (HintOutcome::Applied, "applied"),
            (HintOutcome::Already, "already"),
            (HintOutcome::Deferred(None), "deferred"),
            (
                HintOutcome::Deferred(Some("the VM's cgroup lacks 40 MiB".into())),
                "deferred: the VM's cgroup lacks 40 MiB",
            ),
            (
                HintOutcome::Failed("the target exited".into()),
                "failed: the target exited",
            ),
        ] {
            let json = serde_json::to_value(&o).unwrap();
            assert_eq!(json, serde_json::Value::from(text));
            assert_eq!(serde_json::from_value::<HintOutcome>(json).unwrap(), o);
            assert!(HintOutcome::KINDS.contains(&o.kind()));
        }
        assert!("made up".parse::<HintOutcome>().is_err());
    }
}
