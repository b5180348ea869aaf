//! The HTTP routes: /metrics (text 0.0.4 or OpenMetrics), /healthz, /v1/status,
//! /v1/ranges, /v1/recommendations and the fabric's, with the number of JSON documents
//! built at once bounded and guest addresses redacted unless asked for.

use std::{sync::Arc, time::Duration};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::registry::Registry;

use super::{Shared, registry};
use crate::wire::StatusV1;

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
    /// Basic auth's verifications, when it is on.
    pub auth: Option<Arc<crate::http_auth::AuthStats>>,
    /// Migrations peers send here, when `[fabric]` is on.
    pub incoming: Option<Arc<crate::migrate::incoming::Incoming>>,
    /// Migrations this host's commands send, when `[fabric]` is on.
    pub outgoing: Option<Arc<crate::migrate::outgoing::Ledger>>,
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
    held_response(Json(value).into_response(), permit)
}

/// JSON text already encoded, as a response whose body keeps `permit` until it is sent.
fn held_body(json: Vec<u8>, permit: tokio::sync::OwnedSemaphorePermit) -> axum::response::Response {
    held_response(
        (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            json,
        )
            .into_response(),
        permit,
    )
}

fn held_response(
    response: axum::response::Response,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> axum::response::Response {
    let (parts, body) = response.into_parts();
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
fn health(s: &StatusV1, now_ms: u64, stale_after: Duration) -> (StatusCode, String) {
    let age = now_ms.saturating_sub(s.taken_at_unix_ms);
    if s.taken_at_unix_ms == 0 || age > crate::util::convert::millis(stale_after) {
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
    held_json(status_document(&s, app.opts.expose_addresses), permit)
}

/// The `/v1/status` document. Guest addresses are left out by their fields' own serde
/// attributes ([`crate::addresses::hidden`]) unless `expose`; error texts are hidden of
/// any address they quote.
fn status_document(s: &StatusV1, expose: bool) -> serde_json::Value {
    let mut v = crate::addresses::exposing(expose, || serde_json::to_value(s).unwrap_or_default());
    if !expose {
        hide_in_outcomes(&mut v);
    }
    v
}

/// Hides addresses quoted in the hint decisions' outcome texts (`failed: ...`).
fn hide_in_outcomes(doc: &mut serde_json::Value) {
    let Some(recent) = doc
        .pointer_mut("/hints/recent")
        .and_then(|r| r.as_array_mut())
    else {
        return;
    };
    for o in recent.iter_mut().filter_map(|d| d.get_mut("outcome")) {
        if let Some(text) = o.as_str() {
            *o = crate::addresses::hide(text).into();
        }
    }
}

/// `/v1/recommendations`: the ksmd decision and the merge hints (decided, applied or only
/// recommended, each with its reason and outcome).
async fn recommendations(State(app): State<App>) -> axum::response::Response {
    let Some(permit) = app.reader() else {
        return busy();
    };
    let s = app.state.read().map(|s| s.clone()).unwrap_or_default();
    let expose = app.opts.expose_addresses;
    let mut v = crate::addresses::exposing(
        expose,
        || serde_json::json!({ "ksmd": s.ksmd, "hints": s.hints }),
    );
    if !expose {
        hide_in_outcomes(&mut v);
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
        Ok(Ok(body)) => held_body(body, permit),
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
) -> Result<Vec<u8>, (StatusCode, String)> {
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
    // Hidden, a range's address becomes its offset into the guest RAM (the VM's mappings
    // laid end to end).
    let offset_of = |start: u64| {
        let mut before = 0u64;
        for m in &vm.vm.ram {
            // A range is 2 MiB aligned: its start may lie just below its mapping's.
            if start < m.span.end && start + crate::scan::RANGE_BYTES > m.span.start {
                return Some(before + start.saturating_sub(m.span.start));
            }
            before += m.span.bytes;
        }
        None
    };
    let rows: Vec<crate::wire::RangeRow<'_>> = page
        .map(|r| crate::wire::RangeRow {
            range: r,
            offset: (!expose).then(|| offset_of(r.counts.start)),
        })
        .collect();
    let next = (offset + rows.len() < list.len()).then_some(offset + rows.len());
    let doc = crate::wire::RangesPageV1 {
        vm: &vm.vm.name,
        pid: vm.vm.pid,
        passes: s.ranges.vm_passes.get(&vm.vm.pid).copied(),
        heat_window_seconds: s.ranges.heat_window_seconds,
        policy: s.ranges.policy,
        classes: vm.range_classes.as_ref(),
        total: list.len(),
        offset,
        next_offset: next,
        ranges: rows,
    };
    // Serialized straight to bytes: a page of 8,192 ranges as a JSON value tree took
    // several times the memory of its text, per request in flight.
    crate::addresses::exposing(expose, || serde_json::to_vec(&doc)).map_err(|e| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the ranges: {e}"),
        )
    })
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
        Some((opts.http.clone(), opts.auth.clone())),
        opts.fabric.clone(),
        opts.incoming.clone(),
        opts.outgoing.clone(),
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
    use std::sync::RwLock;

    use super::*;

    /// A host state whose VM has a RAM mapping and whose hints hold a failed decision
    /// quoting its addresses.
    fn with_addresses() -> StatusV1 {
        let json = serde_json::json!({
            "name": "vm-a", "pid": 7, "kind": "qemu", "uuid": null, "guest_memory_bytes": 1u64 << 30,
            "ram": [{ "start": 0x7f00_0000_0000u64, "end": 0x7f00_4000_0000u64,
                      "bytes": 1u64 << 30, "backing": "private-anonymous", "mergeable": true }],
            "mergeability": "mergeable",
        });
        let vm: crate::host::inventory::Vm = serde_json::from_value(json).unwrap();
        let mut s = StatusV1::default();
        s.vms.push(crate::model::VmState::new(vm));
        s.hints = Some(crate::wire::HintsStatus {
            recent: vec![crate::wire::HintView {
                vm: "vm-a".into(),
                pid: 7,
                span: crate::addresses::GuestSpan::new(0x7f00_0000_0000, 0x7f00_0020_0000),
                target: crate::policy::hints::Target::Unmergeable,
                reason: crate::policy::hints::HintReason::Volatile,
                outcome: crate::wire::HintOutcome::Failed(
                    "0x7f0000000000-0x7f0000200000 is not entirely mapped".into(),
                ),
                stopped_us: None,
            }],
            ..Default::default()
        });
        s
    }

    #[test]
    fn status_documents_carry_no_guest_addresses() {
        let s = with_addresses();
        let v = status_document(&s, false);
        let text = v.to_string();
        assert!(
            !text.contains("\"start\"") && !text.contains("\"end\""),
            "{text}"
        );
        assert!(
            !text.contains("0x7f") && !text.contains("139637976727552"),
            "{text}"
        );
        assert_eq!(
            v.pointer("/hints/recent/0/bytes"),
            Some(&(2u64 << 20).into())
        );
        assert_eq!(v.pointer("/vms/0/ram/0/bytes"), Some(&(1u64 << 30).into()));
        // Asked for, they are there.
        let v = status_document(&s, true);
        assert_eq!(
            v.pointer("/vms/0/ram/0/start"),
            Some(&0x7f00_0000_0000u64.into())
        );
        assert_eq!(
            v.pointer("/hints/recent/0/end"),
            Some(&0x7f00_0020_0000u64.into())
        );
        // Read back by the CLI, hidden addresses are 0 and sizes stay.
        let back: StatusV1 = serde_json::from_value(status_document(&s, false)).unwrap();
        assert_eq!(back.vms[0].vm.ram[0].span.start, 0);
        assert_eq!(back.vms[0].vm.ram[0].span.bytes, 1 << 30);
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
        let mut s = StatusV1::default();
        s.ksm.unreadable = vec!["pages_sharing".into(), "cow_ksm".into()];
        let reg = registry(Arc::new(RwLock::new(s)), None, None, None, None);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(text.contains("memfabric_ksm_pages_shared 0"), "{text}");
        assert!(!text.contains("memfabric_ksm_pages_sharing"), "{text}");
        assert!(!text.contains("memfabric_ksm_cow_breaks"), "{text}");
    }

    #[test]
    fn health_fails_on_stale_state_and_on_a_dead_scanner() {
        let stale = Duration::from_secs(5);
        let mut s = StatusV1 {
            taken_at_unix_ms: 1_000_000,
            ..StatusV1::default()
        };
        assert_eq!(health(&s, 1_001_000, stale).0, StatusCode::OK);
        assert_eq!(
            health(&s, 1_010_000, stale).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            health(&StatusV1::default(), 5, stale).0,
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
