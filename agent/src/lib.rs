//! memfabric: kernel-assisted page sharing for hypervisor hosts.
//!
//! Modules follow the data flow of docs/architecture.md; this first slice has the probes
//! and what they need from the kernel.

pub mod inventory;
pub mod kernel_btf;
pub mod probes;
pub mod tracefs;
