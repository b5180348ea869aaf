//! Types shared by memfabric's eBPF programs (`memfabric-ebpf`) and its agent.
//!
//! Everything here crosses the kernel/user boundary through BPF maps or the ring buffer,
//! so every type is `#[repr(C)]`, `Copy`, and laid out without implicit padding: the
//! verifier rejects reads of uninitialised padding and both sides must agree byte for byte.
#![no_std]

/// Names of the BPF maps, shared so the agent looks up exactly what the programs define.
pub mod maps {
    /// `HashMap<u32 tgid, TgidStats>`: the tracked processes and their counters.
    pub const TRACKED: &str = "TRACKED";
    /// `HashMap<u64 mm, u32 tgid>`: which tracked process owns an `mm_struct`.
    pub const MM_OWNER: &str = "MM_OWNER";
    /// `LruHashMap<PageKey, u64>`: write heat per (tgid, page): write-protect faults (pages
    /// written again after being shared or write-protected: COW, KSM) in the low 32 bits,
    /// of which KSM COW breaks in the high 32 bits (see [`crate::heat`]).
    pub const WRITE_HEAT: &str = "WRITE_HEAT";
    /// `LruHashMap<MmPage, u32 tgid>`: pages of tracked processes that KSM merged, keyed
    /// by `mm` (merges the probes saw) or by [`MmPage::seeded`] (pages the agent found
    /// already merged). The value is the owner's TGID, or [`UNKNOWN_OWNER`].
    pub const KSM_PAGES: &str = "KSM_PAGES";
    /// `Array<u32>` of [`Setting`]s the agent changes at run time.
    pub const SETTINGS: &str = "SETTINGS";
    /// `PerCpuArray<u64>` indexed by [`crate::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// `RingBuf` of [`crate::Event`] records.
    pub const EVENTS: &str = "EVENTS";
}

/// Capacities of the BPF maps.
pub mod sizes {
    /// Tracked processes (VMs) per host.
    pub const TRACKED: u32 = 4096;
    /// `mm_struct`s of tracked processes (one per process, plus slack for exec).
    pub const MM_OWNER: u32 = 8192;
    /// Hottest written pages kept (LRU): 64 Ki entries is a few MiB of kernel memory.
    pub const WRITE_HEAT: u32 = 65_536;
    /// Merged pages of tracked processes remembered for exact COW-break attribution (LRU).
    /// 256 Ki entries cover 1 GiB of merged guest memory; past that the oldest merges are
    /// forgotten and their breaks are counted only by the write-protect signature.
    pub const KSM_PAGES: u32 = 262_144;
    /// Of those, the most a process merged before the agent tracked it is seeded with
    /// (so one large VM cannot evict every other's merges).
    pub const KSM_PAGES_SEEDED: u32 = KSM_PAGES / 4;
    /// Ring buffer bytes (must be a power of two multiple of the page size).
    pub const EVENTS: u32 = 256 * 1024;
}

/// The `WRITE_HEAT` value: two counters in one u64 so one atomic add updates both.
pub mod heat {
    /// Added for a KSM COW break (on top of [`WRITE_PROTECT`]).
    pub const COW_BREAK: u64 = 1 << 32;
    /// Added for every write-protect fault.
    pub const WRITE_PROTECT: u64 = 1;

    /// (write-protect faults, KSM COW breaks) of a `WRITE_HEAT` value.
    pub fn split(v: u64) -> (u32, u32) {
        (v as u32, (v >> 32) as u32)
    }
}

/// Page geometry of the architectures memfabric supports (x86_64, aarch64 with 4 KiB pages).
pub const PAGE_SHIFT: u32 = 12;
/// Mask that clears the in-page offset of an address.
pub const PAGE_MASK: u64 = !((1u64 << PAGE_SHIFT) - 1);

/// `error_code` bit of `exceptions:page_fault_user`: the fault hit a present page
/// (a protection fault rather than a missing page).
pub const PF_PROTECTION: u64 = 1 << 0;
/// `error_code` bit: the access was a write.
pub const PF_WRITE: u64 = 1 << 1;
/// `error_code` bit of `kvm:kvm_page_fault` (PFERR_WRITE_MASK): the guest access was a write.
pub const KVM_PF_WRITE: u64 = 1 << 1;

/// The page a `kvm:kvm_unmap_hva_range` event stands for when it can be a COW break: KVM's
/// MMU notifier fires for every invalidation of a VMM's memory (ksmd's own merges, THP
/// splits, reclaim, munmap, mprotect), and a COW break invalidates exactly one page, in the
/// writer's context. Other sizes are not COW breaks; the caller also drops events outside
/// tracked VMMs' own context (ksmd, kswapd).
pub fn kvm_unmap_page(start: u64, end: u64) -> Option<u64> {
    (end.wrapping_sub(start) == 1 << PAGE_SHIFT && start & !PAGE_MASK == 0).then_some(start)
}

