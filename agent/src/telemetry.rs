//! Prometheus metrics (OpenMetrics text via prometheus-client, read from the current
//! [`HostState`] at scrape time) and the HTTP endpoints: /metrics, /healthz, /v1/status,
//! /v1/ranges.
//! Metric names are a contract: units in names, counters end in `_total` (prometheus-client
//! appends it to counters), a superset of node_exporter's ksmd collector.

use std::{
    fmt,
    sync::{Arc, RwLock},
    time::Duration,
};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeMetric, MetricEncoder,
    },
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::model::HostState;

/// The state shared between the refresh loop and the HTTP handlers.
pub type Shared = Arc<RwLock<HostState>>;

#[derive(Debug)]
struct HostCollector(Shared);

type Labels = Vec<(&'static str, String)>;

/// Encodes one metric family with several label sets.
fn family<V: Copy>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: &[(Labels, V)],
    encode: fn(V, MetricEncoder<'_>) -> fmt::Result,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in rows {
        encode(*v, m.encode_family(labels)?)?;
    }
    Ok(())
}

fn enc_gauge<N: EncodeGaugeValue>(v: N, m: MetricEncoder<'_>) -> fmt::Result {
    ConstGauge::new(v).encode(m)
}

fn enc_counter(v: u64, m: MetricEncoder<'_>) -> fmt::Result {
    ConstCounter::new(v).encode(m)
}

/// One unlabelled gauge (integer or float).
fn gauge<N: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: N,
) -> fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

