//! Page scanner: reads the guest RAM of tracked processes (present pages only, found via
//! pagemap, so scanning never faults memory in), hashes every page (xxh3-64), keeps a
//! compact per-page history, and tells what is stable, volatile, duplicated, merged and
//! still mergeable. This is the one-shot core behind `memfabric scan`.
//!
//! Per-page state is 10 bytes: last hash (8), consecutive unchanged scans (1), flags (1).

pub mod pagemap;

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::inventory::{self, VmKind};

pub const PAGE: usize = 4096;
/// Pages read per process_vm_readv call (buffer reused).
const CHUNK: usize = 256;

const F_PRESENT: u8 = 1;
/// Zero content on a frame of its own (KSM can save it).
const F_ZERO: u8 = 2;
const F_MERGED: u8 = 4;
/// Present in the previous pass too (so "changed" is meaningful).
const F_SEEN: u8 = 8;
/// Mapped to the kernel's shared zero page (read, never written): costs nothing.
const F_ZERO_FRAME: u8 = 16;
/// Part of a transparent huge page.
const F_THP: u8 = 32;

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("no process with PID {0}")]
    UnknownPid(u32),
    #[error("reading /proc/{pid}/pagemap: {source} (needs root for frame numbers)")]
    Pagemap { pid: u32, source: std::io::Error },
}

/// One scanned mapping and its pages' history.
struct Mapping {
    start: u64,
    hash: Vec<u64>,
    unchanged: Vec<u8>,
    flags: Vec<u8>,
}

/// Figures for a set of pages (contract: field names are the JSON of `memfabric scan`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub pages_present: u64,
    /// Pages of zero bytes on frames of their own: what KSM saves by merging them (into
    /// one KSM page, or into the zero page with `use_zero_pages`).
    pub zero_pages: u64,
    /// Pages mapped to the kernel's shared zero page (read, never written): they use no
    /// memory and KSM leaves them alone.
    pub zero_frame_pages: u64,
    /// Of `zero_pages`, those inside transparent huge pages.
    pub zero_thp_pages: u64,
    pub stable_pages: u64,
    pub volatile_pages: u64,
    pub duplicate_pages: u64,
    pub mergeable_duplicate_pages: u64,
    pub merged_pages: u64,
    pub potential_savings_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    #[serde(flatten)]
    pub total: Counts,
    pub per_pid: BTreeMap<u32, Counts>,
    pub passes: u32,
    pub bytes_read: u64,
    /// Bytes of per-page state kept per tracked page.
    pub state_bytes_per_page: u32,
}

impl Counts {
    /// Pages KSM should end up saving (`pages_sharing + ksm_zero_pages` once it has
    /// converged): every mergeable duplicate, plus zero-filled pages that are not part of a
    /// transparent huge page. Zero-filled subpages of THPs are left out because on the
    /// kernel this was measured on (6.18, `use_zero_pages=0`, QEMU guests with THP-backed
    /// RAM) ksmd merged none of them in 8+ full scans while it merged every other
    /// duplicate (see tests/tests/scan_lab.rs). With `use_zero_pages=1` zero pages map to
    /// the zero page instead of one KSM page, so none of them is kept.
    pub fn predicted_ksm_pages(&self, use_zero_pages: bool) -> u64 {
        let zero = self.zero_pages - self.zero_thp_pages;
        let zero_saved = if use_zero_pages {
            zero
        } else {
            zero.saturating_sub(1)
        };
        self.mergeable_duplicate_pages + zero_saved
    }
}

