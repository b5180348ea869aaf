//! Outgoing migrations for the daemon's metrics. `memfabric migrate --to` (and `plan
//! --apply`) run in the command's process, not the daemon's, so each writes a record of
//! its migration into the daemon's state directory (`<state_dir>/outgoing/`, root's, mode
//! 0700) with each progress line (every 1-5 s) and at its end ([`Recorder`]). The daemon reads them when scraped
//! ([`Ledger`]): a finished record, or one whose command is gone, is added to its totals
//! and removed; one under way counts as it stands. The records hold counts only: nothing
//! of a VM's identity reaches them or the metrics.

use std::{
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

use super::Progress;
use crate::{actuate::journal, host::inventory};

/// The records' directory under the state directory.
pub const DIR: &str = "outgoing";
/// A record larger than this is not one of ours.
const MAX_BYTES: u64 = 4096;
/// Records read per scrape: a directory that holds more is read over several scrapes.
const MAX_READ: usize = 256;

/// How an outgoing migration ended, or that it is under way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Under way.
    Sending,
    /// The guest runs on the destination.
    Completed,
    /// The guest runs on the source.
    Failed,
    /// The answer to the start was lost: the guest is paused on the source.
    Undecided,
    /// The command ended without saying (killed): found by the daemon, never written.
    Abandoned,
}

impl Outcome {
    /// The finished outcomes, in the metrics' order.
    pub const ENDED: [Outcome; 4] = [
        Outcome::Completed,
        Outcome::Failed,
        Outcome::Undecided,
        Outcome::Abandoned,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Sending => "sending",
            Outcome::Completed => "completed",
            Outcome::Failed => "failed",
            Outcome::Undecided => "undecided",
            Outcome::Abandoned => "abandoned",
        }
    }
}

/// One migration's record: its command (PID and start time, so that a reused PID is not
/// taken for it), its outcome so far and its counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    pid: u32,
    start: u64,
    outcome: Outcome,
    bytes: Bytes,
}

/// What outgoing migrations carried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bytes {
    /// QEMU's streams (what plain migrations would have sent).
    pub stream: u64,
    /// What the source proxies put on the link.
    pub wire: u64,
    pub referenced_pages: u64,
    pub resent_pages: u64,
}

impl Bytes {
    fn of(p: &Progress) -> Bytes {
        Bytes {
            stream: Progress::get(&p.qemu_bytes),
            wire: Progress::get(&p.wire_bytes),
            referenced_pages: Progress::get(&p.referenced),
            resent_pages: Progress::get(&p.resent),
        }
    }

    fn add(&mut self, o: &Bytes) {
        self.stream = self.stream.saturating_add(o.stream);
        self.wire = self.wire.saturating_add(o.wire);
        self.referenced_pages = self.referenced_pages.saturating_add(o.referenced_pages);
        self.resent_pages = self.resent_pages.saturating_add(o.resent_pages);
    }
}

/// The record a migration command keeps for the daemon.
#[derive(Debug)]
pub struct Recorder {
    dir: PathBuf,
    name: String,
    pid: u32,
    start: u64,
}

impl Recorder {
    /// A record for this process's migration in `state_dir`; None (logged) when it cannot
    /// be kept: the metrics are not worth failing a migration over.
    pub fn open(state_dir: &Path) -> Option<Recorder> {
        let dir = state_dir.join(DIR);
        let pid = std::process::id();
        let made = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir);
        match (made, inventory::start_time(pid)) {
            (Ok(()), Some(start)) => Some(Recorder {
                dir,
                name: format!("{pid}-{start}.json"),
                pid,
                start,
            }),
            (Err(e), _) => {
                tracing::warn!(
                    "{}: {e}: this migration is not in the daemon's metrics",
                    dir.display()
                );
                None
            }
            (_, None) => None,
        }
    }

    /// Writes the migration's counters and outcome (atomically: the daemon never reads a
    /// record half written).
    pub fn write(&self, progress: &Progress, outcome: Outcome) {
        let r = Record {
            pid: self.pid,
            start: self.start,
            outcome,
            bytes: Bytes::of(progress),
        };
        if let Err(e) = journal::write_atomic_in(&self.dir, &self.name, &r) {
            tracing::debug!("the migration's record: {e}");
        }
    }
}

/// What the daemon's metrics show of outgoing migrations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    /// Migrations ended, by [`Outcome::ENDED`].
    pub ended: [u64; 4],
    /// Migrations under way.
    pub open: u64,
    /// Everything carried: the ended migrations' and, so far, those under way.
    pub bytes: Bytes,
}

