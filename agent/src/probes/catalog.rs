//! Which program attaches to which tracepoint, and which record fields it needs.

use memfabric_common::Offsets;

/// Where a required field's offset goes in [`Offsets`].
type Slot = fn(&mut Offsets) -> &mut u32;

/// A field a program reads from its tracepoint record.
pub struct FieldSpec {
    pub name: &'static str,
    /// Bytes the program reads: a kernel whose record has another size for the field
    /// would be misread, so the program is not attached there.
    pub size: u32,
    pub slot: Slot,
    /// Optional fields may be missing; the program then falls back (documented per field).
    pub optional: bool,
}

/// One program of the eBPF object and its default tracepoint.
pub struct ProbeSpec {
    /// Program (function) name in the eBPF object.
    pub program: &'static str,
    pub category: &'static str,
    pub tracepoint: &'static str,
    pub fields: &'static [FieldSpec],
    /// What the operator loses without it.
    pub signal: &'static str,
    /// Attached only while needed (see [`crate::probes::Probes::refresh_mm_learning`]).
    pub on_demand: bool,
}

const fn field(name: &'static str, size: u32, slot: Slot) -> FieldSpec {
    FieldSpec {
        name,
        size,
        slot,
        optional: false,
    }
}

/// Every probe memfabric loads.
pub const PROBES: &[ProbeSpec] = &[
    ProbeSpec {
        program: "page_fault_user",
        category: "exceptions",
        tracepoint: "page_fault_user",
        fields: &[
            field("address", 8, |o| &mut o.pf_address),
            field("error_code", 8, |o| &mut o.pf_error_code),
        ],
        signal: "per-VM read/write faults, COW breaks and write heat",
        on_demand: false,
    },
    ProbeSpec {
        program: "kvm_page_fault",
        category: "kvm",
        tracepoint: "kvm_page_fault",
        fields: &[field("error_code", 8, |o| &mut o.kvm_error_code)],
        signal: "KVM guest-physical faults",
        on_demand: false,
    },
    ProbeSpec {
        program: "kvm_unmap_hva_range",
        category: "kvm",
        tracepoint: "kvm_unmap_hva_range",
        fields: &[
            field("start", 8, |o| &mut o.kvm_unmap_start),
            field("end", 8, |o| &mut o.kvm_unmap_end),
        ],
        signal: "KSM COW breaks of KVM guests (guest writes resolved by KVM)",
        on_demand: false,
    },
    ProbeSpec {
        program: "ksm_merge_with_ksm_page",
        category: "ksm",
        tracepoint: "ksm_merge_with_ksm_page",
        fields: &[
            field("rmap_item", 8, |o| &mut o.mwk_rmap_item),
            field("mm", 8, |o| &mut o.mwk_mm),
            field("err", 4, |o| &mut o.mwk_err),
        ],
        signal: "per-VM KSM merges and exact KSM COW breaks",
        on_demand: false,
    },
    ProbeSpec {
        program: "ksm_merge_one_page",
        category: "ksm",
        tracepoint: "ksm_merge_one_page",
        fields: &[
            field("mm", 8, |o| &mut o.mop_mm),
            field("err", 4, |o| &mut o.mop_err),
        ],
        signal: "KSM zero-page merges",
        on_demand: false,
    },
    ProbeSpec {
        program: "ksm_remove_ksm_page",
        category: "ksm",
        tracepoint: "ksm_remove_ksm_page",
        fields: &[],
        signal: "KSM pages freed",
        on_demand: false,
    },
    ProbeSpec {
        program: "ksm_enter",
        category: "ksm",
        tracepoint: "ksm_enter",
        fields: &[field("mm", 8, |o| &mut o.enter_mm)],
        signal: "early mm attribution of processes entering KSM",
        on_demand: false,
    },
    ProbeSpec {
        program: "sched_process_exit",
        category: "sched",
        tracepoint: "sched_process_exit",
        fields: &[FieldSpec {
            name: "group_dead",
            size: 1,
            slot: |o| &mut o.exit_group_dead,
            // Without it the main thread's exit stands for the whole process's.
            optional: true,
        }],
        signal: "tracked processes leaving the maps on exit",
        on_demand: false,
    },
    ProbeSpec {
        program: "sched_switch",
        category: "sched",
        tracepoint: "sched_switch",
        fields: &[],
        signal: "KSM attribution of tracked processes that do not fault (e.g. idle TCG guests)",
        on_demand: true,
    },
];

/// The spec of `program`, if memfabric has such a program.
pub fn find(program: &str) -> Option<&'static ProbeSpec> {
    PROBES.iter().find(|p| p.program == program)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_distinct() {
        let mut o = Offsets::MISSING;
        let mut n = 0;
        for p in PROBES {
            for f in p.fields {
                n += 1;
                *(f.slot)(&mut o) = n;
            }
        }
        let mut seen = std::collections::HashSet::new();
        for p in PROBES {
            for f in p.fields {
                assert!(
                    seen.insert(*(f.slot)(&mut o)),
                    "{}.{} shares a slot",
                    p.program,
                    f.name
                );
            }
        }
    }

    #[test]
    fn program_names_are_unique() {
        let mut seen = std::collections::HashSet::new();
        assert!(PROBES.iter().all(|p| seen.insert(p.program)));
    }
}
