//! Loads memfabric's eBPF programs, attaches them to their tracepoints, keeps the set of
//! tracked processes, and reads what the programs counted.
//!
//! A tracepoint or field this kernel lacks costs only its own signal: that program is
//! reported unavailable and the rest load and run. The caller decides whether that is
//! fatal (`memfabric check` says it is).

pub mod catalog;

use std::{
    collections::BTreeMap,
    fmt,
    os::fd::AsRawFd as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{TracePoint, trace_point::TracePointLinkId},
};
use memfabric_common::{
    Counter, Event, MmPage, OFFSETS_GLOBAL, Offsets, PageKey, Setting, TgidStats, event_kind, maps,
    sizes,
};

use crate::{host::btf, host::tracefs};

/// `BPF_NOEXIST` from linux/bpf.h: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

/// The eBPF object, built by build.rs (aya-build) from the `memfabric-ebpf` crate.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/memfabric"));

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("memfabric's probes need root (CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN); run as root")]
    NotRoot,
    #[error(transparent)]
    Tracefs(#[from] tracefs::TracefsError),
    #[error(
        "loading the eBPF object failed: {0}; the kernel needs CONFIG_BPF_SYSCALL and BTF, \
         and the caller CAP_BPF"
    )]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no program or map named {0} (agent and object out of step?)")]
    MissingInObject(String),
    #[error("BPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("no process with PID {0}")]
    UnknownPid(u32),
    #[error("unknown probe program {0:?}; known: {1}")]
    UnknownProgram(String, String),
    #[error("invalid tracepoint {0:?}: expected CATEGORY:NAME")]
    BadTracepoint(String),
}

/// Options for [`Probes::load`].
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Attach a program to another tracepoint than its default (program -> (category, name)),
    /// for kernels that renamed one. `memfabric check --tracepoint` sets these.
    pub tracepoints: BTreeMap<String, (String, String)>,
}

impl LoadOptions {
    /// Parses `PROGRAM=CATEGORY:NAME` into an override.
    pub fn add_override(&mut self, spec: &str) -> Result<(), ProbeError> {
        let bad = || ProbeError::BadTracepoint(spec.to_owned());
        let (program, tp) = spec.split_once('=').ok_or_else(bad)?;
        let (category, name) = tp.split_once(':').ok_or_else(bad)?;
        if category.is_empty() || name.is_empty() || category.contains('/') || name.contains('/') {
            return Err(bad());
        }
        if catalog::find(program).is_none() {
            let known: Vec<_> = catalog::PROBES.iter().map(|p| p.program).collect();
            return Err(ProbeError::UnknownProgram(program.into(), known.join(", ")));
        }
        self.tracepoints
            .insert(program.into(), (category.into(), name.into()));
        Ok(())
    }
}

/// What became of one program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeState {
    /// Loaded (verified) and attached.
    Attached { verified_insns: Option<u32> },
    /// This kernel lacks the tracepoint or a field the program needs.
    Unavailable(String),
    /// The verifier or the attach refused it.
    Failed(String),
}

pub use crate::heat::{PageHeat, RangeHeatMap};

/// A `WRITE_HEAT` value as [`PageHeat`].
fn heat_from_raw(v: u64) -> PageHeat {
    let (write_protect_faults, cow_breaks) = memfabric_common::heat::split(v);
    PageHeat {
        write_protect_faults,
        cow_breaks,
        rewritten_pages: u32::from(write_protect_faults >= 2),
    }
}

#[derive(Clone, Debug)]
pub struct ProbeStatus {
    pub program: &'static str,
    pub tracepoint: String,
    pub signal: &'static str,
    pub state: ProbeState,
}

impl ProbeStatus {
    pub fn attached(&self) -> bool {
        matches!(self.state, ProbeState::Attached { .. })
    }
}

