//! The fabric: agents on different hosts exchange compact summaries of their VMs' stable
//! pages and find where memory would be shared: which host already holds most of a VM
//! (placement, migration) and how many hosts sharing-aware packing frees.

pub mod candidates;
pub mod client;
pub mod gossip_auth;
pub mod membership;
pub mod node;
pub mod plan;
pub mod service;
/// The sketch lives at the crate root (the scanner builds it too); here for the fabric's
/// users.
pub use crate::sketch;
pub mod stats;
pub mod summary;
pub mod tls;
