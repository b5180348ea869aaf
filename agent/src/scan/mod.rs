//! Page scanner: reads the guest RAM of tracked processes (present pages only, found via
//! pagemap, so scanning never faults memory in), hashes every page (xxh3-64), keeps a
//! compact per-page history (8 bytes, [`page_state`]), and tells what is stable, volatile,
//! duplicated, merged and still mergeable ([`account`]), per VM and per 2 MiB range, and
//! how each range ranks as a merge candidate ([`rank`]). This is the core behind
//! `memfabric scan` and the daemon's background scan.

pub mod account;
pub mod content;
pub mod known;
pub mod page_state;
pub mod recheck;
pub mod schedule;
pub mod worker;

use std::collections::BTreeMap;

use xxhash_rust::xxh3::xxh3_64;

use account::Mapping;
pub use account::{Counts, RANGE_BYTES, RangeCounts, Report};
use page_state::{F_MERGED, F_THP, F_ZERO, F_ZERO_FRAME, PageState, SAMPLE_ONE_IN};

use crate::{
    host::{inventory, maps, pagemap},
    util::convert,
};

pub const PAGE: usize = crate::util::PAGE;
/// Pages per chunk: one pagemap read, reads of its present runs into one reused buffer.
const CHUNK: usize = 256;
/// The longest sleep between two looks at the stop flag. 50 ms woke a resting scan thread
/// twenty times a second: a sixth of its CPU on a quiet host went to waking up.
const SLEEP_SLICE: std::time::Duration = std::time::Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("no process with PID {0}")]
    UnknownPid(u32),
    #[error("reading /proc/{pid}/pagemap: {source} (needs root for frame numbers)")]
    Pagemap { pid: u32, source: std::io::Error },
    #[error("opening /proc/{pid}/mem: {source} (needs root, or ptrace rights over the process)")]
    Mem { pid: u32, source: std::io::Error },
}

/// Scans processes pass after pass, keeping per-page history between passes.
pub struct Scanner {
    stable_after: u8,
    procs: BTreeMap<u32, Vec<Mapping>>,
    buf: Vec<u8>,
    entries: Vec<pagemap::Entry>,
    /// kpageflags of the frames of the run being read.
    frames: Vec<pagemap::FrameFlags>,
    passes: u32,
    /// Passes over each process (the daemon scans VMs one at a time).
    vm_passes: BTreeMap<u32, u32>,
    bytes_read: u64,
    zero_hash: u64,
    /// Fraction of one core the scan may use (1.0: unpaced).
    budget: f64,
    /// Set to stop a pass early (the daemon's shutdown).
    cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Whether reports carry content sketches (the fabric wants them).
    sketches: bool,
    /// Suspect ranges read again between passes.
    rechecks: recheck::Rechecks,
    /// The scanner's clock (seconds since this instant).
    epoch: std::time::Instant,
    /// Frames whose content is known without a read (the zero page, KSM pages).
    known: known::KnownFrames,
    /// Whether known frames are skipped (off: every present page is read, as before).
    skip_known: bool,
    /// Per page of the run being read: its hash when known, else what a read checks.
    lookups: Vec<known::Lookup>,
    /// Calm pages of the chunk being read that its sample left out (see
    /// [`Scanner::settle_deferred`]), with their frames' flags.
    deferred: Vec<(usize, u8)>,
    /// Per page of the chunk being read: calm before this pass.
    was_calm: Vec<bool>,
    /// VMs passed over since the known frames' round began (see [`known::KnownFrames`]).
    round_seen: std::collections::BTreeSet<u32>,
    /// The pass under way reads one page in this many (1: every page; see
    /// [`Scanner::pass_sampled`]).
    sample_one_in: usize,
    /// Each process's ranges to scan, with the fingerprint of the mappings they were
    /// found in (see [`Scanner::targets_of`]).
    layouts: BTreeMap<u32, (u64, Vec<(u64, u64)>)>,
    /// Whether a figure may differ from the last report's: a page's [`PageState::accounted`]
    /// key changed, or the processes or their mappings did (see [`Scanner::next_report`]).
    figures_changed: bool,
    /// The chunk being read's keys before the read.
    keys_before: Vec<u64>,
    /// The last report [`Scanner::next_report`] built.
    last_report: Option<std::sync::Arc<Report>>,
    /// Reports [`Scanner::next_report`] built in full, and reused.
    reports_built: (u64, u64),
    /// CPU seconds of the rechecks' last round.
    recheck_round_cpu: f64,
}