/// Global counters summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalCounters {
    pub events_dropped: u64,
    pub ksm_merges: u64,
    pub ksm_zero_merges: u64,
    pub ksm_pages_removed: u64,
    pub ksm_pages_insert_failed: u64,
    pub heat_insert_failed: u64,
    pub ksm_merges_untracked: u64,
    /// `mm`s that joined KSM (any process) since the probes were loaded.
    pub ksm_enters: u64,
    /// Remembered merges found at a write fault to belong to another process (a freed and
    /// reused `mm` address): not counted as COW breaks.
    pub ksm_pages_stale: u64,
    /// Merges remembered while their `mm`'s owner was not yet known.
    pub ksm_merges_unowned: u64,
    /// KSM COW breaks seen through KVM's MMU notifier (no user page fault).
    pub kvm_cow_breaks: u64,
    /// `mm` owners that could not be remembered (`MM_OWNER` full).
    pub mm_owner_insert_failed: u64,
    /// Program runs that ended early on a failed read.
    pub probe_errors: u64,
}

/// An event from the ring buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeEvent {
    /// A tracked process exited and left the maps; its final counters.
    Exit { tgid: u32, stats: TgidStats },
}

/// The loaded probes. Dropping this detaches every program and frees the maps.
pub struct Probes {
    status: Vec<ProbeStatus>,
    kernel: KernelInfo,
    tracked: HashMap<MapData, u32, TgidStats>,
    mm_owner: HashMap<MapData, u64, u32>,
    heat: HashMap<MapData, PageKey, u64>,
    ksm_pages: HashMap<MapData, MmPage, u32>,
    settings: Array<MapData, u32>,
    /// Pages seeded into `KSM_PAGES` per tracked process, removed again when it goes
    /// (a later process with the same PID must not inherit them).
    seeded: std::collections::HashMap<u32, Vec<u64>>,
    counters: PerCpuArray<MapData, u64>,
    events: RingBuf<MapData>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// The on-demand mm learner: its tracepoint (if it can attach) and its link while
    /// attached.
    learner: Option<(String, Option<TracePointLinkId>)>,
    /// When the learner was attached, or until when it rests (see [`LEARNER_SPELL`]).
    learner_since: Option<Instant>,
    learner_rest_until: Option<Instant>,
    // Last: programs detach when this drops.
    ebpf: Ebpf,
}

/// Program name of the on-demand mm learner.
const LEARNER: &str = "sched_switch";
/// The longest the learner stays attached at once, and its rest after a fruitless spell.
pub const LEARNER_SPELL: Duration = Duration::from_secs(30);
pub const LEARNER_REST: Duration = Duration::from_secs(300);

/// What the loader learned about the kernel.
#[derive(Clone, Debug)]
pub struct KernelInfo {
    pub tracefs: PathBuf,
    pub btf: Result<btf::KernelOffsets, String>,
}

impl fmt::Display for KernelInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tracefs {}; ", self.tracefs.display())?;
        match &self.btf {
            Ok(k) => {
                let show = |o: Option<u32>| o.map_or("missing".to_string(), |v| format!("@{v}"));
                write!(
                    f,
                    "BTF task_struct.mm {}, ksm_rmap_item.address {}",
                    show(k.task_mm),
                    show(k.rmap_address)
                )
            }
            Err(e) => write!(f, "BTF unavailable: {e}"),
        }
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, ProbeError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| ProbeError::MissingInObject(name.into()))?;
    T::try_from(map).map_err(|source| ProbeError::Map { map: name, source })
}

