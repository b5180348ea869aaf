//! Maps, load-time offsets and the small helpers every probe shares.

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    ptr::addr_of_mut,
};

use aya_ebpf::{
    Global,
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task, bpf_probe_read_kernel},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use memfabric_common::{
    Counter, MmPage, OFFSET_MISSING, Offsets, PageKey, Setting, TgidStats, UNKNOWN_OWNER, sizes,
};

/// Field and member offsets, overridden by the agent at load time.
#[unsafe(no_mangle)]
static OFFSETS: Global<Offsets> = Global::new(Offsets::MISSING);

#[map]
pub(crate) static TRACKED: HashMap<u32, TgidStats> = HashMap::with_max_entries(sizes::TRACKED, 0);
#[map]
pub(crate) static MM_OWNER: HashMap<u64, u32> = HashMap::with_max_entries(sizes::MM_OWNER, 0);
#[map]
pub(crate) static WRITE_HEAT: LruHashMap<PageKey, u64> =
    LruHashMap::with_max_entries(sizes::WRITE_HEAT, 0);
#[map]
pub(crate) static KSM_PAGES: LruHashMap<MmPage, u32> =
    LruHashMap::with_max_entries(sizes::KSM_PAGES, 0);
#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::LEN, 0);
#[map]
pub(crate) static SETTINGS: Array<u32> = Array::with_max_entries(Setting::LEN, 0);
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(sizes::EVENTS, 0);

/// The load-time offsets.
#[inline(always)]
pub(crate) fn offsets() -> Offsets {
    OFFSETS.load()
}

/// TGID (the process ID userspace knows) of the current task.
#[inline(always)]
pub(crate) fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// Adds one to a `u64` that other CPUs update too (a field of a shared map value).
///
/// # Safety
/// `field` must point into a live map value.
#[inline(always)]
pub(crate) unsafe fn bump(field: *mut u64) {
    // SAFETY: the caller's contract: `field` points into a live map value.
    unsafe { add_to(field, 1) };
}

/// Atomically adds `n` to a u64 in a map value.
///
/// # Safety
/// `field` must point into a live map value.
#[inline(always)]
pub(crate) unsafe fn add_to(field: *mut u64, n: u64) {
    // `AtomicU64::fetch_add` is not offered on the BPF target (no CAS); the intrinsic is.
    // The result is unused, so LLVM emits a plain BPF atomic add (no BPF_FETCH needed).
    // SAFETY: the caller's contract: `field` points into a live map value, aligned for a
    // u64.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, n) };
}

/// Whether a run-time setting is on.
#[inline(always)]
pub(crate) fn setting(s: Setting) -> bool {
    SETTINGS.get(s as u32).is_some_and(|v| *v != 0)
}

/// Adds one to a global per-CPU counter.
#[inline(always)]
pub(crate) fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot the lookup just returned: only this CPU writes it, and
        // programs do not nest on one CPU.
        unsafe { *slot += 1 };
    }
}

/// What a program returns when it ended early (a read failed): counted, never silent.
#[inline(always)]
pub(crate) fn failed(_errno: i32) -> u32 {
    count(Counter::ProbeErrors);
    1
}

/// Remembers that `mm` belongs to `tgid`; a full map is counted.
#[inline(always)]
pub(crate) fn own_mm(mm: u64, tgid: u32) {
    if MM_OWNER.insert(mm, tgid, 0).is_err() {
        count(Counter::MmOwnerInsertFailed);
    }
}

/// Reads a `T` at `offset` into a kernel object.
#[inline(always)]
pub(crate) fn read_kernel<T>(base: u64, offset: u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel checks the address: a bad one is an error, not a fault.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) }
}

/// Learns (or re-learns, after exec) the `mm_struct` of a tracked process from its own
/// context, so that ksmd's events, which carry only an `mm`, can be attributed to it.
/// Returns the process's current `mm`, or 0 when the kernel's BTF gave no offset for it.
///
/// # Safety
/// `stats` must point at the `TRACKED` value of the current task's TGID.
#[inline(always)]
pub(crate) unsafe fn learn_mm(tgid: u32, stats: *mut TgidStats, off: &Offsets) -> u64 {
    // SAFETY: a pointer the map lookup above returned: the value lives for this program's
    // run (map values are freed after an RCU grace period).
    let known = unsafe { (*stats).mm };
    if off.task_mm == OFFSET_MISSING {
        return known;
    }
    // SAFETY: a helper without preconditions; the task pointer is only read through
    // bpf_probe_read_kernel.
    let task = unsafe { bpf_get_current_task() };
    let Ok(mm) = read_kernel::<u64>(task, off.task_mm) else {
        return known;
    };
    if mm != known && mm != 0 {
        // SAFETY: `stats` points into the TRACKED value looked up above, live for this run.
        unsafe { *addr_of_mut!((*stats).mm) = mm };
        own_mm(mm, tgid);
        if known != 0
            && let Some(owner) = MM_OWNER.get_ptr(known)
            // SAFETY: a pointer the map lookup above returned: the value lives for this
            // program's run (map values are freed after an RCU grace period).
            && unsafe { *owner } == tgid
        {
            // exec gave the process a new mm; the old one is gone with it.
            let _ = MM_OWNER.remove(known);
        }
    }
    mm
}

/// Whether a write by `tgid` (whose `mm` is `mm`, 0 if unknown) to `address` breaks a
/// merge the probes remembered: one ksmd merged through this `mm` (seen by
/// `ksm_merge_with_ksm_page`) or one the agent found already merged when it began tracking
/// the process (keyed by TGID). Either is forgotten here: the write leaves the page
/// unshared.
#[inline(always)]
pub(crate) fn ksm_cow_break(tgid: u32, mm: u64, address: u64) -> bool {
    if mm != 0 {
        let key = mm_page(mm, address);
        if let Some(owner) = KSM_PAGES.get_ptr(key) {
            // SAFETY: a pointer the map lookup above returned: the value lives for this
            // program's run (map values are freed after an RCU grace period).
            let owner = unsafe { *owner };
            let _ = KSM_PAGES.remove(key);
            if owner == tgid || owner == UNKNOWN_OWNER {
                return true;
            }
            // Another process's merge at the same mm address: that mm was freed and its
            // address reused by this one. Not a COW break.
            count(Counter::KsmPagesStale);
        }
    }
    let seeded = MmPage::seeded(tgid, address);
    if KSM_PAGES.get_ptr(seeded).is_some() {
        let _ = KSM_PAGES.remove(seeded);
        return true;
    }
    false
}

/// Adds `add` to the write heat of `tgid`'s page at `address`.
#[inline(always)]
pub(crate) fn add_heat(tgid: u32, address: u64, add: u64) {
    let key = PageKey {
        tgid,
        _pad: 0,
        page: address & memfabric_common::PAGE_MASK,
    };
    match WRITE_HEAT.get_ptr_mut(key) {
        Some(v) => {
            // SAFETY: `v` points into the WRITE_HEAT value the lookup just returned.
            unsafe { add_to(v, add) }
        }
        None => {
            if WRITE_HEAT.insert(key, add, 0).is_err() {
                count(Counter::HeatInsertFailed);
            }
        }
    }
}

/// The page of `mm` at `address` (flag bits masked off), as a `KSM_PAGES` key.
#[inline(always)]
pub(crate) fn mm_page(mm: u64, address: u64) -> MmPage {
    MmPage {
        mm,
        page: address & memfabric_common::PAGE_MASK,
    }
}
