//! The host's and its VMs' metrics, encoded from the current
//! [`crate::wire::StatusV1`] at scrape time.

use std::fmt;

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder, metrics::MetricType};

use super::{
    encode::{counter, enc_counter, enc_gauge, family, gauge},
    labels,
};
use crate::wire::HintOutcome;

/// The label of a hint outcome's kind.
fn outcome(o: HintOutcome) -> labels::Outcome {
    labels::Outcome { outcome: o.kind() }
}

/// The host's state, shared with the refresh loop.
#[derive(Debug)]
pub(super) struct HostCollector(pub(super) super::Shared);

impl Collector for HostCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = self.0.read().map_err(|_| fmt::Error)?;
        let k = &s.ksm;
        let e = &mut enc;
        if k.known("pages_shared") {
            gauge(
                e,
                "memfabric_ksm_pages_shared",
                "KSM pages in use (shared by several pages)",
                k.pages_shared,
            )?;
        }
        if k.known("pages_sharing") {
            gauge(
                e,
                "memfabric_ksm_pages_sharing",
                "Pages merged into KSM pages: roughly the pages saved",
                k.pages_sharing,
            )?;
        }
        if k.known("pages_unshared") {
            gauge(
                e,
                "memfabric_ksm_pages_unshared",
                "Pages KSM checked that are unique so far",
                k.pages_unshared,
            )?;
        }
        if k.known("pages_volatile") {
            gauge(
                e,
                "memfabric_ksm_pages_volatile",
                "Pages changing too fast to be merged",
                k.pages_volatile,
            )?;
        }
        if k.known("pages_skipped") {
            gauge(
                e,
                "memfabric_ksm_pages_skipped",
                "Pages KSM's smart scan skipped",
                k.pages_skipped,
            )?;
        }
        if k.known("ksm_zero_pages") {
            gauge(
                e,
                "memfabric_ksm_zero_pages",
                "Pages merged with the zero page (use_zero_pages)",
                k.ksm_zero_pages,
            )?;
        }
        if k.known("full_scans") {
            counter(
                e,
                "memfabric_ksm_full_scans",
                "Full scans of mergeable memory by ksmd",
                k.full_scans.max(0) as u64,
            )?;
        }
        if k.known("general_profit") {
            gauge(
                e,
                "memfabric_ksm_general_profit_bytes",
                "KSM's own estimate of bytes saved net of its metadata (may be negative)",
                k.general_profit_bytes,
            )?;
        }
        if k.known("run") {
            gauge(
                e,
                "memfabric_ksm_run",
                "KSM run state (0 stopped, 1 running, 2 unmerging)",
                k.run,
            )?;
        }
        if k.known("pages_to_scan") {
            gauge(
                e,
                "memfabric_ksm_pages_to_scan",
                "Pages ksmd scans per wake-up",
                k.pages_to_scan,
            )?;
        }
        if k.known("sleep_millisecs") {
            gauge(
                e,
                "memfabric_ksm_sleep_seconds",
                "Sleep between ksmd wake-ups",
                k.sleep_millisecs as f64 / 1000.0,
            )?;
        }
        if k.known("cow_ksm") {
            counter(
                e,
                "memfabric_ksm_cow_breaks",
                "Writes that broke a KSM merge, host-wide (vmstat cow_ksm)",
                k.cow_ksm,
            )?;
        }
        if k.known("ksmd") {
            counter(
                e,
                "memfabric_ksmd_cpu_seconds",
                "CPU time ksmd has used",
                k.ksmd_cpu_seconds,
            )?;
        }
        let label = labels::Vm::of;
        let rows = |f: &dyn Fn(&crate::model::VmState) -> i64| -> Vec<(labels::Vm, i64)> {
            s.vms.iter().map(|v| (label(v), f(v))).collect()
        };
        family(
            e,
            "memfabric_vm_guest_memory_bytes",
            "Guest RAM of the VM",
            MetricType::Gauge,
            &rows(&|v| v.vm.guest_memory_bytes as i64),
            enc_gauge,
        )?;
        family(
            e,
            "memfabric_vm_ksm_merging_pages",
            "Pages of the VM that KSM merged (ksm_stat)",
            MetricType::Gauge,
            &rows(&|v| v.ksm.merging_pages),
            enc_gauge,
        )?;
        family(
            e,
            "memfabric_vm_ksm_profit_bytes",
            "KSM's profit for the VM (ksm_stat ksm_process_profit)",
            MetricType::Gauge,
            &rows(&|v| v.ksm.process_profit_bytes),
            enc_gauge,
        )?;

        let probed: Vec<_> = s
            .vms
            .iter()
            .filter_map(|v| v.probes.map(|p| (v, p)))
            .collect();
        let mut faults = Vec::new();
        for (v, p) in &probed {
            for (access, n) in [("read", p.read_faults), ("write", p.write_faults)] {
                faults.push(((label(v), labels::Access { access }), n));
            }
        }
        family(
            e,
            "memfabric_vm_page_faults",
            "User page faults of the VM process",
            MetricType::Counter,
            &faults,
            enc_counter,
        )?;
        let prow = |f: &dyn Fn(&crate::model::VmProbeCounters) -> u64| -> Vec<(labels::Vm, u64)> {
            probed.iter().map(|(v, p)| (label(v), f(p))).collect()
        };
        family(
            e,
            "memfabric_vm_cow_breaks",
            "Writes to pages KSM merged for the VM (exact KSM COW breaks)",
            MetricType::Counter,
            &prow(&|p| p.cow_breaks),
            enc_counter,
        )?;
        family(
            e,
            "memfabric_vm_kvm_faults",
            "KVM guest-physical faults of the VM",
            MetricType::Counter,
            &prow(&|p| p.kvm_faults),
            enc_counter,
        )?;
        family(
            e,
            "memfabric_vm_ksm_merges",
            "Pages of the VM ksmd merged",
            MetricType::Counter,
            &prow(&|p| p.ksm_merges),
            enc_counter,
        )?;

        let scanned: Vec<_> = s
            .vms
            .iter()
            .filter_map(|v| v.scan.map(|c| (v, c)))
            .collect();
        let srow = |f: &dyn Fn(&crate::scan::Counts) -> u64| -> Vec<(labels::Vm, i64)> {
            scanned
                .iter()
                .map(|(v, c)| (label(v), f(c) as i64))
                .collect()
        };
        family(
            e,
            "memfabric_vm_stable_pages",
            "Pages unchanged for the last scans (page scanner)",
            MetricType::Gauge,
            &srow(&|c| c.stable_pages),
            enc_gauge,
        )?;
        family(
            e,
            "memfabric_vm_volatile_pages",
            "Pages that changed since the previous scan",
            MetricType::Gauge,
            &srow(&|c| c.volatile_pages),
            enc_gauge,
        )?;
        family(
            e,
            "memfabric_vm_duplicate_pages",
            "Stable non-zero pages whose content exists elsewhere on the host",
            MetricType::Gauge,
            &srow(&|c| c.duplicate_pages),
            enc_gauge,
        )?;
        let mut savings = Vec::new();
        for (v, c) in &scanned {
            for (scope, bytes) in [
                ("intra", c.potential_savings_intra_bytes),
                ("inter", c.potential_savings_inter_bytes),
            ] {
                savings.push(((label(v), labels::Scope { scope }), bytes as i64));
            }
        }
        family(
            e,
            "memfabric_vm_potential_savings_bytes",
            "Duplicates KSM has not merged yet: within the VM (intra) or with another VM (inter)",
            MetricType::Gauge,
            &savings,
            enc_gauge,
        )?;
        let mut ranges = Vec::new();
        for v in &s.vms {
            for (class, n) in v.range_classes.iter().flatten() {
                let class = labels::Class {
                    class: class.as_str(),
                };
                ranges.push(((label(v), class), i64::from(*n)));
            }
        }
        family(
            e,
            "memfabric_vm_ranges",
            "2 MiB ranges of guest RAM per class (stable-duplicate, volatile, stable-unique, cold-unknown)",
            MetricType::Gauge,
            &ranges,
            enc_gauge,
        )?;
        let vm_pass: Vec<(labels::Vm, f64)> = s
            .vms
            .iter()
            .filter_map(|v| v.scan_pass_seconds.map(|t| (label(v), t)))
            .collect();
        family(
            e,
            "memfabric_vm_scan_pass_seconds",
            "Wall time of the page scanner's last full pass over the VM (paced to the budget)",
            MetricType::Gauge,
            &vm_pass,
            enc_gauge,
        )?;
        gauge(
            e,
            "memfabric_scan_pass_seconds",
            "Wall time of the last scan round (the busy VMs and the quiet ones due)",
            s.scan_pass_seconds,
        )?;
        counter(
            e,
            "memfabric_scan_bytes",
            "Bytes the page scanner has read",
            s.scan_bytes_total,
        )?;
        let pages = &s.scan_pages;
        family(
            e,
            "memfabric_scan_pages",
            "Pages the scanner took in without reading them: `known` (the zero page, or a \
             KSM frame read before), `sampled-out` (calm memory outside the \
             pass's rotating sample); and `escalated`: calm pages read anyway because a \
             calm page of their 1 MiB chunk changed",
            MetricType::Counter,
            &[
                (labels::How { how: "known" }, pages.known),
                (labels::How { how: "sampled-out" }, pages.sampled_out),
                (labels::How { how: "escalated" }, pages.escalated),
            ],
            enc_counter,
        )?;
        gauge(
            e,
            "memfabric_scan_rechecked_ranges",
            "2 MiB ranges whose sample pages the scanner reads again between passes \
             (suspected of churn, or new)",
            s.scan_rechecked_ranges as f64,
        )?;
        gauge(
            e,
            "memfabric_scan_busy_vms",
            "VMs the page scanner reads every round (new, new memory, a moved ranking)",
            s.scan_busy_vms as f64,
        )?;
        gauge(
            e,
            "memfabric_scan_quiet_vms",
            "VMs the page scanner rests on (read on their share of the quiet budget)",
            s.scan_quiet_vms as f64,
        )?;
        counter(
            e,
            "memfabric_probe_events_dropped",
            "Probe events lost because the ring buffer was full",
            s.probes.events_dropped,
        )?;
        let p = &s.probes;
        family(
            e,
            "memfabric_probe_insert_failures",
            "Probe map inserts that failed: a merge whose COW break will be missed \
             (KSM_PAGES), write heat lost (WRITE_HEAT), or an mm whose merges count as \
             untracked (MM_OWNER)",
            MetricType::Counter,
            &[
                (labels::Map { map: "KSM_PAGES" }, p.ksm_pages_insert_failed),
                (labels::Map { map: "WRITE_HEAT" }, p.heat_insert_failed),
                (labels::Map { map: "MM_OWNER" }, p.mm_owner_insert_failed),
            ],
            enc_counter,
        )?;
        counter(
            e,
            "memfabric_probe_errors",
            "Probe runs that ended early because a tracepoint field or a kernel object \
             could not be read (the event was not counted)",
            p.probe_errors,
        )?;
        counter(
            e,
            "memfabric_probe_ksm_merges_untracked",
            "KSM merges of an mm that no tracked process was known to own",
            p.ksm_merges_untracked,
        )?;
        counter(
            e,
            "memfabric_probe_ksm_merges_unowned",
            "Of those, merges remembered anyway while a tracked process's mm was unknown",
            p.ksm_merges_unowned,
        )?;
        counter(
            e,
            "memfabric_probe_ksm_pages_stale",
            "Remembered merges of a freed and reused mm address, dropped without counting \
             a COW break",
            p.ksm_pages_stale,
        )?;
        counter(
            e,
            "memfabric_probe_kvm_cow_breaks",
            "KSM COW breaks of tracked VMMs seen through KVM's MMU notifier (a guest write \
             KVM resolved: no user page fault); included in memfabric_vm_cow_breaks_total",
            p.kvm_cow_breaks,
        )?;
        counter(
            e,
            "memfabric_probe_merged_pages_seeded",
            "Pages found already merged (pagemap, KPF_KSM) when their process was tracked, \
             remembered so writes to them count as COW breaks",
            p.merged_pages_seeded,
        )?;
        counter(
            e,
            "memfabric_agent_cpu_seconds",
            "CPU time the daemon has used, every thread (scanner included)",
            s.agent_cpu_seconds,
        )?;
        counter(
            e,
            "memfabric_vm_track_failures",
            "VMs the probes could not track (map full): monitored from /proc without probes",
            s.track_failures,
        )?;
        counter(
            e,
            "memfabric_untrusted_vmm_processes",
            "Processes named like a VMM refused: their executable is not root-owned or is \
             writable by others, they run as a user other than root and vmm_users, or they \
             preload a library such a user could have written",
            s.untrusted_vmm_processes,
        )?;
        if let Some(h) = &s.hints {
            family(
                e,
                "memfabric_hints",
                "Merge hints carried out (applied), found already in place, failed, or \
                 deferred (short of memory for an unmerge, or of room for more mappings)",
                MetricType::Counter,
                &[
                    (outcome(HintOutcome::Applied), h.applied_total),
                    (outcome(HintOutcome::Already), h.already_total),
                    (outcome(HintOutcome::Failed(String::new())), h.failed_total),
                    (outcome(HintOutcome::Deferred(None)), h.deferred_total),
                ],
                enc_counter,
            )?;
            counter(
                e,
                "memfabric_hint_stop_seconds",
                "Time VMs spent stopped for merge-hint injections",
                h.stop_seconds_total,
            )?;
            gauge(
                e,
                "memfabric_hint_changed_ranges",
                "Mapping pieces memfabric changed and will put back on exit",
                h.changed_ranges as i64,
            )?;
            let pieces = |f: fn(&crate::wire::VmPieces) -> u64| -> Vec<(labels::VmPid, i64)> {
                h.mapping_pieces
                    .iter()
                    .map(|p| {
                        let vm = labels::VmPid {
                            vm: p.vm.clone(),
                            pid: p.pid,
                        };
                        (vm, f(p) as i64)
                    })
                    .collect()
            };
            family(
                e,
                "memfabric_hint_vm_mappings",
                "Memory mappings of a VM's process that the hints may change",
                MetricType::Gauge,
                &pieces(|p| p.mappings),
                enc_gauge,
            )?;
            family(
                e,
                "memfabric_hint_vm_mappings_added",
                "Memory mappings added to a VM's process since memfabric first saw it (hints \
                 split mappings; at most 1024 per VM, far below vm.max_map_count)",
                MetricType::Gauge,
                &pieces(|p| p.added),
                enc_gauge,
            )?;
            gauge(
                e,
                "memfabric_hints_acting",
                "1 when merge hints are applied, 0 when only recommended",
                i64::from(h.acting),
            )?;
        }
        counter(
            e,
            "memfabric_proc_read_errors",
            "/proc reads that failed for another reason than the process's exit (EMFILE...): \
             the VM is kept as it was, not taken as gone",
            s.proc_read_errors,
        )?;
        if let Some(k) = &s.ksmd {
            encode_ksmd(e, k)?;
        }
        let info = [(
            labels::Version {
                version: s.version.clone(),
            },
            1i64,
        )];
        family(
            e,
            "memfabric_build_info",
            "memfabric build",
            MetricType::Gauge,
            &info,
            enc_gauge,
        )?;
        Ok(())
    }
}

