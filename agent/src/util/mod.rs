//! Leaves every other module may use, which use nothing of memfabric's.

pub mod clock;

/// Bytes in a page (`memfabric_common::PAGE_SHIFT`, as the probes count them).
pub const PAGE: usize = 1 << memfabric_common::PAGE_SHIFT;
