//! The destination's side of `memfabric migrate --to`: a peer asks, over the fabric's
//! mutual TLS, for an incoming migration; this agent starts the incoming QEMU from the
//! source's command line ([`super::command`]) behind a proxy on a port of its own, and
//! starts the guest only when the source says so, after every byte was verified.
//!
//! ```text
//! POST /v1/fabric/migrations            {name, uuid, args} -> {id, port, token}
//!      (QEMU started paused, listening; this host's pages indexed; the proxy on `port`)
//! ... the source's proxy sends `token`, then streams to `port` (run::receive_on) ...
//! POST /v1/fabric/migrations/{id}/start  -> the guest runs here, or an error
//! POST /v1/fabric/migrations/{id}/cancel -> the source gave up: its QEMU here is stopped
//! GET  /v1/fabric/migrations/{id}        -> where it stands
//! ```
//!
//! A migration that fails, or that the source does not start within [`START_WITHIN`],
//! has its QEMU stopped and its files removed: the guest runs on the source. One
//! migration at a time (another request is answered 503). Off unless the config names the
//! QEMU to run (`[fabric] incoming_qemu`).

use std::{
    collections::VecDeque,
    net::{IpAddr, SocketAddr},
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Path as UrlPath, State as Extract},
    http::StatusCode,
    response::{IntoResponse as _, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize};

use super::{
    Progress,
    command::{self, MAX_ARG_BYTES},
    incoming_qemu::{boot_id, cont, loaded, stop, stop_qemu},
    run::{self, Summary},
};
use crate::host::inventory;

/// The largest request body: the source's arguments and a little more.
const MAX_REQUEST: usize = MAX_ARG_BYTES + (16 << 10);
/// How long the source has to connect once answered.
const ACCEPT_WITHIN: Duration = Duration::from_secs(60);
/// A verified migration the source does not start within this is dropped.
pub const START_WITHIN: Duration = Duration::from_secs(120);
/// How long a start request waits for the stream's last bytes to be verified.
const VERIFY_WAIT: Duration = Duration::from_secs(30);
/// The longest unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Migrations whose state is kept for `GET`.
const REMEMBERED: usize = 16;

/// What the source asks for.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The VM's name (`-name`), for logs and status.
    pub name: String,
    /// Its UUID: its own QEMUs here are not donors, and a VM with it running here
    /// refuses the migration.
    pub uuid: Option<String>,
    /// The source QEMU's arguments, without the program.
    pub args: Vec<String>,
    /// The source QEMU's PID and its host's boot id: on one machine (a lab of network
    /// namespaces) the source's QEMU is visible here too and is not a conflicting VM.
    #[serde(default)]
    pub source: Option<(String, u32)>,
    /// The source QEMU's return path and multifd channels, which the incoming QEMU is
    /// given before the source connects.
    #[serde(default)]
    pub capabilities: run::Capabilities,
}

/// The answer to a request: where the source's proxy connects, and the one-time token it
/// sends first (hex), so that only the requester's stream reaches the incoming QEMU.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Accepted {
    pub id: String,
    pub port: u16,
    pub token: String,
}

/// A token as hex, and back (None unless exactly 16 bytes of hex).
pub fn token_hex(t: &run::Token) -> String {
    t.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn token_of_hex(s: &str) -> Option<run::Token> {
    let mut t = [0u8; 16];
    if s.len() != 32 || !s.is_ascii() {
        return None;
    }
    for (i, b) in t.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(t)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The stream is arriving.
    Receiving,
    /// Every byte arrived and was verified; the guest waits paused for the source.
    Verified,
    /// Being started.
    Starting,
    /// The guest runs here.
    Running,
    /// Stopped and removed here; the guest runs on the source.
    Failed,
}

impl Phase {
    /// Under way: its QEMU is here and must not outlive a failure or the agent.
    fn open(self) -> bool {
        matches!(self, Phase::Receiving | Phase::Verified | Phase::Starting)
    }
}

/// One migration as `GET` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub id: String,
    pub vm: String,
    pub phase: Phase,
    pub error: Option<String>,
    pub summary: Option<Summary>,
}

struct Entry {
    status: Status,
    dir: PathBuf,
    pid: u32,
}