/// The daemon's side: the ended migrations' totals, kept across scrapes.
#[derive(Debug)]
pub struct Ledger {
    dir: PathBuf,
    ended: Mutex<([u64; 4], Bytes)>,
}

impl Ledger {
    pub fn new(state_dir: &Path) -> Ledger {
        Ledger {
            dir: state_dir.join(DIR),
            ended: Mutex::new(([0; 4], Bytes::default())),
        }
    }

    /// Reads the records: the ended ones are added to the totals and removed.
    pub fn read(&self) -> Reading {
        let mut ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
        let mut open = (0u64, Bytes::default());
        let entries = std::fs::read_dir(&self.dir).into_iter().flatten();
        for path in entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .take(MAX_READ)
        {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            // Temporary files of a write under way start with a dot.
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            let Some(r) = read_record(&path) else {
                tracing::warn!("{}: not a migration record; removed", path.display());
                let _ = std::fs::remove_file(&path);
                continue;
            };
            let alive = inventory::start_time(r.pid) == Some(r.start);
            let outcome = match r.outcome {
                Outcome::Sending if alive => {
                    open.0 += 1;
                    open.1.add(&r.bytes);
                    continue;
                }
                Outcome::Sending => Outcome::Abandoned,
                o => o,
            };
            if let Some(i) = Outcome::ENDED.iter().position(|o| *o == outcome) {
                ended.0[i] += 1;
            }
            ended.1.add(&r.bytes);
            let _ = std::fs::remove_file(&path);
        }
        let mut bytes = ended.1;
        bytes.add(&open.1);
        Reading {
            ended: ended.0,
            open: open.0,
            bytes,
        }
    }
}

/// A record, if the file is one: a regular file (not a link), small, well formed.
fn read_record(path: &Path) -> Option<Record> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.file_type().is_file() || meta.len() > MAX_BYTES {
        return None;
    }
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    fn scratch(test: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("memfabric-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_migration_under_way_counts_as_it_stands_and_an_ended_one_once() {
        let state = scratch("outgoing");
        let ledger = Ledger::new(&state);
        assert_eq!(ledger.read(), Reading::default(), "no directory yet");
        let rec = Recorder::open(&state).expect("a record");
        let p = Progress::default();
        p.qemu_bytes.store(1000, Ordering::Relaxed);
        p.wire_bytes.store(300, Ordering::Relaxed);
        rec.write(&p, Outcome::Sending);
        let r = ledger.read();
        assert_eq!((r.open, r.ended, r.bytes.stream), (1, [0; 4], 1000));
        p.qemu_bytes.store(2000, Ordering::Relaxed);
        p.referenced.store(7, Ordering::Relaxed);
        rec.write(&p, Outcome::Completed);
        let r = ledger.read();
        assert_eq!((r.open, r.ended), (0, [1, 0, 0, 0]));
        assert_eq!(
            r.bytes,
            Bytes {
                stream: 2000,
                wire: 300,
                referenced_pages: 7,
                resent_pages: 0
            }
        );
        // Folded and removed: the next scrape shows the same totals.
        assert_eq!(ledger.read(), r);
        assert_eq!(std::fs::read_dir(state.join(DIR)).unwrap().count(), 0);
        let _ = std::fs::remove_dir_all(&state);
    }

    #[test]
    fn a_record_whose_command_is_gone_is_abandoned_and_foreign_files_are_dropped() {
        let state = scratch("outgoing-gone");
        let dir = state.join(DIR);
        std::fs::create_dir_all(&dir).unwrap();
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let pid = gone.id();
        gone.wait().unwrap();
        let r = Record {
            pid,
            start: 1,
            outcome: Outcome::Sending,
            bytes: Bytes {
                stream: 5,
                ..Bytes::default()
            },
        };
        journal::write_atomic_in(&dir, "x.json", &r).unwrap();
        std::fs::write(dir.join("junk.json"), b"{\"pid\": \"not a record\"}").unwrap();
        std::fs::write(dir.join("big.json"), vec![b' '; 10_000]).unwrap();
        let read = Ledger::new(&state).read();
        assert_eq!(
            (read.open, read.ended, read.bytes.stream),
            (0, [0, 0, 0, 1], 5)
        );
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        let _ = std::fs::remove_dir_all(&state);
    }
}
