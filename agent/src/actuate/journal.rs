//! The state directory: a lock held for the owner's life and a journal of every original
//! value memfabric changed, so that exit and the next start after a crash put them back.

use std::{
    fs::{self, File, OpenOptions},
    io::{Read as _, Write as _},
    os::{
        fd::AsRawFd as _,
        unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::ActuateError;

const LOCK_FILE: &str = "memfabric.lock";
const JOURNAL_FILE: &str = "journal.json";
/// The journal format this code writes and understands.
pub const JOURNAL_FORMAT: u32 = 1;
/// A journal is a few hundred bytes; anything much larger is not ours.
const JOURNAL_MAX_BYTES: u64 = 1 << 20;

/// An exclusive `flock` on `<dir>/memfabric.lock`, released when dropped (or when the
/// process dies, however it dies: the kernel drops the lock with the file).
#[derive(Debug)]
pub struct StateLock {
    dir: PathBuf,
    _file: File,
}

impl StateLock {
    /// Takes the lock, creating the directory (0700) if needed. `wait`: how long to wait
    /// for another holder to finish (`None`: refuse at once); `on_wait` is told once who
    /// holds it.
    pub fn acquire(
        dir: &Path,
        wait: Option<Duration>,
        on_wait: impl FnOnce(&str),
    ) -> Result<StateLock, ActuateError> {
        let state_err = |source| ActuateError::StateDir {
            path: dir.to_owned(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(state_err)?;
        trusted(dir)?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)
            .map_err(state_err)?;
        let deadline = wait.map(|w| Instant::now() + w);
        let mut on_wait = Some(on_wait);
        loop {
            // SAFETY: flock on a file descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(state_err(err));
            }
            let holder = holder(&path);
            match deadline {
                Some(d) if Instant::now() < d => {
                    if let Some(f) = on_wait.take() {
                        f(&holder);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                _ => {
                    return Err(ActuateError::Locked {
                        path: path.clone(),
                        holder: if holder.is_empty() {
                            String::new()
                        } else {
                            format!(" ({holder})")
                        },
                    });
                }
            }
        }
        // Who holds it, for the message another process will show.
        let me = format!("PID {}\n", std::process::id());
        let _ = file.set_len(0);
        let _ = file.write_all(me.as_bytes());
        Ok(StateLock {
            dir: dir.to_owned(),
            _file: file,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn journal_path(&self) -> PathBuf {
        self.dir.join(JOURNAL_FILE)
    }
}

/// Whether `dir` may be trusted with journals a root daemon acts on: a directory itself
/// (not a symlink to one), owned by this user (root for the daemon), writable by nobody
/// else (mode 0700 or stricter). Otherwise another user could plant a journal that makes
/// memfabric write KSM knobs or madvise processes of their choosing.
pub fn trusted(dir: &Path) -> Result<(), ActuateError> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let untrusted = |reason: String| ActuateError::UntrustedStateDir {
        path: dir.to_owned(),
        reason,
    };
    let m = fs::symlink_metadata(dir).map_err(|source| ActuateError::StateDir {
        path: dir.to_owned(),
        source,
    })?;
    if m.file_type().is_symlink() {
        return Err(untrusted("it is a symbolic link".into()));
    }
    if !m.is_dir() {
        return Err(untrusted("it is not a directory".into()));
    }
    // SAFETY: no preconditions.
    let me = unsafe { libc::geteuid() };
    if m.uid() != me {
        return Err(untrusted(format!(
            "it is owned by uid {}, not {me}",
            m.uid()
        )));
    }
    let mode = m.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(untrusted(format!(
            "its mode is {mode:04o}: others may write or read it (chmod 700 it)"
        )));
    }
    Ok(())
}

/// "PID 1234 (comm)" of the lock's holder, as far as it can be told.
fn holder(lock: &Path) -> String {
    let mut text = String::new();
    let _ = File::open(lock).and_then(|f| f.take(64).read_to_string(&mut text));
    let Some(pid) = text
        .trim()
        .strip_prefix("PID ")
        .and_then(|p| p.parse::<u32>().ok())
    else {
        return String::new();
    };
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let comm: String = comm
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(16)
        .collect();
    format!("PID {pid} {comm}").trim().to_owned()
}

/// One KSM knob memfabric changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnobEntry {
    pub knob: super::knobs::Knob,
    /// What it was before memfabric first changed it.
    pub original: String,
    /// What memfabric last set it to (or read back after a write that moved it, like
    /// `pages_to_scan` after `advisor_mode`). A different value at restore time means
    /// someone else changed it since: theirs is kept.
    pub ours: Option<String>,
    /// What memfabric is about to write, journaled before the write: after a crash
    /// between the journal and the write's confirmation, finding this value is ours too,
    /// not someone else's change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
}

impl KnobEntry {
    /// Whether `current` is a value memfabric set (or was about to).
    pub fn is_ours(&self, current: &str) -> bool {
        self.ours.as_deref() == Some(current) || self.pending.as_deref() == Some(current)
    }
}

/// What the state directory remembers, written before every change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Journal {
    pub format: u32,
    /// The process that wrote it (for messages only; the lock is the authority).
    pub owner_pid: u32,
    /// `/proc/sys/kernel/random/boot_id` when written: after a reboot the kernel starts
    /// from its own defaults and the journal no longer describes the host.
    pub boot_id: String,
    /// In the order they were first changed.
    pub ksm: Vec<KnobEntry>,
}

/// Writes `value` as JSON to `name` in the locked state directory, atomically: a new temp
/// file in the same directory (0600, `O_EXCL`, no symlink followed), fsync, rename, fsync
/// of the directory. A crash leaves the old file or the new one, never half.
pub fn write_atomic<T: Serialize>(
    lock: &StateLock,
    name: &str,
    value: &T,
) -> Result<(), ActuateError> {
    write_atomic_in(lock.dir(), name, value)
}

/// [`write_atomic`] into `dir`, a directory the caller made its own (mode 0700) without
/// a state lock: one writer per file name.
pub fn write_atomic_in<T: Serialize>(
    dir: &Path,
    name: &str,
    value: &T,
) -> Result<(), ActuateError> {
    let path = dir.join(name);
    let err = |source| ActuateError::JournalWrite {
        path: path.clone(),
        source,
    };
    let tmp = dir.join(format!(".{name}.tmp"));
    let text = serde_json::to_string_pretty(value)
        .map_err(std::io::Error::other)
        .map_err(err)?;
    // A temp file left by a crash (or planted: unlink removes a symlink itself, never
    // its target), then a new one that must not exist yet.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, &path).map_err(err)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
    Ok(())
}

/// The error for a state file that is not what memfabric writes.
pub fn corrupt(lock: &StateLock, name: &str, message: String) -> ActuateError {
    ActuateError::CorruptJournal {
        path: lock.dir().join(name),
        message,
    }
}

/// Reads the JSON state file `name` of the locked state directory: `None` when there is
/// none, an error when it is larger than `max` bytes or not valid (left for the operator).
pub fn read_json<T: serde::de::DeserializeOwned>(
    lock: &StateLock,
    name: &str,
    max: u64,
) -> Result<Option<T>, ActuateError> {
    read_json_in(lock.dir(), name, max)
}

/// [`read_json`] from `dir` (see [`write_atomic_in`]).
pub fn read_json_in<T: serde::de::DeserializeOwned>(
    dir: &Path,
    name: &str,
    max: u64,
) -> Result<Option<T>, ActuateError> {
    let path = dir.join(name);
    let corrupt = |message: String| ActuateError::CorruptJournal {
        path: path.clone(),
        message,
    };
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(ActuateError::StateDir { path, source }),
    };
    let mut text = String::new();
    file.take(max + 1)
        .read_to_string(&mut text)
        .map_err(|e| corrupt(e.to_string()))?;
    if text.len() as u64 > max {
        return Err(corrupt(format!("larger than {max} bytes")));
    }
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| corrupt(e.to_string()))
}

/// Removes the state file `name` (absent is fine).
pub fn remove_file(lock: &StateLock, name: &str) -> Result<(), ActuateError> {
    let path = lock.dir().join(name);
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ActuateError::JournalWrite { path, source }),
    }
}

