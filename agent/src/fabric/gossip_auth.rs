//! chitchat's gossip over UDP, with every datagram authenticated. chitchat itself trusts
//! whatever arrives; on a fabric of root daemons a forged datagram could invent hosts or
//! steer placement. Each datagram carries a header and an HMAC-SHA256 over all of it
//! under the cluster's shared key:
//!
//! ```text
//! "MFG2" | unix time in ms (u64 LE) | random nonce (u64 LE) | sender | recipient
//!        | chitchat bytes | HMAC (32)
//! ```
//!
//! (an address is 16 bytes of IPv6, IPv4 mapped, and the port, u16 LE). A receiver
//! refuses, and counts by reason: a datagram too short or without the magic, a wrong MAC
//! (tampered, or another cluster's key), a time more than [`WINDOW`] away from its own
//! clock (an old capture replayed), one from another address than the sender it names or
//! for another recipient than itself (a capture replayed to another member, or from
//! another host), a nonce it has already seen inside the window (a fresh capture
//! replayed), and bytes that are not a chitchat message. The MAC is checked before anything
//! else is parsed. Members must reach each other at the addresses they advertise (no NAT
//! between them).

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use async_trait::async_trait;
use chitchat::{
    ChitchatMessage, Deserializable as _, Serializable as _,
    transport::{Socket, Transport},
};
use ring::hmac;

use super::stats::{FabricStats, Reject};

const MAGIC: &[u8; 4] = b"MFG2";
const ADDR: usize = 18;
const HEADER: usize = 4 + 8 + 8 + 2 * ADDR;
const MAC: usize = 32;
/// The largest UDP payload over IPv4.
pub const MAX_DATAGRAM: usize = 65_507;
/// How far a datagram's time may be from ours: clocks of a fleet are NTP-synchronised to
/// well under this, and a replay must come inside it (where the nonce cache catches it).
pub const WINDOW: Duration = Duration::from_secs(30);
/// Nonces remembered at most (a flood of valid datagrams from a member cannot grow it
/// without bound; past it the oldest go first, and those are about to leave the window).
const MAX_NONCES: usize = 200_000;

/// The cluster's gossip key.
#[derive(Clone)]
pub struct GossipKey(hmac::Key);

impl GossipKey {
    /// At least 32 bytes of secret (a key file's contents).
    pub fn new(secret: &[u8]) -> Result<GossipKey, String> {
        if secret.len() < 32 {
            return Err(format!(
                "the gossip key has {} bytes; at least 32 are needed (e.g. `head -c 32 /dev/urandom > key`)",
                secret.len()
            ));
        }
        Ok(GossipKey(hmac::Key::new(hmac::HMAC_SHA256, secret)))
    }
}

fn encode_addr(a: SocketAddr) -> [u8; ADDR] {
    let ip = match a.ip() {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        std::net::IpAddr::V6(v6) => v6,
    };
    let mut out = [0u8; ADDR];
    out[..16].copy_from_slice(&ip.octets());
    out[16..].copy_from_slice(&a.port().to_le_bytes());
    out
}

/// Who sends a datagram and to whom: bound into its MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub from: SocketAddr,
    pub to: SocketAddr,
}

/// Wraps chitchat's bytes in a header and a MAC.
pub fn seal(key: &GossipKey, now_ms: u64, nonce: u64, route: Route, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len() + MAC);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&now_ms.to_le_bytes());
    out.extend_from_slice(&nonce.to_le_bytes());
    out.extend_from_slice(&encode_addr(route.from));
    out.extend_from_slice(&encode_addr(route.to));
    out.extend_from_slice(payload);
    let tag = hmac::sign(&key.0, &out);
    out.extend_from_slice(tag.as_ref());
    out
}

/// Nonces seen inside the window, oldest first.
#[derive(Default)]
pub struct ReplayGuard {
    seen: HashMap<u64, u64>,
    order: VecDeque<(u64, u64)>,
}

impl ReplayGuard {
    /// Records `nonce` (sent at `at_ms`); false if it was already seen.
    fn admit(&mut self, nonce: u64, at_ms: u64, now_ms: u64) -> bool {
        let window = crate::util::convert::millis(WINDOW);
        while let Some(&(n, t)) = self.order.front() {
            if t + 2 * window >= now_ms && self.order.len() < MAX_NONCES {
                break;
            }
            self.order.pop_front();
            if self.seen.get(&n) == Some(&t) {
                self.seen.remove(&n);
            }
        }
        if self.seen.contains_key(&nonce) {
            return false;
        }
        self.seen.insert(nonce, at_ms);
        self.order.push_back((nonce, at_ms));
        true
    }
}

