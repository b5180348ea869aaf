//! `memfabric run`: finds the VMs, tracks them with the probes, and keeps the shared
//! [`HostState`] fresh for the HTTP endpoints, until SIGINT/SIGTERM. The probes detach when
//! it returns; the daemon changes no KSM setting, so there is nothing else to restore.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
    time::Instant,
};

use tokio::net::TcpListener;

use crate::{
    config::Config,
    inventory::{self, Scanner, Selector, Vm},
    ksm_host::{self, KsmHost, KsmStat},
    model::{HostState, ProbeSummary, Ranking, VmProbeCounters, VmState},
    probes::{LoadOptions, ProbeError, ProbeEvent, Probes},
    scan::RANGE_BYTES,
    telemetry,
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Probes(#[from] ProbeError),
    #[error("cannot listen on {addr}: {source}{hint}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("no process with PID {0} (given with --pid)")]
    UnknownPid(u32),
    #[error("HTTP server: {0}")]
    Serve(std::io::Error),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
}

/// The refresh side of the daemon.
pub struct Daemon {
    probes: Probes,
    scanner: Scanner,
    ksmd: Option<u32>,
    vms: BTreeMap<u32, Vm>,
    previous: HashMap<u32, (Instant, VmProbeCounters)>,
    exited: BTreeMap<u32, VmProbeCounters>,
    scan: Option<crate::scan_worker::ScanWorker>,
    ranking: Ranking,
    state: telemetry::Shared,
}

impl Daemon {
    pub fn new(cfg: &Config) -> Result<Daemon, DaemonError> {
        for &pid in &cfg.pids {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                return Err(DaemonError::UnknownPid(pid));
            }
        }
        let probes = Probes::load(&LoadOptions::default())?;
        for s in probes.status().iter().filter(|s| !s.attached()) {
            tracing::warn!(
                "running without {} ({}): {:?}",
                s.tracepoint,
                s.signal,
                s.state
            );
        }
        Ok(Daemon {
            probes,
            scanner: Scanner::new(Selector {
                pids: cfg.pids.clone(),
                patterns: cfg.matches.clone(),
            }),
            ksmd: ksm_host::ksmd_pid(),
            vms: BTreeMap::new(),
            previous: HashMap::new(),
            exited: BTreeMap::new(),
            scan: (cfg.scan_cpu > 0.0).then(|| crate::scan_worker::ScanWorker::start(cfg.scan_cpu)),
            ranking: Ranking::default(),
            state: Arc::new(RwLock::new(HostState::default())),
        })
    }

    pub fn shared(&self) -> telemetry::Shared {
        self.state.clone()
    }

    /// One refresh: follow VMs that appeared or left, read counters, publish the state.
    pub fn refresh(&mut self) -> Result<(), DaemonError> {
        for ev in self.probes.drain_events() {
            let ProbeEvent::Exit { tgid, stats } = ev;
            self.exited.insert(tgid, stats.into());
        }
        let found = self.scanner.scan();
        // Gone: exited, or no longer matching.
        let gone: Vec<u32> = self
            .vms
            .keys()
            .filter(|p| !found.contains_key(p))
            .copied()
            .collect();
        for pid in gone {
            let vm = self.vms.remove(&pid);
            let _ = self.probes.untrack(pid);
            self.previous.remove(&pid);
            self.exited.remove(&pid);
            if let Some(vm) = vm {
                tracing::info!("VM {} (pid {pid}) is gone", vm.name);
            }
        }
        for (pid, kind) in found {
            if !self.vms.contains_key(&pid) {
                // Described once: reading smaps is the costly part of discovery.
                let Some(vm) = inventory::describe(pid, kind) else {
                    continue; // exited meanwhile
                };
                match self.probes.track(pid) {
                    Ok(()) => tracing::info!(
                        "tracking VM {} (pid {pid}, {}, {} MiB, {:?})",
                        vm.name,
                        vm.kind.as_str(),
                        vm.guest_memory_bytes >> 20,
                        vm.mergeability
                    ),
                    // It exited between discovery and tracking: next refresh drops it.
                    Err(ProbeError::UnknownPid(_)) => continue,
                    Err(e) => return Err(e.into()),
                }
                self.vms.insert(pid, vm);
            }
        }
        self.probes.refresh_mm_learning()?;
        let scan = self.scan.as_ref().map(|w| {
            w.set_targets(self.vms.keys().copied().collect());
            w.status()
        });
        let report = scan.as_ref().and_then(|s| s.report.clone());
        if let Some(r) = &report {
            let probes = &self.probes;
            self.ranking.update(r, || probes.heat_by_range(RANGE_BYTES));
        }
        let scan_counts = |pid: u32| report.as_ref().and_then(|r| r.per_pid.get(&pid).copied());

        let now = Instant::now();
        let mut vms = Vec::new();
        for (pid, vm) in &self.vms {
            let probes: Option<VmProbeCounters> = self.probes.stats(*pid)?.map(Into::into);
            let (wf, cb) = match (probes, self.previous.get(pid)) {
                (Some(p), Some((t, prev))) => {
                    let dt = now.duration_since(*t).as_secs_f64().max(1e-3);
                    (
                        (p.write_faults.saturating_sub(prev.write_faults)) as f64 / dt,
                        (p.cow_breaks.saturating_sub(prev.cow_breaks)) as f64 / dt,
                    )
                }
                _ => (0.0, 0.0),
            };
            if let Some(p) = probes {
                self.previous.insert(*pid, (now, p));
            }
            vms.push(VmState {
                vm: vm.clone(),
                ksm: KsmStat::read(*pid),
                scan: scan_counts(*pid),
                range_classes: self.ranking.ranked.class_counts(*pid),
                scan_pass_seconds: scan
                    .as_ref()
                    .and_then(|s| s.vm_pass_seconds.get(pid).copied()),
                probes,
                write_faults_per_sec: wf,
                cow_breaks_per_sec: cb,
            });
        }
        let counters = self.probes.counters()?;
        let state = HostState {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            taken_at_unix_ms: telemetry::timestamp(),
            ksm: KsmHost::read_with(self.ksmd),
            vms,
            probes: ProbeSummary {
                attached: self
                    .probes
                    .status()
                    .iter()
                    .filter(|s| s.attached())
                    .map(|s| s.tracepoint.clone())
                    .collect(),
                missing: self
                    .probes
                    .status()
                    .iter()
                    .filter(|s| !s.attached())
                    .map(|s| s.tracepoint.clone())
                    .collect(),
                events_dropped: counters.events_dropped,
            },
            scan_pass_seconds: scan.as_ref().map_or(0.0, |s| s.pass_seconds),
            scan_bytes_total: scan.as_ref().map_or(0, |s| s.bytes_read),
            ranges: self.ranking.ranked.clone(),
        };
        if let Ok(mut s) = self.state.write() {
            *s = state;
        }
        Ok(())
    }
}