/// Scans processes pass after pass, keeping per-page history between passes.
pub struct Scanner {
    stable_after: u8,
    procs: BTreeMap<u32, Vec<Mapping>>,
    buf: Vec<u8>,
    entries: Vec<pagemap::Entry>,
    passes: u32,
    bytes_read: u64,
    zero_hash: u64,
    /// Fraction of one core the scan may use (1.0: unpaced).
    budget: f64,
    /// Set to stop a pass early (the daemon's shutdown).
    cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// The mappings to scan: a VM's guest RAM; for any other process, its private anonymous
/// read-write mappings of 1 MiB or more.
fn targets(pid: u32) -> Result<Vec<(u64, u64)>, ScanError> {
    let proc_ =
        procfs::process::Process::new(pid as i32).map_err(|_| ScanError::UnknownPid(pid))?;
    let exe = proc_
        .exe()
        .ok()
        .and_then(|e| e.file_name().map(|n| n.to_string_lossy().into_owned()));
    if let Some(kind) = exe.as_deref().and_then(VmKind::from_exe)
        && let Some(vm) = inventory::describe(pid, kind)
        && !vm.ram.is_empty()
    {
        return Ok(vm.ram.iter().map(|m| (m.start, m.end)).collect());
    }
    use procfs::process::{MMPermissions, MMapPath};
    let maps = proc_.maps().map_err(|_| ScanError::UnknownPid(pid))?;
    Ok(maps
        .into_iter()
        .filter(|m| matches!(m.pathname, MMapPath::Anonymous))
        .filter(|m| {
            m.perms
                .contains(MMPermissions::READ | MMPermissions::WRITE | MMPermissions::PRIVATE)
                && !m.perms.contains(MMPermissions::EXECUTE)
        })
        .filter(|m| m.address.1 - m.address.0 >= 1 << 20)
        .map(|m| m.address)
        .collect())
}

/// Reads `len` bytes at `addr` of `pid` into `buf`; returns how many arrived.
fn read_remote(pid: u32, addr: u64, buf: &mut [u8]) -> usize {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: one local iovec over our own buffer; the kernel checks the remote side.
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    n.max(0) as usize
}

impl Scanner {
    /// `stable_after`: unchanged scans after which a page counts as stable (default 2).
    pub fn new(stable_after: u8) -> Scanner {
        Scanner {
            stable_after: stable_after.max(1),
            procs: BTreeMap::new(),
            buf: vec![0; CHUNK * PAGE],
            entries: Vec::new(),
            passes: 0,
            bytes_read: 0,
            zero_hash: xxh3_64(&[0u8; PAGE]),
            budget: 1.0,
            cancel: None,
        }
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
        self.procs.retain(|p, _| pids.contains(p));
    }

    /// Bytes read from processes so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// One pass over every page of `pids`.
    pub fn pass(&mut self, pids: &[u32]) -> Result<(), ScanError> {
        for &pid in pids {
            let ranges = targets(pid)?;
            let map =
                pagemap::Pagemap::open(pid).map_err(|source| ScanError::Pagemap { pid, source })?;
            let known = self.procs.remove(&pid).unwrap_or_default();
            let mut mappings = Vec::with_capacity(ranges.len());
            for (start, end) in ranges {
                let pages = ((end - start) as usize) / PAGE;
                let mut m = known
                    .iter()
                    .position(|k| k.start == start && k.hash.len() == pages)
                    .map(|i| Mapping {
                        start,
                        hash: known[i].hash.clone(),
                        unchanged: known[i].unchanged.clone(),
                        flags: known[i].flags.clone(),
                    })
                    .unwrap_or_else(|| Mapping {
                        start,
                        hash: vec![0; pages],
                        unchanged: vec![0; pages],
                        flags: vec![0; pages],
                    });
                self.scan_mapping(pid, &map, &mut m)?;
                mappings.push(m);
            }
            self.procs.insert(pid, mappings);
        }
        self.passes += 1;
        Ok(())
    }

    fn scan_mapping(
        &mut self,
        pid: u32,
        map: &pagemap::Pagemap,
        m: &mut Mapping,
    ) -> Result<(), ScanError> {
        let pages = m.hash.len();
        let mut first = 0;
        while first < pages {
            let chunk_start = std::time::Instant::now();
            let n = CHUNK.min(pages - first);
            let addr = m.start + (first * PAGE) as u64;
            map.read(addr, n, &mut self.entries)
                .map_err(|source| ScanError::Pagemap { pid, source })?;
            // Read runs of present pages only.
            let mut i = 0;
            while i < n {
                if !self.entries[i].present() || self.entries[i].swapped() {
                    let p = first + i;
                    m.flags[p] = 0;
                    m.unchanged[p] = 0;
                    i += 1;
                    continue;
                }
                let mut j = i;
                while j < n && self.entries[j].present() && !self.entries[j].swapped() {
                    j += 1;
                }
                let bytes = (j - i) * PAGE;
                let got = read_remote(pid, addr + (i * PAGE) as u64, &mut self.buf[..bytes]);
                self.bytes_read += got as u64;
                for k in i..j {
                    let p = first + k;
                    let off = (k - i) * PAGE;
                    if off + PAGE > got {
                        // Unmapped meanwhile: treat as not present.
                        m.flags[p] = 0;
                        m.unchanged[p] = 0;
                        continue;
                    }
                    let page = &self.buf[off..off + PAGE];
                    let h = xxh3_64(page);
                    let (merged, zero_frame, thp) = map.frame_flags(self.entries[k].pfn());
                    let was = m.flags[p];
                    let same = was & F_PRESENT != 0 && m.hash[p] == h;
                    m.unchanged[p] = if same {
                        m.unchanged[p].saturating_add(1)
                    } else {
                        0
                    };
                    m.hash[p] = h;
                    let zero = !zero_frame && h == self.zero_hash && page.iter().all(|b| *b == 0);
                    m.flags[p] = F_PRESENT
                        | if zero { F_ZERO } else { 0 }
                        | if zero_frame { F_ZERO_FRAME } else { 0 }
                        | if thp { F_THP } else { 0 }
                        | if merged { F_MERGED } else { 0 }
                        | if was & F_PRESENT != 0 { F_SEEN } else { 0 };
                }
                i = j;
            }
            first += n;
            if self.cancelled() {
                break;
            }
            if self.budget < 1.0 {
                let busy = chunk_start.elapsed();
                std::thread::sleep(busy.mul_f64(1.0 / self.budget - 1.0));
            }
        }
        Ok(())
    }

