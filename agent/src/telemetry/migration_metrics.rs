//! Migrations peers sent here (`memfabric migrate --to`), and those this host's commands
//! sent (their records, `migrate::outgoing`): their outcomes and what they carried.

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

#[derive(Debug)]
pub(super) struct OutgoingCollector(pub(super) Arc<crate::migrate::outgoing::Ledger>);

impl Collector for OutgoingCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        use crate::migrate::outgoing::Outcome;
        let (r, e) = (self.0.read(), &mut enc);
        let outcomes = Outcome::ENDED
            .map(|o| labels::Outcome {
                outcome: o.as_str(),
            })
            .into_iter()
            .zip(r.ended)
            .collect::<Vec<_>>();
        family(
            e,
            "memfabric_migrations_outgoing",
            "Migrations this host's `memfabric migrate --to` and `plan --apply` sent, by outcome (completed: the guest runs on the destination; failed: it runs here; undecided: the start's answer was lost and it is paused here; abandoned: the command ended without saying)",
            MetricType::Counter,
            &outcomes,
            enc_counter,
        )?;
        gauge(
            e,
            "memfabric_migrations_outgoing_open",
            "Outgoing migrations under way",
            i64::try_from(r.open).unwrap_or(i64::MAX),
        )?;
        counter(
            e,
            "memfabric_migrations_outgoing_stream_bytes",
            "QEMU's migration streams sent from here, those under way so far (what plain migrations would have carried)",
            r.bytes.stream,
        )?;
        counter(
            e,
            "memfabric_migrations_outgoing_wire_bytes",
            "What those streams put on the link (raw bytes, references, pages sent again): against the stream's bytes, what the destinations' holdings saved",
            r.bytes.wire,
        )?;
        let pages = [
            ("referenced", r.bytes.referenced_pages),
            ("resent", r.bytes.resent_pages),
        ]
        .map(|(way, n)| (labels::Way { way }, n));
        family(
            e,
            "memfabric_migrations_outgoing_pages",
            "Pages of outgoing migrations sent as references to the destination's copy (referenced) or sent again because that copy had changed or gone (resent)",
            MetricType::Counter,
            &pages,
            enc_counter,
        )
    }
}