/// One unlabelled counter (integer or float); `name` without `_total`: prometheus-client
/// adds it to counters.
fn counter<N: EncodeCounterValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: N,
) -> fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

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
        let label = |v: &crate::model::VmState| -> Labels {
            vec![
                ("vm", v.vm.name.clone()),
                ("pid", v.vm.pid.to_string()),
                ("kind", v.vm.kind.as_str().to_owned()),
            ]
        };
        let rows = |f: &dyn Fn(&crate::model::VmState) -> i64| -> Vec<(Labels, i64)> {
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
            let mut r = label(v);
            r.push(("access", "read".into()));
            faults.push((r, p.read_faults));
            let mut w = label(v);
            w.push(("access", "write".into()));
            faults.push((w, p.write_faults));
        }
        family(
            e,
            "memfabric_vm_page_faults",
            "User page faults of the VM process",
            MetricType::Counter,
            &faults,
            enc_counter,
        )?;
        let prow = |f: &dyn Fn(&crate::model::VmProbeCounters) -> u64| -> Vec<(Labels, u64)> {
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
        let srow = |f: &dyn Fn(&crate::scan::Counts) -> u64| -> Vec<(Labels, i64)> {
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
                let mut l = label(v);
                l.push(("scope", scope.into()));
                savings.push((l, bytes as i64));
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
                let mut l = label(v);
                l.push(("class", class.as_str().into()));
                ranges.push((l, i64::from(*n)));
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
        let vm_pass: Vec<(Labels, f64)> = s
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
            "Wall time of the last full scan pass over every tracked VM",
            s.scan_pass_seconds,
        )?;
        counter(
            e,
            "memfabric_scan_bytes",
            "Bytes the page scanner has read",
            s.scan_bytes_total,
        )?;
        gauge(
            e,
            "memfabric_scan_rechecked_ranges",
            "2 MiB ranges whose sample pages the scanner reads again between passes \
             (suspected of churn, or new)",
            s.scan_rechecked_ranges as f64,
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
             (KSM_PAGES) or write heat lost (WRITE_HEAT)",
            MetricType::Counter,
            &[
                (
                    vec![("map", "KSM_PAGES".to_owned())],
                    p.ksm_pages_insert_failed,
                ),
                (vec![("map", "WRITE_HEAT".to_owned())], p.heat_insert_failed),
            ],
            enc_counter,
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
                    (vec![("outcome", "applied".to_owned())], h.applied_total),
                    (vec![("outcome", "already".to_owned())], h.already_total),
                    (vec![("outcome", "failed".to_owned())], h.failed_total),
                    (vec![("outcome", "deferred".to_owned())], h.deferred_total),
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
            let pieces = |f: fn(&crate::model::VmPieces) -> u64| -> Vec<(Labels, i64)> {
                h.mapping_pieces
                    .iter()
                    .map(|p| {
                        (
                            vec![("vm", p.vm.clone()), ("pid", p.pid.to_string())],
                            f(p) as i64,
                        )
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
        let info: Vec<(Labels, i64)> = vec![(vec![("version", s.version.clone())], 1)];
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
fn encode_ksmd(e: &mut DescriptorEncoder, k: &crate::model::KsmdStatus) -> fmt::Result {
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
    let rows: Vec<(Labels, u64)> = k
        .decisions_total
        .iter()
        .map(|(r, n)| (vec![("reason", r.as_str().to_owned())], *n))
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

/// The HTTP server's own counters.
#[derive(Debug)]
struct HttpCollector(Arc<crate::http::Stats>);

impl Collector for HttpCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.0;
        let e = &mut enc;
        gauge(
            e,
            "memfabric_http_connections",
            "HTTP connections open now",
            s.open.load(Relaxed) as i64,
        )?;
        counter(
            e,
            "memfabric_http_connections_accepted",
            "HTTP connections accepted",
            s.accepted.load(Relaxed),
        )?;
        counter(
            e,
            "memfabric_http_connections_evicted",
            "HTTP connections closed to make room under the connection cap (oldest first)",
            s.evicted.load(Relaxed),
        )?;
        counter(
            e,
            "memfabric_http_accept_errors",
            "Failed accepts (for example out of file descriptors)",
            s.accept_errors.load(Relaxed),
        )?;
        counter(
            e,
            "memfabric_http_busy_rejections",
            "JSON requests answered 503 because too many were being served at once",
            s.busy.load(Relaxed),
        )
    }
}

/// The fabric's peers, candidates, exchange and refusals.
#[derive(Debug)]
struct FabricCollector(Arc<crate::fabric::node::Fabric>);

impl Collector for FabricCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        use std::sync::atomic::Ordering::Relaxed;
        let f = &self.0;
        let e = &mut enc;
        let peers: Vec<(Labels, i64)> = f
            .peer_counts()
            .iter()
            .map(|(s, n)| (vec![("state", s.label().to_owned())], *n as i64))
            .collect();
        family(
            e,
            "memfabric_fabric_peers",
            "Peer hosts by state (joining: no summary yet; stale: not gossiping or unreachable)",
            MetricType::Gauge,
            &peers,
            enc_gauge,
        )?;
        let shared: Vec<(Labels, i64)> = f
            .candidates()
            .pairs
            .iter()
            .map(|c| {
                (
                    vec![("vm", c.vm.clone()), ("host", c.host.clone())],
                    c.shared_bytes as i64,
                )
            })
            .collect();
        family(
            e,
            "memfabric_fabric_candidate_shared_bytes",
            "Estimated bytes of a local VM's stable memory a peer host already holds (what a migration there need not send)",
            MetricType::Gauge,
            &shared,
            enc_gauge,
        )?;
        let s = &f.stats;
        let bytes = [
            (
                vec![("direction", "in".to_owned())],
                s.bytes_in.load(Relaxed),
            ),
            (
                vec![("direction", "out".to_owned())],
                s.bytes_out.load(Relaxed),
            ),
        ];
        family(
            e,
            "memfabric_fabric_exchange_bytes",
            "Bytes exchanged with peers (gossip datagrams and summaries)",
            MetricType::Counter,
            &bytes,
            enc_counter,
        )?;
        let server_tls = f.server_stats.tls_failures.load(Relaxed);
        let rejected: Vec<(Labels, u64)> = crate::fabric::stats::Reject::ALL
            .iter()
            .map(|r| {
                let extra = if *r == crate::fabric::stats::Reject::Tls {
                    server_tls
                } else {
                    0
                };
                (
                    vec![("reason", r.label().to_owned())],
                    s.rejected(*r) + extra,
                )
            })
            .collect();
        family(
            e,
            "memfabric_fabric_rejected",
            "Peer messages refused, by reason (unauthenticated, tampered, replayed, malformed, oversized, failed TLS, timed out)",
            MetricType::Counter,
            &rejected,
            enc_counter,
        )
    }
}

/// The registry serving `state` (and the HTTP server's counters and the fabric's, when
/// given).
pub fn registry(
    state: Shared,
    http: Option<Arc<crate::http::Stats>>,
    fabric: Option<Arc<crate::fabric::node::Fabric>>,
) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(HostCollector(state)));
    if let Some(h) = http {
        r.register_collector(Box::new(HttpCollector(h)));
    }
    if let Some(f) = fabric {
        r.register_collector(Box::new(FabricCollector(f)));
    }
    r
}