/// Reads `buf.len()` bytes at `addr` of the process whose `/proc/PID/mem` is `mem`;
/// returns how many arrived (fewer when the range was unmapped meanwhile).
///
/// Not `process_vm_readv`: it pins the pages (FOLL_PIN), and since Linux 5.19 a read-only
/// pin of an anonymous page that is not exclusive to the process *unshares* it (copies
/// it): every KSM-merged page the scan read was unmerged again (measured on 6.18: 25,545
/// merged pages of a lab guest, none after one pass). `/proc/PID/mem` reads through a
/// plain reference (FOLL_GET), which leaves shared pages shared.
fn read_remote(mem: &std::fs::File, addr: u64, buf: &mut [u8]) -> usize {
    use std::os::unix::fs::FileExt as _;
    let mut got = 0;
    while got < buf.len() {
        match mem.read_at(&mut buf[got..], addr + got as u64) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    got
}

impl Scanner {
    /// `stable_after`: unchanged scans after which a page counts as stable (default 2).
    pub fn new(stable_after: u8) -> Scanner {
        Scanner {
            stable_after: stable_after.max(1),
            procs: BTreeMap::new(),
            buf: vec![0; CHUNK * PAGE],
            entries: Vec::new(),
            frames: Vec::with_capacity(CHUNK),
            passes: 0,
            vm_passes: BTreeMap::new(),
            bytes_read: 0,
            zero_hash: xxh3_64(&[0u8; PAGE]),
            budget: 1.0,
            cancel: None,
            sketches: false,
            rechecks: recheck::Rechecks::default(),
            epoch: std::time::Instant::now(),
            known: known::KnownFrames::default(),
            skip_known: true,
            lookups: Vec::with_capacity(CHUNK),
            deferred: Vec::with_capacity(CHUNK),
            was_calm: Vec::with_capacity(CHUNK),
            round_seen: std::collections::BTreeSet::new(),
            sample_one_in: 1,
            layouts: BTreeMap::new(),
            figures_changed: true,
            keys_before: Vec::with_capacity(CHUNK),
            last_report: None,
            reports_built: (0, 0),
            recheck_round_cpu: 0.0,
        }
    }

    /// Whether pages on the zero page or on a KSM frame of known content are skipped
    /// (on by default; off reads every present page, for comparison).
    pub fn set_skip_known(&mut self, on: bool) {
        self.skip_known = on;
    }

    /// What skipping known frames did so far, and how many KSM frames are remembered.
    pub fn known_stats(&self) -> (known::KnownStats, usize) {
        (self.known.stats, self.known.len())
    }

    /// Builds each VM's content sketch in its report (the fabric's; off by default: they
    /// cost up to 1.5 MiB per VM and some CPU per pass).
    pub fn set_sketches(&mut self, on: bool) {
        self.figures_changed |= self.sketches != on;
        self.sketches = on;
    }

    /// A flag that, once set, ends the current pass early.
    pub fn set_cancel(&mut self, flag: std::sync::Arc<std::sync::atomic::AtomicBool>) {
        self.cancel = Some(flag);
    }

    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Paces the scan to `fraction` of one core: after each 1 MiB chunk it sleeps in
    /// proportion to the time the chunk took, so the scan never spikes.
    pub fn set_budget(&mut self, fraction: f64) {
        self.budget = fraction.clamp(0.001, 1.0);
    }

    /// Forgets processes not in `pids` (exited or no longer tracked).
    pub fn retain(&mut self, pids: &[u32]) {
        let before = self.procs.len();
        self.procs.retain(|p, _| pids.contains(p));
        self.figures_changed |= self.procs.len() != before;
        self.vm_passes.retain(|p, _| pids.contains(p));
        self.layouts.retain(|p, _| pids.contains(p));
        self.rechecks.retain(pids);
    }

    /// Bytes read from processes so far (the rechecks' reads included).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Pages of `pid` present after its last pass (as its report would count them),
    /// without building a report: a walk over one VM's page states.
    pub fn present_pages(&self, pid: u32) -> u64 {
        self.procs.get(&pid).map_or(0, |maps| {
            maps.iter()
                .flat_map(|m| &m.pages)
                .filter(|s| s.has(page_state::F_PRESENT))
                .count() as u64
        })
    }

    /// CPU seconds the rechecks' last round took.
    pub fn recheck_round_cpu(&self) -> f64 {
        self.recheck_round_cpu
    }

    /// Ranges the rechecks between passes track now.
    pub fn rechecked_ranges(&self) -> usize {
        self.rechecks.tracked()
    }

    /// One pass over every page of `pids`.
    pub fn pass(&mut self, pids: &[u32]) -> Result<(), ScanError> {
        self.pass_with_progress(pids, &mut |_, _| {})
    }

    /// A pass that reads one page in `one_in` of `pids` (the same pages each time: their
    /// history builds up as a full pass's would), the others left as they were (absent,
    /// for a VM not scanned before). A new large VM is ranked from such a sample in
    /// seconds, whatever its size: a range's shares of stable, changed and duplicated
    /// pages are estimated from its sampled pages (32 of 512 at one in 16), whose contents
    /// are looked up among every page of the VMs scanned in full. Its counts cover the
    /// sample only until a full pass.
    pub fn pass_sampled(&mut self, pids: &[u32], one_in: usize) -> Result<(), ScanError> {
        self.sample_one_in = one_in.max(1);
        let done = self.pass(pids);
        self.sample_one_in = 1;
        done
    }

    /// Spaces the rechecks' rounds `factor` times further apart (1: about one a second).
    /// On a quiet host the ranges they track are known churn: reading them every second
    /// tells nothing new and was the scan's largest cost there.
    pub fn set_recheck_spacing(&mut self, factor: f64) {
        let now = self.now();
        self.rechecks.set_spacing(factor, now);
    }

    /// [`Scanner::pass`], calling `progress(walked, total)` with the pages of guest RAM
    /// (present or not) walked so far and to walk in this pass, after each chunk.
    pub fn pass_with_progress(
        &mut self,
        pids: &[u32],
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(), ScanError> {
        let mut plan = Vec::with_capacity(pids.len());
        for &pid in pids {
            plan.push((pid, self.targets_of(pid).ok_or(ScanError::UnknownPid(pid))?));
        }
        let total: u64 = plan
            .iter()
            .flat_map(|(_, ranges)| ranges)
            .map(|(s, e)| (e - s) / PAGE as u64)
            .sum();
        let mut walked = 0;
        let mut advance = |n: u64| {
            walked += n;
            progress(walked, total);
        };
        for (pid, ranges) in plan {
            let map =
                pagemap::Pagemap::open(pid).map_err(|source| ScanError::Pagemap { pid, source })?;
            let mem = std::fs::File::open(format!("/proc/{pid}/mem"))
                .map_err(|source| ScanError::Mem { pid, source })?;
            let mut known = self.procs.remove(&pid).unwrap_or_default();
            let mut mappings = Vec::with_capacity(ranges.len());
            for (start, end) in ranges {
                let pages = convert::usize_of(end - start) / PAGE;
                // Pages seen before keep their history, whatever became of their VMA. The
                // same mapping is moved, not copied (mappings are disjoint: no other one
                // needs its pages).
                let mut m = match known
                    .iter()
                    .position(|k| k.start == start && k.pages.len() == pages)
                {
                    Some(i) => known.swap_remove(i),
                    None => {
                        self.figures_changed = true;
                        Mapping::carried(&known, start, pages)
                    }
                };
                if let Err(e) = self.scan_mapping(pid, &map, &mem, &mut m, &mut advance) {
                    // The process's history is dropped with the failed pass.
                    self.figures_changed = true;
                    return Err(e);
                }
                mappings.push(m);
            }
            // A mapping gone (or a process new) changes the ranges reported.
            self.figures_changed |= !known.is_empty() || mappings.is_empty();
            self.rechecks.refresh(pid, &mappings, self.now());
            self.procs.insert(pid, mappings);
            *self.vm_passes.entry(pid).or_default() += 1;
            self.round_seen.insert(pid);
        }
        self.passes += 1;
        if self.procs.keys().all(|p| self.round_seen.contains(p)) {
            self.known.round_done();
            self.round_seen.clear();
        }
        Ok(())
    }

    /// The ranges of `pid` to scan. [`maps::targets`] describes a VM from smaps, which
    /// walks the page tables of all its guest RAM: it is asked again only when the
    /// process's mappings moved ([`inventory::layout_fingerprint`], a read of
    /// `/proc/PID/maps`). The fingerprint is taken first: mappings that move meanwhile
    /// read as moved next time.
    fn targets_of(&mut self, pid: u32) -> Option<Vec<(u64, u64)>> {
        let known = self
            .layouts
            .get(&pid)
            .map_or(&[][..], |(_, r)| r.as_slice());
        let layout = inventory::layout_fingerprint(pid, known)?;
        if let Some((seen, ranges)) = self.layouts.get(&pid)
            && *seen == layout
        {
            return Some(ranges.clone());
        }
        let ranges = maps::targets(pid)?;
        self.layouts.insert(pid, (layout, ranges.clone()));
        Some(ranges)
    }

    fn scan_mapping(
        &mut self,
        pid: u32,
        map: &pagemap::Pagemap,
        mem: &std::fs::File,
        m: &mut Mapping,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), ScanError> {
        let pages = m.pages.len();
        let vm_pass = self.vm_passes.get(&pid).copied().unwrap_or(0) as usize;
        let one_in = self.sample_one_in;
        let mut first = 0;
        while first < pages {
            let chunk_start = std::time::Instant::now();
            let n = CHUNK.min(pages - first);
            let addr = m.start + (first * PAGE) as u64;
            map.read(addr, n, &mut self.entries)
                .map_err(|source| ScanError::Pagemap { pid, source })?;
            // Whether the chunk changes a figure: its keys before, compared after.
            let watch = !self.figures_changed;
            if watch {
                self.keys_before.clear();
                self.keys_before.extend(
                    m.pages[first..first + n]
                        .iter()
                        .map(|s| s.accounted(self.stable_after)),
                );
            }
            // Calm pages are sampled; a change among them has the rest read now.
            let sampling = self.skip_known && one_in == 1;
            self.deferred.clear();
            self.was_calm.clear();
            self.was_calm
                .extend(m.pages[first..first + n].iter().map(|s| s.calm()));
            let sampled = |p: usize| (p + vm_pass).is_multiple_of(SAMPLE_ONE_IN);
            // Read runs of present pages only.
            let mut i = 0;
            while i < n {
                if !(first + i).is_multiple_of(one_in) {
                    // Outside the sample: left as it was.
                    i += 1;
                    continue;
                }
                if !self.entries[i].in_ram() {
                    m.pages[first + i] = PageState::ABSENT;
                    i += 1;
                    continue;
                }
                let mut j = i + 1;
                while j < n && self.entries[j].in_ram() && one_in == 1 {
                    j += 1;
                }
                // Frame flags first, so they describe the frames the data came from.
                map.frame_flags_of(&self.entries[i..j], &mut self.frames);
                self.lookups.clear();
                for k in i..j {
                    let f = self.frames[k - i];
                    let lookup = if self.skip_known {
                        self.known.lookup(
                            self.entries[k].pfn(),
                            f.ksm,
                            f.zero_page,
                            self.zero_hash,
                            self.passes,
                        )
                    } else {
                        known::Lookup::Read { expect: None }
                    };
                    // A calm page on a frame of its own: read in one pass of
                    // SAMPLE_ONE_IN, by its place in the mapping. Not a page that left a
                    // KSM frame or the zero page: it was written.
                    let p = first + k;
                    let was = m.pages[p];
                    let written = (was.has(F_MERGED) && !f.ksm) || was.has(F_ZERO_FRAME);
                    let lookup = match lookup {
                        known::Lookup::Read { expect: None }
                            if sampling && self.was_calm[k] && !written && !sampled(p) =>
                        {
                            known::Lookup::Kept
                        }
                        l => l,
                    };
                    self.lookups.push(lookup);
                }
                for a in i..j {
                    let p = first + a;
                    match self.lookups[a - i] {
                        known::Lookup::Known(h) => {
                            let f = self.frames[a - i];
                            m.pages[p] = m.pages[p].rescanned(h, page_flags(false, f));
                        }
                        known::Lookup::Kept => {
                            self.deferred
                                .push((a, page_flags(false, self.frames[a - i])));
                        }
                        known::Lookup::Read { .. } => {}
                    }
                }
                // Runs of pages that must be read, one read each.
                let read = |l: &known::Lookup| matches!(l, known::Lookup::Read { .. });
                let mut a = i;
                while a < j {
                    if !read(&self.lookups[a - i]) {
                        a += 1;
                        continue;
                    }
                    let mut b = a;
                    while b < j && read(&self.lookups[b - i]) {
                        b += 1;
                    }
                    self.read_run(mem, m, first, addr, a..b, i);
                    a = b;
                }
                i = j;
            }
            if !self.deferred.is_empty() {
                self.settle_deferred(map, mem, m, first, addr, n);
            }
            if watch {
                self.figures_changed = m.pages[first..first + n]
                    .iter()
                    .zip(&self.keys_before)
                    .any(|(s, k)| s.accounted(self.stable_after) != *k);
            }
            first += n;
            progress(n as u64);
            if self.cancelled() {
                break;
            }
            if self.budget < 1.0 {
                let busy = chunk_start.elapsed();
                self.idle(busy.mul_f64(1.0 / self.budget - 1.0));
            }
        }
        Ok(())
    }

    /// The calm pages of a chunk left out of its sample (`self.deferred`): taken as
    /// unchanged when every calm page the pass did read is calm still, else read now (a
    /// calm page changed or went: a guest rewriting a block rewrites pages outside the
    /// sample too, and the ranking judges this pass by what it reads). Pages that changed
    /// lately are read in every pass and do not count: a few churning pages do not have
    /// the calm ones around them read again and again.
    fn settle_deferred(
        &mut self,
        map: &pagemap::Pagemap,
        mem: &std::fs::File,
        m: &mut Mapping,
        first: usize,
        addr: u64,
        n: usize,
    ) {
        let deferred = std::mem::take(&mut self.deferred);
        // The deferred pages' states are untouched (calm) yet: only those read count.
        let still_calm = (0..n).all(|k| !self.was_calm[k] || m.pages[first + k].calm());
        if still_calm {
            self.known.stats.kept += deferred.len() as u64;
            for &(k, flags) in &deferred {
                m.pages[first + k] = m.pages[first + k].kept(flags);
            }
        } else {
            self.known.stats.escalated += deferred.len() as u64;
            let mut r = 0;
            while r < deferred.len() {
                let mut e = r + 1;
                while e < deferred.len() && deferred[e].0 == deferred[e - 1].0 + 1 {
                    e += 1;
                }
                let (a, b) = (deferred[r].0, deferred[e - 1].0 + 1);
                map.frame_flags_of(&self.entries[a..b], &mut self.frames);
                self.lookups.clear();
                self.lookups
                    .resize(b - a, known::Lookup::Read { expect: None });
                self.read_run(mem, m, first, addr, a..b, a);
                r = e;
            }
        }
        self.deferred = deferred;
    }

    /// Reads the chunk's pages `run` (present, in one piece) and takes in what they hold;
    /// `self.frames` and `self.lookups` describe the chunk's pages from `base` on.
    fn read_run(
        &mut self,
        mem: &std::fs::File,
        m: &mut Mapping,
        first: usize,
        addr: u64,
        run: std::ops::Range<usize>,
        base: usize,
    ) {
        let (a, b) = (run.start, run.end);
        let bytes = (b - a) * PAGE;
        let got = read_remote(mem, addr + (a * PAGE) as u64, &mut self.buf[..bytes]);
        self.bytes_read += got as u64;
        for k in a..b {
            let p = first + k;
            let off = (k - a) * PAGE;
            if off + PAGE > got {
                // Unmapped meanwhile: treat as not present.
                m.pages[p] = PageState::ABSENT;
                continue;
            }
            let page = &self.buf[off..off + PAGE];
            let h = xxh3_64(page);
            let f = self.frames[k - base];
            if self.skip_known
                && let known::Lookup::Read { expect } = self.lookups[k - base]
            {
                self.known.read(self.entries[k].pfn(), f.ksm, h, expect);
            }
            let zero = !f.zero_page && h == self.zero_hash && page.iter().all(|b| *b == 0);
            m.pages[p] = m.pages[p].rescanned(h, page_flags(zero, f));
        }
    }

    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    /// Waits `d`, running the rechecks' rounds as they fall due, and returns early once
    /// the pass is cancelled. When paced (a budget below one core), the wait is `d` plus
    /// each round's CPU at the budget's pace: the rounds pay for themselves. Without that they ran for free inside the pacing
    /// waits, and 512 suspect ranges of four new 4 GiB VMs put the scan thread at 7.7 %
    /// of a core on a 5 % budget.
    pub fn idle(&mut self, d: std::time::Duration) {
        self.wait(d, self.budget < 1.0);
    }

    /// [`Scanner::idle`] without the rounds paying for themselves; returns the CPU
    /// seconds they took, for a caller that charges them to a budget of its own (the
    /// quiet rest).
    pub fn idle_unpaced(&mut self, d: std::time::Duration) -> f64 {
        self.wait(d, false)
    }

    fn wait(&mut self, d: std::time::Duration, pay: bool) -> f64 {
        let mut end = std::time::Instant::now() + d;
        let mut spent = 0.0;
        loop {
            if self.cancelled() {
                return spent;
            }
            if self.rechecks.due(self.now()) {
                let cpu = crate::util::thread_cpu();
                self.recheck_round();
                let cpu = crate::util::thread_cpu() - cpu;
                tracing::trace!("recheck round: {:.1} ms of CPU", cpu * 1e3);
                self.recheck_round_cpu = cpu;
                spent += cpu;
                if pay {
                    end += std::time::Duration::from_secs_f64(cpu / self.budget);
                }
            }
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return spent;
            }
            // Nothing tracked: no round to wake for.
            let to_round = if self.rechecks.tracked() == 0 {
                left
            } else {
                std::time::Duration::from_secs_f64(
                    (self.rechecks.next_round() - self.now()).max(0.001),
                )
            };
            std::thread::sleep(left.min(SLEEP_SLICE).min(to_round));
        }
    }

    /// Reads every tracked sample once (present pages only, as the pass does: never
    /// faulting one in). A process that cannot be opened any more is dropped.
    fn recheck_round(&mut self) {
        for (pid, ranges) in self.rechecks.plan() {
            let (Ok(map), Ok(mem)) = (
                pagemap::Pagemap::open(pid),
                std::fs::File::open(format!("/proc/{pid}/mem")),
            ) else {
                self.rechecks.forget(pid);
                continue;
            };
            for (start, addrs) in ranges {
                let (Some(&first), Some(&last)) = (addrs.first(), addrs.last()) else {
                    continue;
                };
                let n = convert::usize_of((last - first) / PAGE as u64) + 1;
                if map.read(first, n, &mut self.entries).is_err() {
                    continue;
                }
                for addr in addrs {
                    let e = self.entries[convert::usize_of((addr - first) / PAGE as u64)];
                    if !e.present() || e.swapped() {
                        continue;
                    }
                    let got = read_remote(&mem, addr, &mut self.buf[..PAGE]);
                    self.bytes_read += got as u64;
                    if got == PAGE {
                        let h = xxh3_64(&self.buf[..PAGE]);
                        self.rechecks.observe(pid, start, addr, h, self.now());
                    }
                }
            }
        }
        self.rechecks.round_done(self.now());
    }

    /// What the last pass found, with duplicates counted across every scanned process.
    pub fn report(&self) -> Report {
        self.report_and_table().0
    }

    /// [`Scanner::report`], built in full only when a figure may have changed since the
    /// last call: otherwise the last one with its pass counts, bytes read and the
    /// rechecks' evidence brought up to date. A full report walks every page of every VM
    /// (1.2 s of CPU at 16 GiB of guests); a quiet VM's pass that changed nothing, the
    /// usual pass on a resting host, needs none of it.
    pub fn next_report(&mut self) -> std::sync::Arc<Report> {
        let report = match &self.last_report {
            Some(last) if !self.figures_changed => {
                self.reports_built.1 += 1;
                let mut r = Report::clone(last);
                self.refresh_report(&mut r);
                r
            }
            _ => {
                self.reports_built.0 += 1;
                self.figures_changed = false;
                self.report()
            }
        };
        let report = std::sync::Arc::new(report);
        self.last_report = Some(report.clone());
        report
    }

    /// Reports [`Scanner::next_report`] built in full, and reused.
    pub fn reports_built(&self) -> (u64, u64) {
        self.reports_built
    }

    /// What changes in a report without a page changing: the rechecks' evidence, the pass
    /// counts and bytes read.
    fn refresh_report(&self, report: &mut Report) {
        let now = self.now();
        for (pid, ranges) in report.ranges.iter_mut() {
            for r in ranges.iter_mut() {
                let e = self.rechecks.evidence(*pid, r.start, now);
                (r.rechecked_pages, r.rewritten_again_pages) = (e.sampled, e.repeated);
            }
        }
        report.passes = self.passes;
        report.vm_passes = self.vm_passes.clone();
        report.bytes_read = self.bytes_read;
        report.state_bytes_per_page = page_state::BYTES_PER_PAGE;
    }

    /// The report and what its content tables held (for sizing measurements).
    pub fn report_and_table(&self) -> (Report, account::TableStats) {
        let (mut report, table) = account::account(&self.procs, self.stable_after, self.sketches);
        self.refresh_report(&mut report);
        (report, table)
    }
}

/// A page's flags from what its content and frame showed.
fn page_flags(zero: bool, f: pagemap::FrameFlags) -> u8 {
    let bit = |on: bool, flag: u8| if on { flag } else { 0 };
    bit(zero, F_ZERO) | bit(f.zero_page, F_ZERO_FRAME) | bit(f.thp, F_THP) | bit(f.ksm, F_MERGED)
}

/// Sleeps for `d`, in slices of at most [`SLEEP_SLICE`], and returns early once `stop` is set: at
/// a small budget a pacing sleep lasts seconds, and shutdown must not wait for it.
pub fn sleep_unless(stop: Option<&std::sync::atomic::AtomicBool>, d: std::time::Duration) {
    let end = std::time::Instant::now() + d;
    loop {
        if stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed)) {
            return;
        }
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(SLEEP_SLICE));
    }
}