/// Counters since the agent started, for the metrics.
#[derive(Debug, Default)]
pub struct IncomingStats {
    /// Guests that run here after a migration.
    pub running: AtomicU64,
    /// Migrations accepted that failed (their guests run on their sources).
    pub failed: AtomicU64,
    /// Requests refused (not accepted here, malformed, busy, conflicting).
    pub refused: AtomicU64,
    /// QEMU's stream handed to incoming QEMUs, and the pages in it resolved from this
    /// host's memory or sent again.
    pub stream_bytes: AtomicU64,
    /// What those streams took on the link to this host.
    pub link_bytes: AtomicU64,
    pub referenced_pages: AtomicU64,
    pub resent_pages: AtomicU64,
}

/// The incoming side, shared by the routes and each migration's task.
pub struct Incoming {
    pub stats: IncomingStats,
    qemu: Option<PathBuf>,
    dir: PathBuf,
    bind: IpAddr,
    server: tokio_rustls::TlsAcceptor,
    busy: Arc<tokio::sync::Semaphore>,
    entries: Mutex<VecDeque<Entry>>,
    changed: tokio::sync::Notify,
}

/// An error answer: a status and a sentence.
fn refuse(code: StatusCode, why: impl Into<String>) -> Response {
    (code, Json(serde_json::json!({ "error": why.into() }))).into_response()
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("qemu", &self.qemu)
            .field("dir", &self.dir)
            .field("bind", &self.bind)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Incoming {
    /// `qemu`: what to run (none: refuse every request); `dir`: where each migration's
    /// files go; `bind`: the address proxies listen on (the fabric's); `server`: the
    /// fabric's mutual TLS.
    pub fn new(
        qemu: Option<PathBuf>,
        dir: PathBuf,
        bind: IpAddr,
        server: tokio_rustls::TlsAcceptor,
    ) -> Arc<Incoming> {
        Arc::new(Incoming {
            stats: IncomingStats::default(),
            qemu,
            dir,
            bind,
            server,
            busy: Arc::new(tokio::sync::Semaphore::new(1)),
            entries: Mutex::default(),
            changed: tokio::sync::Notify::new(),
        })
    }

    /// The routes, for the fabric's HTTPS listener.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v1/fabric/migrations", post(request))
            .route("/v1/fabric/migrations/{id}", get(status))
            .route("/v1/fabric/migrations/{id}/start", post(start))
            .route("/v1/fabric/migrations/{id}/cancel", post(cancel))
            .layer(axum::extract::DefaultBodyLimit::max(MAX_REQUEST))
            .with_state(self.clone())
    }

    /// Migrations under way (received, or verified and not started yet).
    pub fn open(&self) -> usize {
        self.entries()
            .iter()
            .filter(|e| e.status.phase.open())
            .count()
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn status_of(&self, id: &str) -> Option<Status> {
        self.entries()
            .iter()
            .find(|e| e.status.id == id)
            .map(|e| e.status.clone())
    }

    /// Moves migration `id` from `from` (any phase when none) to `to`; whether it was in
    /// `from`. The one place phases change: a start and the expiry cannot both win.
    fn advance(&self, id: &str, from: Option<Phase>, to: Phase, error: Option<String>) -> bool {
        let moved = match self.entries().iter_mut().find(|e| e.status.id == id) {
            Some(e) if from.is_none_or(|f| e.status.phase == f) => {
                let counter = match to {
                    Phase::Running => Some(&self.stats.running),
                    Phase::Failed if e.status.phase != Phase::Failed => Some(&self.stats.failed),
                    _ => None,
                };
                if let Some(c) = counter {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                e.status.phase = to;
                if error.is_some() {
                    e.status.error = error;
                }
                true
            }
            _ => false,
        };
        self.changed.notify_waiters();
        moved
    }

    /// Stops every migration not running yet (the daemon is exiting): their guests run on
    /// their sources.
    pub fn shutdown(&self) {
        let open: Vec<(String, u32, PathBuf)> = self
            .entries()
            .iter()
            .filter(|e| e.status.phase.open())
            .map(|e| (e.status.id.clone(), e.pid, e.dir.clone()))
            .collect();
        for (id, pid, dir) in open {
            stop_qemu(pid, &dir);
            self.advance(&id, None, Phase::Failed, Some("the agent exited".into()));
        }
    }
}

/// `POST /v1/fabric/migrations`.
///
/// The work runs on a task of its own: a client that goes away mid-way (the fabric's
/// listener closes connections after 2 minutes; indexing a large host's pages takes a
/// while) must not leave a started QEMU behind unrecorded. Recorded, it is stopped when
/// no source connects in time.
async fn request(Extract(inc): Extract<Arc<Incoming>>, body: axum::body::Bytes) -> Response {
    let task = {
        let inc = inc.clone();
        tokio::spawn(async move { accept(&inc, &body).await })
    };
    let r = task.await.unwrap_or_else(|e| {
        refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the request's task: {e}"),
        )
    });
    if !r.status().is_success() {
        inc.stats.refused.fetch_add(1, Ordering::Relaxed);
    }
    r
}

/// A request's answer: the proxy's port once everything is ready, or why not.
async fn accept(inc: &Arc<Incoming>, body: &[u8]) -> Response {
    let Some(qemu) = inc.qemu.clone() else {
        return refuse(
            StatusCode::FORBIDDEN,
            "this host does not accept incoming migrations (its config sets no \
             [fabric] incoming_qemu)",
        );
    };
    let req: Request = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("the request: {e}")),
    };
    if let Err(e) = check_identity(&req) {
        return refuse(StatusCode::BAD_REQUEST, e);
    }
    let Ok(permit) = inc.busy.clone().try_acquire_owned() else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "another incoming migration is in progress here",
        );
    };
    let Some(token) = new_token() else {
        return refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "no randomness for the migration's token",
        );
    };
    let id = new_id();
    let dir = inc.dir.join(&id);
    let prepared = {
        let (req, dir, qemu) = (req.clone(), dir.clone(), qemu.clone());
        tokio::task::spawn_blocking(move || prepare(&qemu, &req, &dir))
            .await
            .unwrap_or_else(|e| Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string())))
    };
    let pid = match prepared {
        Ok(pid) => pid,
        Err((code, why)) => {
            let _ = std::fs::remove_dir_all(&dir);
            tracing::warn!("incoming migration of {:?} refused: {why}", req.name);
            return refuse(code, why);
        }
    };
    let listener = match tokio::net::TcpListener::bind(SocketAddr::new(inc.bind, 0)).await {
        Ok(l) => l,
        Err(e) => {
            stop(pid, &dir).await;
            return refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("listening on {}: {e}", inc.bind),
            );
        }
    };
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let holdings = match run::index(req.uuid.clone()).await {
        Ok(h) => h,
        Err(e) => {
            stop(pid, &dir).await;
            return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
        }
    };
    {
        let mut entries = inc.entries();
        if entries.len() >= REMEMBERED {
            entries.pop_front();
        }
        entries.push_back(Entry {
            status: Status {
                id: id.clone(),
                vm: req.name.clone(),
                phase: Phase::Receiving,
                error: None,
                summary: None,
            },
            dir: dir.clone(),
            pid,
        });
    }
    tracing::info!(
        "incoming migration {id} of {:?}: QEMU {pid} listening, proxy on port {port}; this host holds {}",
        req.name,
        holdings.summary()
    );
    tokio::spawn(receive(
        inc.clone(),
        id.clone(),
        Proxy {
            listener,
            holdings,
            token,
        },
        pid,
        dir,
        permit,
    ));
    let token = token_hex(&token);
    (StatusCode::OK, Json(Accepted { id, port, token })).into_response()
}

