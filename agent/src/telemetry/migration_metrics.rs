//! Migrations peers sent here (`memfabric migrate --to`): their outcomes and what they
//! carried.

use std::{fmt, sync::Arc};

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder, metrics::MetricType};

use super::{
    encode::{counter, enc_counter, family, gauge},
    labels,
};

#[derive(Debug)]
pub(super) struct MigrationCollector(pub(super) Arc<crate::migrate::incoming::Incoming>);

impl Collector for MigrationCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        use std::sync::atomic::Ordering::Relaxed;
        let (inc, e) = (&self.0, &mut enc);
        let s = &inc.stats;
        let outcomes = [
            ("running", s.running.load(Relaxed)),
            ("failed", s.failed.load(Relaxed)),
            ("refused", s.refused.load(Relaxed)),
        ]
        .map(|(outcome, n)| (labels::Outcome { outcome }, n));
        family(
            e,
            "memfabric_migrations_incoming",
            "Migrations peers sent here, by outcome (running: the guest runs here; failed: it runs on its source; refused: the request was turned down)",
            MetricType::Counter,
            &outcomes,
            enc_counter,
        )?;
        gauge(
            e,
            "memfabric_migrations_incoming_open",
            "Incoming migrations under way (receiving, or verified and waiting for the source's start)",
            inc.open() as i64,
        )?;
        counter(
            e,
            "memfabric_migrations_incoming_stream_bytes",
            "QEMU's migration stream handed to incoming QEMUs (what plain migrations would have carried)",
            s.stream_bytes.load(Relaxed),
        )?;
        counter(
            e,
            "memfabric_migrations_incoming_link_bytes",
            "What those streams took on the link to this host (raw bytes, references, pages sent again): against the stream's bytes, what the host's holdings saved",
            s.link_bytes.load(Relaxed),
        )?;
        let pages = [
            ("referenced", s.referenced_pages.load(Relaxed)),
            ("resent", s.resent_pages.load(Relaxed)),
        ]
        .map(|(way, n)| (labels::Way { way }, n));
        family(
            e,
            "memfabric_migrations_incoming_pages",
            "Pages of incoming migrations resolved from this host's memory (referenced) or sent again because the copy here had changed or gone (resent)",
            MetricType::Counter,
            &pages,
            enc_counter,
        )
    }
}
