//! memfabric: kernel-assisted page sharing for hypervisor hosts.
//!
//! Modules follow the data flow of docs/architecture.md: `tracefs`/`kernel_btf`/`probes`
//! (the kernel side), `inventory` and `ksm_host` (what /proc and /sys say), `model` (the
//! host's view), `telemetry` (metrics and HTTP), `daemon` (the loop), `config`.

pub mod config;
pub mod daemon;
pub mod inventory;
pub mod kernel_btf;
pub mod ksm_host;
pub mod model;
pub mod probes;
pub mod scan;
pub mod scan_worker;
pub mod telemetry;
pub mod tracefs;
