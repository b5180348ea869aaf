//! The fabric's peers, candidates, exchange and refusals.

use std::{fmt, sync::Arc};

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder, metrics::MetricType};

use super::encode::{Labels, enc_counter, enc_gauge, family};

#[derive(Debug)]
pub(super) struct FabricCollector(pub(super) Arc<crate::fabric::node::Fabric>);

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