/// A name and UUID fit for logs and paths' neighbours: bounded, printable; a UUID of hex
/// digits and dashes.
fn check_identity(req: &Request) -> Result<(), String> {
    if req.name.is_empty() || req.name.len() > 128 || req.name.chars().any(char::is_control) {
        return Err("the VM's name: 1 to 128 printable characters".into());
    }
    if let Some(u) = &req.uuid
        && (u.len() != 36 || !u.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
    {
        return Err(format!("{u:?} is no UUID"));
    }
    Ok(())
}

/// 64 random bits, hex: a migration's id and directory name (short: unix socket paths
/// hold at most 107 bytes). Not a secret (the token is).
fn new_id() -> String {
    crate::util::random::u64_or_clock()
        .to_le_bytes()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// 128 random bits from the system's generator: a migration's token (none without
/// randomness: then no migration is accepted).
fn new_token() -> Option<run::Token> {
    let mut t = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut t)
        .ok()
        .map(|()| t)
}

/// Checks the request against this host and starts the incoming QEMU (paused,
/// listening): its PID.
fn prepare(qemu: &Path, req: &Request, dir: &Path) -> Result<u32, (StatusCode, String)> {
    let bad = |why: String| (StatusCode::BAD_REQUEST, why);
    let conflict = |why: String| (StatusCode::CONFLICT, why);
    let internal = |why: String| (StatusCode::INTERNAL_SERVER_ERROR, why);
    let longest = dir.join("incoming.sock").as_os_str().len();
    if longest > MAX_SOCKET_PATH {
        return Err(internal(format!(
            "{}: {longest} bytes, too long for a unix socket path (at most {MAX_SOCKET_PATH}): \
             give the agent a shorter state directory",
            dir.join("incoming.sock").display()
        )));
    }
    let args = command::incoming_args(&req.args, dir).map_err(bad)?;
    if req.capabilities.multifd > super::link::MAX_MULTIFD {
        return Err(bad(format!(
            "{} multifd channels (at most {})",
            req.capabilities.multifd,
            super::link::MAX_MULTIFD
        )));
    }
    if let Some(root) = dir.parent() {
        super::incoming_qemu::sweep(root);
    }
    let source_here = |pid: u32| {
        req.source
            .as_ref()
            .is_some_and(|(boot, p)| *p == pid && !boot.is_empty() && *boot == boot_id())
    };
    if let Some(uuid) = &req.uuid
        && let Some(vm) = inventory::discover(&inventory::Selector::default())
            .values()
            .find(|v| v.uuid.as_deref() == Some(uuid) && !source_here(v.pid))
    {
        // The peer learns the conflict, not this host's VM (its name is another
        // tenant's fact): that goes to the local log.
        tracing::warn!(
            "incoming migration of {:?} refused: VM {} (pid {}) here has its UUID {uuid}",
            req.name,
            vm.name,
            vm.pid
        );
        return Err(conflict(format!("a VM with UUID {uuid} already runs here")));
    }
    if let Some(ram) = command::guest_ram(&req.args) {
        let available = crate::host::ksm::meminfo().1;
        if available > 0 && ram > available {
            return Err(conflict(format!(
                "the guest's {} MiB of RAM exceed the {} MiB this host has available",
                ram >> 20,
                available >> 20
            )));
        }
    }
    if let Some(parent) = dir.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| internal(format!("{}: {e}", parent.display())))?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| internal(format!("{}: {e}", dir.display())))?;
    let pid = super::incoming_qemu::start(qemu, &args, dir).map_err(conflict)?;
    if let Err(why) = super::incoming_qemu::configure(&dir.join("qmp.sock"), &req.capabilities) {
        super::incoming_qemu::stop_qemu(pid, dir);
        return Err(conflict(why));
    }
    Ok(pid)
}

