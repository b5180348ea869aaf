//! The ksmd controller's view of a tick ([`Observation`]), joined from the host's KSM
//! counters, the probes' global counters, the VMs and the scanner's savings estimate.

use crate::{
    host::ksm::KsmHost,
    model::VmState,
    policy::{KsmCounters, Observation},
};

/// What the tick knows besides KSM's own counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct Context {
    pub t: f64,
    /// `mm`s that joined KSM since the probes loaded.
    pub ksm_enters: u64,
    pub vms_arrived: u64,
    pub guest_writes: u64,
    pub potential_savings_bytes: Option<u64>,
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    pub hints_settling: bool,
}

/// The controller's observation. Counters the kernel could not give read as 0 (never
/// negative); mergeable pages are the guest RAM of VMs whose RAM KSM may merge.
pub fn observation(ksm: &KsmHost, vms: &[VmState], c: Context) -> Observation {
    let n = |v: i64| v.max(0) as u64;
    Observation {
        t: c.t,
        ksm: KsmCounters {
            pages_scanned: n(ksm.pages_scanned),
            pages_shared: n(ksm.pages_shared),
            pages_sharing: n(ksm.pages_sharing),
            pages_unshared: n(ksm.pages_unshared),
            pages_volatile: n(ksm.pages_volatile),
            full_scans: n(ksm.full_scans),
            general_profit: ksm.general_profit_bytes,
        },
        ksmd_cpu_seconds: ksm.ksmd_cpu_seconds,
        cow_ksm: ksm.cow_ksm,
        ksm_enters: c.ksm_enters,
        vms_arrived: c.vms_arrived,
        guest_writes: c.guest_writes,
        mergeable_pages: vms
            .iter()
            .filter(|v| v.vm.mergeability == crate::host::inventory::Mergeability::Mergeable)
            .map(|v| v.vm.guest_memory_bytes >> memfabric_common::PAGE_SHIFT)
            .sum(),
        potential_savings_pages: c
            .potential_savings_bytes
            .map(|b| b >> memfabric_common::PAGE_SHIFT),
        mem_available_bytes: c.mem_available_bytes,
        mem_total_bytes: c.mem_total_bytes,
        hints_settling: c.hints_settling,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::inventory::{Mergeability, Vm};

    fn vm(pid: u32, bytes: u64, mergeability: Mergeability) -> VmState {
        VmState {
            vm: Vm {
                name: format!("vm{pid}"),
                guest_memory_bytes: bytes,
                mergeability,
                ..Vm::guest(pid)
            },
            ksm: Default::default(),
            scan: None,
            range_classes: Default::default(),
            scan_pass_seconds: None,
            probes: None,
            write_faults_per_sec: 0.0,
            cow_breaks_per_sec: 0.0,
        }
    }

    #[test]
    fn the_controller_sees_mergeable_ram_and_clamped_counters() {
        let ksm = KsmHost {
            pages_sharing: 500,
            pages_unshared: -1, // unreadable on this kernel
            full_scans: 3,
            cow_ksm: 42,
            ..KsmHost::default()
        };
        let vms = [
            vm(1, 1 << 30, Mergeability::Mergeable),
            vm(2, 1 << 30, Mergeability::NotMarked),
            vm(3, 256 << 20, Mergeability::Mergeable),
        ];
        let o = observation(
            &ksm,
            &vms,
            Context {
                t: 5.0,
                vms_arrived: 2,
                potential_savings_bytes: Some(8 << 20),
                hints_settling: true,
                ..Context::default()
            },
        );
        assert_eq!(o.mergeable_pages, (1 << 18) + (1 << 16));
        assert_eq!(o.ksm.pages_sharing, 500);
        assert_eq!(o.ksm.pages_unshared, 0);
        assert_eq!(o.potential_savings_pages, Some(2048));
        assert_eq!((o.cow_ksm, o.vms_arrived, o.hints_settling), (42, 2, true));
    }
}
