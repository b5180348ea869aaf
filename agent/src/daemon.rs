//! `memfabric run`: finds the VMs, tracks them with the probes, and keeps the shared
//! [`StatusV1`] fresh for the HTTP endpoints, until SIGINT/SIGTERM. Each refresh runs
//! observe -> decide -> act on its own thread (a slow /proc or sysfs never stalls
//! `/metrics`): the ksmd controller decides every tick, and with `--act ksmd` its settings
//! are applied. On the way out ksmd's settings are put back and the probes detach; after a
//! crash the next start puts the settings back from the journal.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock, mpsc},
    time::Instant,
};

use tokio::net::TcpListener;

use crate::{
    actuate::{ActuateError, KsmControl},
    config::{Act, Config, Listen},
    control::{Decided, ksmd::Steering},
    host::inventory::{self, Scanner, Selector, Vm},
    host::ksm::{self, KsmHost, KsmStat},
    host::redescribe::Described,
    model::{Ranking, VmProbeCounters, VmState},
    policy::KsmdPolicy,
    probes::{LoadOptions, ProbeError, ProbeEvent, Probes},
    scan::RANGE_BYTES,
    telemetry,
    wire::{ProbeSummary, StatusV1},
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Probes(#[from] ProbeError),
    #[error("cannot listen on {addr}: {source}{hint}")]
    Listen {
        addr: String,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("no process with PID {0} (given with --pid)")]
    UnknownPid(u32),
    #[error("PID {0} (given with --pid) is a kernel thread: it has no user memory to track")]
    KernelThread(u32),
    #[error("HTTP server: {0}")]
    Serve(std::io::Error),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    Actuate(#[from] ActuateError),
    #[error("the refresh thread died: {0}")]
    Refresh(String),
    #[error("config [web]: {0}")]
    Web(String),
    #[error(transparent)]
    Fabric(#[from] crate::fabric::node::FabricError),
}

/// What one tick observed.
struct Observed {
    scan: Option<crate::scan::worker::ScanStatus>,
    /// The scanner's latest pass.
    report: Option<Arc<crate::scan::Report>>,
    counters: crate::probes::GlobalCounters,
    ksm: KsmHost,
    mem_total_bytes: u64,
    mem_available_bytes: u64,
}

/// The refresh side of the daemon.
pub struct Daemon {
    probes: Probes,
    scanner: Scanner,
    ksmd: Option<u32>,
    vms: BTreeMap<u32, Vm>,
    /// Each VM's process start time and last description: a PID reused by a new process
    /// is a new VM, and a VM is described again when its RAM appears after it starts or
    /// its mappings move (merging turned on and off).
    described: HashMap<u32, Described>,
    refreshes: u32,
    /// Guest activity from the probes' counters, tick to tick.
    activity: crate::control::activity::Activity,
    /// Which VMs the scanner should read at its full budget again.
    scan_wakes: crate::control::scan_wakes::ScanWakes,
    exited: BTreeMap<u32, VmProbeCounters>,
    scan: Option<crate::scan::worker::ScanWorker>,
    ranking: Ranking,
    state: telemetry::Shared,
    /// The merge hints (recommended, or applied with `--act hints`) and the ksmd
    /// controller (absent when the host has no KSM).
    controllers: crate::control::Controllers,
    /// Mergeable VMs that appeared since the start.
    vms_arrived: u64,
    started: Instant,
    /// VMs the probes could not track (a full map).
    track_failures: u64,
    /// Pages found already merged when their process was tracked, remembered for the probes.
    merged_pages_seeded: u64,
    /// /proc reads that failed for another reason than a process's exit.
    proc_errors: u64,
    /// Peers on other hosts (`[fabric]`), told of the local VMs after each scan pass.
    fabric: Option<Arc<crate::fabric::node::Fabric>>,
    /// The scan pass and the count of VM arrivals and departures ([`Daemon::vm_changes`])
    /// last published to the fabric.
    fabric_published: Option<(u32, u64)>,
    domains: Vec<crate::config::Domain>,
    /// VMs that arrived or left since the start (see [`crate::control::pace`]).
    vm_changes: u64,
    /// Hints applied at the last tick.
    hints_applied: u64,
    /// The wait before the next tick.
    pace: crate::control::pace::TickPace,
    refresh: std::time::Duration,
}

impl Daemon {
    /// `control`: ksmd's knobs when steering (`--act ksmd`), taken before the probes load.
    pub fn new(cfg: &Config, controls: Controls) -> Result<Daemon, DaemonError> {
        let Controls {
            ksm: control,
            hints,
        } = controls;
        let mut pid_starts = HashMap::new();
        for &pid in &cfg.pids {
            let Some(t) = inventory::start_time(pid) else {
                return Err(DaemonError::UnknownPid(pid));
            };
            if inventory::is_kernel_thread(pid) {
                return Err(DaemonError::KernelThread(pid));
            }
            pid_starts.insert(pid, t);
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
                pid_starts,
                patterns: cfg.matches.clone(),
                untrusted_vmm_executables: cfg.untrusted_vmm_executables,
                vmm_uids: cfg.vmm_uids.clone(),
            }),
            ksmd: ksm::ksmd_pid(),
            vms: BTreeMap::new(),
            described: HashMap::new(),
            refreshes: 0,
            activity: Default::default(),
            scan_wakes: Default::default(),
            exited: BTreeMap::new(),
            scan: (cfg.scan_cpu > 0.0).then(|| {
                crate::scan::worker::ScanWorker::start(
                    cfg.scan_cpu,
                    cfg.scan_quiet_cpu,
                    cfg.fabric.is_some(),
                )
            }),
            ranking: Ranking::default(),
            state: Arc::new(RwLock::new(StatusV1::default())),
            controllers: crate::control::Controllers {
                hints: {
                    let mut h = crate::control::hints::Hinting::new(hints, cfg.domains.clone());
                    h.expose_addresses(cfg.expose_addresses);
                    h
                },
                ksmd: crate::actuate::knobs::available().then(|| {
                    Steering::new(
                        KsmdPolicy {
                            ksmd_cpu: cfg.ksmd_cpu,
                            ..KsmdPolicy::default()
                        },
                        control,
                    )
                }),
            },
            vms_arrived: 0,
            started: Instant::now(),
            track_failures: 0,
            merged_pages_seeded: 0,
            proc_errors: 0,
            fabric: None,
            fabric_published: None,
            domains: cfg.domains.clone(),
            vm_changes: 0,
            hints_applied: 0,
            pace: crate::control::pace::TickPace::default(),
            refresh: cfg.refresh,
        })
    }

    /// Tells the fabric the local VMs after a new scan pass, or when VMs came or went
    /// (a VM that exited must not stay in the summary until the next pass, which on a quiet
    /// host may be an hour away): keyed by UUID, else name, one entry per key (an incoming
    /// migration's QEMU has its source's UUID: the larger one stands for the VM); VMs of a
    /// domain that must not share are left out (their page hashes leave no host), and so
    /// are guests whose operator turned merging off (they share with nothing, here or
    /// elsewhere).
    fn publish_to_fabric(&mut self, report: &crate::scan::Report) {
        let (Some(fabric), Some(sketches)) = (&self.fabric, &report.sketches) else {
            return;
        };
        let published = (report.passes, self.vm_changes);
        if self.fabric_published == Some(published) {
            return;
        }
        self.fabric_published = Some(published);
        let vms: Vec<_> = self
            .vms
            .iter()
            .filter(|(_, vm)| {
                !vm.merge_off
                    && crate::config::may_share(&self.domains, &vm.name, vm.uuid.as_deref())
                        != Some(false)
            })
            .filter_map(|(pid, vm)| {
                let sketch = sketches.per_pid.get(pid)?.clone();
                let bytes = report.per_pid.get(pid)?.pages_present * crate::scan::PAGE as u64;
                Some(crate::fabric::node::LocalVmState {
                    id: vm.uuid.clone().unwrap_or_else(|| vm.name.clone()),
                    bytes,
                    sketch,
                })
            })
            .collect();
        fabric.publish(one_per_id(vms));
    }

    /// Tells the probes which pages of a newly tracked process KSM merged before memfabric
    /// was watching (a restarted daemon on a host whose VMs are merged), so writes to them
    /// count as COW breaks. Costs one pagemap walk, only for a process that has merged pages.
    fn seed_merged(&mut self, pid: u32) {
        let expected = usize::try_from(KsmStat::read(pid).merging_pages).unwrap_or(0);
        if expected == 0 {
            return;
        }
        let t = Instant::now();
        match crate::host::merged::find(pid, expected, Probes::SEED_LIMIT)
            .map_err(|e| e.to_string())
            .and_then(|pages| {
                self.probes
                    .seed_merged(pid, &pages)
                    .map_err(|e| e.to_string())
            }) {
            Ok(n) => {
                self.merged_pages_seeded += n as u64;
                tracing::info!(
                    "pid {pid}: {n} of its {expected} merged pages remembered for COW-break                      counting ({:.0} ms)",
                    t.elapsed().as_secs_f64() * 1e3
                );
            }
            Err(e) => tracing::warn!("pid {pid}: finding its merged pages: {e}"),
        }
    }

    pub fn shared(&self) -> telemetry::Shared {
        self.state.clone()
    }

    /// One tick of the loop (see [`crate::control`]): observe, model, decide and act,
    /// publish. Returns the wait before the next one ([`crate::control::pace`]).
    pub fn tick(&mut self) -> Result<std::time::Duration, DaemonError> {
        let (vm_changes, passes) = (self.vm_changes, self.ranking.ranked.passes);
        // Observe: the VMs, the scanner, the probes, KSM.
        let seen = self.observe()?;
        // Model: a new scan pass ranked, each VM with its rates.
        let vms = self.model(&seen)?;
        // Decide and act: the hints, then ksmd.
        let context = self.ksmd_context(&seen);
        let decided =
            self.controllers
                .tick(&self.vms, &self.ranking.ranked, &vms, &seen.ksm, context);
        // The scan's own pace: VMs that may have changed are read at the full budget.
        if let Some(w) = &self.scan {
            w.wake(&self.scan_wakes.tick(&self.ranking.ranked, &vms));
        }
        let pace = crate::control::pace::Seen {
            vms_changed: self.vm_changes != vm_changes,
            scan_busy: self.ranking.ranked.passes != passes
                || seen.scan.as_ref().is_some_and(|s| s.busy_vms > 0),
            cow_breaks: vms.iter().any(|v| v.cow_breaks_per_sec > 0.0),
            ksmd_active: decided
                .ksmd
                .as_ref()
                .is_some_and(|k| k.decision.reason != crate::policy::Reason::Quiet),
            hints_acted: decided.hints.applied_total != self.hints_applied,
        };
        self.hints_applied = decided.hints.applied_total;
        // Publish: to the endpoints, and a new pass's summaries to the fabric.
        if let Some(r) = &seen.report {
            self.publish_to_fabric(r);
        }
        let state = self.host_state(seen, vms, decided);
        if let Ok(mut s) = self.state.write() {
            *s = state;
        }
        Ok(self.pace.next(pace, self.refresh))
    }

    /// Observe: follows the VM processes of the host (probes, scanner), and reads the
    /// scanner's status, the probes' counters, KSM and the host's memory.
    fn observe(&mut self) -> Result<Observed, DaemonError> {
        let found = self.list_vms();
        self.follow_vms(&found);
        self.probes.refresh_mm_learning()?;
        let scan = self.scan.as_ref().map(|w| {
            w.set_targets(self.vms.keys().copied().collect());
            w.status()
        });
        let report = scan.as_ref().and_then(|s| s.report.clone());
        let (mem_total_bytes, mem_available_bytes) = ksm::meminfo();
        Ok(Observed {
            counters: self.probes.counters()?,
            ksm: KsmHost::read_with(self.ksmd),
            scan,
            report,
            mem_total_bytes,
            mem_available_bytes,
        })
    }

    /// Model: ranks a new scan pass (with the probes' heat since the last one) and joins
    /// each VM's KSM figures, scan counts and probe rates.
    fn model(&mut self, seen: &Observed) -> Result<Vec<VmState>, DaemonError> {
        if let Some(r) = &seen.report {
            let probes = &self.probes;
            self.ranking.update(r, || probes.heat_by_range(RANGE_BYTES));
        }
        self.vm_states(seen.report.as_deref(), seen.scan.as_ref())
    }

    /// What the ksmd controller needs beyond the VMs' states.
    fn ksmd_context(&self, seen: &Observed) -> crate::control::ksmd_input::Context {
        crate::control::ksmd_input::Context {
            t: self.started.elapsed().as_secs_f64(),
            ksm_enters: seen.counters.ksm_enters,
            vms_arrived: self.vms_arrived,
            guest_writes: self.activity.guest_writes(),
            potential_savings_bytes: seen
                .report
                .as_ref()
                .map(|r| r.total.potential_savings_bytes),
            mem_total_bytes: seen.mem_total_bytes,
            mem_available_bytes: seen.mem_available_bytes,
            hints_settling: false,
        }
    }

    /// The state the endpoints serve, from one tick's parts and the daemon's counters.
    fn host_state(&self, seen: Observed, vms: Vec<VmState>, decided: Decided) -> StatusV1 {
        let Observed {
            ksm,
            scan,
            counters,
            ..
        } = seen;
        let Decided { hints, ksmd } = decided;
        StatusV1 {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            taken_at_unix_ms: crate::util::clock::unix_ms(),
            ksm,
            ksmd,
            agent_cpu_seconds: ksm::cpu_seconds(std::process::id()).unwrap_or(0.0),
            track_failures: self.track_failures,
            scan_failed: scan.as_ref().and_then(|s| s.failed.clone()),
            untrusted_vmm_processes: self.scanner.untrusted() as u64,
            proc_read_errors: self.proc_errors,
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
                ksm_pages_insert_failed: counters.ksm_pages_insert_failed,
                heat_insert_failed: counters.heat_insert_failed,
                ksm_merges_untracked: counters.ksm_merges_untracked,
                ksm_merges_unowned: counters.ksm_merges_unowned,
                ksm_pages_stale: counters.ksm_pages_stale,
                merged_pages_seeded: self.merged_pages_seeded,
                kvm_cow_breaks: counters.kvm_cow_breaks,
                mm_owner_insert_failed: counters.mm_owner_insert_failed,
                probe_errors: counters.probe_errors,
            },
            scan_pass_seconds: scan.as_ref().map_or(0.0, |s| s.pass_seconds),
            scan_bytes_total: scan.as_ref().map_or(0, |s| s.bytes_read),
            scan_pages: scan.as_ref().map_or_else(Default::default, |s| s.pages),
            scan_rechecked_ranges: scan.as_ref().map_or(0, |s| s.rechecked_ranges),
            scan_busy_vms: scan.as_ref().map_or(0, |s| s.busy_vms as u64),
            scan_quiet_vms: scan.as_ref().map_or(0, |s| s.quiet_vms as u64),
            ranges: self.ranking.ranked.clone(),
            hints: Some(hints),
        }
    }

    /// The VM processes of the host now; when /proc does not answer (out of descriptors?),
    /// the VMs as they were.
    fn list_vms(&mut self) -> inventory::Found {
        for ev in self.probes.drain_events() {
            let ProbeEvent::Exit { tgid, stats } = ev;
            self.exited.insert(tgid, stats.into());
        }
        let found = match self.scanner.scan() {
            Ok(f) => f,
            Err(e) => {
                self.proc_errors += 1;
                tracing::warn!("listing /proc: {e}; keeping the VMs as they were");
                inventory::Found {
                    unknown: self.vms.keys().copied().collect(),
                    ..Default::default()
                }
            }
        };
        self.proc_errors += found.unknown.len() as u64;
        self.refreshes = self.refreshes.wrapping_add(1);
        found
    }

    /// VMs that left are dropped (and untracked), new ones described and tracked, known
    /// ones described again now and then.
    fn follow_vms(&mut self, found: &inventory::Found) {
        // Gone: exited, or no longer matching, or its PID now belongs to another process.
        // A VM whose /proc could not be read stays.
        let gone: Vec<u32> = self
            .vms
            .keys()
            .filter(|p| {
                if found.unknown.contains(p) {
                    return false;
                }
                let reused = || {
                    let then = self.described.get(p).and_then(|d| d.start_time);
                    then.is_some()
                        && inventory::start_time(**p).is_some_and(|now| Some(now) != then)
                };
                !found.vms.contains_key(p) || reused()
            })
            .copied()
            .collect();
        for pid in gone {
            self.vm_changes += 1;
            let vm = self.vms.remove(&pid);
            self.controllers.hints.gone(pid);
            self.described.remove(&pid);
            let _ = self.probes.untrack(pid);
            self.activity.forget(pid);
            self.exited.remove(&pid);
            if let Some(vm) = vm {
                tracing::info!("VM {} (pid {pid}) is gone", vm.name);
            }
        }
        for (&pid, &kind) in &found.vms {
            // Described again: while its RAM is not mapped yet (a VMM seen at its start),
            // and when its mappings moved (merging turned on or off).
            // The fingerprint is taken before describing, so that a move meanwhile shows
            // at the next check; the one the check read serves when it found the move.
            let mut checked = None;
            if let Some(old) = self.vms.get(&pid)
                && let Some(d) = self.described.get_mut(&pid)
                && d.due(
                    self.refreshes,
                    old.mergeability == inventory::Mergeability::Unknown,
                    || *checked.insert(inventory::layout_fingerprint(pid, &old.ram_spans())),
                )
            {
                let old_ram = old.ram_spans();
                let mut layout =
                    checked.unwrap_or_else(|| inventory::layout_fingerprint(pid, &old_ram));
                if let Some(vm) = inventory::describe(pid, kind) {
                    let ram = vm.ram_spans();
                    if ram != old_ram {
                        layout = inventory::layout_fingerprint(pid, &ram);
                    }
                    if vm.mergeability != old.mergeability {
                        tracing::info!(
                            "VM {} (pid {pid}): {:?} -> {:?}",
                            vm.name,
                            old.mergeability,
                            vm.mergeability
                        );
                        if vm.mergeability == inventory::Mergeability::Mergeable {
                            self.vms_arrived += 1;
                        }
                    }
                    self.vms.insert(pid, vm);
                }
                d.renewed(self.refreshes, layout);
            }
            if !self.vms.contains_key(&pid) {
                // Described once: reading smaps is the costly part of discovery.
                let Some(vm) = inventory::describe(pid, kind) else {
                    continue; // exited meanwhile
                };
                match self.probes.track_deferred(pid) {
                    Ok(()) => {
                        tracing::info!(
                            "tracking VM {} (pid {pid}, {}, {} MiB, {:?})",
                            vm.name,
                            vm.kind.as_str(),
                            vm.guest_memory_bytes >> 20,
                            vm.mergeability
                        );
                        self.seed_merged(pid);
                    }
                    // It exited between discovery and tracking: next refresh drops it.
                    Err(ProbeError::UnknownPid(_)) => continue,
                    // A full map (thousands of VMs) is this VM's problem, not the daemon's:
                    // it is monitored from /proc without the probes' counters.
                    Err(e) => {
                        self.track_failures += 1;
                        if self.track_failures == 1 {
                            tracing::warn!(
                                "cannot track VM {} (pid {pid}) with the probes: {e}; it is \
                                 monitored without them (further failures are counted in \
                                 memfabric_vm_track_failures_total)",
                                vm.name
                            );
                        }
                    }
                }
                if vm.mergeability == inventory::Mergeability::Mergeable {
                    self.vms_arrived += 1;
                }
                self.vm_changes += 1;
                let layout = inventory::layout_fingerprint(pid, &vm.ram_spans());
                self.described.insert(
                    pid,
                    Described::new(inventory::start_time(pid), self.refreshes, layout),
                );
                self.vms.insert(pid, vm);
            }
        }
    }

    /// Each VM's state this tick: its KSM figures, scan counts, range classes and probe
    /// rates.
    fn vm_states(
        &mut self,
        report: Option<&crate::scan::Report>,
        scan: Option<&crate::scan::worker::ScanStatus>,
    ) -> Result<Vec<VmState>, DaemonError> {
        let t = self.started.elapsed().as_secs_f64();
        let mut vms = Vec::new();
        for (pid, vm) in &self.vms {
            let probes: Option<VmProbeCounters> = self.probes.stats(*pid)?.map(Into::into);
            let rates = self.activity.update(*pid, t, probes);
            vms.push(VmState {
                vm: vm.clone(),
                ksm: KsmStat::read(*pid),
                scan: report.and_then(|r| r.per_pid.get(pid).copied()),
                range_classes: self.ranking.ranked.class_counts(*pid),
                scan_pass_seconds: scan.and_then(|s| s.vm_pass_seconds.get(pid).copied()),
                probes,
                write_faults_per_sec: rates.write_faults_per_sec,
                cow_breaks_per_sec: rates.cow_breaks_per_sec,
            });
        }
        Ok(vms)
    }
}

