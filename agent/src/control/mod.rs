//! The daemon's loop, one tick at a time: **observe** (what /proc, /sys, the probes and
//! the scanner say: `daemon::Daemon::observe`), **model** (the pure joins of this module:
//! guest activity from the probes' counters, the ksmd controller's observation), **decide
//! and act** (the hints' and ksmd's controllers, each deciding from the model and applying
//! through `actuate`), **publish** (the [`crate::model::HostState`] the endpoints serve).
//! What is here needs no probes, no /proc and no root: it is unit-tested with recorded
//! counters.

pub mod activity;
#[cfg(feature = "ebpf")]
pub mod hints;
pub mod ksmd;
pub mod ksmd_input;
