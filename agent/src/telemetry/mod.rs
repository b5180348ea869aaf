//! Prometheus metrics (OpenMetrics text via prometheus-client, read from the current
//! [`StatusV1`] at scrape time) and the HTTP endpoints: /metrics, /healthz, /v1/status,
//! /v1/ranges, /v1/recommendations and the fabric's.
//! Metric names are a contract: units in names, counters end in `_total` (prometheus-client
//! appends it to counters), a superset of node_exporter's ksmd collector.
//!
//! One room per job: `encode` (the encoding helpers), `host` (the host's and VMs' metrics),
//! `http_metrics` and `fabric_metrics` (those areas' counters), `api` (the routes, their
//! bounds and the redaction of addresses).

mod api;
mod encode;
mod fabric_metrics;
mod host;
mod http_metrics;
mod labels;

use std::sync::{Arc, RwLock};

use prometheus_client::registry::Registry;

use crate::wire::StatusV1;

pub use api::{Options, router};

/// The state shared between the refresh loop and the HTTP handlers.
pub type Shared = Arc<RwLock<StatusV1>>;

/// The registry serving `state` (and the HTTP server's counters and the fabric's, when
/// given).
pub fn registry(
    state: Shared,
    http: Option<(
        Arc<crate::http::Stats>,
        Option<Arc<crate::http_auth::AuthStats>>,
    )>,
    fabric: Option<Arc<crate::fabric::node::Fabric>>,
) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(host::HostCollector(state)));
    if let Some(h) = http {
        r.register_collector(Box::new(http_metrics::HttpCollector(h.0, h.1)));
    }
    if let Some(f) = fabric {
        r.register_collector(Box::new(fabric_metrics::FabricCollector(f)));
    }
    r
}