/// Sentinel for a load-time offset global whose tracepoint field or kernel struct member
/// could not be found: the program that needs it skips that part of its work.
pub const OFFSET_MISSING: u32 = u32::MAX;

/// Per-process counters, the value of the `TRACKED` map. Updated with atomic adds by
/// every CPU, so the agent reads one consistent-enough snapshot without per-CPU sums.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TgidStats {
    /// User page faults that were reads (or instruction fetches).
    pub read_faults: u64,
    /// User page faults that were writes.
    pub write_faults: u64,
    /// Writes to a present, write-protected page: the COW-break signature. Includes
    /// fork COW and first writes to the shared zero page, not only KSM.
    pub write_protect_faults: u64,
    /// Writes to a page that the probes saw KSM merge for this process: a KSM COW break
    /// for certain (the kernel's `cow_ksm`, attributed to the process).
    pub ksm_cow_breaks: u64,
    /// `kvm:kvm_page_fault` events in this process (guest-physical faults).
    pub kvm_faults: u64,
    /// Of those, guest writes.
    pub kvm_write_faults: u64,
    /// Pages of this process merged by ksmd into a KSM page (`ksm_merge_with_ksm_page`).
    pub ksm_merges: u64,
    /// Pages of this process merged with the zero page (`ksm_merge_one_page`,
    /// `use_zero_pages`).
    pub ksm_zero_merges: u64,
    /// The `mm_struct` address the probes last saw for this process (0: not yet known).
    pub mm: u64,
}

/// Key of the `WRITE_HEAT` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageKey {
    pub tgid: u32,
    pub _pad: u32,
    /// Page-aligned user virtual address.
    pub page: u64,
}

/// Key of the `KSM_PAGES` map: an `mm_struct` and a page-aligned virtual address in it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MmPage {
    pub mm: u64,
    pub page: u64,
}

impl MmPage {
    /// The key of a page the agent found already merged (pagemap + kpageflags `KPF_KSM`)
    /// in a tracked process whose `mm` it cannot know: the TGID stands in for the `mm`.
    /// A TGID (< 2^22) is never a kernel address, so the two kinds of key cannot collide.
    pub fn seeded(tgid: u32, address: u64) -> MmPage {
        MmPage {
            mm: tgid as u64,
            page: address & PAGE_MASK,
        }
    }
}

/// `KSM_PAGES` value of a merge whose `mm` no tracked process was known to own when ksmd
/// merged it (a tracked process that had not run since it was tracked). The first write
/// fault through that `mm` claims it.
pub const UNKNOWN_OWNER: u32 = 0;

/// Indexes of the `SETTINGS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    /// Non-zero while some tracked process's `mm` is unknown: merges of unowned `mm`s are
    /// then remembered too (with [`UNKNOWN_OWNER`]), so a process that sleeps while ksmd
    /// merges it still has its COW breaks counted. Zero otherwise, so that untracked
    /// processes' merges do not crowd tracked ones out of the LRU.
    RememberUnowned = 0,
}

impl Setting {
    /// Entries in the `SETTINGS` array.
    pub const LEN: u32 = 1;
}

/// Indexes of the global `COUNTERS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Ring-buffer records that could not be reserved (buffer full): lost events.
    EventsDropped = 0,
    /// Successful `ksm_merge_with_ksm_page` events, any process.
    KsmMerges = 1,
    /// Successful `ksm_merge_one_page` (zero-page) merges, any process.
    KsmZeroMerges = 2,
    /// `ksm_remove_ksm_page` events: KSM pages freed.
    KsmPagesRemoved = 3,
    /// Merges of a tracked `mm` that could not be remembered in `KSM_PAGES`.
    KsmPagesInsertFailed = 4,
    /// Write-heat entries that could not be inserted.
    HeatInsertFailed = 5,
    /// Merge events whose `mm` belongs to no tracked process.
    KsmMergesUntracked = 6,
    /// `ksm_enter` events, any process: an `mm` joined KSM (new mergeable memory).
    KsmEnters = 7,
    /// Remembered merges dropped at a write fault because another process owned them: the
    /// `mm` address was freed and reused (a recycled `mm`), so the write is no COW break.
    KsmPagesStale = 8,
    /// Merges remembered without a known owner ([`UNKNOWN_OWNER`]).
    KsmMergesUnowned = 9,
    /// KSM COW breaks of tracked KVM processes seen through `kvm:kvm_unmap_hva_range`
    /// (a guest write resolved by KVM, or a write through GUP): no user page fault.
    KvmCowBreaks = 10,
    /// `mm` -> TGID entries that could not be inserted (`MM_OWNER` full): that process's
    /// merges are counted as untracked.
    MmOwnerInsertFailed = 11,
    /// Program runs that ended early: a tracepoint field or a kernel object could not be
    /// read (the event is not counted).
    ProbeErrors = 12,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; 13] = [
        Counter::EventsDropped,
        Counter::KsmMerges,
        Counter::KsmZeroMerges,
        Counter::KsmPagesRemoved,
        Counter::KsmPagesInsertFailed,
        Counter::HeatInsertFailed,
        Counter::KsmMergesUntracked,
        Counter::KsmEnters,
        Counter::KsmPagesStale,
        Counter::KsmMergesUnowned,
        Counter::KvmCowBreaks,
        Counter::MmOwnerInsertFailed,
        Counter::ProbeErrors,
    ];
    /// Entries in the `COUNTERS` array.
    pub const LEN: u32 = Self::ALL.len() as u32;
}