/// A bound listener.
pub enum Bound {
    Tcp(TcpListener),
    /// A unix socket (mode 0600), removed again when the daemon stops.
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

/// Binds the listener (a clear error when the address is taken).
pub async fn bind(cfg: &Config) -> Result<Bound, DaemonError> {
    let fail = |source: std::io::Error| {
        let hint = match source.kind() {
            std::io::ErrorKind::AddrInUse => {
                " (the address is taken: is another memfabric running? choose another with \
                 --listen)"
            }
            std::io::ErrorKind::PermissionDenied => " (permission denied)",
            _ => "",
        };
        DaemonError::Listen {
            addr: cfg.listen.to_string(),
            source,
            hint,
        }
    };
    match &cfg.listen {
        Listen::Tcp(addr) => TcpListener::bind(addr).await.map(Bound::Tcp).map_err(fail),
        Listen::Unix(path) => {
            use std::os::unix::fs::FileTypeExt as _;
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                // A socket nobody answers on is a crashed daemon's: replace it. Anything
                // else (a live daemon's socket, a file) is not ours to remove.
                let live = std::os::unix::net::UnixStream::connect(path).is_ok();
                if !meta.file_type().is_socket() || live {
                    return Err(fail(std::io::ErrorKind::AddrInUse.into()));
                }
                std::fs::remove_file(path).map_err(fail)?;
            }
            // Created 0600 from the start (no window in which others could connect).
            // SAFETY: umask has no preconditions; no other thread creates files now.
            let old = unsafe { libc::umask(0o177) };
            let l = tokio::net::UnixListener::bind(path);
            // SAFETY: as above.
            unsafe { libc::umask(old) };
            Ok(Bound::Unix(l.map_err(fail)?, path.clone()))
        }
    }
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

/// What the daemon may change, each owning its part of the state directory's journal.
#[derive(Default)]
pub struct Controls {
    pub ksm: Option<KsmControl>,
    pub hints: Option<crate::actuate::hints::HintControl>,
}

/// With `--act`: the state directory's lock (a second daemon is refused here, before it
/// loads anything) and the repair of what a crashed predecessor left (KSM knobs, hinted
/// ranges). Without it: only the repair, when a journal exists and no acting daemon holds
/// the lock.
fn take_state(cfg: &Config) -> Result<Controls, DaemonError> {
    use crate::actuate::{StateLock, hints::HintControl, knobs};
    let steer = cfg.act.contains(&Act::Ksmd);
    let hint = cfg.act.contains(&Act::Hints);
    let leftovers = ["journal.json", "hints.json"]
        .iter()
        .any(|f| cfg.state_dir.join(f).exists());
    if !steer {
        tracing::info!("observing only: ksmd decisions are recommended, not applied (--act ksmd)");
    }
    if !steer && !hint && !leftovers {
        return Ok(Controls::default());
    }
    let lock = match StateLock::acquire(&cfg.state_dir, None, |_| {}) {
        Ok(l) => std::sync::Arc::new(l),
        Err(ActuateError::Locked { .. }) if !steer && !hint => return Ok(Controls::default()),
        Err(e) if !steer && !hint => {
            tracing::warn!("not repairing what a previous memfabric left: {e}");
            return Ok(Controls::default());
        }
        Err(e) => return Err(e.into()),
    };
    let mut controls = Controls::default();
    if knobs::available() {
        let (control, restored) = KsmControl::begin_locked(lock.clone())?;
        if let Some(r) = restored.filter(|r| !r.is_empty() || r.other_boot) {
            tracing::warn!("KSM settings left by a memfabric that did not exit cleanly: {r}");
        }
        if steer {
            tracing::info!(
                "steering ksmd within {:.1} % of a core; journal in {}",
                cfg.ksmd_cpu * 100.0,
                cfg.state_dir.display()
            );
            controls.ksm = Some(control);
        }
    } else if steer {
        return Err(ActuateError::NoKsm.into());
    }
    let (hints, restored) = HintControl::begin(lock, cfg.keep_hints)?;
    if let Some(r) = restored {
        let r = crate::addresses::shown(&r.to_string(), cfg.expose_addresses);
        tracing::warn!("merge hints left by a memfabric that did not exit cleanly: {r}");
    }
    if hint {
        controls.hints = Some(hints);
    }
    Ok(controls)
}

/// Migrations peers send here (`[fabric] incoming_qemu`; refused without it), served on
/// the fabric's mutual-TLS listener, their files under the state directory.
fn incoming_migrations(
    f: &crate::config::Fabric,
    state_dir: &std::path::Path,
    server: tokio_rustls::TlsAcceptor,
) -> Arc<crate::migrate::incoming::Incoming> {
    let dir = state_dir.join("incoming");
    crate::migrate::incoming_qemu::reap_leftovers(&dir);
    crate::migrate::incoming::Incoming::new(f.incoming_qemu.clone(), dir, f.listen.ip(), server)
}

/// Runs until `stop` completes (tests stop it themselves). The listener is bound and the
/// state directory locked first, so a second daemon fails before it loads any probe.
pub async fn serve(
    cfg: Config,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    // TLS files and password hashes are checked before anything else happens.
    let tls = match (&cfg.web.tls_cert_file, &cfg.web.tls_key_file) {
        (Some(cert), Some(key)) => Some(
            crate::http::tls_acceptor(cert, key).map_err(|e| DaemonError::Web(e.to_string()))?,
        ),
        _ => None,
    };
    let auth = if cfg.web.authenticates() {
        Some(
            crate::http_auth::BasicAuth::new(cfg.web.basic_auth_users.clone())
                .map_err(|e| DaemonError::Web(e.to_string()))?,
        )
    } else {
        None
    };
    let listener = bind(&cfg).await?;
    let (fabric_stop_tx, fabric_stop_rx) = tokio::sync::watch::channel(false);
    let (fabric, incoming) = match &cfg.fabric {
        Some(f) => {
            // Loaded once: the fabric's listener and the incoming migrations' proxies
            // present the same certificate.
            let tls = crate::fabric::tls::load(&f.ca_file, &f.cert_file, &f.key_file)
                .map_err(|e| DaemonError::Fabric(crate::fabric::node::FabricError::Tls(e)))?;
            let incoming = incoming_migrations(f, &cfg.state_dir, tls.server.clone());
            let fabric =
                crate::fabric::node::Fabric::start(f, tls, fabric_stop_rx, incoming.router())
                    .await?;
            (Some(fabric), Some(incoming))
        }
        None => (None, None),
    };
    let control = take_state(&cfg)?;
    // QEMU downtime limits a migration command left lowered when it was killed.
    tokio::task::spawn_blocking(|| {
        crate::migrate::limit_journal::recover(std::path::Path::new(
            crate::migrate::limit_journal::DIR,
        ))
    });
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let refresh = cfg.refresh;
    let thread_cfg = cfg.clone();
    let thread_fabric = fabric.clone();
    std::thread::Builder::new()
        .name("memfabric-refresh".into())
        .spawn(move || {
            let mut daemon = match Daemon::new(&thread_cfg, control).and_then(|mut d| {
                d.fabric = thread_fabric;
                d.tick()?;
                Ok(d)
            }) {
                Ok(d) => d,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(daemon.shared()));
            let mut wait = refresh;
            let result = loop {
                match stop_rx.recv_timeout(wait) {
                    Err(mpsc::RecvTimeoutError::Timeout) => match daemon.tick() {
                        Ok(next) => wait = next,
                        Err(e) => break Err(e),
                    },
                    _ => break Ok(()),
                }
            };
            daemon.controllers.hints.finish();
            match daemon.controllers.ksmd.as_mut().and_then(Steering::finish) {
                Some(r) if !r.failed.is_empty() => {
                    tracing::warn!("KSM settings: {r}; the next start tries again");
                }
                Some(r) => tracing::info!("KSM settings: {r}"),
                None => {}
            }
            drop(daemon); // detaches the probes
            let _ = done_tx.send(result);
        })
        .map_err(|e| DaemonError::Refresh(e.to_string()))?;
    let shared = match ready_rx.await {
        Ok(Ok(shared)) => shared,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(DaemonError::Refresh("panicked while starting".into())),
    };
    let http_stats = Arc::new(crate::http::Stats::default());
    let app = telemetry::router(
        shared,
        telemetry::Options {
            stale_after: cfg.refresh * 3 + std::time::Duration::from_secs(5),
            expose_addresses: cfg.expose_addresses,
            http: http_stats.clone(),
            fabric: fabric.clone(),
            auth: auth.as_ref().map(crate::http_auth::BasicAuth::stats_handle),
            incoming: incoming.clone(),
            outgoing: cfg
                .fabric
                .as_ref()
                .map(|_| Arc::new(crate::migrate::outgoing::Ledger::new(&cfg.state_dir))),
        },
    );
    let app = match auth {
        Some(a) => app.layer(axum::middleware::from_fn_with_state(
            a,
            crate::http_auth::require,
        )),
        None => app,
    };
    tracing::info!(
        "serving /metrics, /healthz, /v1/status, /v1/ranges on {}{}{}",
        cfg.listen,
        if tls.is_some() { " over TLS" } else { "" },
        if cfg.web.authenticates() {
            " with basic auth"
        } else {
            ""
        }
    );
    if !cfg.listen.is_local() && !cfg.web.authenticates() {
        tracing::warn!(
            "LISTENING BEYOND LOOPBACK ({}) WITHOUT AUTHENTICATION: anyone who reaches it \
             reads every VM's name, size and sharing figures. Bind to loopback or a unix \
             socket (--listen unix:/run/memfabric.sock), or set [web] basic_auth_users \
             (and TLS) in the config.",
            cfg.listen
        );
    }
    let (http_stop_tx, http_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let limits = crate::http::Limits::default();
    let stopped = async {
        let _ = http_stop_rx.await;
    };
    let (server, socket) = match listener {
        Bound::Tcp(l) => (
            tokio::spawn(crate::http::serve(l, app, limits, tls, http_stats, stopped)),
            None,
        ),
        Bound::Unix(l, path) => (
            tokio::spawn(crate::http::serve(l, app, limits, tls, http_stats, stopped)),
            Some(path),
        ),
    };
    tokio::pin!(stop);
    let mut done_rx = done_rx;
    let result = tokio::select! {
        _ = &mut stop => {
            let _ = stop_tx.send(());
            (&mut done_rx).await
        }
        r = &mut done_rx => r,
    };
    let result = result.unwrap_or_else(|_| Err(DaemonError::Refresh("panicked".into())));
    let _ = http_stop_tx.send(());
    let _ = fabric_stop_tx.send(true);
    if let Some(i) = incoming {
        // Guests not started here yet run on their sources.
        let _ = tokio::task::spawn_blocking(move || i.shutdown()).await;
    }
    if let Err(e) = server.await {
        tracing::warn!("HTTP server task: {e}");
    }
    if let Some(path) = socket {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("probes detached; bye");
    result
}

/// One entry per VM id, the one with the most memory present: two processes of one UUID
/// on a host are one VM (an incoming migration's QEMU beside its source, a leftover).
fn one_per_id(
    vms: Vec<crate::fabric::node::LocalVmState>,
) -> Vec<crate::fabric::node::LocalVmState> {
    let mut by_id: BTreeMap<String, crate::fabric::node::LocalVmState> = BTreeMap::new();
    for v in vms {
        match by_id.get(&v.id) {
            Some(kept) if kept.bytes >= v.bytes => {}
            _ => {
                by_id.insert(v.id.clone(), v);
            }
        }
    }
    by_id.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{fabric::node::LocalVmState, sketch::Sketch};

    #[test]
    fn two_processes_of_one_vm_are_published_once_the_larger() {
        let v = |id: &str, bytes| LocalVmState {
            id: id.into(),
            bytes,
            sketch: Sketch::new(8),
        };
        let out = one_per_id(vec![v("a", 10), v("b", 5), v("a", 30), v("a", 20)]);
        let got: Vec<_> = out.iter().map(|v| (v.id.as_str(), v.bytes)).collect();
        assert_eq!(got, [("a", 30), ("b", 5)]);
    }
}
