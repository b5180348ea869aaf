//! The only code that changes the host: ksmd's sysfs knobs (`/sys/kernel/mm/ksm`) and merge
//! hints (`madvise` injected into VMMs, [`hints`], [`inject`]).
//!
//! Every change is journaled *before* it is made: the original value goes into
//! `journal.json` in the state directory (atomic write: temp file, fsync, rename), and a
//! lock on that directory is held for the owner's life. A clean exit, SIGINT or SIGTERM puts
//! every knob back; after a crash (kill -9, power loss within one boot), the next owner of
//! the state directory restores what the journal holds before doing anything else. A knob
//! that someone else changed after memfabric set it is left as that someone set it.
//!
//! The daemon (`memfabric run --act ksmd`) and xtask's KSM sessions (lab, demo, tests,
//! benchmarks) both use this module, so there is one implementation of "leave the host as
//! found". The module needs no eBPF: xtask builds the agent library without its probes.

pub mod headroom;
pub mod hints;
pub mod inject;
pub mod journal;
pub mod knobs;
pub mod ksm;
pub mod qmp;

pub use journal::{Journal, StateLock};
pub use ksm::{KsmControl, Restored};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ActuateError {
    #[error(
        "{KSM_DIR} is missing: this kernel has no KSM (build it with CONFIG_KSM=y)",
        KSM_DIR = knobs::KSM_DIR
    )]
    NoKsm,
    #[error("state directory {path}: {source} (choose another with --state-dir)")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "state directory {path} is not safe to trust: {reason}. memfabric restores what \
         its journals say as root, so the directory must be a real directory (no symlink), \
         owned by root, mode 0700"
    )]
    UntrustedStateDir { path: PathBuf, reason: String },
    #[error(
        "another memfabric process{holder} holds {path}: it is steering KSM; \
         stop it first, or give this one another --state-dir only if it steers nothing"
    )]
    Locked { path: PathBuf, holder: String },
    #[error(
        "journal {path} is corrupt ({message}); the host was left untouched. It lists KSM \
         settings a previous memfabric changed: inspect it, restore them by hand if needed, \
         then remove it"
    )]
    CorruptJournal { path: PathBuf, message: String },
    #[error("writing journal {path}: {source}")]
    JournalWrite {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{knob}={value:?} is not a value memfabric writes: {why}")]
    BadValue {
        knob: knobs::Knob,
        value: String,
        why: String,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {value:?} to {path}: {source}{hint}")]
    Write {
        path: PathBuf,
        value: String,
        source: std::io::Error,
        hint: &'static str,
    },
}

impl ActuateError {
    /// True when the cause is the host (permissions, missing feature) rather than the
    /// input (a corrupt journal, a lock held by another process).
    pub fn is_host_problem(&self) -> bool {
        matches!(
            self,
            ActuateError::NoKsm
                | ActuateError::StateDir { .. }
                | ActuateError::UntrustedStateDir { .. }
                | ActuateError::JournalWrite { .. }
                | ActuateError::Read { .. }
                | ActuateError::Write { .. }
        )
    }
}
