//! KSM knobs changed by the demo, benchmarks and tests, through the agent's own
//! [`memfabric::actuate::KsmControl`]: every original value is journaled in
//! `target/lab/ksm-state` *before* it changes, a clean exit restores them, and a crash is
//! repaired by the next session that starts (or by `cargo xtask lab down`). KSM is one
//! switch for the whole host, so one session at a time: a second one waits for the first
//! (the state directory's lock), and neither can overwrite the other's saved values.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
pub use memfabric::actuate::knobs::Knob;
use memfabric::actuate::{KsmControl, knobs};

use crate::cmd;

pub const KSM: &str = knobs::KSM_DIR;

/// How long a session waits for another one to end before giving up.
const WAIT: Duration = Duration::from_secs(30 * 60);

/// The journal and lock of xtask's sessions (a developer's daemon uses its own).
pub fn state_dir() -> PathBuf {
    cmd::root().join("target/lab/ksm-state")
}

/// A KSM knob's current value (the selection of a choice knob).
pub fn read(knob: &str) -> Option<String> {
    knobs::read(knob).ok()
}

/// A numeric KSM counter (0 if unreadable).
pub fn read_u64(knob: &str) -> u64 {
    read(knob).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// A signed KSM counter such as `general_profit`.
pub fn read_i64(knob: &str) -> i64 {
    read(knob).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn say(restored: Option<memfabric::actuate::Restored>) {
    if let Some(r) = restored.filter(|r| !r.is_empty() || r.other_boot) {
        eprintln!("ksm: settings left by an interrupted session: {r}");
    }
}

fn waiting(holder: &str) {
    eprintln!(
        "ksm: another session ({holder}) is driving KSM ({}); waiting for it to end",
        state_dir().display()
    );
}

/// Restores what a crashed session saved. A live session (this process's own, or
/// another's) restores its own settings when it ends: it is left alone.
pub fn restore_leftover() -> anyhow::Result<()> {
    match KsmControl::begin(&state_dir(), None, |_| {}) {
        Ok((_control, restored)) => {
            say(restored);
            Ok(())
        }
        Err(memfabric::actuate::ActuateError::Locked { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Changed KSM knobs, restored on [`KsmSession::restore`] or drop. Before stopping ksmd it
/// lets ksmd reap the KSM state of processes that exited mid-scan (10 s at most).
pub struct KsmSession {
    control: KsmControl,
}

impl KsmSession {
    pub fn begin() -> anyhow::Result<KsmSession> {
        let (mut control, restored) = KsmControl::begin(&state_dir(), Some(WAIT), waiting)
            .context("starting a KSM session")?;
        say(restored);
        control.settle_on_restore(Duration::from_secs(10));
        Ok(KsmSession { control })
    }

    /// Sets `knob`, first saving (to the journal on disk) what it was.
    pub fn set(&mut self, knob: Knob, value: &str) -> anyhow::Result<()> {
        Ok(self.control.set(knob, value)?)
    }

    /// Puts every changed knob back (the advisor pair in the order the kernel needs).
    pub fn restore(mut self) -> anyhow::Result<()> {
        let r = self.control.restore()?;
        if !r.failed.is_empty() {
            anyhow::bail!("restoring KSM settings: {r}");
        }
        Ok(())
    }
}

impl Drop for KsmSession {
    fn drop(&mut self) {
        match self.control.restore() {
            Ok(r) if !r.failed.is_empty() || !r.kept.is_empty() => eprintln!("ksm: {r}"),
            Ok(_) => {}
            Err(e) => eprintln!("ksm: restoring settings: {e}"),
        }
    }
}