/// How the routes behave.
#[derive(Clone, Debug)]
pub struct Options {
    /// /healthz fails when the state is older than this.
    pub stale_after: Duration,
    /// Serve guest-RAM virtual addresses (an ASLR leak for every VMM on the host):
    /// off unless asked for (`--expose-addresses`); ranges are given as offsets into the
    /// VM's guest RAM instead.
    pub expose_addresses: bool,
    /// The HTTP server's counters.
    pub http: Arc<crate::http::Stats>,
    /// Peers on other hosts, when `[fabric]` is on.
    pub fabric: Option<Arc<crate::fabric::node::Fabric>>,
}

/// JSON documents served at once (/v1/status, /v1/ranges): each is built in memory, so
/// their number bounds the memory slow or many clients can make the daemon hold.
const MAX_JSON_READERS: usize = 4;

#[derive(Clone)]
struct App {
    state: Shared,
    registry: Arc<Registry>,
    opts: Options,
    readers: Arc<tokio::sync::Semaphore>,
}

impl App {
    /// A permit to build a JSON document, or `None` (counted) when too many are.
    fn reader(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let permit = self.readers.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.opts
                .http
                .busy
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        permit
    }
}

/// A response body that holds a reader permit until the client has taken all of it (or
/// gone): a slow reader of a large document counts against the cap for as long as the
/// document sits in memory, not only while it is built.
struct Held {
    inner: axum::body::Body,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl hyper::body::Body for Held {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

/// `value` as a JSON response whose body keeps `permit` until it is sent.
fn held_json(
    value: serde_json::Value,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> axum::response::Response {
    let (parts, body) = Json(value).into_response().into_parts();
    axum::response::Response::from_parts(
        parts,
        axum::body::Body::new(Held {
            inner: body,
            _permit: permit,
        }),
    )
}

/// The answer when too many JSON documents are being built.
fn busy() -> axum::response::Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [("retry-after", "1")],
        Json(serde_json::json!({ "error": "busy: too many JSON requests at once; retry" })),
    )
        .into_response()
}

/// Prometheus's text format 0.0.4, what scrapers get unless they ask for OpenMetrics.
const TEXT_004: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether an `Accept` header asks for OpenMetrics (as client_golang negotiates: the
/// Prometheus server asks for it first, curl and older scrapers do not).
fn wants_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|part| {
        let mut it = part.split(';').map(str::trim);
        let media = it.next().unwrap_or("");
        let q = it
            .find_map(|p| p.strip_prefix("q="))
            .and_then(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        media.eq_ignore_ascii_case("application/openmetrics-text") && q > 0.0
    })
}

/// OpenMetrics text (prometheus-client's only output) as the Prometheus text format
/// 0.0.4: a counter family `x` becomes `x_total` in HELP and TYPE (its samples already
/// are), `# UNIT` and `# EOF` go. promtool checks the result.
fn openmetrics_to_text(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        if let Some((prefix, rest)) = meta {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if counters.contains(name) && !name.ends_with("_total") {
                out.push_str(&format!("{prefix}{name}_total {tail}\n"));
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

async fn metrics(State(app): State<App>, headers: axum::http::HeaderMap) -> impl IntoResponse {
    let accept = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &app.registry) {
        Ok(()) if wants_openmetrics(accept) => {
            (StatusCode::OK, [("content-type", OPENMETRICS)], body)
        }
        Ok(()) => (
            StatusCode::OK,
            [("content-type", TEXT_004)],
            openmetrics_to_text(&body),
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            "encoding failed\n".into(),
        ),
    }
}

/// The daemon's health: the state must be fresh, and no worker may have died.
fn health(s: &HostState, now_ms: u64, stale_after: Duration) -> (StatusCode, String) {
    let age = now_ms.saturating_sub(s.taken_at_unix_ms);
    if s.taken_at_unix_ms == 0 || age > stale_after.as_millis() as u64 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stale: state {age} ms old\n"),
        );
    }
    if let Some(why) = &s.scan_failed {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the page scanner died: {why}\n"),
        );
    }
    (StatusCode::OK, format!("ok (state {age} ms old)\n"))
}

