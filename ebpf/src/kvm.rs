//! `kvm:kvm_page_fault`: guest-physical (EPT/NPT) faults of tracked VM processes. Fires in
//! the vCPU thread, so the current TGID is the VMM process.
//!
//! `kvm:kvm_unmap_hva_range`: KVM's MMU notifier, for any invalidation of a VMM's memory.
//! A guest's write to a merged page is resolved by KVM (GUP with FOLL_WRITE), not by a user
//! page fault, so `page_fault_user` never sees that COW break; the invalidation of that one
//! page fires here, on the writing vCPU thread, with the host virtual address.
//! ```text
//! field:unsigned long start;       offset:8;  size:8; signed:0;
//! field:unsigned long end;         offset:16; size:8; signed:0;
//! ```
//!
//! ```text
//! field:unsigned int vcpu_id;      offset:8;  size:4; signed:0;
//! field:unsigned long guest_rip;   offset:16; size:8; signed:0;
//! field:u64 fault_address;         offset:24; size:8; signed:0;
//! field:u64 error_code;            offset:32; size:8; signed:0;
//! ```

use core::ptr::addr_of_mut;

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use memfabric_common::{Counter, KVM_PF_WRITE, heat, kvm_unmap_page};

use crate::state::{
    TRACKED, add_heat, bump, count, current_tgid, failed, ksm_cow_break, learn_mm, offsets,
};

#[tracepoint]
pub(crate) fn kvm_page_fault(ctx: TracePointContext) -> u32 {
    try_kvm_page_fault(&ctx).unwrap_or_else(failed)
}

fn try_kvm_page_fault(ctx: &TracePointContext) -> Result<u32, i32> {
    let Some(stats) = TRACKED.get_ptr_mut(current_tgid()) else {
        return Ok(0);
    };
    // SAFETY: the offset is this tracepoint's field, from its format file at load time, and
    // the type is the field's; read_at copies it with bpf_probe_read_kernel (a bad read is
    // an error, never a fault).
    let error_code: u64 = unsafe { ctx.read_at(offsets().kvm_error_code as usize)? };
    // SAFETY: `stats` points into the TRACKED value looked up above, live for this run.
    unsafe { bump(addr_of_mut!((*stats).kvm_faults)) };
    if error_code & KVM_PF_WRITE != 0 {
        // SAFETY: `stats` points into the TRACKED value looked up above, live for this run.
        unsafe { bump(addr_of_mut!((*stats).kvm_write_faults)) };
    }
    Ok(0)
}

#[tracepoint]
pub(crate) fn kvm_unmap_hva_range(ctx: TracePointContext) -> u32 {
    try_kvm_unmap_hva_range(&ctx).unwrap_or_else(failed)
}

fn try_kvm_unmap_hva_range(ctx: &TracePointContext) -> Result<u32, i32> {
    // Only the VMM's own context: ksmd's merges, kswapd's reclaim and khugepaged's
    // collapses invalidate the same memory from other tasks.
    let tgid = current_tgid();
    let Some(stats) = TRACKED.get_ptr_mut(tgid) else {
        return Ok(0);
    };
    let off = offsets();
    // SAFETY: the offset is this tracepoint's field, from its format file at load time, and
    // the type is the field's; read_at copies it with bpf_probe_read_kernel (a bad read is
    // an error, never a fault).
    let start: u64 = unsafe { ctx.read_at(off.kvm_unmap_start as usize)? };
    // SAFETY: the offset is this tracepoint's field, from its format file at load time, and
    // the type is the field's; read_at copies it with bpf_probe_read_kernel (a bad read is
    // an error, never a fault).
    let end: u64 = unsafe { ctx.read_at(off.kvm_unmap_end as usize)? };
    let Some(page) = kvm_unmap_page(start, end) else {
        return Ok(0);
    };
    // SAFETY: `stats` is the TRACKED value of the current task's TGID, looked up above.
    let mm = unsafe { learn_mm(tgid, stats, &off) };
    // A user write to a merged page faulted first: page_fault_user already counted it and
    // forgot the page, so nothing is counted twice here.
    if ksm_cow_break(tgid, mm, page) {
        // SAFETY: `stats` points into the TRACKED value looked up above, live for this run.
        unsafe { bump(addr_of_mut!((*stats).ksm_cow_breaks)) };
        count(Counter::KvmCowBreaks);
        add_heat(tgid, page, heat::WRITE_PROTECT + heat::COW_BREAK);
    }
    Ok(0)
}