/// Checks one datagram, received over `route` (its source address, our own), and returns
/// chitchat's bytes.
pub fn open<'a>(
    key: &GossipKey,
    now_ms: u64,
    guard: &mut ReplayGuard,
    route: Route,
    datagram: &'a [u8],
) -> Result<&'a [u8], Reject> {
    if datagram.len() < HEADER + MAC || &datagram[..4] != MAGIC {
        return Err(Reject::Malformed);
    }
    let (signed, tag) = datagram.split_at(datagram.len() - MAC);
    hmac::verify(&key.0, signed, tag).map_err(|_| Reject::BadMac)?;
    let at = u64::from_le_bytes(signed[4..12].try_into().expect("8 bytes"));
    let nonce = u64::from_le_bytes(signed[12..20].try_into().expect("8 bytes"));
    if at.abs_diff(now_ms) > crate::util::convert::millis(WINDOW) {
        return Err(Reject::Stale);
    }
    if signed[20..20 + ADDR] != encode_addr(route.from)
        || signed[20 + ADDR..HEADER] != encode_addr(route.to)
    {
        return Err(Reject::Misaddressed);
    }
    if !guard.admit(nonce, at, now_ms) {
        return Err(Reject::Replay);
    }
    Ok(&signed[HEADER..])
}

/// Checks and decodes one datagram (what the socket does; a fuzz target).
pub fn receive(
    key: &GossipKey,
    now_ms: u64,
    guard: &mut ReplayGuard,
    route: Route,
    datagram: &[u8],
) -> Result<ChitchatMessage, Reject> {
    let mut body = open(key, now_ms, guard, route, datagram)?;
    ChitchatMessage::deserialize(&mut body).map_err(|_| Reject::Malformed)
}

/// chitchat's transport: UDP with [`seal`] and [`receive`].
pub struct AuthTransport {
    pub key: GossipKey,
    pub stats: Arc<FabricStats>,
    /// The address peers send to (the advertised one); None: the bound address.
    pub advertise: Option<SocketAddr>,
}

#[async_trait]
impl Transport for AuthTransport {
    async fn open(&self, bind: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let socket = tokio::net::UdpSocket::bind(bind)
            .await
            .with_context(|| format!("binding the gossip socket {bind}/udp"))?;
        Ok(Box::new(AuthSocket {
            me: self.advertise.unwrap_or(bind),
            socket,
            key: self.key.clone(),
            stats: self.stats.clone(),
            guard: ReplayGuard::default(),
            rng: ring::rand::SystemRandom::new(),
            buf: vec![0; MAX_DATAGRAM].into_boxed_slice(),
        }))
    }
}

struct AuthSocket {
    me: SocketAddr,
    socket: tokio::net::UdpSocket,
    key: GossipKey,
    stats: Arc<FabricStats>,
    guard: ReplayGuard,
    rng: ring::rand::SystemRandom,
    buf: Box<[u8]>,
}