async fn healthz(State(app): State<App>) -> impl IntoResponse {
    match app.state.read() {
        Ok(s) => health(&s, crate::util::clock::unix_ms(), app.opts.stale_after),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "state lock poisoned\n".into(),
        ),
    }
}

async fn status(State(app): State<App>) -> axum::response::Response {
    let Some(permit) = app.reader() else {
        return busy();
    };
    let s = app.state.read().map(|s| s.clone()).unwrap_or_default();
    let mut v = serde_json::to_value(&s).unwrap_or_default();
    if !app.opts.expose_addresses {
        redact_addresses(&mut v);
    }
    held_json(v, permit)
}

/// Removes guest-RAM virtual addresses from a `/v1/status` document: each mapping keeps
/// its size and kind, each hint decision its size and an outcome without addresses.
fn redact_addresses(status: &mut serde_json::Value) {
    if let Some(vms) = status.get_mut("vms").and_then(|v| v.as_array_mut()) {
        for ram in vms
            .iter_mut()
            .filter_map(|v| v.get_mut("ram").and_then(|r| r.as_array_mut()))
        {
            ram.iter_mut().for_each(addresses_to_bytes);
        }
    }
    if let Some(recent) = status
        .pointer_mut("/hints/recent")
        .and_then(|r| r.as_array_mut())
    {
        recent.iter_mut().for_each(redact_decision);
    }
}

/// A hint decision without addresses: its size instead of its bounds, its outcome text
/// hidden of any address an error put there.
fn redact_decision(v: &mut serde_json::Value) {
    addresses_to_bytes(v);
    if let Some(o) = v.get_mut("outcome")
        && let Some(text) = o.as_str()
    {
        *o = crate::addresses::hide(text).into();
    }
}

/// Replaces an object's `start` and `end` (virtual addresses) by `bytes`, their distance.
fn addresses_to_bytes(v: &mut serde_json::Value) {
    let Some(m) = v.as_object_mut() else {
        return;
    };
    let bytes = match (m.remove("start"), m.remove("end")) {
        (Some(s), Some(e)) => e
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(s.as_u64().unwrap_or(0)),
        _ => 0,
    };
    m.insert("bytes".into(), bytes.into());
}

/// `/v1/recommendations`: the ksmd decision and the merge hints (decided, applied or only
/// recommended, each with its reason and outcome).
async fn recommendations(State(app): State<App>) -> axum::response::Response {
    let Some(permit) = app.reader() else {
        return busy();
    };
    let s = app.state.read().map(|s| s.clone()).unwrap_or_default();
    let mut v = serde_json::json!({ "ksmd": s.ksmd, "hints": s.hints });
    if !app.opts.expose_addresses
        && let Some(recent) = v
            .pointer_mut("/hints/recent")
            .and_then(|r| r.as_array_mut())
    {
        recent.iter_mut().for_each(redact_decision);
    }
    held_json(v, permit)
}

#[derive(serde::Deserialize)]
struct RangesQuery {
    vm: Option<String>,
    /// First range to return (in address order) and how many: a 64 GiB guest has 32 Ki
    /// ranges, so the list comes in pages.
    offset: Option<usize>,
    limit: Option<usize>,
}

/// Ranges per `/v1/ranges` page unless `limit` says otherwise, and the most it may say.
const RANGES_PAGE: usize = 1024;
const RANGES_PAGE_MAX: usize = 8192;

fn error(code: StatusCode, msg: String) -> axum::response::Response {
    (code, Json(serde_json::json!({ "error": msg }))).into_response()
}

/// `/v1/ranges?vm=<name|pid|uuid>`: the VM's 2 MiB ranges with their figures, probe heat
/// and class, in address order.
async fn ranges(
    State(app): State<App>,
    axum::extract::Query(q): axum::extract::Query<RangesQuery>,
) -> axum::response::Response {
    let Some(permit) = app.reader() else {
        return busy();
    };
    // Off the async thread: a page of 8,192 ranges is megabytes of JSON, and /metrics
    // must not wait behind it.
    let (state, expose) = (app.state.clone(), app.opts.expose_addresses);
    match tokio::task::spawn_blocking(move || ranges_document(&state, q, expose)).await {
        Ok(Ok(v)) => held_json(v, permit),
        Ok(Err((code, msg))) => error(code, msg),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "building the ranges document failed".into(),
        ),
    }
}