/// What the proxy of one migration starts from.
struct Proxy {
    listener: tokio::net::TcpListener,
    holdings: Arc<super::holdings::Holdings>,
    token: run::Token,
}

/// One migration after its answer: the stream, QEMU's own verdict, then the wait for the
/// source's start. Holds `_permit` (one migration at a time) until the guest runs or is
/// dropped.
async fn receive(
    inc: Arc<Incoming>,
    id: String,
    proxy: Proxy,
    pid: u32,
    dir: PathBuf,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    let progress = Arc::new(Progress::default());
    let socket = dir.join("incoming.sock");
    let receiving = run::receive_on(
        proxy.listener,
        &inc.server,
        proxy.holdings,
        &socket,
        ACCEPT_WITHIN,
        Some(proxy.token),
        progress,
    );
    let received = tokio::select! {
        r = receiving => r,
        () = cancelled(&inc, &id) => {
            tracing::warn!("incoming migration {id}: cancelled by the source; stopped");
            stop(pid, &dir).await;
            return;
        }
    };
    let verdict = match received {
        Ok(summary) => {
            let qmp = dir.join("qmp.sock");
            match tokio::task::spawn_blocking(move || loaded(&qmp)).await {
                Ok(Ok(())) => Ok(summary),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(e.to_string()),
            }
        }
        Err(e) => Err(e.to_string()),
    };
    match verdict {
        Ok(summary) => {
            let st = &inc.stats;
            st.stream_bytes
                .fetch_add(summary.stream_bytes, Ordering::Relaxed);
            st.link_bytes
                .fetch_add(summary.link_in_bytes, Ordering::Relaxed);
            st.referenced_pages
                .fetch_add(summary.referenced, Ordering::Relaxed);
            st.resent_pages.fetch_add(summary.resent, Ordering::Relaxed);
            if let Some(e) = inc.entries().iter_mut().find(|e| e.status.id == id) {
                e.status.summary = Some(summary);
            }
            inc.advance(&id, Some(Phase::Receiving), Phase::Verified, None);
            tracing::info!("incoming migration {id}: verified, waiting for the source's start");
        }
        Err(why) => {
            tracing::warn!("incoming migration {id} failed: {why}");
            stop(pid, &dir).await;
            inc.advance(&id, None, Phase::Failed, Some(why));
            return;
        }
    }
    // The source's start, or the expiry.
    let deadline = tokio::time::Instant::now() + START_WITHIN;
    loop {
        let changed = inc.changed.notified();
        match inc.status_of(&id).map(|s| s.phase) {
            Some(Phase::Verified | Phase::Starting) => {}
            Some(Phase::Failed) => {
                // Cancelled by the source (or failed to start, already stopped: `stop`
                // stops only the QEMU still running from this migration's directory).
                tracing::warn!("incoming migration {id}: not started here; stopped");
                stop(pid, &dir).await;
                return;
            }
            _ => return,
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            break;
        }
    }
    if inc.advance(
        &id,
        Some(Phase::Verified),
        Phase::Failed,
        Some(format!(
            "the source did not start the guest within {} s",
            START_WITHIN.as_secs()
        )),
    ) {
        tracing::warn!("incoming migration {id}: no start from the source; stopped");
        stop(pid, &dir).await;
    }
}