/// Kinds of ring-buffer [`Event`].
pub mod event_kind {
    /// A tracked process exited; `stats` holds its final counters and it left the maps.
    pub const EXIT: u32 = 1;
}

/// A ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    /// One of [`event_kind`].
    pub kind: u32,
    pub tgid: u32,
    pub stats: TgidStats,
}

/// Name of the load-time global that holds [`Offsets`].
pub const OFFSETS_GLOBAL: &str = "OFFSETS";

/// Where the programs find their inputs, set once at load time by the agent: tracepoint
/// field offsets from each tracepoint's tracefs `format` file and kernel struct member
/// offsets from the running kernel's BTF. Other kernels lay these records out differently,
/// so nothing here is hard-coded; [`OFFSET_MISSING`] marks what this kernel lacks.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    /// `exceptions:page_fault_user`: `address`, `error_code`.
    pub pf_address: u32,
    pub pf_error_code: u32,
    /// `kvm:kvm_page_fault`: `error_code`.
    pub kvm_error_code: u32,
    /// `ksm:ksm_merge_with_ksm_page`: `rmap_item`, `mm`, `err`.
    pub mwk_rmap_item: u32,
    pub mwk_mm: u32,
    pub mwk_err: u32,
    /// `ksm:ksm_merge_one_page`: `mm`, `err`.
    pub mop_mm: u32,
    pub mop_err: u32,
    /// `ksm:ksm_enter`: `mm`.
    pub enter_mm: u32,
    /// `kvm:kvm_unmap_hva_range`: `start`, `end`.
    pub kvm_unmap_start: u32,
    pub kvm_unmap_end: u32,
    /// `sched:sched_process_exit`: `group_dead` (absent on older kernels: then the
    /// main thread's exit stands for the process's).
    pub exit_group_dead: u32,
    /// BTF: byte offset of `mm` in `struct task_struct`.
    pub task_mm: u32,
    /// BTF: byte offset of `address` in `struct ksm_rmap_item`.
    pub rmap_address: u32,
}

impl Offsets {
    /// Every offset missing: what the programs see if the loader set nothing.
    pub const MISSING: Offsets = Offsets {
        pf_address: OFFSET_MISSING,
        pf_error_code: OFFSET_MISSING,
        kvm_error_code: OFFSET_MISSING,
        mwk_rmap_item: OFFSET_MISSING,
        mwk_mm: OFFSET_MISSING,
        mwk_err: OFFSET_MISSING,
        mop_mm: OFFSET_MISSING,
        mop_err: OFFSET_MISSING,
        enter_mm: OFFSET_MISSING,
        kvm_unmap_start: OFFSET_MISSING,
        kvm_unmap_end: OFFSET_MISSING,
        exit_group_dead: OFFSET_MISSING,
        task_mm: OFFSET_MISSING,
        rmap_address: OFFSET_MISSING,
    };
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], Copy, and have no padding or invalid bit patterns.
    unsafe impl aya::Pod for super::TgidStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PageKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MmPage {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Offsets {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<TgidStats>(), 9 * 8);
        assert_eq!(size_of::<PageKey>(), 16);
        assert_eq!(size_of::<MmPage>(), 16);
        assert_eq!(size_of::<Event>(), 8 + size_of::<TgidStats>());
    }

    #[test]
    fn kvm_unmaps_of_one_page_are_cow_candidates() {
        // Recorded on this kernel (6.18) from a process holding a KVM VM: MADV_DONTNEED of
        // one page, then munmap of the 4 MiB mapping; then what a COW break looks like.
        let recorded = [
            (0x007f1d14c03000, 0x007f1d14c04000, Some(0x007f1d14c03000)),
            (0x007f1d14c00000, 0x007f1d15000000, None),
        ];
        for (start, end, want) in recorded {
            assert_eq!(kvm_unmap_page(start, end), want, "{start:#x}-{end:#x}");
        }
        // A THP split or collapse (2 MiB), an empty or inverted range, an unaligned start.
        assert_eq!(kvm_unmap_page(0x200000, 0x400000), None);
        assert_eq!(kvm_unmap_page(0x1000, 0x1000), None);
        assert_eq!(kvm_unmap_page(0x2000, 0x1000), None);
        assert_eq!(kvm_unmap_page(0x1800, 0x2800), None);
    }

    #[test]
    fn counter_indexes_are_dense() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