    /// What the last pass found, with duplicates counted across every scanned process.
    pub fn report(&self) -> Report {
        // Content table over stable non-zero pages: hash -> (pages, merged pages, owner pid).
        let mut groups: HashMap<u64, (u64, u64, u32)> = HashMap::new();
        let stable = |m: &Mapping, p: usize| {
            m.flags[p] & F_PRESENT != 0
                && m.flags[p] & (F_ZERO | F_ZERO_FRAME) == 0
                && m.unchanged[p] >= self.stable_after
        };
        for (&pid, maps) in &self.procs {
            for m in maps {
                for p in 0..m.hash.len() {
                    if stable(m, p) {
                        let g = groups.entry(m.hash[p]).or_insert((0, 0, pid));
                        g.0 += 1;
                        if m.flags[p] & F_MERGED != 0 {
                            g.1 += 1;
                        }
                    }
                }
            }
        }
        let mut report = Report {
            passes: self.passes,
            bytes_read: self.bytes_read,
            state_bytes_per_page: 10,
            ..Default::default()
        };
        for (&pid, maps) in &self.procs {
            let mut c = Counts::default();
            let mut owned = std::collections::HashSet::new();
            for m in maps {
                for p in 0..m.hash.len() {
                    let f = m.flags[p];
                    if f & F_PRESENT == 0 {
                        continue;
                    }
                    c.pages_present += 1;
                    if f & F_MERGED != 0 {
                        c.merged_pages += 1;
                    }
                    if f & F_ZERO_FRAME != 0 {
                        c.zero_frame_pages += 1;
                        continue;
                    }
                    if f & F_ZERO != 0 {
                        c.zero_pages += 1;
                        if f & F_THP != 0 {
                            c.zero_thp_pages += 1;
                        }
                        continue;
                    }
                    if stable(m, p) {
                        c.stable_pages += 1;
                        let (n, _, owner) = groups[&m.hash[p]];
                        if n >= 2 {
                            c.duplicate_pages += 1;
                            if owner == pid {
                                owned.insert(m.hash[p]);
                            }
                        }
                    } else if f & F_SEEN != 0 && m.unchanged[p] == 0 {
                        c.volatile_pages += 1;
                    }
                }
            }
            // One copy of each group stays: charged to the lowest PID holding it.
            c.mergeable_duplicate_pages = c.duplicate_pages - owned.len() as u64;
            let potential: u64 = owned
                .iter()
                .map(|h| {
                    let (n, merged, _) = groups[h];
                    (n - 1).saturating_sub(merged.saturating_sub(1))
                })
                .sum();
            c.potential_savings_bytes = potential * PAGE as u64;
            report.total.pages_present += c.pages_present;
            report.total.zero_pages += c.zero_pages;
            report.total.zero_frame_pages += c.zero_frame_pages;
            report.total.zero_thp_pages += c.zero_thp_pages;
            report.total.stable_pages += c.stable_pages;
            report.total.volatile_pages += c.volatile_pages;
            report.total.duplicate_pages += c.duplicate_pages;
            report.total.mergeable_duplicate_pages += c.mergeable_duplicate_pages;
            report.total.merged_pages += c.merged_pages;
            report.total.potential_savings_bytes += c.potential_savings_bytes;
            report.per_pid.insert(pid, c);
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::Counts;

    #[test]
    fn prediction_counts_duplicates_and_non_thp_zero_pages() {
        let c = Counts {
            mergeable_duplicate_pages: 100,
            zero_pages: 50,
            zero_thp_pages: 20,
            ..Default::default()
        };
        // 30 zero pages outside THPs: one KSM page keeps them, or the zero page does.
        assert_eq!(c.predicted_ksm_pages(false), 129);
        assert_eq!(c.predicted_ksm_pages(true), 130);
        assert_eq!(Counts::default().predicted_ksm_pages(false), 0);
    }
}
