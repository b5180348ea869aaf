//! QEMU's downtime control, corrected for the proxies.
//!
//! QEMU stops the guest for the last step once what is left would take at most its
//! `downtime-limit` at the bandwidth it measured over the last 100 ms, and it measures
//! its own stream. Through the proxies references make that stream flow faster than the
//! link (three times on average with a twin on the destination, a hundred times through
//! a run of held pages), so QEMU accepts a tail that many times larger than it would
//! without them, and the tail (what the guest wrote last, which the destination rarely
//! holds) then crosses at the link's rate: 232 ms of downtime where plain migration had
//! 23 ms, at 1 Gbit/s in one run. The governor scales the limit QEMU works with by the
//! share of the stream that went on the wire: if the whole tail must cross, it crosses
//! within the operator's limit.
//!
//! The share is the lowest of the last few polls' (QEMU's 100 ms window and this one's
//! are not aligned, and a run of references is where a too-large tail would be accepted):
//! a stricter threshold, never a looser one.
//!
//! Only the first pass over guest RAM is corrected. There the tail QEMU would accept is
//! the rest of RAM, which nothing sent so far describes (it may hold none of what the
//! destination holds). From the second pass on QEMU sends pages the guest just wrote,
//! and its tail is more of the same: the stream's own pace is then the right measure, and
//! the operator's limit is given back ([`RELEASE_AFTER_SYNCS`]). Holding the stricter limit
//! longer cost time for no gain (QEMU sent pass after pass of a churning region the
//! destination held, each one cheap, to stop on a tail as cheap: QEMU's time 0.8 and
//! 1.1 s against 0.24 and 0.23 s plain, for downtimes of 41 and 14 ms against plain's 255
//! and 119 ms), and it could keep a guest that converges alone from converging.
//!
//! What the operator set (QEMU's limit before the migration, or a new one set meanwhile,
//! e.g. libvirt's `migrate-setmaxdowntime`) stays the ceiling, and is put back after.

use std::collections::VecDeque;

/// Polls whose shares are looked at: with polls every 100 ms, QEMU's last window and the
/// proxy's buffering behind it.
const WINDOW: usize = 3;
/// A poll interval with less of QEMU's stream than this says nothing of the share; with
/// so little flowing, QEMU's own bandwidth figure, and its threshold, are small anyway.
const MIN_STREAM: u64 = 256 << 10;
/// QEMU's dirty-bitmap syncs (`ram.dirty-sync-count`: one at the start, one at the end
/// of each pass) from which on the correction is given up: the first pass is over.
pub const RELEASE_AFTER_SYNCS: u64 = 2;

/// The limit to give QEMU, from the proxy's counters as the migration goes.
#[derive(Debug)]
pub struct Governor {
    /// The operator's limit, in ms.
    operator_ms: u64,
    /// What QEMU was last told (the operator's until the first change).
    set_ms: u64,
    /// What it was told before that.
    previous_ms: u64,
    /// (stream bytes, wire bytes) at the last poll.
    last: Option<(u64, u64)>,
    /// The wire's share of the stream in each of the last [`WINDOW`] polls, as (wire,
    /// stream) byte counts, oldest first; None for a poll with too little stream.
    shares: VecDeque<Option<(u64, u64)>>,
    /// The correction was given up (the first pass is over).
    released: bool,
}

/// One poll's view: the source proxy's counters so far, QEMU's limit and passes now.
#[derive(Clone, Copy, Debug)]
pub struct Poll {
    /// QEMU's stream read by the proxy.
    pub stream: u64,
    /// Bytes the proxy wrote to the link.
    pub wire: u64,
    /// QEMU's `downtime-limit` now.
    pub limit_ms: u64,
    /// QEMU's `ram.dirty-sync-count` (0 when not known).
    pub syncs: u64,
}