impl Probes {
    /// Loads the object with offsets from tracefs and BTF, and attaches every program it can.
    pub fn load(opts: &LoadOptions) -> Result<Self, ProbeError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(ProbeError::NotRoot);
        }
        let root = tracefs::ensure_mounted()?;

        let mut offsets = Offsets::MISSING;
        let mut plan = Vec::new();
        for spec in catalog::PROBES {
            let (category, name) = opts
                .tracepoints
                .get(spec.program)
                .map(|(c, n)| (c.as_str(), n.as_str()))
                .unwrap_or((spec.category, spec.tracepoint));
            let unavailable = match tracefs::read_format(&root, category, name) {
                Err(e) => Some(e.to_string()),
                Ok(format) => {
                    place_fields(&format, spec, &format!("{category}:{name}"), &mut offsets)
                }
            };
            plan.push((spec, format!("{category}:{name}"), unavailable));
        }

        let btf = btf::kernel_offsets().map_err(|e| e.to_string());
        match &btf {
            Ok(k) => {
                if let Some(v) = k.task_mm {
                    offsets.task_mm = v;
                }
                if let Some(v) = k.rmap_address {
                    offsets.rmap_address = v;
                }
            }
            Err(e) => tracing::warn!(
                "{e}: KSM events are attributed only to processes seen entering KSM, and \
                 exact KSM COW breaks are not told apart"
            ),
        }

        // No CO-RE relocations to apply (aya has none for Rust programs; the offsets above
        // stand in for them): aya's own parse of the kernel's BTF (15 ms here) is skipped.
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .override_global(OFFSETS_GLOBAL, &offsets, true)
            .load(EBPF_OBJECT)
            .map_err(ProbeError::Load)?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::debug!("eBPF logging unavailable: {e}");
                None
            }
        };

        let mut status = Vec::new();
        let mut learner = None;
        for (spec, tracepoint, unavailable) in plan {
            let state = match unavailable {
                Some(reason) => ProbeState::Unavailable(reason),
                None => {
                    let (state, link) = attach(&mut ebpf, spec.program, &tracepoint)?;
                    if let Some(link) = link
                        && spec.on_demand
                    {
                        // Proven to attach; detached until a tracked process needs it.
                        program(&mut ebpf, spec.program)?
                            .detach(link)
                            .map_err(|e| ProbeError::MissingInObject(e.to_string()))?;
                        learner = Some((tracepoint.clone(), None));
                    }
                    state
                }
            };
            match &state {
                ProbeState::Attached { .. } => {}
                ProbeState::Unavailable(r) | ProbeState::Failed(r) => tracing::warn!(
                    "probe {} not attached, no {}: {r}",
                    spec.program,
                    spec.signal
                ),
            }
            status.push(ProbeStatus {
                program: spec.program,
                tracepoint,
                signal: spec.signal,
                state,
            });
        }

        Ok(Probes {
            status,
            kernel: KernelInfo { tracefs: root, btf },
            tracked: take(&mut ebpf, maps::TRACKED)?,
            mm_owner: take(&mut ebpf, maps::MM_OWNER)?,
            heat: take(&mut ebpf, maps::WRITE_HEAT)?,
            ksm_pages: take(&mut ebpf, maps::KSM_PAGES)?,
            settings: take(&mut ebpf, maps::SETTINGS)?,
            seeded: Default::default(),
            counters: take(&mut ebpf, maps::COUNTERS)?,
            events: take(&mut ebpf, maps::EVENTS)?,
            logger,
            learner,
            learner_since: None,
            learner_rest_until: None,
            ebpf,
        })
    }

    /// Attaches the mm learner while some tracked process's `mm` is unknown and detaches it
    /// once all are known, so context switches cost nothing in the steady state. A process
    /// that never runs (a stopped VM) would keep it attached host-wide forever: after
    /// [`LEARNER_SPELL`] attached it rests for [`LEARNER_REST`], then tries again. Merges
    /// of unknown `mm`s are remembered all the while, so a sleeper's COW breaks still
    /// count. Called by `track`; callers that run long call it now and then (a process may
    /// exec).
    pub fn refresh_mm_learning(&mut self) -> Result<(), ProbeError> {
        let needed = self.tracked()?.iter().any(|(_, s)| s.mm == 0);
        // Merges of an unknown mm may be a sleeping tracked process's: remember them too.
        self.settings
            .set(Setting::RememberUnowned as u32, u32::from(needed), 0)
            .map_err(|source| ProbeError::Map {
                map: maps::SETTINGS,
                source,
            })?;
        let now = Instant::now();
        let resting = self.learner_rest_until.is_some_and(|t| now < t);
        let spell_over = self
            .learner_since
            .is_some_and(|t| now.duration_since(t) >= LEARNER_SPELL);
        let want = needed && !resting && !spell_over;
        let Some((tracepoint, link)) = self.learner.as_mut() else {
            return Ok(());
        };
        let prog = program(&mut self.ebpf, LEARNER)?;
        match (want, link.is_some()) {
            (true, false) => {
                let (category, name) = tracepoint.split_once(':').unwrap_or_default();
                match prog.attach(category, name) {
                    Ok(l) => {
                        *link = Some(l);
                        self.learner_since = Some(now);
                        self.learner_rest_until = None;
                    }
                    Err(e) => tracing::warn!("attaching the mm learner to {tracepoint}: {e}"),
                }
            }
            (false, true) => {
                if let Some(l) = link.take() {
                    let _ = prog.detach(l);
                }
                self.learner_since = None;
                if spell_over && needed {
                    tracing::info!(
                        "a tracked process has not run for {} s (stopped?): the mm learner \
                         rests for {} s",
                        LEARNER_SPELL.as_secs(),
                        LEARNER_REST.as_secs()
                    );
                    self.learner_rest_until = Some(now + LEARNER_REST);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether the on-demand mm learner is attached right now.
    pub fn mm_learning(&self) -> bool {
        self.learner.as_ref().is_some_and(|(_, l)| l.is_some())
    }

    /// Per-program load and attach results.
    pub fn status(&self) -> &[ProbeStatus] {
        &self.status
    }

    /// Tracefs location and the BTF offsets in use.
    pub fn kernel(&self) -> &KernelInfo {
        &self.kernel
    }

    /// Whether every program attached.
    pub fn all_attached(&self) -> bool {
        self.status.iter().all(ProbeStatus::attached)
    }

    /// Starts counting for `tgid` (tracking a tracked process again keeps its counters),
    /// leaving the mm learner to the caller's next
    /// [`Probes::refresh_mm_learning`]: that walks every tracked process, so calling it per
    /// process made tracking n VMs O(n^2).
    pub fn track_deferred(&mut self, tgid: u32) -> Result<(), ProbeError> {
        if !PathBuf::from(format!("/proc/{tgid}")).exists() || tgid == 0 {
            return Err(ProbeError::UnknownPid(tgid));
        }
        match self.tracked.insert(tgid, TgidStats::default(), BPF_NOEXIST) {
            Ok(()) => {}
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(source) => {
                return Err(ProbeError::Map {
                    map: maps::TRACKED,
                    source,
                });
            }
        }
        Ok(())
    }

    /// Starts counting for `tgid` and attaches the mm learner if its mm is unknown.
    pub fn track(&mut self, tgid: u32) -> Result<(), ProbeError> {
        self.track_deferred(tgid)?;
        self.refresh_mm_learning()
    }

    /// Stops counting for `tgid` and forgets what was counted. Returns the final counters.
    pub fn untrack(&mut self, tgid: u32) -> Result<Option<TgidStats>, ProbeError> {
        let stats = self.stats(tgid)?;
        if stats.is_some() {
            // Already gone if the process exited concurrently: not an error.
            let _ = self.tracked.remove(&tgid);
        }
        self.forget(tgid, stats);
        Ok(stats)
    }

    /// Remembers pages of tracked process `tgid` that were already merged when tracking
    /// began (see [`crate::host::merged`]), so that writes to them count as the COW breaks
    /// they are, although the probes never saw them merge. At most a quarter of the map per
    /// process, so one large VM cannot evict every other's merges. Returns how many pages
    /// were remembered.
    pub fn seed_merged(&mut self, tgid: u32, pages: &[u64]) -> Result<usize, ProbeError> {
        let take = pages.len().min(Self::SEED_LIMIT);
        let mut done = Vec::with_capacity(take);
        for &page in &pages[..take] {
            self.ksm_pages
                .insert(MmPage::seeded(tgid, page), tgid, 0)
                .map_err(|source| ProbeError::Map {
                    map: maps::KSM_PAGES,
                    source,
                })?;
            done.push(page);
        }
        let n = done.len();
        self.seeded.entry(tgid).or_default().extend(done);
        Ok(n)
    }

    /// The most pages [`Probes::seed_merged`] remembers for one process.
    pub const SEED_LIMIT: usize = sizes::KSM_PAGES_SEEDED as usize;

    /// Drops the side state of a process that is no longer tracked.
    fn forget(&mut self, tgid: u32, stats: Option<TgidStats>) {
        for page in self.seeded.remove(&tgid).unwrap_or_default() {
            let _ = self.ksm_pages.remove(&MmPage::seeded(tgid, page));
        }
        if let Some(mm) = stats.map(|s| s.mm).filter(|mm| *mm != 0)
            && self.mm_owner.get(&mm, 0).ok() == Some(tgid)
        {
            let _ = self.mm_owner.remove(&mm);
        }
        // A later process reusing the PID must not inherit this one's heat.
        let stale: Vec<PageKey> = self
            .heat
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.tgid == tgid)
            .collect();
        for k in stale {
            let _ = self.heat.remove(&k);
        }
    }

    /// Counters of one tracked process; `None` if it is not tracked (or exited).
    pub fn stats(&self, tgid: u32) -> Result<Option<TgidStats>, ProbeError> {
        match self.tracked.get(&tgid, 0) {
            Ok(s) => Ok(Some(s)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(ProbeError::Map {
                map: maps::TRACKED,
                source,
            }),
        }
    }

    /// Every tracked process with its counters, by TGID.
    pub fn tracked(&self) -> Result<Vec<(u32, TgidStats)>, ProbeError> {
        let mut v = self
            .tracked
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| ProbeError::Map {
                map: maps::TRACKED,
                source,
            })?;
        v.sort_by_key(|(t, _)| *t);
        Ok(v)
    }

    /// Which tracked process owns `mm`, as the probes learned it.
    pub fn mm_owner(&self, mm: u64) -> Option<u32> {
        self.mm_owner.get(&mm, 0).ok()
    }

    /// Write heat per page of `tgid`, hottest first.
    pub fn write_heat(&self, tgid: u32) -> Vec<(u64, PageHeat)> {
        let mut v: Vec<(u64, PageHeat)> = self
            .heat
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.tgid == tgid)
            .map(|(k, n)| (k.page, heat_from_raw(n)))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    /// Write heat of every tracked process summed per aligned range of `range_bytes`
    /// (a power of two): tgid -> range start -> heat. One walk over the map (up to
    /// 64 Ki entries), so callers do it once per scan pass, not per refresh.
    pub fn heat_by_range(&self, range_bytes: u64) -> RangeHeatMap {
        let mut out = RangeHeatMap::new();
        for (k, n) in self.heat.iter().filter_map(Result::ok) {
            let h = heat_from_raw(n);
            let r = out
                .entry(k.tgid)
                .or_default()
                .entry(k.page & !(range_bytes - 1))
                .or_default();
            r.write_protect_faults = r
                .write_protect_faults
                .saturating_add(h.write_protect_faults);
            r.cow_breaks = r.cow_breaks.saturating_add(h.cow_breaks);
            r.rewritten_pages = r.rewritten_pages.saturating_add(h.rewritten_pages);
        }
        out
    }

    /// Global counters, summed over CPUs.
    pub fn counters(&self) -> Result<GlobalCounters, ProbeError> {
        let mut sums = [0u64; Counter::LEN as usize];
        for (i, sum) in sums.iter_mut().enumerate() {
            let per_cpu = self
                .counters
                .get(&crate::util::convert::u32_saturating(i), 0)
                .map_err(|source| ProbeError::Map {
                    map: maps::COUNTERS,
                    source,
                })?;
            *sum = per_cpu.iter().sum();
        }
        let c = |k: Counter| sums[k as usize];
        Ok(GlobalCounters {
            events_dropped: c(Counter::EventsDropped),
            ksm_merges: c(Counter::KsmMerges),
            ksm_zero_merges: c(Counter::KsmZeroMerges),
            ksm_pages_removed: c(Counter::KsmPagesRemoved),
            ksm_pages_insert_failed: c(Counter::KsmPagesInsertFailed),
            heat_insert_failed: c(Counter::HeatInsertFailed),
            ksm_merges_untracked: c(Counter::KsmMergesUntracked),
            ksm_enters: c(Counter::KsmEnters),
            ksm_pages_stale: c(Counter::KsmPagesStale),
            ksm_merges_unowned: c(Counter::KsmMergesUnowned),
            kvm_cow_breaks: c(Counter::KvmCowBreaks),
            mm_owner_insert_failed: c(Counter::MmOwnerInsertFailed),
            probe_errors: c(Counter::ProbeErrors),
        })
    }

    /// Takes every pending ring-buffer event (and forwards eBPF log records to `log`).
    pub fn drain_events(&mut self) -> Vec<ProbeEvent> {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            if item.len() < size_of::<Event>() {
                tracing::warn!("short ring-buffer record ({} bytes) ignored", item.len());
                continue;
            }
            // SAFETY: the program writes whole `Event`s; read_unaligned copes with alignment.
            let ev: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            if ev.kind == event_kind::EXIT {
                out.push(ProbeEvent::Exit {
                    tgid: ev.tgid,
                    stats: ev.stats,
                });
            }
        }
        for ev in &out {
            let ProbeEvent::Exit { tgid, stats } = *ev;
            self.forget(tgid, Some(stats));
        }
        out
    }

    /// Waits up to `timeout` for at least one event, then drains.
    pub fn wait_events(&mut self, timeout: Duration) -> Vec<ProbeEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.drain_events();
            let left = deadline.saturating_duration_since(Instant::now());
            if !events.is_empty() || left.is_zero() {
                return events;
            }
            let mut pfd = libc::pollfd {
                fd: self.events.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd. A failed poll (EINTR) just loops.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32) };
        }
    }
}