#[async_trait]
impl Socket for AuthSocket {
    async fn send(&mut self, to: SocketAddr, message: ChitchatMessage) -> anyhow::Result<()> {
        let mut payload = Vec::new();
        message.serialize(&mut payload);
        let nonce: [u8; 8] = ring::rand::generate(&self.rng)
            .map_err(|_| anyhow::anyhow!("no randomness for a gossip nonce"))?
            .expose();
        let datagram = seal(
            &self.key,
            crate::util::clock::unix_ms(),
            u64::from_le_bytes(nonce),
            Route { from: self.me, to },
            &payload,
        );
        if datagram.len() > MAX_DATAGRAM {
            // chitchat sizes its messages to a full datagram; ours adds 52 bytes. Never
            // seen with fabric-sized states; dropped (and counted) rather than split.
            self.stats.reject(Reject::Oversize);
            return Ok(());
        }
        match self.socket.send_to(&datagram, to).await {
            Ok(n) => self.stats.add_gossip_out(n),
            // A peer that is gone (ICMP unreachable): chitchat's detector will notice.
            Err(e) => tracing::debug!("gossip to {to}: {e}"),
        }
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            let (n, from) = match self.socket.recv_from(&mut self.buf).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!("gossip receive: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            self.stats.add_gossip_in(n);
            match receive(
                &self.key,
                crate::util::clock::unix_ms(),
                &mut self.guard,
                Route { from, to: self.me },
                &self.buf[..n],
            ) {
                Ok(message) => return Ok((from, message)),
                Err(reason) => {
                    self.stats.reject(reason);
                    tracing::debug!("gossip datagram from {from} refused: {reason}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn key(b: u8) -> GossipKey {
        GossipKey::new(&[b; 32]).unwrap()
    }

    fn route(from: &str, to: &str) -> Route {
        Route {
            from: from.parse().unwrap(),
            to: to.parse().unwrap(),
        }
    }

    #[test]
    fn tampered_replayed_stale_and_foreign_datagrams_are_refused() {
        let k = key(1);
        let now = 1_800_000_000_000;
        let r = route("10.0.0.1:7947", "10.0.0.2:7947");
        let mut guard = ReplayGuard::default();
        let d = seal(&k, now, 7, r, b"hello");
        assert_eq!(open(&k, now, &mut guard, r, &d), Ok(&b"hello"[..]));
        assert_eq!(open(&k, now + 5, &mut guard, r, &d), Err(Reject::Replay));
        let mut t = seal(&k, now, 8, r, b"hello");
        t[HEADER] ^= 1;
        assert_eq!(open(&k, now, &mut guard, r, &t), Err(Reject::BadMac));
        let other = seal(&key(2), now, 9, r, b"hello");
        assert_eq!(open(&k, now, &mut guard, r, &other), Err(Reject::BadMac));
        let old = seal(&k, now - 31_000, 10, r, b"hello");
        assert_eq!(open(&k, now, &mut guard, r, &old), Err(Reject::Stale));
        assert_eq!(
            open(&k, now, &mut guard, r, b"MFG2"),
            Err(Reject::Malformed)
        );
        // A valid MAC over bytes that are no chitchat message.
        let junk = seal(&k, now, 11, r, b"\xff\xff\xff");
        assert_eq!(
            receive(&k, now, &mut guard, r, &junk).unwrap_err(),
            Reject::Malformed
        );
        assert!(GossipKey::new(b"short").is_err());
    }

    #[test]
    fn a_datagram_counts_only_from_its_sender_to_its_recipient() {
        let k = key(1);
        let now = 1_800_000_000_000;
        let r = route("10.0.0.1:7947", "10.0.0.2:7947");
        let mut guard = ReplayGuard::default();
        let d = seal(&k, now, 21, r, b"hello");
        // Replayed to a third member, or sent on from another address: refused before
        // its nonce is taken, so the real recipient still takes it.
        let to_c = route("10.0.0.1:7947", "10.0.0.3:7947");
        assert_eq!(
            open(&k, now, &mut guard, to_c, &d),
            Err(Reject::Misaddressed)
        );
        let via_m = route("10.0.0.9:7947", "10.0.0.2:7947");
        assert_eq!(
            open(&k, now, &mut guard, via_m, &d),
            Err(Reject::Misaddressed)
        );
        let other_port = route("10.0.0.1:7948", "10.0.0.2:7947");
        assert_eq!(
            open(&k, now, &mut guard, other_port, &d),
            Err(Reject::Misaddressed)
        );
        assert_eq!(open(&k, now, &mut guard, r, &d), Ok(&b"hello"[..]));
        // IPv6 too.
        let r6 = route("[fd00::1]:7947", "[fd00::2]:7947");
        let d6 = seal(&k, now, 22, r6, b"x");
        assert_eq!(open(&k, now, &mut guard, r6, &d6), Ok(&b"x"[..]));
    }

    #[test]
    fn the_replay_guard_forgets_nonces_outside_the_window_and_stays_bounded() {
        let mut g = ReplayGuard::default();
        let t0 = 1_000_000;
        assert!(g.admit(1, t0, t0));
        assert!(!g.admit(1, t0, t0 + 1_000));
        // Long after: forgotten (and the time check would refuse it anyway).
        assert!(g.admit(1, t0 + 100_000, t0 + 100_000));
        for n in 0..(MAX_NONCES as u64 + 10) {
            g.admit(n + 10, t0 + 100_000, t0 + 100_000);
        }
        assert!(g.order.len() <= MAX_NONCES + 1 && g.seen.len() <= MAX_NONCES + 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn the_handler_never_panics_on_arbitrary_datagrams(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let k = key(3);
            let r = route("127.0.0.1:1", "127.0.0.1:2");
            let mut g = ReplayGuard::default();
            let _ = receive(&k, 1_000_000, &mut g, r, &bytes);
            // Validly sealed garbage reaches chitchat's decoder: it must refuse, not panic.
            let sealed = seal(&k, 1_000_000, 1, r, &bytes);
            let _ = receive(&k, 1_000_000, &mut g, r, &sealed);
        }
    }
}