impl Governor {
    /// `operator_ms`: QEMU's `downtime-limit` before the migration.
    pub fn new(operator_ms: u64) -> Governor {
        Governor {
            operator_ms,
            set_ms: operator_ms,
            previous_ms: operator_ms,
            last: None,
            shares: VecDeque::with_capacity(WINDOW),
            released: false,
        }
    }

    /// The operator's limit, to put back when the migration ends.
    pub fn operator_ms(&self) -> u64 {
        self.operator_ms
    }

    /// Whether QEMU must be told the operator's limit again.
    pub fn changed(&self) -> bool {
        self.set_ms != self.operator_ms
    }

    /// The limit [`Governor::poll`] asked for was not set: QEMU still has the last one.
    pub fn forget(&mut self, asked_ms: u64) {
        if self.set_ms == asked_ms {
            self.set_ms = self.previous_ms;
        }
    }

    /// One poll. Returns the limit to set, when it should change.
    pub fn poll(&mut self, p: Poll) -> Option<u64> {
        if p.limit_ms != self.set_ms {
            // Someone else set it meanwhile: their value is the ceiling now.
            self.operator_ms = p.limit_ms;
            self.set_ms = p.limit_ms;
            self.previous_ms = p.limit_ms;
        }
        let (s0, w0) = self.last.replace((p.stream, p.wire)).unwrap_or((0, 0));
        let (ds, dw) = (p.stream.saturating_sub(s0), p.wire.saturating_sub(w0));
        if self.shares.len() == WINDOW {
            self.shares.pop_front();
        }
        self.shares
            .push_back((ds >= MIN_STREAM).then_some((dw.min(ds), ds)));
        if self.operator_ms == 0 {
            // The operator's "stop only when nothing is left": nothing to correct.
            return None;
        }
        let want = if self.released || p.syncs >= RELEASE_AFTER_SYNCS {
            self.released = true;
            self.operator_ms
        } else {
            // The operator's limit times the lowest share, rounded, at least 1 ms (0 is
            // "stop only when nothing is left"); the operator's when too little flowed
            // lately to tell.
            self.shares
                .iter()
                .flatten()
                .map(|&(w, s)| {
                    (u128::from(self.operator_ms) * u128::from(w) + u128::from(s / 2))
                        / u128::from(s)
                })
                .min()
                .map_or(self.operator_ms, |scaled| {
                    u64::try_from(scaled)
                        .unwrap_or(self.operator_ms)
                        .clamp(1, self.operator_ms)
                })
        };
        // Small moves are not worth a command (QEMU's window is as rough).
        let moved = want.abs_diff(self.set_ms);
        if moved == 0 || (moved * 20 < self.set_ms && want != self.operator_ms) {
            return None;
        }
        self.previous_ms = self.set_ms;
        self.set_ms = want;
        Some(want)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Polls `g` with cumulative counters, QEMU's limit being what `g` set last.
    fn feed(g: &mut Governor, limit: &mut u64, stream: u64, wire: u64, syncs: u64) -> Option<u64> {
        let r = g.poll(Poll {
            stream,
            wire,
            limit_ms: *limit,
            syncs,
        });
        if let Some(ms) = r {
            *limit = ms;
        }
        r
    }

    #[test]
    fn the_limit_follows_the_lowest_recent_share_of_the_wire() {
        let (mut g, mut l) = (Governor::new(300), 300);
        // Nothing to judge yet.
        assert_eq!(feed(&mut g, &mut l, 0, 0, 1), None);
        // 30 MiB of stream, 10 on the wire: a third of the limit.
        assert_eq!(feed(&mut g, &mut l, 30 * MIB, 10 * MIB, 1), Some(100));
        assert!(g.changed());
        // A run of references (1 % on the wire): the lowest share rules.
        assert_eq!(feed(&mut g, &mut l, 130 * MIB, 11 * MIB, 1), Some(3));
        // Raw pages (the tail, with the frames' own bytes): the run of references is
        // still among the last three polls, then it is not.
        assert_eq!(feed(&mut g, &mut l, 140 * MIB, 22 * MIB, 1), None);
        assert_eq!(feed(&mut g, &mut l, 150 * MIB, 33 * MIB, 1), None);
        assert_eq!(feed(&mut g, &mut l, 160 * MIB, 44 * MIB, 1), Some(300));
        assert!(!g.changed());
    }

    #[test]
    fn a_share_ages_out_when_little_flows_after_it() {
        let (mut g, mut l) = (Governor::new(300), 300);
        assert_eq!(feed(&mut g, &mut l, 30 * MIB, 3 * MIB, 1), Some(30));
        // Almost nothing flows for a while (QEMU held up): the run of references is
        // forgotten after three polls.
        for i in 1..=2 {
            assert_eq!(feed(&mut g, &mut l, 30 * MIB + i * 1024, 3 * MIB, 1), None);
        }
        assert_eq!(
            feed(&mut g, &mut l, 30 * MIB + 3 * 1024, 3 * MIB, 1),
            Some(300)
        );
    }

    #[test]
    fn after_the_first_pass_the_operators_limit_is_given_back() {
        let (mut g, mut l) = (Governor::new(300), 300);
        assert_eq!(feed(&mut g, &mut l, 30 * MIB, 3 * MIB, 1), Some(30));
        assert_eq!(
            feed(&mut g, &mut l, 60 * MIB, 6 * MIB, RELEASE_AFTER_SYNCS - 1),
            None
        );
        assert_eq!(
            feed(&mut g, &mut l, 90 * MIB, 9 * MIB, RELEASE_AFTER_SYNCS),
            Some(300)
        );
        // Released for good, even if the count is not known later.
        assert_eq!(feed(&mut g, &mut l, 120 * MIB, 12 * MIB, 0), None);
        assert!(!g.changed());
    }

    #[test]
    fn a_limit_set_by_someone_else_becomes_the_ceiling() {
        let (mut g, mut l) = (Governor::new(300), 300);
        assert_eq!(feed(&mut g, &mut l, 40 * MIB, 10 * MIB, 1), Some(75));
        // libvirt sets 500 ms meanwhile.
        l = 500;
        assert_eq!(feed(&mut g, &mut l, 80 * MIB, 20 * MIB, 1), Some(125));
        assert_eq!(g.operator_ms(), 500);
        // Almost nothing on the wire: 1 ms, not 0.
        let (mut g, mut l) = (Governor::new(300), 300);
        assert_eq!(feed(&mut g, &mut l, 1 << 30, 1, 1), Some(1));
        // An operator's 0 is left alone.
        let (mut g, mut l) = (Governor::new(0), 0);
        assert_eq!(feed(&mut g, &mut l, 1 << 30, 1, 1), None);
    }

    #[test]
    fn a_limit_qemu_did_not_take_is_forgotten() {
        let mut g = Governor::new(300);
        let at = |stream, wire, limit_ms| Poll {
            stream,
            wire,
            limit_ms,
            syncs: 1,
        };
        assert_eq!(g.poll(at(40 * MIB, 10 * MIB, 300)), Some(75));
        // Setting it failed: QEMU still says 300, which is no one else's limit.
        g.forget(75);
        assert!(!g.changed());
        assert_eq!(g.poll(at(80 * MIB, 20 * MIB, 300)), Some(75));
        assert_eq!(g.operator_ms(), 300);
    }

    #[test]
    fn small_moves_are_not_sent() {
        let (mut g, mut l) = (Governor::new(300), 300);
        assert_eq!(feed(&mut g, &mut l, 10 * MIB, 5 * MIB, 1), Some(150));
        // 52 % from now on: 156 ms once the 50 % poll left the window, a move under
        // the 5 % step.
        for (stream, tenths) in [(20, 102), (30, 154), (40, 206)] {
            let wire = tenths * MIB / 10;
            assert_eq!(feed(&mut g, &mut l, stream * MIB, wire, 1), None);
        }
        assert_eq!(l, 150);
    }
}
