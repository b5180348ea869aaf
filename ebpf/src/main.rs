//! memfabric's eBPF programs: one object, one module per probe family. Tracepoints only:
//! kprobes and fentry are not available on the hosts we target (see docs/architecture.md).
#![no_std]
#![no_main]
// Atomic adds on shared map values (see state::bump); the eBPF crate always builds on nightly.
#![feature(core_intrinsics)]
#![allow(
    internal_features,
    reason = "core_intrinsics: the atomic add the BPF target offers (no CAS for AtomicU64)"
)]

mod exit;
mod ksm;
mod kvm;
mod learn;
mod page_fault;
mod state;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves there is no way here; a panic in BPF cannot unwind anyway.
    loop {}
}

/// GPL-compatible, as `bpf_probe_read_kernel` and the ring buffer helpers require.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
