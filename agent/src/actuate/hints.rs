//! Carries out merge hints and puts them back: every range memfabric makes mergeable or
//! unmergeable is journaled in `<state-dir>/hints.json` (the original `mg` flag of every
//! mapping piece it covers, with the process's start time) before the injection, under the
//! state directory's lock. On exit every piece is put back as it was (unless the operator
//! asked to keep the hints); after a crash the next start does it. A process that exited,
//! or whose PID now names another process, has nothing left to put back.

use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

use super::{
    ActuateError, StateLock,
    inject::{self, Advice, InjectError, Injected},
    journal::{self, boot_id},
};

const HINTS_FILE: &str = "hints.json";
const HINTS_FORMAT: u32 = 1;
/// A hints journal larger than this is not one of ours.
const HINTS_MAX_BYTES: u64 = 16 << 20;
const INJECT_TIMEOUT: Duration = Duration::from_secs(2);

/// One mapping piece memfabric changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeEntry {
    pub pid: u32,
    /// The process's start time (clock ticks after boot): a reused PID is not it.
    pub start_time: u64,
    pub start: u64,
    pub end: u64,
    /// Whether it was mergeable (`mg`) before memfabric first changed it.
    pub was_mergeable: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HintsJournal {
    format: u32,
    boot_id: String,
    ranges: Vec<RangeEntry>,
}

/// What a restore did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HintsRestored {
    pub restored: usize,
    /// Pieces of processes that are gone (nothing to put back).
    pub gone: usize,
    pub failed: Vec<String>,
}

impl std::fmt::Display for HintsRestored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} range(s) put back, {} of exited processes",
            self.restored, self.gone
        )?;
        if !self.failed.is_empty() {
            write!(
                f,
                ", {} failed: {}",
                self.failed.len(),
                self.failed.join("; ")
            )?;
        }
        Ok(())
    }
}

/// What one hint did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Injected; the process was stopped this long.
    Injected(Duration),
    /// Every piece already was so: nothing injected.
    Already,
}

/// The owner of hinted ranges while the daemon lives.
#[derive(Debug)]
pub struct HintControl {
    lock: Arc<StateLock>,
    journal: HintsJournal,
    /// Leave the hints in place at exit (`--keep-hints`); the journal is removed.
    keep: bool,
    done: bool,
}

fn load(lock: &StateLock) -> Result<Option<HintsJournal>, ActuateError> {
    let Some(j) = journal::read_json::<HintsJournal>(lock, HINTS_FILE, HINTS_MAX_BYTES)? else {
        return Ok(None);
    };
    if j.format != HINTS_FORMAT {
        return Err(journal::corrupt(
            lock,
            HINTS_FILE,
            format!("format {} (this memfabric reads {HINTS_FORMAT})", j.format),
        ));
    }
    Ok(Some(j))
}

fn save(lock: &StateLock, j: &HintsJournal) -> Result<(), ActuateError> {
    journal::write_atomic(lock, HINTS_FILE, j)
}

fn remove(lock: &StateLock) -> Result<(), ActuateError> {
    journal::remove_file(lock, HINTS_FILE)
}

/// The mapping pieces of `pid` inside `[start, end)` with their `mg` flag.
pub fn pieces(pid: u32, start: u64, end: u64) -> Result<Vec<(u64, u64, bool)>, InjectError> {
    use procfs::process::{Process, VmFlags};
    let maps = Process::new(pid as i32)
        .and_then(|p| p.smaps())
        .map_err(|_| InjectError::NoProcess(pid))?;
    Ok(maps
        .into_iter()
        .filter(|m| m.address.0 < end && m.address.1 > start)
        .map(|m| {
            (
                m.address.0.max(start),
                m.address.1.min(end),
                m.extension.vm_flags.contains(VmFlags::MG),
            )
        })
        .collect())
}

/// Puts entries back (latest first); returns what was done and what is left to retry.
fn restore_entries(entries: &[RangeEntry]) -> (HintsRestored, Vec<RangeEntry>) {
    let mut out = HintsRestored::default();
    let mut left = Vec::new();
    for e in entries.iter().rev() {
        if crate::inventory::start_time(e.pid) != Some(e.start_time) {
            out.gone += 1;
            continue;
        }
        let advice = if e.was_mergeable {
            Advice::Mergeable
        } else {
            Advice::Unmergeable
        };
        match inject::madvise(e.pid, e.start, e.end, advice, INJECT_TIMEOUT) {
            Ok(_) => out.restored += 1,
            Err(e) if e.is_gone() => out.gone += 1,
            Err(err) => {
                out.failed
                    .push(format!("PID {} {:#x}-{:#x}: {err}", e.pid, e.start, e.end));
                left.push(e.clone());
            }
        }
    }
    left.reverse();
    (out, left)
}

