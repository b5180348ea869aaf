//! The wall clock, one way: time since the Unix epoch (0 if the clock is before it).
//! Timestamps that leave the process (the published state, gossip datagrams, a gossip
//! generation) use it; durations inside the process use `Instant`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Since the epoch.
pub fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Milliseconds since the epoch.
pub fn unix_ms() -> u64 {
    super::convert::millis(since_epoch())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_agrees_with_itself() {
        let (ms, d) = (unix_ms(), since_epoch());
        assert!(super::super::convert::millis(d) >= ms);
        // After 2020 and before 2200.
        assert!((1_577_836_800_000..7_258_118_400_000).contains(&ms), "{ms}");
    }
}
