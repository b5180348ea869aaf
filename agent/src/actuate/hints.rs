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
/// Mapping pieces journaled at most (about 150 bytes each on disk, well within
/// [`HINTS_MAX_BYTES`]); past it no new range is changed until some are put back.
pub const MAX_ENTRIES: usize = 65_536;
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
    /// Unmerges that wait for memory ([`super::headroom`]); they stay journaled.
    pub deferred: Vec<String>,
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
        if !self.deferred.is_empty() {
            write!(
                f,
                ", {} deferred (kept in the journal): {}",
                self.deferred.len(),
                self.deferred.join("; ")
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
    /// This run's changes, plus what the start-up restore could not put back (those
    /// first, [`HintControl::inherited`] of them): they stay journaled until they are
    /// put back or their process is gone.
    journal: HintsJournal,
    inherited: usize,
    /// Leave the hints in place at exit (`--keep-hints`); the journal is removed.
    keep: bool,
    done: bool,
}

fn load(lock: &StateLock) -> Result<Option<HintsJournal>, ActuateError> {
    let Some(j) = journal::read_json::<HintsJournal>(lock, HINTS_FILE, HINTS_MAX_BYTES)? else {
        return Ok(None);
    };
    let corrupt = |m: String| journal::corrupt(lock, HINTS_FILE, m);
    if j.format != HINTS_FORMAT {
        return Err(corrupt(format!(
            "format {} (this memfabric reads {HINTS_FORMAT})",
            j.format
        )));
    }
    if j.ranges.len() > MAX_ENTRIES {
        return Err(corrupt(format!(
            "{} ranges (memfabric journals at most {MAX_ENTRIES})",
            j.ranges.len()
        )));
    }
    // Only what memfabric could have journaled: a user process's page-aligned range.
    if let Some(e) = j.ranges.iter().find(|e| {
        e.pid <= 1
            || e.start >= e.end
            || !e.start.is_multiple_of(4096)
            || !e.end.is_multiple_of(4096)
            || e.end > 1 << 57
    }) {
        return Err(corrupt(format!(
            "PID {} {:#x}-{:#x} is not a range memfabric hints",
            e.pid, e.start, e.end
        )));
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
        if crate::host::inventory::start_time(e.pid) != Some(e.start_time) {
            out.gone += 1;
            continue;
        }
        let advice = if e.was_mergeable {
            Advice::Mergeable
        } else {
            Advice::Unmergeable
        };
        if advice == Advice::Unmergeable
            && let Err(why) = super::headroom::check_unmerge(e.pid, e.start, e.end)
        {
            out.deferred.push(format!("PID {}: {why}", e.pid));
            left.push(e.clone());
            continue;
        }
        // Twice at most: a call that missed its deadline on a loaded host (the target
        // slow to stop, the helper slow to start) is tried once more before the range is
        // kept in the journal for the next start.
        let attempt = || inject::madvise(e.pid, e.start, e.end, advice, INJECT_TIMEOUT);
        let result = attempt().or_else(|err| {
            if err.is_gone() {
                Err(err)
            } else {
                tracing::debug!("putting back PID {}: {err}; trying again", e.pid);
                std::thread::sleep(Duration::from_millis(200));
                attempt()
            }
        });
        match result {
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
        let mut inherited = Vec::new();
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
                    save(
                        &lock,
                        &HintsJournal {
                            ranges: left.clone(),
                            ..j
                        },
                    )?;
                }
                inherited = left;
                Some(done)
            }
        };
        Ok((
            HintControl {
                lock,
                inherited: inherited.len(),
                journal: HintsJournal {
                    format: HINTS_FORMAT,
                    boot_id: boot_id(),
                    ranges: inherited,
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
        let start_time =
            crate::host::inventory::start_time(pid).ok_or(InjectError::NoProcess(pid))?;
        let pieces = pieces(pid, start, end)?;
        if pieces.is_empty() {
            return Err(InjectError::NotMapped { pid, start, end }.into());
        }
        if pieces.iter().all(|p| p.2 == mergeable) {
            return Ok(Applied::Already);
        }
        if !mergeable {
            super::headroom::check_unmerge(pid, start, end)?;
        }
        let mut fresh = false;
        // This process's entries, once: the check per piece stays linear in the journal.
        let mine: Vec<(u64, u64)> = self
            .journal
            .ranges
            .iter()
            .filter(|r| r.pid == pid && r.start_time == start_time)
            .map(|r| (r.start, r.end))
            .collect();
        let unknown = pieces
            .iter()
            .filter(|&&(s, e, _)| !mine.iter().any(|&(a, b)| a <= s && e <= b))
            .count();
        if self.journal.ranges.len() + unknown > MAX_ENTRIES {
            return Err(HintError::JournalFull {
                entries: self.journal.ranges.len(),
            });
        }
        for &(s, e, mg) in &pieces {
            let known = mine.iter().any(|&(a, b)| a <= s && e <= b);
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

    /// Forgets the entries of `pid` if its process is gone: the same PID with the same
    /// start time is the same process, whose ranges must still be put back (a VM that
    /// only stopped matching the selection, say); a reused PID is another one.
    pub fn forget(&mut self, pid: u32) {
        let alive = crate::host::inventory::start_time(pid);
        let before = self.journal.ranges.len();
        let mut dropped_inherited = 0;
        for (i, r) in self.journal.ranges.iter().enumerate() {
            if r.pid == pid && Some(r.start_time) != alive && i < self.inherited {
                dropped_inherited += 1;
            }
        }
        self.journal
            .ranges
            .retain(|r| r.pid != pid || Some(r.start_time) == alive);
        self.inherited -= dropped_inherited;
        if self.journal.ranges.len() != before {
            let _ = save(&self.lock, &self.journal);
        }
    }

    /// Ranges currently journaled.
    pub fn changed(&self) -> usize {
        self.journal.ranges.len()
    }

    /// Puts every range back (with keep, only what a predecessor left: this run's hints
    /// stay and are forgotten). What cannot be put back stays journaled. Idempotent.
    pub fn restore(&mut self) -> Result<HintsRestored, ActuateError> {
        if self.done {
            return Ok(HintsRestored::default());
        }
        self.done = true;
        if self.keep {
            self.journal.ranges.truncate(self.inherited);
        }
        let (done, left) = restore_entries(&self.journal.ranges);
        self.inherited = left.len();
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
    #[error(transparent)]
    Deferred(#[from] super::headroom::Deferred),
    #[error(
        "the hints journal holds {entries} ranges (at most {MAX_ENTRIES}): no new range is \
         changed until some are put back"
    )]
    JournalFull { entries: usize },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_memfabric_could_not_have_written_is_refused() {
        let d = std::env::temp_dir().join(format!("memfabric-hints-load-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let lock = StateLock::acquire(&d, None, |_| {}).unwrap();
        let entry = |pid: u32, start: u64, end: u64| RangeEntry {
            pid,
            start_time: 1,
            start,
            end,
            was_mergeable: false,
        };
        let with = |ranges| HintsJournal {
            format: HINTS_FORMAT,
            boot_id: boot_id(),
            ranges,
        };
        save(&lock, &with(vec![entry(1234, 0x1000, 0x3000)])).unwrap();
        assert_eq!(load(&lock).unwrap().unwrap().ranges.len(), 1);
        for bad in [
            vec![entry(1, 0x1000, 0x2000)],    // init, or PID 0
            vec![entry(1234, 0x2000, 0x1000)], // empty
            vec![entry(1234, 0x1001, 0x2000)], // unaligned
            vec![entry(1234, 0x1000, !0xfff)], // beyond user space
            vec![entry(1234, 0x1000, 0x2000); MAX_ENTRIES + 1],
        ] {
            save(&lock, &with(bad)).unwrap();
            let e = load(&lock).unwrap_err();
            assert!(matches!(e, ActuateError::CorruptJournal { .. }), "{e}");
        }
        drop(lock);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
