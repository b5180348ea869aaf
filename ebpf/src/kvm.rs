//! `kvm:kvm_page_fault`: guest-physical (EPT/NPT) faults of tracked VM processes. Fires in
//! the vCPU thread, so the current TGID is the VMM process.
//!
//! ```text
//! field:unsigned int vcpu_id;      offset:8;  size:4; signed:0;
//! field:unsigned long guest_rip;   offset:16; size:8; signed:0;
//! field:u64 fault_address;         offset:24; size:8; signed:0;
//! field:u64 error_code;            offset:32; size:8; signed:0;
//! ```

use core::ptr::addr_of_mut;

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use memfabric_common::KVM_PF_WRITE;

use crate::state::{TRACKED, bump, current_tgid, offsets};

#[tracepoint]
pub fn kvm_page_fault(ctx: TracePointContext) -> u32 {
    try_kvm_page_fault(&ctx).unwrap_or(1)
}

fn try_kvm_page_fault(ctx: &TracePointContext) -> Result<u32, i32> {
    let Some(stats) = TRACKED.get_ptr_mut(current_tgid()) else {
        return Ok(0);
    };
    let error_code: u64 = unsafe { ctx.read_at(offsets().kvm_error_code as usize)? };
    unsafe { bump(addr_of_mut!((*stats).kvm_faults)) };
    if error_code & KVM_PF_WRITE != 0 {
        unsafe { bump(addr_of_mut!((*stats).kvm_write_faults)) };
    }
    Ok(0)
}
