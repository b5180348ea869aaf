//! The metric names are a contract (dashboards and alerts depend on them): the exposition
//! has every name the design promises, and the shipped Grafana dashboard and example config
//! only use what exists. Needs no root: it encodes a state built here.

use std::{
    collections::BTreeSet,
    sync::{Arc, RwLock},
};

use memfabric::{
    config::FileConfig,
    host::inventory::{Mergeability, Vm, VmKind},
    model::rank::RangeClass,
    model::{VmProbeCounters, VmState},
    telemetry,
    wire::StatusV1,
};

fn exposition() -> String {
    let state = StatusV1 {
        version: "test".into(),
        taken_at_unix_ms: 1,
        vms: vec![VmState {
            vm: Vm {
                pid: 42,
                kind: VmKind::Qemu,
                name: "vm1".into(),
                uuid: None,
                guest_memory_bytes: 1 << 30,
                ram: vec![],
                mergeability: Mergeability::Mergeable,
                merge_off: false,
            },
            ksm: Default::default(),
            probes: Some(VmProbeCounters::default()),
            scan: Some(Default::default()),
            range_classes: Some(RangeClass::ALL.iter().map(|c| (*c, 1)).collect()),
            scan_pass_seconds: Some(1.5),
            write_faults_per_sec: 0.0,
            cow_breaks_per_sec: 0.0,
        }],
        ..Default::default()
    };
    let registry = telemetry::registry(
        Arc::new(RwLock::new(state)),
        Some((
            Arc::new(memfabric::http::Stats::default()),
            Some(Arc::new(memfabric::http_auth::AuthStats::default())),
        )),
        None,
        None,
        // A state directory without records: the outgoing migrations' series at zero.
        Some(Arc::new(memfabric::migrate::outgoing::Ledger::new(
            &std::env::temp_dir().join(format!("memfabric-contract-{}", std::process::id())),
        ))),
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text
}

fn names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_promised_metric_is_exported() {
    let got = names(&exposition());
    for name in [
        "memfabric_ksm_pages_shared",
        "memfabric_ksm_pages_sharing",
        "memfabric_ksm_pages_unshared",
        "memfabric_ksm_pages_volatile",
        "memfabric_ksm_pages_skipped",
        "memfabric_ksm_zero_pages",
        "memfabric_ksm_full_scans_total",
        "memfabric_ksm_general_profit_bytes",
        "memfabric_ksm_run",
        "memfabric_ksm_pages_to_scan",
        "memfabric_ksm_sleep_seconds",
        "memfabric_ksm_cow_breaks_total",
        "memfabric_ksmd_cpu_seconds_total",
        "memfabric_vm_guest_memory_bytes",
        "memfabric_vm_ksm_merging_pages",
        "memfabric_vm_ksm_profit_bytes",
        "memfabric_vm_page_faults_total",
        "memfabric_vm_cow_breaks_total",
        "memfabric_vm_kvm_faults_total",
        "memfabric_vm_ksm_merges_total",
        "memfabric_probe_events_dropped_total",
        "memfabric_build_info",
        "memfabric_vm_stable_pages",
        "memfabric_vm_volatile_pages",
        "memfabric_vm_duplicate_pages",
        "memfabric_scan_pass_seconds",
        "memfabric_scan_bytes_total",
        "memfabric_scan_rechecked_ranges",
        "memfabric_vm_potential_savings_bytes",
        "memfabric_vm_ranges",
        "memfabric_vm_scan_pass_seconds",
        "memfabric_probe_insert_failures_total",
        "memfabric_probe_ksm_merges_untracked_total",
        "memfabric_probe_ksm_merges_unowned_total",
        "memfabric_probe_ksm_pages_stale_total",
        "memfabric_probe_merged_pages_seeded_total",
        "memfabric_probe_kvm_cow_breaks_total",
        "memfabric_proc_read_errors_total",
        "memfabric_http_connections",
        "memfabric_http_connections_evicted_total",
        "memfabric_http_accept_errors_total",
        "memfabric_http_busy_rejections_total",
        "memfabric_migrations_outgoing_total",
        "memfabric_migrations_outgoing_open",
        "memfabric_migrations_outgoing_stream_bytes_total",
        "memfabric_migrations_outgoing_wire_bytes_total",
        "memfabric_migrations_outgoing_pages_total",
    ] {
        assert!(got.contains(name), "{name} missing; exported: {got:?}");
    }
    let text = exposition();
    assert!(
        text.contains(
            "memfabric_vm_page_faults_total{vm=\"vm1\",pid=\"42\",kind=\"qemu\",access=\"write\"}"
        ),
        "{text}"
    );
    for scope in ["intra", "inter"] {
        let series = format!(
            "memfabric_vm_potential_savings_bytes{{vm=\"vm1\",pid=\"42\",kind=\"qemu\",scope=\"{scope}\"}}"
        );
        assert!(text.contains(&series), "{series} missing: {text}");
    }
    for class in RangeClass::ALL {
        let series = format!(
            "memfabric_vm_ranges{{vm=\"vm1\",pid=\"42\",kind=\"qemu\",class=\"{}\"}} 1",
            class.as_str()
        );
        assert!(text.contains(&series), "{series} missing: {text}");
    }
}

#[test]
fn the_grafana_dashboard_uses_only_exported_metrics() {
    let got = names(&exposition());
    let dash: serde_json::Value =
        serde_json::from_str(include_str!("../../packaging/grafana-dashboard.json")).unwrap();
    let mut used = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("memfabric_") {
                    used += 1;
                    assert!(
                        got.contains(word),
                        "dashboard uses {word}, which is not exported"
                    );
                }
            }
        }
    }
    assert!(used >= 8);
}

#[test]
fn the_example_config_parses() {
    let cfg = FileConfig::parse(include_str!("../../packaging/memfabric.toml")).unwrap();
    assert!(cfg.listen.unwrap().is_local());
}
