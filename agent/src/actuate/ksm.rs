//! [`KsmControl`]: changes ksmd's knobs with the original of each journaled first, and puts
//! them back on [`KsmControl::restore`], on drop, or at the next start after a crash.
//!
//! The kernel's advisor (6.7+) makes the knobs depend on each other (mm/ksm.c, 6.18):
//! changing `advisor_mode` resets `pages_to_scan` (100 for `none`, `advisor_min_pages_to_scan`
//! for `scan-time`) and zeroes the advisor's history, and `pages_to_scan` cannot be written
//! while the advisor is on (EINVAL). So `pages_to_scan` is journaled whenever `advisor_mode`
//! is, and they are restored as a pair: the mode first, then the page count when the
//! original mode lets it be written. An advisor the operator had on comes back on, with the
//! kernel's start value (its history cannot be restored).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use super::{
    ActuateError,
    journal::{Journal, KnobEntry, StateLock, boot_id},
    knobs::{self, Knob},
};

/// What a restore did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// (knob, value written back).
    pub restored: Vec<(Knob, String)>,
    /// (knob, value found): changed by someone else after memfabric set it; left alone.
    pub kept: Vec<(Knob, String)>,
    /// Knobs that could not be written back; they stay in the journal for the next start.
    pub failed: Vec<(Knob, String)>,
    /// The journal was from another boot: the kernel had started afresh, nothing to undo.
    pub other_boot: bool,
}

impl Restored {
    pub fn is_empty(&self) -> bool {
        self.restored.is_empty() && self.kept.is_empty() && self.failed.is_empty()
    }
}

impl std::fmt::Display for Restored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &[(Knob, String)]| {
            v.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        if self.other_boot {
            return write!(f, "journal from an earlier boot discarded");
        }
        write!(f, "restored [{}]", list(&self.restored))?;
        if !self.kept.is_empty() {
            write!(f, "; changed by someone else, kept [{}]", list(&self.kept))?;
        }
        if !self.failed.is_empty() {
            write!(f, "; FAILED [{}] (kept in the journal)", list(&self.failed))?;
        }
        Ok(())
    }
}

/// The owner of ksmd's knobs while it lives.
#[derive(Debug)]
pub struct KsmControl {
    lock: std::sync::Arc<StateLock>,
    journal: Journal,
    /// Before stopping ksmd on restore, let it reap the KSM state of processes that exited
    /// mid-scan (with `run=0` that state stays allocated), for at most this long.
    settle: Option<Duration>,
    merged_at_begin: u64,
    done: bool,
}

fn merged() -> u64 {
    knobs::read_u64("pages_shared").unwrap_or(0) + knobs::read_u64("pages_sharing").unwrap_or(0)
}

impl KsmControl {
    /// Takes the state directory's lock (waiting up to `wait` for another holder), and
    /// restores what a crashed previous owner's journal holds before anything else.
    /// A corrupt journal is an error and the host is left untouched.
    pub fn begin(
        dir: &Path,
        wait: Option<Duration>,
        on_wait: impl FnOnce(&str),
    ) -> Result<(KsmControl, Option<Restored>), ActuateError> {
        if !knobs::available() {
            return Err(ActuateError::NoKsm);
        }
        Self::begin_locked(std::sync::Arc::new(StateLock::acquire(dir, wait, on_wait)?))
    }

    /// As [`KsmControl::begin`], with the state directory's lock already held (the
    /// daemon shares it with the merge hints).
    pub fn begin_locked(
        lock: std::sync::Arc<StateLock>,
    ) -> Result<(KsmControl, Option<Restored>), ActuateError> {
        if !knobs::available() {
            return Err(ActuateError::NoKsm);
        }
        let mut inherited = Vec::new();
        let leftover = match Journal::load(&lock)? {
            None => None,
            Some(j) if j.boot_id != boot_id() => {
                Journal::remove(&lock)?;
                Some(Restored {
                    other_boot: true,
                    ..Restored::default()
                })
            }
            Some(j) => {
                let (done, left) = restore_entries(&j.ksm, None, 0);
                if left.is_empty() {
                    Journal::remove(&lock)?;
                } else {
                    Journal {
                        ksm: left.clone(),
                        ..Journal::new()
                    }
                    .save(&lock)?;
                }
                inherited = left;
                Some(done)
            }
        };
        // What could not be put back stays journaled, and is tried again at exit: the
        // original stays the first one (a later `set` of the same knob keeps it).
        Ok((
            KsmControl {
                lock,
                journal: Journal {
                    ksm: inherited,
                    ..Journal::new()
                },
                settle: None,
                merged_at_begin: merged(),
                done: false,
            },
            leftover,
        ))
    }

    /// Lets ksmd reap dead processes' KSM state before it is stopped on restore.
    pub fn settle_on_restore(&mut self, limit: Duration) {
        self.settle = Some(limit);
    }

    fn journal_original(&mut self, knob: Knob) -> Result<bool, ActuateError> {
        if self.journal.ksm.iter().any(|e| e.knob == knob) {
            return Ok(false);
        }
        let original = knob.read()?;
        self.journal.ksm.push(KnobEntry {
            knob,
            original,
            ours: None,
            pending: None,
        });
        Ok(true)
    }

    fn set_ours(&mut self, knob: Knob, value: String) {
        if let Some(e) = self.journal.ksm.iter_mut().find(|e| e.knob == knob) {
            e.ours = Some(value);
            e.pending = None;
        }
    }

