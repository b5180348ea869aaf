//! A gossip datagram (fabric): checked and decoded, never a panic, whether or not it
//! carries a valid MAC (the second call seals the bytes first, so chitchat's decoder sees
//! them too).
#![no_main]
use memfabric::fabric::gossip_auth::{GossipKey, ReplayGuard, Route, receive, seal};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let key = GossipKey::new(&[0x42; 32]).expect("a 32-byte key");
    let route = Route {
        from: "127.0.0.1:1".parse().expect("an address"),
        to: "127.0.0.1:2".parse().expect("an address"),
    };
    let mut guard = ReplayGuard::default();
    let _ = receive(&key, 1_000_000, &mut guard, route, data);
    let sealed = seal(&key, 1_000_000, 7, route, data);
    let _ = receive(&key, 1_000_000, &mut guard, route, &sealed);
});