/// Binds the listener (a clear error when the port is taken).
pub async fn bind(cfg: &Config) -> Result<TcpListener, DaemonError> {
    TcpListener::bind(cfg.listen).await.map_err(|source| {
        let hint = match source.kind() {
            std::io::ErrorKind::AddrInUse => {
                " (the port is taken: is another memfabric running? choose another with --listen)"
            }
            std::io::ErrorKind::PermissionDenied => " (permission denied)",
            _ => "",
        };
        DaemonError::Listen {
            addr: cfg.listen,
            source,
            hint,
        }
    })
}

/// Runs until SIGINT or SIGTERM.
pub async fn run(cfg: Config) -> Result<(), DaemonError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
    let stop = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    };
    serve(cfg, stop).await
}

/// Runs until `stop` completes (tests stop it themselves).
pub async fn serve(
    cfg: Config,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    let mut daemon = Daemon::new(&cfg)?;
    let listener = bind(&cfg).await?;
    daemon.refresh()?;
    let app = telemetry::router(
        daemon.shared(),
        cfg.refresh * 3 + std::time::Duration::from_secs(5),
    );
    tracing::info!(
        "serving /metrics, /healthz, /v1/status on http://{}",
        cfg.listen
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });
    let mut tick = tokio::time::interval(cfg.refresh);
    tokio::pin!(stop);
    let result = loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = daemon.refresh() {
                    break Err(e);
                }
            }
            _ = &mut stop => break Ok(()),
        }
    };
    let _ = stop_tx.send(());
    match server.await {
        Ok(Err(e)) => tracing::warn!("HTTP server: {e}"),
        Err(e) => tracing::warn!("HTTP server task: {e}"),
        Ok(Ok(())) => {}
    }
    drop(daemon); // detaches the probes
    tracing::info!("probes detached; bye");
    result
}
