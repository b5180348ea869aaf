//! The operator's downtime limit, written down before a migration gives QEMU a corrected
//! one ([`super::downtime`]), so that a `migrate` command killed before it could put the
//! limit back does not leave the VM with a limit of a few milliseconds (with which its
//! next migration, by memfabric or by libvirt, might never converge). The next migration
//! command and the daemon at its start put back what a dead command left
//! ([`recover`]).
//!
//! One file per QEMU (named by a hash of its QMP socket's path) holding the socket's path,
//! the operator's limit and the writing process; root's own directory, mode 0700.

use std::{
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
};

use crate::actuate::{journal, qmp::Qmp};

/// Where journals live.
pub const DIR: &str = "/run/memfabric/downtime-limits";
/// A journal larger than this is not one of ours.
const MAX_BYTES: u64 = 8192;

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Entry {
    qmp: PathBuf,
    operator_ms: u64,
    pid: u32,
}

/// A written journal; [`Journal::remove`] once the operator's limit is back.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
}

fn name_for(qmp: &Path) -> String {
    let h = xxhash_rust::xxh3::xxh3_64(qmp.as_os_str().as_encoded_bytes());
    format!("{h:016x}.json")
}

impl Journal {
    /// Writes down `operator_ms` for the QEMU behind `qmp` (replacing an older entry: the
    /// caller read the limit QEMU has now, after any recovery).
    pub fn record(dir: &Path, qmp: &Path, operator_ms: u64) -> std::io::Result<Journal> {
        Journal::record_as(dir, qmp, operator_ms, std::process::id())
    }

    /// [`Journal::record`] in the name of process `pid` (tests: a command that is gone).
    pub fn record_as(
        dir: &Path,
        qmp: &Path,
        operator_ms: u64,
        pid: u32,
    ) -> std::io::Result<Journal> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let name = name_for(qmp);
        let entry = Entry {
            qmp: qmp.to_owned(),
            operator_ms,
            pid,
        };
        journal::write_atomic_in(dir, &name, &entry).map_err(std::io::Error::other)?;
        Ok(Journal {
            path: dir.join(name),
        })
    }

    /// Removes the journal, and its directories once empty (nothing left on the host).
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
        if let Some(dir) = self.path.parent()
            && std::fs::remove_dir(dir).is_ok()
            && dir == Path::new(DIR)
            && let Some(run) = dir.parent()
        {
            // /run/memfabric, made for it.
            let _ = std::fs::remove_dir(run);
        }
    }
}

/// Puts back the operator's limit wherever a command that is gone left a journal: the
/// QEMU's limit is set again (when it is not migrating now) and the journal removed; a
/// QEMU that is gone has its journal removed. Journals of running commands are left.
/// Returns what was put back, as (QMP socket, ms).
pub fn recover(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut restored = Vec::new();
    let Ok(files) = std::fs::read_dir(dir) else {
        return restored;
    };
    if let Err(e) = journal::trusted(dir) {
        // Anyone who could write here could have memfabric set any QEMU's limit.
        tracing::warn!("downtime-limit journals not read: {e}");
        return restored;
    }
    for f in files.flatten() {
        let path = f.path();
        let name = f.file_name();
        let Some(name) = name.to_str().filter(|n| n.ends_with(".json")) else {
            continue;
        };
        let entry = journal::read_json_in::<Entry>(dir, name, MAX_BYTES)
            .ok()
            .flatten();
        let Some(entry) = entry else {
            tracing::warn!("{}: not a downtime-limit journal, removed", path.display());
            let _ = std::fs::remove_file(&path);
            continue;
        };
        if Path::new(&format!("/proc/{}", entry.pid)).exists() {
            // Its command still runs (this one included): it puts the limit back itself.
            continue;
        }
        if !entry.qmp.exists() {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        let put_back = Qmp::connect(&entry.qmp).and_then(|mut q| {
            let m = q.execute("query-migrate", serde_json::json!({}))?;
            let status = m["status"].as_str().unwrap_or("none");
            if !super::settled(status) {
                return Ok(false);
            }
            q.execute(
                "migrate-set-parameters",
                serde_json::json!({ "downtime-limit": entry.operator_ms }),
            )?;
            Ok(true)
        });
        match put_back {
            Ok(true) => {
                tracing::info!(
                    "QEMU at {}: downtime-limit put back to {} ms (left lowered by a \
                     migration command that did not finish)",
                    entry.qmp.display(),
                    entry.operator_ms
                );
                restored.push((entry.qmp.clone(), entry.operator_ms));
                let _ = std::fs::remove_file(&path);
            }
            // Migrating now (someone else's migration): the next recovery tries again.
            Ok(false) => {}
            Err(e) => tracing::warn!(
                "QEMU at {}: downtime-limit not put back to {} ms yet: {e}",
                entry.qmp.display(),
                entry.operator_ms
            ),
        }
    }
    restored
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journals_of_live_commands_stay_those_for_gone_qemus_and_garbage_go() {
        let dir = std::env::temp_dir().join(format!("mf-limits-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // This command's own journal: left while it runs.
        let j = Journal::record(&dir, Path::new("/nonexistent/qmp.sock"), 300).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o700
        );
        assert!(recover(&dir).is_empty());
        assert!(j.path.exists());
        // A dead command's, for a QEMU whose socket is gone: removed, nothing put back.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let gone = dir.join("gone.json");
        let entry = Entry {
            qmp: "/nonexistent/qmp.sock".into(),
            operator_ms: 300,
            pid: dead,
        };
        std::fs::write(&gone, serde_json::to_vec(&entry).unwrap()).unwrap();
        let garbage = dir.join("garbage.json");
        std::fs::write(&garbage, b"{not json").unwrap();
        assert!(recover(&dir).is_empty());
        assert!(j.path.exists());
        assert!(!gone.exists());
        assert!(!garbage.exists());
        j.remove();
        assert!(!dir.exists(), "an empty journal directory left");
    }
}
