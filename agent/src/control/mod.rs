//! The daemon's loop, one tick at a time: **observe** (what /proc, /sys, the probes and
//! the scanner say: `daemon::Daemon::observe`), **model** (the pure joins of this module:
//! guest activity from the probes' counters, the ksmd controller's observation), **decide
//! and act** (the hints' and ksmd's controllers, each deciding from the model and applying
//! through `actuate`), **publish** (the [`crate::wire::StatusV1`] the endpoints serve).
//! What is here needs no probes, no /proc and no root: it is unit-tested with recorded
//! counters.

pub mod activity;
#[cfg(feature = "ebpf")]
pub mod hints;
pub mod ksmd;
pub mod ksmd_input;
pub mod pace;
pub mod scan_wakes;

#[cfg(feature = "ebpf")]
pub use decide::{Controllers, Decided};

/// Decide and act: the hints' controller, then ksmd's, which holds its fast scan while the
/// hints have not judged every VM ([`crate::policy::Reason::HintsSettling`]).
#[cfg(feature = "ebpf")]
mod decide {
    use std::collections::BTreeMap;

    use super::{hints::Hinting, ksmd::Steering, ksmd_input};
    use crate::{
        host::inventory::Vm,
        host::ksm::KsmHost,
        model::VmState,
        model::rank::RankedRanges,
        util::thread_cpu,
        wire::{HintsStatus, KsmdStatus},
    };

    /// The two controllers of the loop.
    pub struct Controllers {
        pub hints: Hinting,
        /// Absent when the host has no KSM.
        pub ksmd: Option<Steering>,
    }

    /// What a tick decided (and, when acting, did).
    pub struct Decided {
        pub hints: HintsStatus,
        pub ksmd: Option<KsmdStatus>,
    }

    impl Controllers {
        /// One tick at `t` seconds over the VMs, their ranking and their states, with what
        /// else the ksmd controller needs in `context` (its `t` and `hints_settling` are
        /// set here).
        pub fn tick(
            &mut self,
            vms: &BTreeMap<u32, Vm>,
            ranked: &RankedRanges,
            states: &[VmState],
            ksm: &KsmHost,
            mut context: ksmd_input::Context,
        ) -> Decided {
            let t = context.t;
            let hints = self.hints.tick(t, vms, ranked);
            context.hints_settling = self.hints.settling(t, vms, ranked);
            let ksmd = self.ksmd.as_mut().map(|steering| {
                let cpu0 = thread_cpu();
                let obs = ksmd_input::observation(ksm, states, context);
                steering.tick(&obs, thread_cpu() - cpu0)
            });
            Decided { hints, ksmd }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::policy::{KsmdPolicy, Reason};

        fn state(v: &Vm) -> VmState {
            VmState::new(v.clone())
        }

        fn ksm(full_scans: i64, sharing: i64) -> KsmHost {
            KsmHost {
                available: true,
                run: 1,
                full_scans,
                pages_sharing: sharing,
                ..KsmHost::default()
            }
        }

        /// Recorded ticks of a host with one new mergeable VM: without acting hints ksmd
        /// runs fast for the new memory; with acting hints that have not judged the VM
        /// yet, ksmd holds its fast scan (and says why) until they could.
        #[test]
        fn ksmd_waits_for_acting_hints_and_runs_fast_otherwise() {
            let pid = std::process::id();
            let vms: BTreeMap<u32, Vm> = [(pid, Vm::guest(pid))].into();
            let states = [state(&vms[&pid])];
            let context = |t: f64| ksmd_input::Context {
                t,
                vms_arrived: 1,
                mem_total_bytes: 8 << 30,
                mem_available_bytes: 6 << 30,
                ..ksmd_input::Context::default()
            };
            let reasons = |c: &mut Controllers| -> Vec<Reason> {
                (0..4)
                    .filter_map(|i| {
                        let t = f64::from(i) * 2.0;
                        let ranked = RankedRanges::default();
                        c.tick(&vms, &ranked, &states, &ksm(i64::from(i), 0), context(t))
                            .ksmd
                            .map(|k| k.decision.reason)
                    })
                    .collect()
            };
            let observing = &mut Controllers {
                hints: Hinting::new(None, vec![]),
                ksmd: Some(Steering::new(KsmdPolicy::default(), None)),
            };
            let seen = reasons(observing);
            assert_eq!(seen.len(), 4);
            assert!(!seen.contains(&Reason::HintsSettling), "{seen:?}");

            let (hints, dir) = super::super::hints::acting_on_guest("control");
            let acting = &mut Controllers {
                hints,
                ksmd: Some(Steering::new(KsmdPolicy::default(), None)),
            };
            let held = reasons(acting);
            assert!(
                held.iter().skip(1).all(|r| *r == Reason::HintsSettling),
                "{held:?}"
            );
            acting.hints.finish();
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
