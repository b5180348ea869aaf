//! Leaves every other module may use, which use nothing of memfabric's.

pub mod clock;
