//! KSM knobs changed by the demo, benchmarks and tests, saved to a file *before* they are
//! changed: a clean exit restores them, and a crash is repaired by the next session that
//! starts (or by `cargo xtask lab down`). KSM is one switch for the whole host, so one
//! session at a time: a second one is refused while the first one's process lives.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::cmd;

pub const KSM: &str = "/sys/kernel/mm/ksm";

/// Where the saved values live while a session runs.
pub fn saved_file() -> PathBuf {
    cmd::root().join("target/lab/ksm-saved")
}

/// A KSM knob's current value.
pub fn read(knob: &str) -> Option<String> {
    fs::read_to_string(Path::new(KSM).join(knob))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// A numeric KSM counter (0 if unreadable).
pub fn read_u64(knob: &str) -> u64 {
    read(knob).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// A signed KSM counter such as `general_profit`.
pub fn read_i64(knob: &str) -> i64 {
    read(knob).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// The value to write back for a value read from sysfs: choice knobs such as
/// `advisor_mode` read as `[none] scan-time`, with the current choice in brackets.
pub fn selected(value: &str) -> &str {
    match (value.find('['), value.find(']')) {
        (Some(a), Some(b)) if a < b => &value[a + 1..b],
        _ => value.trim(),
    }
}

fn write(knob: &str, value: &str) -> anyhow::Result<()> {
    let value = selected(value);
    fs::write(Path::new(KSM).join(knob), value)
        .with_context(|| format!("writing {value} to {KSM}/{knob}"))
}

fn merged() -> u64 {
    read_u64("pages_shared") + read_u64("pages_sharing")
}

/// Restores what a crashed session saved. Returns whether there was anything to restore.
pub fn restore_leftover() -> anyhow::Result<bool> {
    let file = saved_file();
    let Ok(text) = fs::read_to_string(&file) else {
        return Ok(false);
    };
    let mut lines = text.lines();
    let owner: u32 = lines.next().and_then(|l| l.parse().ok()).unwrap_or(0);
    if owner == std::process::id() {
        // Our own live session: it restores them itself.
        return Ok(false);
    }
    if owner != 0 && Path::new(&format!("/proc/{owner}")).exists() {
        bail!(
            "another session (PID {owner}) is driving KSM ({} exists); wait for it to end",
            file.display()
        );
    }
    let pairs: Vec<(&str, &str)> = lines.filter_map(|l| l.split_once('=')).collect();
    for (knob, value) in pairs.iter().rev() {
        write(knob, value)?;
    }
    fs::remove_file(&file)?;
    eprintln!("ksm: restored settings left by an interrupted session: {pairs:?}");
    Ok(true)
}

/// Changed KSM knobs, restored on [`KsmSession::restore`] or drop.
pub struct KsmSession {
    saved: Vec<(String, String)>,
    merged_before: u64,
    done: bool,
}

impl KsmSession {
    pub fn begin() -> anyhow::Result<KsmSession> {
        if !Path::new(KSM).is_dir() {
            bail!("{KSM} is missing: the kernel needs CONFIG_KSM=y");
        }
        restore_leftover()?;
        Ok(KsmSession {
            saved: Vec::new(),
            merged_before: merged(),
            done: false,
        })
    }

    fn persist(&self) -> anyhow::Result<()> {
        let file = saved_file();
        fs::create_dir_all(file.parent().expect("has parent"))?;
        let mut text = format!("{}\n", std::process::id());
        for (k, v) in &self.saved {
            text.push_str(&format!("{k}={v}\n"));
        }
        fs::write(&file, text).with_context(|| format!("saving KSM settings to {}", file.display()))
    }

    /// Sets `knob`, first saving (to memory and to disk) what it was.
    pub fn set(&mut self, knob: &str, value: &str) -> anyhow::Result<()> {
        if !self.saved.iter().any(|(k, _)| k == knob) {
            let old = read(knob).with_context(|| format!("reading {KSM}/{knob}"))?;
            self.saved.push((knob.to_owned(), old));
            self.persist()?;
        }
        write(knob, value)
    }

    /// Puts every changed knob back, in reverse order. Before stopping ksmd it lets ksmd
    /// reap the KSM state of processes that exited mid-scan (merged pages back to where
    /// they were, or two more full scans, 10 s at most): with `run=0` that state would stay
    /// allocated until KSM next runs.
    pub fn restore(mut self) -> anyhow::Result<()> {
        self.restore_inner()
    }

    fn restore_inner(&mut self) -> anyhow::Result<()> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        if read("run").as_deref() == Some("1") {
            let scans = read_u64("full_scans");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline
                && merged() > self.merged_before
                && read_u64("full_scans") < scans + 2
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let mut first_err = None;
        for (knob, value) in self.saved.iter().rev() {
            if let Err(e) = write(knob, value) {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => {
                Err(e.context("restoring KSM settings (they remain saved for the next run)"))
            }
            None => {
                let _ = fs::remove_file(saved_file());
                Ok(())
            }
        }
    }
}

impl Drop for KsmSession {
    fn drop(&mut self) {
        if let Err(e) = self.restore_inner() {
            eprintln!("ksm: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::selected;

    #[test]
    fn choice_knobs_write_back_their_selection() {
        assert_eq!(selected("[none] scan-time"), "none");
        assert_eq!(selected("none [scan-time]"), "scan-time");
        assert_eq!(selected("100"), "100");
        assert_eq!(selected(" 20\n"), "20");
    }
}