/// This boot's identity.
pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

impl Journal {
    pub fn new() -> Journal {
        Journal {
            format: JOURNAL_FORMAT,
            owner_pid: std::process::id(),
            boot_id: boot_id(),
            ksm: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ksm.is_empty()
    }

    /// The journal a previous owner left, if any. The lock must be held.
    pub fn load(lock: &StateLock) -> Result<Option<Journal>, ActuateError> {
        let Some(j) = read_json::<Journal>(lock, JOURNAL_FILE, JOURNAL_MAX_BYTES)? else {
            return Ok(None);
        };
        let corrupt = |message| corrupt(lock, JOURNAL_FILE, message);
        if j.format != JOURNAL_FORMAT {
            return Err(corrupt(format!(
                "format {} (this memfabric reads {JOURNAL_FORMAT})",
                j.format
            )));
        }
        for e in &j.ksm {
            for v in std::iter::once(&e.original)
                .chain(&e.ours)
                .chain(&e.pending)
            {
                super::knobs::validate(e.knob, v).map_err(|why| {
                    corrupt(format!(
                        "{}={v:?} is not a value memfabric writes: {why}",
                        e.knob
                    ))
                })?;
            }
        }
        if j.ksm.len() > super::knobs::Knob::ALL.len() {
            return Err(corrupt(format!(
                "{} entries for {} knobs",
                j.ksm.len(),
                super::knobs::Knob::ALL.len()
            )));
        }
        Ok(Some(j))
    }

    /// Writes the journal atomically (see [`write_atomic`]).
    pub fn save(&self, lock: &StateLock) -> Result<(), ActuateError> {
        write_atomic(lock, JOURNAL_FILE, self)
    }

    /// Removes the journal once everything in it was put back.
    pub fn remove(lock: &StateLock) -> Result<(), ActuateError> {
        remove_file(lock, JOURNAL_FILE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "memfabric-journal-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn the_lock_is_exclusive_and_names_its_holder() {
        let d = tempdir("lock");
        let first = StateLock::acquire(&d, None, |_| {}).unwrap();
        let e = StateLock::acquire(&d, None, |_| {}).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ActuateError::Locked { .. }), "{msg}");
        assert!(
            msg.contains(&format!("PID {}", std::process::id())),
            "{msg}"
        );
        let mut told = String::new();
        let e = StateLock::acquire(&d, Some(Duration::from_millis(300)), |h| told = h.into())
            .unwrap_err();
        assert!(matches!(e, ActuateError::Locked { .. }));
        assert!(told.starts_with("PID "), "{told}");
        drop(first);
        StateLock::acquire(&d, None, |_| {}).unwrap();
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_journal_round_trips_and_refuses_what_is_not_one() {
        let d = tempdir("journal");
        let lock = StateLock::acquire(&d, None, |_| {}).unwrap();
        assert_eq!(Journal::load(&lock).unwrap(), None);
        let mut j = Journal::new();
        j.ksm.push(KnobEntry {
            knob: super::super::knobs::Knob::PagesToScan,
            original: "100".into(),
            ours: Some("2000".into()),
            pending: None,
        });
        j.save(&lock).unwrap();
        assert_eq!(Journal::load(&lock).unwrap(), Some(j));
        let mode = fs::metadata(lock.journal_path()).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );

        for bad in [
            "{",
            "[]",
            r#"{"format":9,"owner_pid":1,"boot_id":"x","ksm":[]}"#,
            r#"{"format":1,"owner_pid":1,"boot_id":"x","ksm":[{"knob":"../x","original":"1","ours":null}]}"#,
            // A value memfabric never writes: run=2 unmerges the whole host.
            r#"{"format":1,"owner_pid":1,"boot_id":"x","ksm":[{"knob":"run","original":"2","ours":null}]}"#,
            r#"{"format":1,"owner_pid":1,"boot_id":"x","ksm":[{"knob":"run","original":"0","ours":"1","pending":"2"}]}"#,
            r#"{"format":1,"owner_pid":1,"boot_id":"x","ksm":[{"knob":"sleep_millisecs","original":"20\n","ours":null}]}"#,
        ] {
            fs::write(lock.journal_path(), bad).unwrap();
            let e = Journal::load(&lock).unwrap_err();
            assert!(
                matches!(e, ActuateError::CorruptJournal { .. }),
                "{bad}: {e}"
            );
            // Still there: a corrupt journal is the operator's to inspect.
            assert!(lock.journal_path().exists());
        }
        Journal::remove(&lock).unwrap();
        assert_eq!(Journal::load(&lock).unwrap(), None);
        drop(lock);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn planted_links_are_never_followed() {
        let d = tempdir("links");
        let lock = StateLock::acquire(&d, None, |_| {}).unwrap();
        let outside = d.with_extension("outside");
        fs::write(&outside, "theirs").unwrap();
        // A temp file planted as a link: the save replaces the link, not its target.
        std::os::unix::fs::symlink(&outside, d.join(".journal.json.tmp")).unwrap();
        Journal::new().save(&lock).unwrap();
        assert_eq!(fs::read_to_string(&outside).unwrap(), "theirs");
        assert!(Journal::load(&lock).unwrap().is_some());
        // A journal that is a link is not read.
        Journal::remove(&lock).unwrap();
        std::os::unix::fs::symlink(&outside, lock.journal_path()).unwrap();
        assert!(Journal::load(&lock).is_err());
        drop(lock);
        fs::remove_dir_all(&d).unwrap();
        fs::remove_file(&outside).unwrap();
    }

    #[test]
    fn an_untrusted_directory_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let d = tempdir("mode");
        fs::create_dir_all(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
        let e = StateLock::acquire(&d, None, |_| {}).unwrap_err();
        assert!(matches!(e, ActuateError::UntrustedStateDir { .. }), "{e}");
        assert!(e.is_host_problem());
        assert!(e.to_string().contains("0777"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }
}