impl HintControl {
    /// Takes over the hints journal in the locked state directory, first putting back what
    /// a crashed predecessor left (a corrupt journal is an error; the processes are left
    /// untouched).
    pub fn begin(
        lock: Arc<StateLock>,
        keep: bool,
    ) -> Result<(HintControl, Option<HintsRestored>), ActuateError> {
        let leftover = match load(&lock)? {
            None => None,
            Some(j) if j.boot_id != boot_id() => {
                remove(&lock)?;
                None
            }
            Some(j) => {
                let (done, left) = restore_entries(&j.ranges);
                if left.is_empty() {
                    remove(&lock)?;
                } else {
                    save(&lock, &HintsJournal { ranges: left, ..j })?;
                }
                Some(done)
            }
        };
        Ok((
            HintControl {
                lock,
                journal: HintsJournal {
                    format: HINTS_FORMAT,
                    boot_id: boot_id(),
                    ranges: Vec::new(),
                },
                keep,
                done: false,
            },
            leftover,
        ))
    }

    /// Makes `[start, end)` of `pid` mergeable or not, journaling the original state of
    /// every piece first (on disk, before the injection). Pieces already journaled keep
    /// their first original.
    pub fn apply(
        &mut self,
        pid: u32,
        start: u64,
        end: u64,
        mergeable: bool,
    ) -> Result<Applied, HintError> {
        let start_time = crate::inventory::start_time(pid).ok_or(InjectError::NoProcess(pid))?;
        let pieces = pieces(pid, start, end)?;
        if pieces.is_empty() {
            return Err(InjectError::NotMapped { pid, start, end }.into());
        }
        if pieces.iter().all(|p| p.2 == mergeable) {
            return Ok(Applied::Already);
        }
        let mut fresh = false;
        for &(s, e, mg) in &pieces {
            let known =
                self.journal.ranges.iter().any(|r| {
                    r.pid == pid && r.start_time == start_time && r.start <= s && e <= r.end
                });
            if !known {
                self.journal.ranges.push(RangeEntry {
                    pid,
                    start_time,
                    start: s,
                    end: e,
                    was_mergeable: mg,
                });
                fresh = true;
            }
        }
        if fresh {
            save(&self.lock, &self.journal)?;
        }
        let advice = if mergeable {
            Advice::Mergeable
        } else {
            Advice::Unmergeable
        };
        let Injected { stopped, .. } = inject::madvise(pid, start, end, advice, INJECT_TIMEOUT)?;
        Ok(Applied::Injected(stopped))
    }

    /// Forgets the entries of a process that exited (nothing to put back).
    pub fn forget(&mut self, pid: u32) {
        let before = self.journal.ranges.len();
        self.journal.ranges.retain(|r| r.pid != pid);
        if self.journal.ranges.len() != before {
            let _ = save(&self.lock, &self.journal);
        }
    }

    /// Ranges currently journaled.
    pub fn changed(&self) -> usize {
        self.journal.ranges.len()
    }

    /// Puts every range back (or, with keep, only drops the journal). Idempotent.
    pub fn restore(&mut self) -> Result<HintsRestored, ActuateError> {
        if self.done {
            return Ok(HintsRestored::default());
        }
        self.done = true;
        if self.keep {
            self.journal.ranges.clear();
            remove(&self.lock)?;
            return Ok(HintsRestored::default());
        }
        let (done, left) = restore_entries(&self.journal.ranges);
        self.journal.ranges = left;
        if self.journal.ranges.is_empty() {
            remove(&self.lock)?;
        } else {
            save(&self.lock, &self.journal)?;
        }
        Ok(done)
    }
}

impl Drop for HintControl {
    fn drop(&mut self) {
        match self.restore() {
            Ok(r) if r.restored + r.gone > 0 || !r.failed.is_empty() => {
                tracing::info!("merge hints: {r}")
            }
            Ok(_) => {}
            Err(e) => tracing::error!("restoring merge hints: {e}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HintError {
    #[error(transparent)]
    Inject(#[from] InjectError),
    #[error(transparent)]
    Journal(#[from] ActuateError),
}