/// Puts the offsets of `spec`'s fields in `format` into `offsets`; the reason the program
/// cannot run on this record layout, if it cannot (a field missing, or of another size than
/// the program reads: it would misread the record).
fn place_fields(
    format: &tracefs::Format,
    spec: &catalog::ProbeSpec,
    tracepoint: &str,
    offsets: &mut Offsets,
) -> Option<String> {
    let mut missing = None;
    for f in spec.fields {
        match format.field(f.name) {
            Some(field) if field.size != f.size => {
                missing = Some(format!(
                    "tracepoint {tracepoint} field `{}` is {} bytes; the program reads {}",
                    f.name, field.size, f.size
                ))
            }
            Some(field) => *(f.slot)(offsets) = field.offset,
            None if f.optional => {
                tracing::info!("{tracepoint} has no field `{}`; using the fallback", f.name)
            }
            None => missing = Some(format!("tracepoint {tracepoint} has no field `{}`", f.name)),
        }
    }
    missing
}

/// The tracepoint program `name` of the object.
fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut TracePoint, ProbeError> {
    ebpf.program_mut(name)
        .ok_or_else(|| ProbeError::MissingInObject(name.into()))?
        .try_into()
        .map_err(|_| ProbeError::MissingInObject(format!("tracepoint program {name}")))
}

