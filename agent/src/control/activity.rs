//! Guest activity from the probes' cumulative counters: per VM, the write-fault and
//! COW-break rates since the previous tick, and host-wide the first-touch writes that tell
//! ksmd guests are populating new memory.

use std::collections::HashMap;

use crate::model::VmProbeCounters;

/// What the previous tick saw of each VM, and the first-touch writes since the start.
#[derive(Debug, Default)]
pub struct Activity {
    previous: HashMap<u32, (f64, VmProbeCounters)>,
    guest_writes: u64,
}

/// One VM's rates over the last tick (0 on its first).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rates {
    pub write_faults_per_sec: f64,
    pub cow_breaks_per_sec: f64,
}

impl Activity {
    /// The counters of `pid` at `t` seconds: its rates since the previous tick. Only first
    /// touches count as guest writes: writes to present pages (COW breaks of churning
    /// memory) are no new memory, and re-merging churn does not pay; KVM's guest write
    /// faults do.
    pub fn update(&mut self, pid: u32, t: f64, counters: Option<VmProbeCounters>) -> Rates {
        let Some(now) = counters else {
            return Rates::default();
        };
        let rates = match self.previous.get(&pid) {
            Some((then, prev)) => {
                let dt = (t - then).max(1e-3);
                self.guest_writes += now
                    .new_memory_writes()
                    .saturating_sub(prev.new_memory_writes());
                Rates {
                    write_faults_per_sec: now.write_faults.saturating_sub(prev.write_faults) as f64
                        / dt,
                    cow_breaks_per_sec: now.cow_breaks.saturating_sub(prev.cow_breaks) as f64 / dt,
                }
            }
            None => Rates::default(),
        };
        self.previous.insert(pid, (t, now));
        rates
    }

    /// A VM is gone: a new process with its PID starts from zero.
    pub fn forget(&mut self, pid: u32) {
        self.previous.remove(&pid);
    }

    /// First-touch write faults of tracked VMs since the start.
    pub fn guest_writes(&self) -> u64 {
        self.guest_writes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(write: u64, protect: u64, cow: u64, kvm_write: u64) -> VmProbeCounters {
        VmProbeCounters {
            write_faults: write,
            write_protect_faults: protect,
            cow_breaks: cow,
            kvm_write_faults: kvm_write,
            ..VmProbeCounters::default()
        }
    }

    #[test]
    fn rates_and_first_touches_follow_the_counters() {
        let mut a = Activity::default();
        // First sight: no rate yet, nothing counted.
        assert_eq!(
            a.update(7, 10.0, Some(counters(100, 0, 0, 0))),
            Rates::default()
        );
        // 2 s later: 400 more write faults, 300 of them on present pages (churn), 50 COW
        // breaks, 20 KVM write faults.
        let r = a.update(7, 12.0, Some(counters(500, 300, 50, 20)));
        assert_eq!(r.write_faults_per_sec, 200.0);
        assert_eq!(r.cow_breaks_per_sec, 25.0);
        assert_eq!(a.guest_writes(), 100 + 20);
        // Untracked this tick (no probe counters): no rate, nothing forgotten.
        assert_eq!(a.update(7, 14.0, None), Rates::default());
        let r = a.update(7, 16.0, Some(counters(900, 300, 50, 20)));
        assert_eq!(r.write_faults_per_sec, 100.0);
        assert_eq!(a.guest_writes(), 520);
    }

    #[test]
    fn a_vm_that_left_starts_again_from_zero() {
        let mut a = Activity::default();
        a.update(7, 0.0, Some(counters(1000, 0, 0, 0)));
        a.forget(7);
        // A new process with the same PID and smaller counters: no negative rate, no
        // writes counted for its first tick.
        assert_eq!(
            a.update(7, 2.0, Some(counters(10, 0, 0, 0))),
            Rates::default()
        );
        assert_eq!(a.guest_writes(), 0);
        // Counters that went backwards are no writes either.
        let r = a.update(7, 4.0, Some(counters(5, 0, 0, 0)));
        assert_eq!(r.write_faults_per_sec, 0.0);
        assert_eq!(a.guest_writes(), 0);
    }
}
