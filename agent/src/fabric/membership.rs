//! Who the peers are: the gossiping members chitchat reports, capped in all and per
//! address, each with its fetch state; `live` (gossiping, its summary fetched), `joining`
//! (gossiping, no summary yet), `stale` (the detector says dead, or its summary cannot be
//! fetched: its last summary is kept but not used for candidates), dropped after
//! [`DROP_AFTER`] stale.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{
    stats::{FabricStats, Reject},
    summary::Summary,
};

/// A stale peer is forgotten after this long.
pub const DROP_AFTER: Duration = Duration::from_secs(60);
/// Failed fetches before a gossiping peer counts as stale.
const STALE_AFTER_FAILURES: u32 = 3;
/// Gossiping members taken for peers at most, in all and per IP address: a member (it
/// holds the key) announcing thousands of node names must not grow the table, the fetches
/// and the candidates without bound. Past either, new names are refused and counted.
pub const MAX_PEERS: usize = 4096;
pub const MAX_PEERS_PER_ADDRESS: usize = 8;

/// Whether a new peer at `addr` fits, given how many peers each address has.
fn room_for(
    total: usize,
    per_address: &std::collections::HashMap<std::net::IpAddr, usize>,
    addr: SocketAddr,
) -> bool {
    total < MAX_PEERS && per_address.get(&addr.ip()).copied().unwrap_or(0) < MAX_PEERS_PER_ADDRESS
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    Joining,
    Live,
    Stale,
}

impl PeerState {
    pub const ALL: [PeerState; 3] = [PeerState::Joining, PeerState::Live, PeerState::Stale];
    pub fn label(self) -> &'static str {
        match self {
            PeerState::Joining => "joining",
            PeerState::Live => "live",
            PeerState::Stale => "stale",
        }
    }
}

pub(super) struct Peer {
    pub(super) addr: SocketAddr,
    /// The version gossip announces, and the one fetched.
    pub(super) announced: String,
    pub(super) fetched: Option<String>,
    pub(super) summary: Option<Arc<Summary>>,
    pub(super) gossiping: bool,
    pub(super) failures: u32,
    pub(super) next_try: Instant,
    pub(super) stale_since: Option<Instant>,
    pub(super) last_error: Option<String>,
}

impl Peer {
    pub(super) fn state(&self) -> PeerState {
        if !self.gossiping || self.failures >= STALE_AFTER_FAILURES {
            PeerState::Stale
        } else if self.summary.is_some() {
            PeerState::Live
        } else {
            PeerState::Joining
        }
    }
}

/// A peer as `memfabric peers` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct PeerView {
    pub node: String,
    pub addr: String,
    pub state: PeerState,
    pub summary_version: Option<String>,
    pub capacity_bytes: Option<u64>,
    pub used_bytes: Option<u64>,
    pub vms: Option<usize>,
    pub failures: u32,
    pub last_error: Option<String>,
}

/// Brings `peers` up to the members gossip reports live now (node, gossip address,
/// announced summary version): new ones within the caps (refusals counted), moved ones
/// fetched afresh, gone ones marked stale and dropped after [`DROP_AFTER`]. Returns
/// whether anything changed that can move candidates.
pub(super) fn sync(
    peers: &mut BTreeMap<String, Peer>,
    live: Vec<(String, SocketAddr, Option<String>)>,
    now: Instant,
    stats: &FabricStats,
) -> bool {
    let mut changed = false;
    for p in peers.values_mut() {
        p.gossiping = false;
    }
    let mut per_address: std::collections::HashMap<std::net::IpAddr, usize> =
        std::collections::HashMap::new();
    for p in peers.values() {
        *per_address.entry(p.addr.ip()).or_default() += 1;
    }
    for (node, addr, version) in live {
        if !peers.contains_key(&node) {
            if !room_for(peers.len(), &per_address, addr) {
                stats.reject(Reject::TooManyPeers);
                continue;
            }
            *per_address.entry(addr.ip()).or_default() += 1;
        }
        let p = peers.entry(node).or_insert_with(|| Peer {
            addr,
            announced: String::new(),
            fetched: None,
            summary: None,
            gossiping: true,
            failures: 0,
            next_try: now,
            stale_since: None,
            last_error: None,
        });
        if p.addr != addr {
            // Restarted elsewhere: fetch afresh.
            p.addr = addr;
            p.failures = 0;
            p.next_try = now;
        }
        p.gossiping = true;
        if let Some(v) = version {
            p.announced = v;
        }
    }
    for p in peers.values_mut() {
        let stale = p.state() == PeerState::Stale;
        match (stale, p.stale_since) {
            (true, None) => {
                p.stale_since = Some(now);
                changed = true;
            }
            (false, Some(_)) => {
                p.stale_since = None;
                changed = true;
            }
            _ => {}
        }
    }
    let before = peers.len();
    peers.retain(|_, p| {
        p.stale_since
            .is_none_or(|t| now.duration_since(t) < DROP_AFTER)
    });
    changed || peers.len() != before
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_capped_per_address_and_in_all() {
        let addr = |ip: &str| -> SocketAddr { format!("{ip}:7947").parse().unwrap() };
        let mut per = std::collections::HashMap::new();
        assert!(room_for(0, &per, addr("10.0.0.1")));
        per.insert(addr("10.0.0.1").ip(), MAX_PEERS_PER_ADDRESS);
        assert!(!room_for(10, &per, addr("10.0.0.1")));
        assert!(room_for(10, &per, addr("10.0.0.2")));
        assert!(!room_for(MAX_PEERS, &per, addr("10.0.0.3")));
    }
}
