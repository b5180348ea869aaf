//! The label sets of memfabric's metrics, one type each (`EncodeLabelSet` derived: a
//! label's name is its field's name, in field order). Values whose spelling is a contract
//! come from one `as_str`/`kind`/`label` of their type, never from a literal here.

use prometheus_client::encoding::EncodeLabelSet;

/// A VM: every per-VM series.
#[derive(Clone, Debug, EncodeLabelSet)]
pub(super) struct Vm {
    pub(super) vm: String,
    pub(super) pid: u32,
    pub(super) kind: &'static str,
}

impl Vm {
    pub(super) fn of(v: &crate::model::VmState) -> Vm {
        Vm {
            vm: v.vm.name.clone(),
            pid: v.vm.pid,
            kind: v.vm.kind.as_str(),
        }
    }
}

/// A VM's process without its kind (the hints' mapping counts).
#[derive(Clone, Debug, EncodeLabelSet)]
pub(super) struct VmPid {
    pub(super) vm: String,
    pub(super) pid: u32,
}

/// Page faults by access.
#[derive(Clone, Debug, EncodeLabelSet)]
pub(super) struct Access {
    pub(super) access: &'static str,
}

/// Potential savings within a VM (`intra`) or with another (`inter`).
#[derive(Clone, Debug, EncodeLabelSet)]
pub(super) struct Scope {
    pub(super) scope: &'static str,
}

/// A range class.
#[derive(Clone, Debug, EncodeLabelSet)]
pub(super) struct Class {
    pub(super) class: &'static str,
}

/// A probe map.
#[derive(Clone, Debug, EncodeLabelSet)]
pub(super) struct Map {
    pub(super) map: &'static str,
}

/// A hint outcome's kind.
#[derive(Clone, Debug, EncodeLabelSet)]
pub(super) struct Outcome {
    pub(super) outcome: &'static str,
}

/// A controller's or a refusal's reason.
#[derive(Clone, Debug, EncodeLabelSet)]
pub(super) struct Reason {
    pub(super) reason: &'static str,
}

/// The build.
#[derive(Clone, Debug, EncodeLabelSet)]
pub(super) struct Version {
    pub(super) version: String,
}

/// A peer's state.
#[derive(Clone, Debug, EncodeLabelSet)]
pub(super) struct State {
    pub(super) state: &'static str,
}

/// A local VM and a peer host.
#[derive(Clone, Debug, EncodeLabelSet)]
pub(super) struct VmHost {
    pub(super) vm: String,
    pub(super) host: String,
}

/// How the scanner took in a page.
#[derive(Clone, Debug, EncodeLabelSet)]
pub(super) struct How {
    pub(super) how: &'static str,
}

/// Bytes in or out.
#[derive(Clone, Debug, EncodeLabelSet)]
pub(super) struct Direction {
    pub(super) direction: &'static str,
}

/// How a migrated page arrived.
#[derive(Clone, Debug, EncodeLabelSet)]
pub(super) struct Way {
    pub(super) way: &'static str,
}
