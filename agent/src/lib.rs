//! memfabric: kernel-assisted page sharing for hypervisor hosts.
//!
//! Modules follow the loop of docs/architecture.md, in layers (each uses only the ones
//! below it; `tests/module_graph.rs` checks it): leaves (`util`, `sketch`, `heat`,
//! `addresses`, `http_auth`); the host's read-only observers (`host`), `config` and the
//! hardened HTTP loop (`http`); the guests' observers (`probes`, `scan`); the pure joins
//! (`model`); pure decisions (`policy`); the only writer (`actuate`) and the published
//! documents (`wire`); the loop's steps (`control`); other hosts (`fabric`); metrics and
//! the API (`telemetry`); the loop itself (`daemon`). `migrate` (above `fabric`) moves a
//! VM to another host through deduplicating proxies.
//!
//! The `ebpf` feature (default) builds and embeds the probes; without it (xtask's view) the
//! library has no eBPF dependency: inventory, scan, policy and actuate only.

// Narrowing casts go through `util::convert`, each written once with why it is sound.
#![deny(clippy::cast_possible_truncation)]

pub mod actuate;
pub mod addresses;
pub mod config;
pub mod control;
#[cfg(feature = "ebpf")]
pub mod daemon;
pub mod fabric;
pub mod heat;
pub mod host;
pub mod http;
pub mod http_auth;
pub mod migrate;
pub mod model;
pub mod policy;
#[cfg(feature = "ebpf")]
pub mod probes;
pub mod scan;
pub mod sketch;
pub mod telemetry;
pub mod util;
pub mod wire;