/// The `/v1/ranges` document, or the error to answer.
fn ranges_document(
    state: &Shared,
    q: RangesQuery,
    expose: bool,
) -> Result<serde_json::Value, (StatusCode, String)> {
    let Ok(s) = state.read().map(|s| s.clone()) else {
        return Err((
            StatusCode::INTERNAL_SERVER_ERROR,
            "state unavailable".into(),
        ));
    };
    let known = || {
        s.vms
            .iter()
            .map(|v| format!("{} (pid {})", v.vm.name, v.vm.pid))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some(want) = q.vm.filter(|v| !v.is_empty()) else {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("give ?vm=<name|pid|uuid>; VMs: {}", known()),
        ));
    };
    let Some(vm) = s.vms.iter().find(|v| {
        v.vm.name == want || v.vm.pid.to_string() == want || v.vm.uuid.as_deref() == Some(&want)
    }) else {
        return Err((
            StatusCode::NOT_FOUND,
            format!("no VM {want:?}; VMs: {}", known()),
        ));
    };
    let Some(list) = s.ranges.by_pid.get(&vm.vm.pid) else {
        let why = if s.scan_pass_seconds == 0.0 && s.scan_bytes_total == 0 {
            "no scan pass has completed yet (or the scanner is off: --scan-cpu 0)"
        } else {
            "the VM has not been through a full scan pass yet"
        };
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no ranges for VM {}: {why}", vm.vm.name),
        ));
    };
    let offset = q.offset.unwrap_or(0);
    let limit = q.limit.unwrap_or(RANGES_PAGE).clamp(1, RANGES_PAGE_MAX);
    let page = list.iter().skip(offset).take(limit);
    let mut rows: Vec<serde_json::Value> = page
        .map(|r| serde_json::to_value(r).unwrap_or_default())
        .collect();
    if !expose {
        // Offsets into the guest RAM (its mappings laid end to end) instead of addresses.
        let ram = &vm.vm.ram;
        for row in rows.iter_mut().filter_map(|r| r.as_object_mut()) {
            let Some(start) = row.remove("start").and_then(|v| v.as_u64()) else {
                continue;
            };
            let mut before = 0u64;
            let mut off = None;
            for m in ram {
                // A range is 2 MiB aligned: its start may lie just below its mapping's.
                if start < m.end && start + crate::scan::RANGE_BYTES > m.start {
                    off = Some(before + start.saturating_sub(m.start));
                    break;
                }
                before += m.end - m.start;
            }
            row.insert("offset".into(), off.into());
        }
    }
    let next = (offset + rows.len() < list.len()).then_some(offset + rows.len());
    Ok(serde_json::json!({
        "vm": vm.vm.name,
        "pid": vm.vm.pid,
        "passes": s.ranges.vm_passes.get(&vm.vm.pid),
        "heat_window_seconds": s.ranges.heat_window_seconds,
        "policy": s.ranges.policy,
        "classes": vm.range_classes,
        "total": list.len(),
        "offset": offset,
        "next_offset": next,
        "ranges": rows,
    }))
}

/// The fabric's document `f` builds, or 404 when the fabric is off.
fn fabric_json(
    app: &App,
    f: impl FnOnce(&crate::fabric::node::Fabric) -> serde_json::Value,
) -> axum::response::Response {
    match &app.opts.fabric {
        Some(fab) => Json(f(fab)).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "the fabric is off: configure [fabric] (listen, peers, certificates, gossip key)"
                .into(),
        ),
    }
}

async fn candidates(State(app): State<App>) -> axum::response::Response {
    fabric_json(
        &app,
        |f| serde_json::json!({"node": f.node, "candidates": *f.candidates()}),
    )
}

async fn peers(State(app): State<App>) -> axum::response::Response {
    fabric_json(
        &app,
        |f| serde_json::json!({"node": f.node, "peers": f.peers()}),
    )
}

