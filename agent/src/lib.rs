//! memfabric: kernel-assisted page sharing for hypervisor hosts.
//!
//! Modules follow the data flow of docs/architecture.md: `tracefs`/`kernel_btf`/`probes`
//! (the kernel side), `inventory` and `ksm_host` (what /proc and /sys say), `model` (the
//! host's view), `policy` (pure decisions), `actuate` (the only code that changes the host),
//! `telemetry` (metrics and HTTP), `control` (the loop's pure steps) and `daemon` (the loop
//! itself), `config`.
//!
//! The `ebpf` feature (default) builds and embeds the probes; without it (xtask's view) the
//! library has no eBPF dependency: inventory, scan, policy and actuate only.

pub mod actuate;
pub mod addresses;
pub mod config;
pub mod control;
#[cfg(feature = "ebpf")]
pub mod daemon;
pub mod fabric;
pub mod heat;
pub mod http;
pub mod http_auth;
pub mod inventory;
pub mod kernel_btf;
pub mod ksm_host;
pub mod model;
pub mod policy;
#[cfg(feature = "ebpf")]
pub mod probes;
pub mod scan;
pub mod sketch;
pub mod telemetry;
pub mod tracefs;
pub mod util;
