//! `exceptions:page_fault_user`: read/write faults, the COW-break signature and exact KSM
//! COW breaks, plus per-page write heat (write-protect faults and KSM COW breaks), for
//! tracked processes only.
//!
//! ```text
//! field:unsigned long address;     offset:8;  size:8; signed:0;
//! field:unsigned long ip;          offset:16; size:8; signed:0;
//! field:unsigned long error_code;  offset:24; size:8; signed:0;
//! ```
//! (Linux 6.18; the offsets used are read from tracefs at load time.)

use core::ptr::addr_of_mut;

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use memfabric_common::{PF_PROTECTION, PF_WRITE, heat};

use crate::state::{
    TRACKED, add_heat, bump, current_tgid, failed, ksm_cow_break, learn_mm, offsets,
};

#[tracepoint]
pub(crate) fn page_fault_user(ctx: TracePointContext) -> u32 {
    try_page_fault_user(&ctx).unwrap_or_else(failed)
}

fn try_page_fault_user(ctx: &TracePointContext) -> Result<u32, i32> {
    let tgid = current_tgid();
    // The in-kernel filter: untracked processes cost one hash lookup.
    let Some(stats) = TRACKED.get_ptr_mut(tgid) else {
        return Ok(0);
    };
    let off = offsets();
    // SAFETY: the offset is this tracepoint's field, from its format file at load time, and
    // the type is the field's; read_at copies it with bpf_probe_read_kernel (a bad read is
    // an error, never a fault).
    let error_code: u64 = unsafe { ctx.read_at(off.pf_error_code as usize)? };
    // SAFETY: `stats` is the TRACKED value of the current task's TGID, looked up above.
    let mm = unsafe { learn_mm(tgid, stats, &off) };
    if error_code & PF_WRITE == 0 {
        // SAFETY: `stats` points into the TRACKED value looked up above, live for this run.
        unsafe { bump(addr_of_mut!((*stats).read_faults)) };
        return Ok(0);
    }
    // SAFETY: `stats` points into the TRACKED value looked up above, live for this run.
    unsafe { bump(addr_of_mut!((*stats).write_faults)) };
    // SAFETY: the offset is this tracepoint's field, from its format file at load time, and
    // the type is the field's; read_at copies it with bpf_probe_read_kernel (a bad read is
    // an error, never a fault).
    let address: u64 = unsafe { ctx.read_at(off.pf_address as usize)? };

    if error_code & PF_PROTECTION == 0 {
        // First touch of a missing page: nothing was shared or write-protected yet.
        return Ok(0);
    }
    // A write to a present read-only page: fork COW, the zero page, or a KSM page.
    // SAFETY: `stats` points into the TRACKED value looked up above, live for this run.
    unsafe { bump(addr_of_mut!((*stats).write_protect_faults)) };
    let mut add = heat::WRITE_PROTECT;
    if ksm_cow_break(tgid, mm, address) {
        // SAFETY: `stats` points into the TRACKED value looked up above, live for this run.
        unsafe { bump(addr_of_mut!((*stats).ksm_cow_breaks)) };
        add += heat::COW_BREAK;
    }
    // Write heat counts writes to pages that were present and write-protected: pages
    // written again after being shared. First-touch faults say nothing about volatility
    // and would flood the LRU (they doubled the fault cost of a tracked process).
    add_heat(tgid, address, add);
    Ok(0)
}