    /// Sets `knob` to `value`, journaling its original first (on disk, before the write).
    /// A knob already at `value` is not written again (a write to `sleep_millisecs` wakes
    /// ksmd; one to `advisor_mode` resets the advisor).
    pub fn set(&mut self, knob: Knob, value: &str) -> Result<(), ActuateError> {
        let value = knobs::selected(value);
        knobs::validate(knob, value).map_err(|why| ActuateError::BadValue {
            knob,
            value: value.into(),
            why,
        })?;
        let mut fresh = self.journal_original(knob)?;
        if knob == Knob::AdvisorMode {
            fresh |= self.journal_original(Knob::PagesToScan)?;
        }
        let current = knob.read()?;
        let ours_known = self
            .journal
            .ksm
            .iter()
            .any(|e| e.knob == knob && e.ours.as_deref() == Some(value));
        if current == value && ours_known {
            if fresh {
                self.journal.save(&self.lock)?;
            }
            return Ok(());
        }
        if current != value {
            // The value about to be written is journaled first: a crash between the
            // write and the next save must not read it as someone else's change.
            if let Some(e) = self.journal.ksm.iter_mut().find(|e| e.knob == knob) {
                e.pending = Some(value.to_owned());
            }
            self.journal.save(&self.lock)?;
            knobs::write(knob, value)?;
        } else if fresh {
            self.journal.save(&self.lock)?;
        }
        self.set_ours(knob, value.to_owned());
        if knob == Knob::AdvisorMode {
            // The kernel reset it; what it reads now is what a restore must find.
            let p = Knob::PagesToScan.read()?;
            self.set_ours(Knob::PagesToScan, p);
        }
        self.journal.save(&self.lock)
    }

    /// Applies the controller's settings. The advisor is turned off first (the kernel
    /// refuses `pages_to_scan` while it steers); ksmd is started last, once its pace is set.
    pub fn apply(&mut self, k: &crate::policy::Knobs) -> Result<(), ActuateError> {
        if Knob::AdvisorMode.exists() && Knob::AdvisorMode.read()? != "none" {
            self.set(Knob::AdvisorMode, "none")?;
        }
        self.set(Knob::PagesToScan, &k.pages_to_scan.to_string())?;
        self.set(Knob::SleepMillisecs, &k.sleep_millisecs.to_string())?;
        self.set(Knob::Run, if k.run { "1" } else { "0" })
    }

    /// Puts every changed knob back (see the module doc for the order). Idempotent.
    pub fn restore(&mut self) -> Result<Restored, ActuateError> {
        if self.done {
            return Ok(Restored::default());
        }
        self.done = true;
        let (done, left) = restore_entries(&self.journal.ksm, self.settle, self.merged_at_begin);
        self.journal.ksm = left;
        if self.journal.ksm.is_empty() {
            Journal::remove(&self.lock)?;
        } else {
            self.journal.save(&self.lock)?;
        }
        Ok(done)
    }
}

impl Drop for KsmControl {
    fn drop(&mut self) {
        match self.restore() {
            Ok(r) if !r.is_empty() => tracing::info!("KSM settings: {r}"),
            Ok(_) => {}
            Err(e) => tracing::error!("restoring KSM settings: {e}"),
        }
    }
}

/// Restores `entries`; returns what was done and the entries that could not be restored.
fn restore_entries(
    entries: &[KnobEntry],
    settle: Option<Duration>,
    merged_at_begin: u64,
) -> (Restored, Vec<KnobEntry>) {
    let mut out = Restored::default();
    let mut left = Vec::new();
    let find = |k: Knob| entries.iter().find(|e| e.knob == k);
    let mut put_back = |e: &KnobEntry, out: &mut Restored, force: bool| -> bool {
        let current = match e.knob.read() {
            Ok(c) => c,
            Err(err) => {
                out.failed.push((e.knob, err.to_string()));
                left.push(e.clone());
                return false;
            }
        };
        if current == e.original {
            return false;
        }
        if !force && !e.is_ours(&current) {
            // Never written by us, or changed by someone else after we wrote it.
            if e.ours.is_some() || e.pending.is_some() {
                out.kept.push((e.knob, current));
            }
            return false;
        }
        match knobs::write(e.knob, &e.original) {
            Ok(()) => {
                out.restored.push((e.knob, e.original.clone()));
                true
            }
            Err(err) => {
                out.failed.push((e.knob, err.to_string()));
                left.push(e.clone());
                false
            }
        }
    };
    const PAIRED: [Knob; 3] = [Knob::Run, Knob::AdvisorMode, Knob::PagesToScan];
    for e in entries.iter().rev().filter(|e| !PAIRED.contains(&e.knob)) {
        put_back(e, &mut out, false);
    }
    match (find(Knob::AdvisorMode), find(Knob::PagesToScan)) {
        (Some(mode), pages) => {
            let moved = put_back(mode, &mut out, false);
            let mode_now = Knob::AdvisorMode.read().unwrap_or_default();
            if let Some(p) = pages
                && mode_now != "scan-time"
            {
                // Writing the mode reset pages_to_scan: then it is ours to put back.
                put_back(p, &mut out, moved);
            }
        }
        (None, Some(p)) => {
            put_back(p, &mut out, false);
        }
        (None, None) => {}
    }
    if let Some(run) = find(Knob::Run) {
        if let Some(limit) = settle
            && run.original == "0"
            && Knob::Run.read().is_ok_and(|v| v == "1")
        {
            let scans = knobs::read_u64("full_scans").unwrap_or(0);
            let deadline = Instant::now() + limit;
            while Instant::now() < deadline
                && merged() > merged_at_begin
                && knobs::read_u64("full_scans").unwrap_or(0) < scans + 2
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        put_back(run, &mut out, false);
    }
    (out, left)
}