/// `GET /v1/fabric/migrations/{id}`.
async fn status(Extract(inc): Extract<Arc<Incoming>>, UrlPath(id): UrlPath<String>) -> Response {
    match inc.status_of(&id) {
        Some(s) => Json(s).into_response(),
        None => refuse(StatusCode::NOT_FOUND, format!("no migration {id:?} here")),
    }
}

/// Resolves once migration `id` failed (a cancel moves it there) or is forgotten.
async fn cancelled(inc: &Incoming, id: &str) {
    loop {
        let changed = inc.changed.notified();
        match inc.status_of(id).map(|s| s.phase) {
            None | Some(Phase::Failed) => return,
            Some(_) => changed.await,
        }
    }
}

/// `POST /v1/fabric/migrations/{id}/cancel`: the source gave up (its operator's Ctrl-C)
/// before starting the guest: the migration's task stops its QEMU here. 200 with its
/// status; 409 once the guest is being started or runs here (then only the source's
/// agent and its operator decide), 404 for an unknown migration.
async fn cancel(Extract(inc): Extract<Arc<Incoming>>, UrlPath(id): UrlPath<String>) -> Response {
    let why = || Some("cancelled by the source".to_owned());
    // Failed now if it was under way; a cancel of one failed already answers the same.
    let _ = [Phase::Receiving, Phase::Verified]
        .into_iter()
        .any(|f| inc.advance(&id, Some(f), Phase::Failed, why()));
    match inc.status_of(&id) {
        None => refuse(StatusCode::NOT_FOUND, format!("no migration {id:?} here")),
        Some(s) if s.phase == Phase::Failed => Json(s).into_response(),
        Some(s) => refuse(
            StatusCode::CONFLICT,
            format!("migration {id} is {:?}: too late to cancel", s.phase),
        ),
    }
}

