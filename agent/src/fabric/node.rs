//! The fabric at run time: membership and liveness through chitchat (Scuttlebutt gossip,
//! chosen over SWIM/foca because its replicated key-value state carries each host's
//! summary version and capacity for free, and its phi-accrual detector needs no tuning per
//! fleet size), summaries fetched on demand over mutual-TLS HTTPS on the same port (the
//! server's certificate must name the node: a subject alternative name equal to its node
//! name), and the candidates recomputed when a summary changes. The parts: who the peers
//! are ([`super::membership`]), fetching a summary ([`super::client`]), serving this
//! host's ([`super::service`]); here the loop that joins them and what it publishes.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, spawn_chitchat};

use super::{
    candidates::{self, Candidates, LocalVm, PeerHost},
    gossip_auth::{AuthTransport, GossipKey},
    membership::{self, DROP_AFTER, Peer, PeerState, PeerView},
    plan::{self, Plan, PlanHost, PlanVm},
    stats::{FabricStats, Reject},
    summary::{Summary, VM_K, VmSummary, clean_id},
    tls::TlsConfigs,
};
use crate::{config::Fabric as FabricConfig, sketch::Sketch};

/// The longest a summary fetch may take (connect, handshake, transfer).
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A published summary is replaced only when it changed this much (Jaccard of the host
/// sketches below this, a VM set change, capacity or use 5 % off) or after
/// [`REPUBLISH_AFTER`]: every new version makes every peer fetch it, so on a fleet of
/// 1,000 hosts this rate is what the exchange budget is spent on (`bench fabric`).
const REPUBLISH_SIMILARITY: f64 = 0.95;
pub const REPUBLISH_AFTER: Duration = Duration::from_secs(7200);

const KEY_VERSION: &str = "summary_version";
const KEY_CAPACITY: &str = "capacity_bytes";
const KEY_USED: &str = "used_bytes";

/// A local VM for the fabric.
pub struct LocalVmState {
    pub id: String,
    pub bytes: u64,
    /// Its full local sketch.
    pub sketch: Sketch,
}

/// What this host publishes, and keeps for its own candidates.
struct Local {
    vms: Vec<LocalVmState>,
    summary: Summary,
    encoded: Arc<Vec<u8>>,
    published: Instant,
}

#[derive(Default)]
struct Inner {
    local: Option<Local>,
    peers: BTreeMap<String, Peer>,
    candidates: Arc<Candidates>,
    /// Bumped on every change that can move candidates.
    generation: u64,
    computed: u64,
}

/// The running fabric.
pub struct Fabric {
    pub node: String,
    pub stats: Arc<FabricStats>,
    /// The HTTPS server's counters (its failed handshakes are refusals too).
    pub server_stats: Arc<crate::http::Stats>,
    capacity_bytes: u64,
    k: usize,
    inner: Mutex<Inner>,
    chitchat: ChitchatHandle,
    client: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for Fabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fabric").field("node", &self.node).finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    #[error("[fabric] gossip key {path}: {message}")]
    Key { path: String, message: String },
    #[error("[fabric] TLS: {0}")]
    Tls(String),
    #[error("[fabric] listening on {addr}: {message}")]
    Listen { addr: SocketAddr, message: String },
    #[error("[fabric] gossip: {0}")]
    Gossip(String),
}

/// Reads the gossip key: a regular file nobody else can read.
fn read_key(path: &std::path::Path) -> Result<GossipKey, FabricError> {
    use std::os::unix::fs::MetadataExt as _;
    let bad = |message: String| FabricError::Key {
        path: path.display().to_string(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() || meta.len() > 4096 {
        return Err(bad("not a regular file of at most 4 KiB".into()));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(bad(format!(
            "mode {:04o}: others can read the cluster's secret (chmod 600 it)",
            meta.mode() & 0o7777
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    GossipKey::new(&bytes).map_err(bad)
}

impl Fabric {
    /// Starts gossip, the HTTPS listener (the fabric's routes and `routes`, what layers above
    /// serve peers on the same channel) and the fetch loop (on the current runtime), with
    /// the mutual TLS the caller loaded from `cfg`'s files ([`super::tls::load`]).
    /// Every file is checked here: a misconfigured fabric stops the daemon at start.
    pub async fn start(
        cfg: &FabricConfig,
        tls: TlsConfigs,
        shutdown: tokio::sync::watch::Receiver<bool>,
        routes: axum::Router,
    ) -> Result<Arc<Fabric>, FabricError> {
        let key = read_key(&cfg.gossip_key_file)?;
        let TlsConfigs { server, client } = tls;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| FabricError::Listen {
                addr: cfg.listen,
                message: e.to_string(),
            })?;
        let stats = Arc::new(FabricStats::default());
        let generation = crate::util::clock::since_epoch().as_secs();
        let chitchat_cfg = ChitchatConfig {
            chitchat_id: ChitchatId::new(cfg.node.clone(), generation, cfg.advertise),
            cluster_id: cfg.cluster.clone(),
            gossip_interval: cfg.gossip_interval,
            listen_addr: cfg.listen,
            seed_nodes: cfg.peers.clone(),
            failure_detector_config: FailureDetectorConfig {
                initial_interval: cfg.gossip_interval,
                dead_node_grace_period: DROP_AFTER * 2,
                ..FailureDetectorConfig::default()
            },
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
        };
        let capacity = cfg
            .capacity_bytes
            .unwrap_or_else(|| crate::host::ksm::meminfo().0);
        let chitchat = spawn_chitchat(
            chitchat_cfg,
            vec![(KEY_CAPACITY.into(), capacity.to_string())],
            &AuthTransport {
                key,
                stats: stats.clone(),
                advertise: Some(cfg.advertise),
            },
        )
        .await
        .map_err(|e| FabricError::Gossip(format!("{e:#}")))?;
        let fabric = Arc::new(Fabric {
            node: cfg.node.clone(),
            stats,
            server_stats: Arc::default(),
            capacity_bytes: capacity,
            k: cfg.k,
            inner: Mutex::default(),
            chitchat,
            client,
        });
        tracing::info!(
            "fabric: node {} on {} (gossip udp, summaries https), advertised as {}, seeds {:?}",
            cfg.node,
            cfg.listen,
            cfg.advertise,
            cfg.peers
        );
        let app = super::service::router(fabric.clone()).merge(routes);
        let mut stop_http = shutdown.clone();
        tokio::spawn(crate::http::serve(
            listener,
            app,
            crate::http::Limits {
                max_connections: 64,
                ..crate::http::Limits::default()
            },
            Some(server),
            fabric.server_stats.clone(),
            async move {
                let _ = stop_http.wait_for(|s| *s).await;
            },
        ));
        tokio::spawn(fetch_loop(fabric.clone(), cfg.gossip_interval, shutdown));
        Ok(fabric)
    }

    /// The summary this host serves, encoded (none before the first scan pass).
    pub(crate) fn encoded_summary(&self) -> Option<Arc<Vec<u8>>> {
        self.lock().local.as_ref().map(|l| l.encoded.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The local VMs after a scan pass (VMs that may not share are left out by the
    /// caller). Republishes the summary when it changed enough.
    pub fn publish(&self, vms: Vec<LocalVmState>) {
        let used: u64 = vms.iter().map(|v| v.bytes).sum();
        let mut host = Sketch::new(self.k);
        for v in &vms {
            host = host.union(&v.sketch).truncated(self.k);
        }
        let summary = Summary {
            host: self.node.clone(),
            capacity_bytes: self.capacity_bytes,
            used_bytes: used,
            sketch: host,
            vms: vms
                .iter()
                .map(|v| VmSummary {
                    id: clean_id(&v.id),
                    bytes: v.bytes,
                    sketch: v.sketch.truncated(VM_K),
                })
                .collect(),
        };
        let mut inner = self.lock();
        let changed = match &inner.local {
            None => true,
            Some(old) => {
                let ids = |s: &Summary| s.vms.iter().map(|v| v.id.clone()).collect::<Vec<_>>();
                let off = |a: u64, b: u64| a.abs_diff(b) as f64 > 0.05 * a.max(b) as f64;
                ids(&old.summary) != ids(&summary)
                    || old.summary.sketch.jaccard(&summary.sketch) < REPUBLISH_SIMILARITY
                    || off(old.summary.used_bytes, summary.used_bytes)
                    || old.published.elapsed() >= REPUBLISH_AFTER
            }
        };
        inner.generation += 1;
        if !changed {
            // Local candidates still use the newest sketches.
            if let Some(l) = &mut inner.local {
                l.vms = vms;
            }
            return;
        }
        let encoded = summary.encode();
        let version = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&encoded));
        inner.local = Some(Local {
            vms,
            summary,
            encoded: Arc::new(encoded),
            published: Instant::now(),
        });
        drop(inner);
        let chitchat = self.chitchat.chitchat();
        let mut c = chitchat.blocking_lock();
        let me = c.self_node_state();
        me.set(KEY_VERSION, version);
        me.set(KEY_USED, used.to_string());
    }

    /// The peers as they stand.
    pub fn peers(&self) -> Vec<PeerView> {
        self.lock()
            .peers
            .iter()
            .map(|(node, p)| PeerView {
                node: node.clone(),
                addr: p.addr.to_string(),
                state: p.state(),
                summary_version: p.fetched.clone(),
                capacity_bytes: p.summary.as_ref().map(|s| s.capacity_bytes),
                used_bytes: p.summary.as_ref().map(|s| s.used_bytes),
                vms: p.summary.as_ref().map(|s| s.vms.len()),
                failures: p.failures,
                last_error: p.last_error.clone(),
            })
            .collect()
    }

    /// Peers per state.
    pub fn peer_counts(&self) -> [(PeerState, usize); 3] {
        let inner = self.lock();
        PeerState::ALL.map(|s| (s, inner.peers.values().filter(|p| p.state() == s).count()))
    }

    /// Recomputed first if a peer changed since (a peer /v1/peers already shows stale must
    /// not be served as a candidate until the fetch loop's next round).
    pub fn candidates(&self) -> Arc<Candidates> {
        self.recompute();
        self.lock().candidates.clone()
    }

    /// The consolidation plan over this host and every live peer.
    pub fn plan(&self) -> Plan {
        let inner = self.lock();
        let mut hosts = Vec::new();
        let mut vms = Vec::new();
        let mut add = |s: &Summary| {
            hosts.push(PlanHost {
                id: s.host.clone(),
                capacity_bytes: s.capacity_bytes,
            });
            vms.extend(s.vms.iter().map(|v| PlanVm {
                id: v.id.clone(),
                host: s.host.clone(),
                bytes: v.bytes,
                sketch: v.sketch.clone(),
            }));
        };
        if let Some(l) = &inner.local {
            add(&l.summary);
        }
        for p in inner
            .peers
            .values()
            .filter(|p| p.state() == PeerState::Live)
        {
            if let Some(s) = &p.summary {
                add(s);
            }
        }
        drop(inner);
        plan::plan(&hosts, &vms)
    }

    /// Recomputes the candidates if anything changed since the last time.
    fn recompute(&self) {
        let inner = self.lock();
        if inner.computed == inner.generation {
            return;
        }
        let generation = inner.generation;
        let Some(local) = &inner.local else {
            return;
        };
        let vms: Vec<LocalVm> = local
            .vms
            .iter()
            .map(|v| LocalVm {
                id: &v.id,
                sketch: &v.sketch,
            })
            .collect();
        let hosts: Vec<PeerHost> = inner
            .peers
            .iter()
            .filter(|(_, p)| p.state() == PeerState::Live)
            .filter_map(|(n, p)| {
                p.summary.as_ref().map(|s| PeerHost {
                    id: n,
                    sketch: &s.sketch,
                })
            })
            .collect();
        let c = Arc::new(candidates::compute(&vms, &hosts));
        drop(vms);
        drop(hosts);
        drop(inner);
        let mut inner = self.lock();
        // Two readers may compute at once: the later state wins.
        if generation > inner.computed {
            inner.candidates = c;
            inner.computed = generation;
        }
    }

    /// Brings the peer table up to date with gossip.
    async fn sync_membership(&self) {
        let chitchat = self.chitchat.chitchat();
        let c = chitchat.lock().await;
        let me = c.self_chitchat_id().clone();
        let live: Vec<(ChitchatId, Option<String>)> = c
            .live_nodes()
            .filter(|id| **id != me)
            .map(|id| {
                let v = c
                    .node_state(id)
                    .and_then(|s| s.get(KEY_VERSION))
                    .map(str::to_owned);
                (id.clone(), v)
            })
            .collect();
        drop(c);
        let live = live
            .into_iter()
            .map(|(id, v)| (id.node_id.to_string(), id.gossip_advertise_addr, v))
            .collect();
        let mut inner = self.lock();
        if membership::sync(&mut inner.peers, live, Instant::now(), &self.stats) {
            inner.generation += 1;
        }
    }

    /// Peers whose announced summary is newer than the one held, due for a try.
    fn due(&self) -> Vec<(String, SocketAddr)> {
        let now = Instant::now();
        self.lock()
            .peers
            .iter()
            .filter(|(_, p)| {
                p.gossiping
                    && !p.announced.is_empty()
                    && p.fetched.as_deref() != Some(p.announced.as_str())
                    && p.next_try <= now
            })
            .map(|(n, p)| (n.clone(), p.addr))
            .collect()
    }

    async fn fetch_one(&self, node: &str, addr: SocketAddr) {
        let result = tokio::time::timeout(FETCH_TIMEOUT, self.fetch(node, addr))
            .await
            .unwrap_or_else(|_| Err((Some(Reject::Timeout), "timed out".into())));
        let mut inner = self.lock();
        let Some(p) = inner.peers.get_mut(node) else {
            return;
        };
        match result {
            Ok(s) => {
                p.fetched = Some(p.announced.clone());
                p.summary = Some(Arc::new(s));
                p.failures = 0;
                p.last_error = None;
            }
            Err((reason, message)) => {
                if let Some(r) = reason {
                    self.stats.reject(r);
                }
                tracing::debug!("fabric: summary of {node} ({addr}): {message}");
                p.failures = p.failures.saturating_add(1);
                // Exponential back-off, 1 s to 64 s.
                p.next_try =
                    Instant::now() + Duration::from_secs(1 << p.failures.min(6).saturating_sub(1));
                p.last_error = Some(message);
            }
        }
        inner.generation += 1;
    }

    /// One summary over mutual TLS (see [`super::client`]); the caller bounds the time.
    async fn fetch(
        &self,
        node: &str,
        addr: SocketAddr,
    ) -> Result<Summary, super::client::FetchError> {
        super::client::summary(&self.client, &self.stats, node, addr).await
    }
}

/// Membership, fetches and candidates, once per gossip interval, until shutdown.
async fn fetch_loop(
    fabric: Arc<Fabric>,
    every: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => break,
        }
        fabric.sync_membership().await;
        // A few at a time: a fleet's worth of new versions must not open a thousand
        // connections at once.
        for chunk in fabric.due().chunks(4) {
            let mut set = tokio::task::JoinSet::new();
            for (node, addr) in chunk.iter().cloned() {
                let f = fabric.clone();
                set.spawn(async move { f.fetch_one(&node, addr).await });
            }
            set.join_all().await;
        }
        let f = fabric.clone();
        let _ = tokio::task::spawn_blocking(move || f.recompute()).await;
    }
    let _ = fabric.chitchat.initiate_shutdown();
}