/// Verifies and attaches one program.
fn attach(
    ebpf: &mut Ebpf,
    name: &str,
    tracepoint: &str,
) -> Result<(ProbeState, Option<TracePointLinkId>), ProbeError> {
    let prog = program(ebpf, name)?;
    if let Err(e) = prog.load() {
        return Ok((
            ProbeState::Failed(format!("verifier rejected {name}: {e}")),
            None,
        ));
    }
    let verified_insns = prog
        .info()
        .ok()
        .and_then(|i| i.verified_instruction_count());
    let (category, tp) = tracepoint.split_once(':').unwrap_or((tracepoint, ""));
    Ok(match prog.attach(category, tp) {
        Ok(link) => (ProbeState::Attached { verified_insns }, Some(link)),
        Err(e) => (
            ProbeState::Failed(format!("attaching to {tracepoint}: {e}")),
            None,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `kvm:kvm_unmap_hva_range` as 6.18 lays it out, and as a kernel with 4-byte fields
    /// would: the program must not attach to the second.
    #[test]
    fn fields_of_another_size_keep_the_program_off() {
        let spec = catalog::find("kvm_unmap_hva_range").unwrap();
        let real = "name: kvm_unmap_hva_range\nID: 27\nformat:\n\
            \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
            \tfield:unsigned long start;\toffset:8;\tsize:8;\tsigned:0;\n\
            \tfield:unsigned long end;\toffset:16;\tsize:8;\tsigned:0;\n";
        let mut o = Offsets::MISSING;
        let f = tracefs::parse_format(real).unwrap();
        assert_eq!(
            place_fields(&f, spec, "kvm:kvm_unmap_hva_range", &mut o),
            None
        );
        assert_eq!((o.kvm_unmap_start, o.kvm_unmap_end), (8, 16));
        let narrow = real.replace("offset:16;\tsize:8", "offset:16;\tsize:4");
        let f = tracefs::parse_format(&narrow).unwrap();
        let why = place_fields(&f, spec, "kvm:kvm_unmap_hva_range", &mut o);
        assert!(why.is_some_and(|w| w.contains("`end` is 4 bytes")));
        let without = real.replace("end;", "stop;");
        let f = tracefs::parse_format(&without).unwrap();
        let why = place_fields(&f, spec, "kvm:kvm_unmap_hva_range", &mut o);
        assert!(why.is_some_and(|w| w.contains("no field `end`")));
    }
}
