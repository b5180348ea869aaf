//! KSM tracepoints. Merges happen in ksmd's context and carry only an `mm` pointer, so they
//! are attributed through `MM_OWNER`, which the fault probe and `ksm_enter` fill in.
//!
//! ```text
//! ksm_merge_with_ksm_page: void *ksm_page @8; unsigned long pfn @16; void *rmap_item @24;
//!                          void *mm @32; int err @40
//! ksm_merge_one_page:      unsigned long pfn @8; void *rmap_item @16; void *mm @24; int err @32
//! ksm_remove_ksm_page:     unsigned long pfn @8
//! ksm_enter:               void *mm @8
//! ```
//! `ksm_merge_with_ksm_page` fires for every page ksmd merges into a KSM page (both pages
//! of a new pair, and pages joining an existing one); `ksm_merge_one_page` only for merges
//! with the zero page (`use_zero_pages`).

use core::ptr::addr_of_mut;

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use memfabric_common::{Counter, OFFSET_MISSING, Setting, UNKNOWN_OWNER};

use crate::state::{
    KSM_PAGES, MM_OWNER, TRACKED, bump, count, current_tgid, failed, learn_mm, mm_page, offsets,
    own_mm, read_kernel, setting,
};

#[tracepoint]
pub(crate) fn ksm_merge_with_ksm_page(ctx: TracePointContext) -> u32 {
    try_merge_with_ksm_page(&ctx).unwrap_or_else(failed)
}

fn try_merge_with_ksm_page(ctx: &TracePointContext) -> Result<u32, i32> {
    let off = offsets();
    // SAFETY: the offset is this tracepoint's field, from its format file at load time, and
    // the type is the field's; read_at copies it with bpf_probe_read_kernel (a bad read is
    // an error, never a fault).
    let err: i32 = unsafe { ctx.read_at(off.mwk_err as usize)? };
    if err != 0 {
        return Ok(0);
    }
    count(Counter::KsmMerges);
    // SAFETY: the offset is this tracepoint's field, from its format file at load time, and
    // the type is the field's; read_at copies it with bpf_probe_read_kernel (a bad read is
    // an error, never a fault).
    let mm: u64 = unsafe { ctx.read_at(off.mwk_mm as usize)? };
    let owner = match MM_OWNER.get_ptr(mm) {
        Some(owner) => {
            // SAFETY: a pointer the map lookup above returned: the value lives for this
            // program's run (map values are freed after an RCU grace period).
            let tgid = unsafe { *owner };
            let Some(stats) = TRACKED.get_ptr_mut(tgid) else {
                return Ok(0);
            };
            // SAFETY: `stats` points into the TRACKED value looked up above, live for this
            // run.
            unsafe { bump(addr_of_mut!((*stats).ksm_merges)) };
            tgid
        }
        None => {
            count(Counter::KsmMergesUntracked);
            // A tracked process that has not run since it was tracked has no known mm,
            // yet ksmd merges it all the same: remember the merge without an owner, and
            // let the process's first write fault through this mm claim it.
            if !setting(Setting::RememberUnowned) {
                return Ok(0);
            }
            count(Counter::KsmMergesUnowned);
            UNKNOWN_OWNER
        }
    };

    if off.rmap_address != OFFSET_MISSING {
        // Remember exactly which page was merged, so the fault probe can tell a KSM COW
        // break from other write-protect faults.
        // SAFETY: the offset is this tracepoint's field, from its format file at load time,
        // and the type is the field's; read_at copies it with bpf_probe_read_kernel (a bad
        // read is an error, never a fault).
        let rmap_item: u64 = unsafe { ctx.read_at(off.mwk_rmap_item as usize)? };
        let address: u64 = read_kernel(rmap_item, off.rmap_address)?;
        if KSM_PAGES.insert(mm_page(mm, address), owner, 0).is_err() {
            count(Counter::KsmPagesInsertFailed);
        }
    }
    Ok(0)
}

#[tracepoint]
pub(crate) fn ksm_merge_one_page(ctx: TracePointContext) -> u32 {
    try_merge_one_page(&ctx).unwrap_or_else(failed)
}

fn try_merge_one_page(ctx: &TracePointContext) -> Result<u32, i32> {
    let off = offsets();
    // SAFETY: the offset is this tracepoint's field, from its format file at load time, and
    // the type is the field's; read_at copies it with bpf_probe_read_kernel (a bad read is
    // an error, never a fault).
    let err: i32 = unsafe { ctx.read_at(off.mop_err as usize)? };
    if err != 0 {
        return Ok(0);
    }
    count(Counter::KsmZeroMerges);
    // SAFETY: the offset is this tracepoint's field, from its format file at load time, and
    // the type is the field's; read_at copies it with bpf_probe_read_kernel (a bad read is
    // an error, never a fault).
    let mm: u64 = unsafe { ctx.read_at(off.mop_mm as usize)? };
    let Some(owner) = MM_OWNER.get_ptr(mm) else {
        count(Counter::KsmMergesUntracked);
        return Ok(0);
    };
    // SAFETY: a pointer the map lookup above returned: the value lives for this program's
    // run (map values are freed after an RCU grace period).
    if let Some(stats) = TRACKED.get_ptr_mut(unsafe { *owner }) {
        // SAFETY: `stats` points into the TRACKED value looked up above, live for this run.
        unsafe { bump(addr_of_mut!((*stats).ksm_zero_merges)) };
    }
    Ok(0)
}

#[tracepoint]
pub(crate) fn ksm_remove_ksm_page(_ctx: TracePointContext) -> u32 {
    count(Counter::KsmPagesRemoved);
    0
}

/// `ksm_enter` fires in the context of the process whose mm joins KSM: the cheapest moment
/// to learn a tracked process's mm, before ksmd merges anything of it.
#[tracepoint]
pub(crate) fn ksm_enter(ctx: TracePointContext) -> u32 {
    try_ksm_enter(&ctx).unwrap_or_else(failed)
}

fn try_ksm_enter(ctx: &TracePointContext) -> Result<u32, i32> {
    // Every mm that joins KSM, tracked or not: the controller scans faster when one does.
    count(Counter::KsmEnters);
    let tgid = current_tgid();
    let Some(stats) = TRACKED.get_ptr_mut(tgid) else {
        return Ok(0);
    };
    let off = offsets();
    if off.task_mm == OFFSET_MISSING {
        // No BTF offset for task_struct.mm: take the event's own field.
        // SAFETY: the offset is this tracepoint's field, from its format file at load time,
        // and the type is the field's; read_at copies it with bpf_probe_read_kernel (a bad
        // read is an error, never a fault).
        let mm: u64 = unsafe { ctx.read_at(off.enter_mm as usize)? };
        // SAFETY: `stats` points into the TRACKED value looked up above, live for this run.
        unsafe { *addr_of_mut!((*stats).mm) = mm };
        own_mm(mm, tgid);
    } else {
        // SAFETY: `stats` is the TRACKED value of the current task's TGID, looked up above.
        unsafe { learn_mm(tgid, stats, &off) };
    }
    Ok(0)
}
