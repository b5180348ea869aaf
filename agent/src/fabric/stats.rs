//! Counters of the fabric's channels, for the exposition: bytes each way and every refused
//! message by reason (a refusal is never silent: a forged or broken peer shows up here).

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a peer's message was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reject {
    /// Not a memfabric gossip datagram, or not a chitchat message inside.
    Malformed,
    /// The MAC does not verify: tampered, or sent with another key.
    BadMac,
    /// Its time is outside the window.
    Stale,
    /// A nonce already seen.
    Replay,
    /// Sent from another address than the sender it names, or to another recipient.
    Misaddressed,
    /// A gossiping member past the caps on peers (per address, in total).
    TooManyPeers,
    /// Larger than a datagram (sent) or than a summary may be (received).
    Oversize,
    /// A summary cut short, or one whose sketch or header does not decode.
    BadSummary,
    /// A TLS handshake failed (no certificate, one from another CA, wrong name).
    Tls,
    /// A summary fetch that did not finish in time (a peer holding the connection).
    Timeout,
}

impl Reject {
    pub const ALL: [Reject; 10] = [
        Reject::Malformed,
        Reject::BadMac,
        Reject::Stale,
        Reject::Replay,
        Reject::Misaddressed,
        Reject::TooManyPeers,
        Reject::Oversize,
        Reject::BadSummary,
        Reject::Tls,
        Reject::Timeout,
    ];

    /// Its counter's slot.
    fn slot(self) -> usize {
        Reject::ALL.iter().position(|x| *x == self).unwrap_or(0)
    }

    pub fn label(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::BadMac => "bad_mac",
            Reject::Stale => "stale",
            Reject::Replay => "replay",
            Reject::Misaddressed => "misaddressed",
            Reject::TooManyPeers => "too_many_peers",
            Reject::Oversize => "oversize",
            Reject::BadSummary => "bad_summary",
            Reject::Tls => "tls",
            Reject::Timeout => "timeout",
        }
    }
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

#[derive(Debug, Default)]
pub struct FabricStats {
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub gossip_bytes_in: AtomicU64,
    pub gossip_bytes_out: AtomicU64,
    rejected: [AtomicU64; Reject::ALL.len()],
}

impl FabricStats {
    pub fn reject(&self, r: Reject) {
        self.rejected[r.slot()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn rejected(&self, r: Reject) -> u64 {
        self.rejected[r.slot()].load(Ordering::Relaxed)
    }

    pub fn add_gossip_in(&self, n: usize) {
        self.gossip_bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn add_gossip_out(&self, n: usize) {
        self.gossip_bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        self.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn add_in(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn add_out(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    }
}
