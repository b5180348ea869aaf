//! Pure decisions: observations in, settings and their reasons out. No I/O, no clock, no
//! kernel: everything here runs (and is property-tested) anywhere. `actuate` carries the
//! decisions out; the daemon observes and calls in between.

pub mod hints;
pub mod ksmd;

pub use ksmd::{Decision, Knobs, KsmCounters, KsmdController, KsmdPolicy, Observation, Reason};