/// The ksmd controller: its targets, its decisions by reason, its own CPU.
fn encode_ksmd(e: &mut DescriptorEncoder, k: &crate::wire::KsmdStatus) -> fmt::Result {
    let d = &k.decision;
    gauge(
        e,
        "memfabric_ksmd_steering",
        "1 when memfabric applies its ksmd decisions (--act ksmd), 0 when it only recommends",
        i64::from(k.steering),
    )?;
    gauge(
        e,
        "memfabric_ksmd_target_pages_to_scan",
        "pages_to_scan the controller chose",
        i64::from(d.knobs.pages_to_scan),
    )?;
    gauge(
        e,
        "memfabric_ksmd_target_sleep_seconds",
        "sleep_millisecs the controller chose, in seconds",
        f64::from(d.knobs.sleep_millisecs) / 1000.0,
    )?;
    gauge(
        e,
        "memfabric_ksmd_target_pages_per_second",
        "Scan pace the controller chose",
        d.knobs.pace(),
    )?;
    gauge(
        e,
        "memfabric_ksmd_budget_pages_per_second",
        "Scan pace the ksmd CPU budget allows at the measured cost per page",
        d.budget_pages_per_sec,
    )?;
    gauge(
        e,
        "memfabric_ksmd_cpu_budget_ratio",
        "ksmd CPU budget, fraction of one core",
        k.ksmd_cpu_budget,
    )?;
    gauge(
        e,
        "memfabric_ksmd_cost_seconds_per_page",
        "Measured ksmd CPU per page visit",
        d.cost_us_per_page * 1e-6,
    )?;
    let rows: Vec<(labels::Reason, u64)> = k
        .decisions_total
        .iter()
        .map(|(r, n)| (labels::Reason { reason: r.as_str() }, *n))
        .collect();
    family(
        e,
        "memfabric_ksmd_decisions",
        "Controller decisions by reason",
        MetricType::Counter,
        &rows,
        enc_counter,
    )?;
    counter(
        e,
        "memfabric_ksmd_controller_cpu_seconds",
        "CPU time of the ksmd controller itself (observe, decide, act)",
        k.controller_cpu_seconds,
    )
}
