//! The fabric's peers, candidates, exchange and refusals.

use std::{fmt, sync::Arc};

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder, metrics::MetricType};

use super::{
    encode::{enc_counter, enc_gauge, family},
    labels,
};

#[derive(Debug)]
pub(super) struct FabricCollector(pub(super) Arc<crate::fabric::node::Fabric>);

impl Collector for FabricCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        use std::sync::atomic::Ordering::Relaxed;
        let f = &self.0;
        let e = &mut enc;
        let peers: Vec<(labels::State, i64)> = f
            .peer_counts()
            .iter()
            .map(|(s, n)| (labels::State { state: s.label() }, *n as i64))
            .collect();
        family(
            e,
            "memfabric_fabric_peers",
            "Peer hosts by state (joining: no summary yet; stale: not gossiping or unreachable)",
            MetricType::Gauge,
            &peers,
            enc_gauge,
        )?;
        let shared: Vec<(labels::VmHost, i64)> = f
            .candidates()
            .pairs
            .iter()
            .map(|c| {
                let pair = labels::VmHost {
                    vm: c.vm.clone(),
                    host: c.host.clone(),
                };
                (pair, c.shared_bytes as i64)
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
                labels::Direction { direction: "in" },
                s.bytes_in.load(Relaxed),
            ),
            (
                labels::Direction { direction: "out" },
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
        let rejected: Vec<(labels::Reason, u64)> = crate::fabric::stats::Reject::ALL
            .iter()
            .map(|r| {
                let extra = if *r == crate::fabric::stats::Reject::Tls {
                    server_tls
                } else {
                    0
                };
                (labels::Reason { reason: r.label() }, s.rejected(*r) + extra)
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
