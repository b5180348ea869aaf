//! Prometheus metrics (OpenMetrics text via prometheus-client, read from the current
//! [`StatusV1`] at scrape time) and the HTTP endpoints: /metrics, /healthz, /v1/status,
//! /v1/ranges, /v1/recommendations and the fabric's.
//! Metric names are a contract: units in names, counters end in `_total` (prometheus-client
//! appends it to counters), a superset of node_exporter's ksmd collector.
//!
//! One room per job: `encode` (the encoding helpers), `host` (the host's and VMs' metrics),
//! `http_metrics`, `fabric_metrics` and `migration_metrics` (those areas' counters), `api` (the routes, their
//! bounds and the redaction of addresses).

mod api;
mod encode;
mod fabric_metrics;
mod host;
mod http_metrics;
mod labels;
mod migration_metrics;

use std::sync::{Arc, RwLock};

use prometheus_client::registry::Registry;

use crate::wire::StatusV1;

pub use api::{Options, router};

/// The state shared between the refresh loop and the HTTP handlers.
pub type Shared = Arc<RwLock<StatusV1>>;

/// The registry serving `state` (and the HTTP server's counters, the fabric's and the
/// incoming and outgoing migrations', when given).
pub fn registry(
    state: Shared,
    http: Option<(
        Arc<crate::http::Stats>,
        Option<Arc<crate::http_auth::AuthStats>>,
    )>,
    fabric: Option<Arc<crate::fabric::node::Fabric>>,
    incoming: Option<Arc<crate::migrate::incoming::Incoming>>,
    outgoing: Option<Arc<crate::migrate::outgoing::Ledger>>,
) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(host::HostCollector(state)));
    if let Some(h) = http {
        r.register_collector(Box::new(http_metrics::HttpCollector(h.0, h.1)));
    }
    if let Some(f) = fabric {
        r.register_collector(Box::new(fabric_metrics::FabricCollector(f)));
    }
    if let Some(i) = incoming {
        r.register_collector(Box::new(migration_metrics::MigrationCollector(i)));
    }
    if let Some(o) = outgoing {
        r.register_collector(Box::new(migration_metrics::OutgoingCollector(o)));
    }
    r
}
