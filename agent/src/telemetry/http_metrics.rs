//! The HTTP server's own counters.

use std::{fmt, sync::Arc};

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use super::encode::{counter, gauge};

/// The HTTP server's own counters, and basic auth's when it is on.
#[derive(Debug)]
pub(super) struct HttpCollector(
    pub(super) Arc<crate::http::Stats>,
    pub(super) Option<Arc<crate::http_auth::AuthStats>>,
);

impl Collector for HttpCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.0;
        let e = &mut enc;
        if let Some(a) = &self.1 {
            counter(
                e,
                "memfabric_http_auth_verifications",
                "bcrypt verifications of presented credentials (remembered ones cost none)",
                a.verifications.load(Relaxed),
            )?;
            gauge(
                e,
                "memfabric_http_auth_verifications_peak",
                "The most bcrypt verifications that ran at once (at most 2)",
                a.peak_concurrent.load(Relaxed) as i64,
            )?;
        }
        gauge(
            e,
            "memfabric_http_connections",
            "HTTP connections open now",
            s.open.load(Relaxed) as i64,
        )?;
        for (name, help, value) in [
            (
                "memfabric_http_connections_accepted",
                "HTTP connections accepted",
                &s.accepted,
            ),
            (
                "memfabric_http_connections_evicted",
                "HTTP connections closed to make room under the connection cap (oldest first)",
                &s.evicted,
            ),
            (
                "memfabric_http_accept_errors",
                "Failed accepts (for example out of file descriptors)",
                &s.accept_errors,
            ),
            (
                "memfabric_http_busy_rejections",
                "JSON requests answered 503 because too many were being served at once",
                &s.busy,
            ),
        ] {
            counter(e, name, help, value.load(Relaxed))?;
        }
        Ok(())
    }
}
