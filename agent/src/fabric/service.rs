//! What this host serves its peers over mutual TLS: its summary, on the fabric's own port
//! (the hardened accept loop of [`crate::http`], at most 64 connections).

use std::sync::Arc;

use super::node::Fabric;

/// The fabric's routes.
pub fn router(fabric: Arc<Fabric>) -> axum::Router {
    axum::Router::new()
        .route("/v1/fabric/summary", axum::routing::get(serve_summary))
        .with_state(fabric)
}

/// `GET /v1/fabric/summary`: the encoded summary, or 503 before the first scan pass.
async fn serve_summary(
    axum::extract::State(f): axum::extract::State<Arc<Fabric>>,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    match f.encoded_summary() {
        Some(b) => {
            f.stats.add_out(b.len());
            (
                [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
                b.as_ref().clone(),
            )
                .into_response()
        }
        None => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "no summary yet: the first scan pass has not finished",
        )
            .into_response(),
    }
}