/// `POST /v1/fabric/migrations/{id}/start`: runs the verified guest; 200 with its status
/// once it runs, 409 when it cannot (then it is stopped here).
async fn start(Extract(inc): Extract<Arc<Incoming>>, UrlPath(id): UrlPath<String>) -> Response {
    // On a task of its own, like the request: a start under way finishes (and its state
    // is recorded) even if the source goes away.
    tokio::spawn(start_guest(inc, id))
        .await
        .unwrap_or_else(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn start_guest(inc: Arc<Incoming>, id: String) -> Response {
    let deadline = tokio::time::Instant::now() + VERIFY_WAIT;
    loop {
        let changed = inc.changed.notified();
        match inc.status_of(&id).map(|s| s.phase) {
            None => return refuse(StatusCode::NOT_FOUND, format!("no migration {id:?} here")),
            Some(Phase::Receiving) => {
                if tokio::time::timeout_at(deadline, changed).await.is_err() {
                    return refuse(
                        StatusCode::CONFLICT,
                        "the stream has not been verified here yet",
                    );
                }
            }
            Some(_) => break,
        }
    }
    if !inc.advance(&id, Some(Phase::Verified), Phase::Starting, None) {
        let s = inc.status_of(&id);
        return refuse(
            StatusCode::CONFLICT,
            format!(
                "migration {id} is {:?}: {}",
                s.as_ref().map(|s| s.phase),
                s.and_then(|s| s.error).unwrap_or_default()
            ),
        );
    }
    let Some((pid, dir)) = inc
        .entries()
        .iter()
        .find(|e| e.status.id == id)
        .map(|e| (e.pid, e.dir.clone()))
    else {
        return refuse(StatusCode::NOT_FOUND, format!("no migration {id:?} here"));
    };
    let qmp = dir.join("qmp.sock");
    let started = tokio::task::spawn_blocking(move || cont(&qmp))
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
    match started {
        Ok(()) => {
            inc.advance(&id, Some(Phase::Starting), Phase::Running, None);
            tracing::info!("incoming migration {id}: the guest runs here (QEMU {pid})");
            Json(inc.status_of(&id)).into_response()
        }
        Err(why) => {
            stop(pid, &dir).await;
            inc.advance(&id, None, Phase::Failed, Some(why.clone()));
            refuse(StatusCode::CONFLICT, format!("starting the guest: {why}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An incoming side running `qemu` (none: refusing), its files under a fresh
    /// directory.
    fn incoming(qemu: Option<&str>, tag: &str) -> (Arc<Incoming>, PathBuf) {
        let dir = std::env::temp_dir().join(format!("mf-inc-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        memfabric_harness::Pki::new("test cluster").write(&dir, &["dst"]);
        let tls = crate::fabric::tls::load_written(&dir, "dst").unwrap();
        let inc = Incoming::new(
            qemu.map(PathBuf::from),
            dir.join("incoming"),
            "127.0.0.1".parse().unwrap(),
            tls.server,
        );
        (inc, dir)
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn body(args: &[&str], uuid: Option<&str>) -> Vec<u8> {
        serde_json::to_vec(&Request {
            name: "vm-1".into(),
            uuid: uuid.map(str::to_owned),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            source: None,
            capabilities: Default::default(),
        })
        .unwrap()
    }

    #[test]
    fn a_host_without_incoming_qemu_refuses_every_request_and_counts_it() {
        let (inc, dir) = incoming(None, "off");
        let r = rt().block_on(request(
            Extract(inc.clone()),
            body(&["-m", "64"], None).into(),
        ));
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(inc.stats.refused.load(Ordering::Relaxed), 1);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn malformed_hostile_and_concurrent_requests_are_refused_before_any_qemu_starts() {
        // A QEMU that would fail loudly if it were ever started.
        let (inc, dir) = incoming(Some("/bin/false"), "bad");
        let rt = rt();
        let refused = |b: &[u8]| {
            rt.block_on(request(Extract(inc.clone()), b.to_vec().into()))
                .status()
        };
        assert_eq!(refused(b"{not json"), StatusCode::BAD_REQUEST);
        assert_eq!(
            refused(br#"{"name":"x","args":[],"extra":1}"#),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            refused(&body(&[], Some("../../etc"))),
            StatusCode::BAD_REQUEST
        );
        let mut long_name = body(&[], None);
        long_name = String::from_utf8(long_name)
            .unwrap()
            .replace("vm-1", &"n".repeat(200))
            .into_bytes();
        assert_eq!(refused(&long_name), StatusCode::BAD_REQUEST);
        for hostile in [
            &["-netdev", "tap,id=n,script=/tmp/x.sh"][..],
            &["-readconfig", "/etc/shadow"],
            &["-chardev", "socket,id=c,path=/x"],
        ] {
            assert_eq!(
                refused(&body(hostile, None)),
                StatusCode::BAD_REQUEST,
                "{hostile:?}"
            );
        }
        let mut channels: serde_json::Value = serde_json::from_slice(&body(&[], None)).unwrap();
        channels["capabilities"] = serde_json::json!({ "multifd": 200 });
        assert_eq!(
            refused(&serde_json::to_vec(&channels).unwrap()),
            StatusCode::BAD_REQUEST
        );
        // One migration at a time.
        let held = inc.busy.clone().try_acquire_owned().unwrap();
        assert_eq!(
            refused(&body(&["-m", "64"], None)),
            StatusCode::SERVICE_UNAVAILABLE
        );
        drop(held);
        assert_eq!(
            inc.stats.refused.load(Ordering::Relaxed),
            9,
            "every refusal counted"
        );
        // Nothing was started, nothing left behind but the (empty) incoming directory.
        let left = std::fs::read_dir(dir.join("incoming"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(left, 0);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn unknown_migrations_are_not_found_and_cannot_be_started() {
        let (inc, dir) = incoming(Some("/bin/false"), "unknown");
        let rt = rt();
        let s = rt.block_on(status(Extract(inc.clone()), UrlPath("nope".into())));
        assert_eq!(s.status(), StatusCode::NOT_FOUND);
        let s = rt.block_on(start(Extract(inc.clone()), UrlPath("nope".into())));
        assert_eq!(s.status(), StatusCode::NOT_FOUND);
        let s = rt.block_on(cancel(Extract(inc.clone()), UrlPath("nope".into())));
        assert_eq!(s.status(), StatusCode::NOT_FOUND);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A cancel fails a migration not started yet (its task, waiting on `cancelled`,
    /// stops its QEMU), answers again the same, and leaves a started one alone.
    #[test]
    fn a_cancel_fails_a_migration_before_its_start_and_never_after() {
        let (inc, dir) = incoming(Some("/bin/false"), "cancel");
        let rt = rt();
        for (id, phase) in [
            ("receiving", Phase::Receiving),
            ("verified", Phase::Verified),
            ("running", Phase::Running),
        ] {
            inc.entries().push_back(Entry {
                status: Status {
                    id: id.into(),
                    vm: "vm".into(),
                    phase,
                    error: None,
                    summary: None,
                },
                dir: dir.join(id),
                pid: u32::MAX,
            });
        }
        for id in ["receiving", "verified"] {
            let waiting = {
                let inc = inc.clone();
                rt.spawn(async move { cancelled(&inc, id).await })
            };
            let r = rt.block_on(cancel(Extract(inc.clone()), UrlPath(id.into())));
            assert_eq!(r.status(), StatusCode::OK, "{id}");
            let s = inc.status_of(id).unwrap();
            assert_eq!(s.phase, Phase::Failed, "{id}");
            assert_eq!(s.error.as_deref(), Some("cancelled by the source"));
            rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(5), waiting)
                    .await
                    .expect("the migration's task sees the cancel")
                    .unwrap()
            });
            let again = rt.block_on(cancel(Extract(inc.clone()), UrlPath(id.into())));
            assert_eq!(again.status(), StatusCode::OK, "{id} again");
        }
        assert_eq!(inc.stats.failed.load(Ordering::Relaxed), 2);
        let r = rt.block_on(cancel(Extract(inc.clone()), UrlPath("running".into())));
        assert_eq!(r.status(), StatusCode::CONFLICT);
        assert_eq!(inc.status_of("running").unwrap().phase, Phase::Running);
        let _ = std::fs::remove_dir_all(dir);
    }
}
