//! How long the daemon waits before its next tick. Each tick reads /proc (every process's
//! name, each VM's KSM figures), /sys and the probes' maps: on a quiet host with three lab
//! guests that refresh was 0.1 % of a core on its own, half of what the hints' daemon cost
//! in the quiet half of the timeline bench, and nothing it read changed. So after
//! [`QUIET_TICKS`] quiet ticks in a row the daemon looks [`SLOW_FACTOR`] times less often,
//! and at the configured interval again from the first tick that sees anything happen.
//! The probes keep counting meanwhile (nothing is lost, a reaction comes at most one slow
//! interval later), and the endpoints' staleness limit (three intervals and 5 s) still
//! holds.

use std::time::Duration;

/// Quiet ticks in a row before the pace slows.
pub const QUIET_TICKS: u32 = 3;
/// A quiet host is looked at this many times less often.
pub const SLOW_FACTOR: u32 = 3;

/// What one tick saw, as far as the pace goes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Seen {
    /// A VM arrived or left.
    pub vms_changed: bool,
    /// The scanner reads a VM at its full budget (new, woken, or its memory moved), or
    /// published a new pass.
    pub scan_busy: bool,
    /// The probes saw merged pages broken (COW) since the last tick.
    pub cow_breaks: bool,
    /// The ksmd controller found something to do (any reason but quiet).
    pub ksmd_active: bool,
    /// The hints changed a VM this tick.
    pub hints_acted: bool,
}

impl Seen {
    pub fn quiet(&self) -> bool {
        !(self.vms_changed
            || self.scan_busy
            || self.cow_breaks
            || self.ksmd_active
            || self.hints_acted)
    }
}

/// Quiet ticks so far.
#[derive(Debug, Default)]
pub struct TickPace {
    quiet: u32,
}

impl TickPace {
    /// The wait before the next tick after one that saw `seen`, at the configured
    /// `refresh`.
    pub fn next(&mut self, seen: Seen, refresh: Duration) -> Duration {
        self.quiet = if seen.quiet() {
            self.quiet.saturating_add(1)
        } else {
            0
        };
        if self.quiet >= QUIET_TICKS {
            refresh * SLOW_FACTOR
        } else {
            refresh
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_host_is_looked_at_less_often_until_anything_happens() {
        let refresh = Duration::from_secs(2);
        let mut p = TickPace::default();
        let quiet = Seen::default();
        for _ in 1..QUIET_TICKS {
            assert_eq!(p.next(quiet, refresh), refresh);
        }
        assert_eq!(p.next(quiet, refresh), refresh * SLOW_FACTOR);
        assert_eq!(p.next(quiet, refresh), refresh * SLOW_FACTOR);
        let events = [
            Seen {
                vms_changed: true,
                ..quiet
            },
            Seen {
                scan_busy: true,
                ..quiet
            },
            Seen {
                cow_breaks: true,
                ..quiet
            },
            Seen {
                ksmd_active: true,
                ..quiet
            },
            Seen {
                hints_acted: true,
                ..quiet
            },
        ];
        for e in events {
            assert_eq!(p.next(e, refresh), refresh, "{e:?}");
            for _ in 1..QUIET_TICKS {
                assert_eq!(p.next(quiet, refresh), refresh);
            }
            assert_eq!(p.next(quiet, refresh), refresh * SLOW_FACTOR);
        }
    }
}