async fn plan(State(app): State<App>) -> axum::response::Response {
    let Some(permit) = app.reader() else {
        return busy();
    };
    let Some(fab) = app.opts.fabric.clone() else {
        return fabric_json(&app, |_| serde_json::Value::Null);
    };
    match tokio::task::spawn_blocking(move || fab.plan()).await {
        Ok(p) => held_json(serde_json::json!(p), permit),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The HTTP routes.
pub fn router(state: Shared, opts: Options) -> Router {
    let registry = Arc::new(registry(
        state.clone(),
        Some(opts.http.clone()),
        opts.fabric.clone(),
    ));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/v1/status", get(status))
        .route("/v1/ranges", get(ranges))
        .route("/v1/recommendations", get(recommendations))
        .route("/v1/candidates", get(candidates))
        .route("/v1/peers", get(peers))
        .route("/v1/plan", get(plan))
        .with_state(App {
            state,
            registry,
            opts,
            readers: Arc::new(tokio::sync::Semaphore::new(MAX_JSON_READERS)),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_documents_carry_no_guest_addresses() {
        let mut v = serde_json::json!({
            "vms": [{ "ram": [{ "start": 0x7f00_0000_0000u64, "end": 0x7f00_4000_0000u64 }] }],
            "hints": { "recent": [{
                "start": 0x7f00_0000_0000u64,
                "end": 0x7f00_0020_0000u64,
                "outcome": "failed: 0x7f0000000000-0x7f0000200000 is not entirely mapped in PID 7",
            }] },
        });
        redact_addresses(&mut v);
        let text = v.to_string();
        assert!(!text.contains("start") && !text.contains("0x7f"), "{text}");
        assert_eq!(
            v.pointer("/hints/recent/0/bytes"),
            Some(&(2u64 << 20).into())
        );
        assert_eq!(v.pointer("/vms/0/ram/0/bytes"), Some(&(1u64 << 30).into()));
    }

    #[test]
    fn scrapers_get_text_0_0_4_unless_they_ask_for_openmetrics() {
        // What Prometheus 2.x/3.x sends, then curl's and a text-only scraper's.
        assert!(wants_openmetrics(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
             version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ));
        assert!(!wants_openmetrics("*/*"));
        assert!(!wants_openmetrics(""));
        assert!(!wants_openmetrics("text/plain;version=0.0.4"));
        assert!(!wants_openmetrics("application/openmetrics-text;q=0"));
    }

    #[test]
    fn openmetrics_becomes_text_0_0_4() {
        let om = "# HELP memfabric_x_bytes Bytes.\n# TYPE memfabric_x_bytes gauge\n\
                  # UNIT memfabric_x_bytes bytes\nmemfabric_x_bytes 3\n\
                  # HELP memfabric_y Ys seen.\n# TYPE memfabric_y counter\n\
                  memfabric_y_total{vm=\"a b\"} 7\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP memfabric_x_bytes Bytes.\n# TYPE memfabric_x_bytes gauge\n\
             memfabric_x_bytes 3\n# HELP memfabric_y_total Ys seen.\n\
             # TYPE memfabric_y_total counter\nmemfabric_y_total{vm=\"a b\"} 7\n"
        );
    }

    #[test]
    fn an_unreadable_ksm_value_is_absent_not_zero() {
        let mut s = HostState::default();
        s.ksm.unreadable = vec!["pages_sharing".into(), "cow_ksm".into()];
        let reg = registry(Arc::new(RwLock::new(s)), None, None);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(text.contains("memfabric_ksm_pages_shared 0"), "{text}");
        assert!(!text.contains("memfabric_ksm_pages_sharing"), "{text}");
        assert!(!text.contains("memfabric_ksm_cow_breaks"), "{text}");
    }

    #[test]
    fn addresses_are_redacted_to_sizes() {
        let mut v = serde_json::json!({"vms": [{"ram": [
            {"start": 4096, "end": 4096 * 3, "backing": "private-anonymous"}
        ]}]});
        redact_addresses(&mut v);
        assert_eq!(
            v["vms"][0]["ram"][0],
            serde_json::json!({"bytes": 8192, "backing": "private-anonymous"})
        );
    }

    #[test]
    fn health_fails_on_stale_state_and_on_a_dead_scanner() {
        let stale = Duration::from_secs(5);
        let mut s = HostState {
            taken_at_unix_ms: 1_000_000,
            ..HostState::default()
        };
        assert_eq!(health(&s, 1_001_000, stale).0, StatusCode::OK);
        assert_eq!(
            health(&s, 1_010_000, stale).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            health(&HostState::default(), 5, stale).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        s.scan_failed = Some("index out of bounds".into());
        let (code, body) = health(&s, 1_001_000, stale);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.contains("page scanner died: index out of bounds"),
            "{body}"
        );
    }
}
