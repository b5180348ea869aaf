//! Reading and writing `/sys/kernel/mm/ksm` knobs. Writing is private to `actuate`: only
//! [`super::KsmControl`] calls [`write`], after journaling the knob's original value.

use std::{
    fs,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::ActuateError;

pub const KSM_DIR: &str = "/sys/kernel/mm/ksm";

/// A knob memfabric may change. Counters (`pages_sharing`, ...) are read-only, and
/// `max_page_sharing`/`merge_across_nodes` fail with EBUSY while KSM pages exist, so they
/// are not steered. `run` is never set to 2 (unmerge everything) by memfabric. A type, not
/// a string, so that no caller (and no journal, which deserialises it) can name a file the
/// daemon was not meant to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Knob {
    Run,
    PagesToScan,
    SleepMillisecs,
    AdvisorMode,
    AdvisorMaxCpu,
    AdvisorMinPagesToScan,
    AdvisorMaxPagesToScan,
    AdvisorTargetScanTime,
    SmartScan,
    UseZeroPages,
}

impl Knob {
    /// Every knob, so a journal can hold at most this many entries.
    pub const ALL: [Knob; 10] = [
        Knob::Run,
        Knob::PagesToScan,
        Knob::SleepMillisecs,
        Knob::AdvisorMode,
        Knob::AdvisorMaxCpu,
        Knob::AdvisorMinPagesToScan,
        Knob::AdvisorMaxPagesToScan,
        Knob::AdvisorTargetScanTime,
        Knob::SmartScan,
        Knob::UseZeroPages,
    ];

    /// Its file's name under [`KSM_DIR`] (and its name in the journal).
    pub fn as_str(self) -> &'static str {
        match self {
            Knob::Run => "run",
            Knob::PagesToScan => "pages_to_scan",
            Knob::SleepMillisecs => "sleep_millisecs",
            Knob::AdvisorMode => "advisor_mode",
            Knob::AdvisorMaxCpu => "advisor_max_cpu",
            Knob::AdvisorMinPagesToScan => "advisor_min_pages_to_scan",
            Knob::AdvisorMaxPagesToScan => "advisor_max_pages_to_scan",
            Knob::AdvisorTargetScanTime => "advisor_target_scan_time",
            Knob::SmartScan => "smart_scan",
            Knob::UseZeroPages => "use_zero_pages",
        }
    }

    /// Its current value, as written (the selection of a choice knob).
    pub fn read(self) -> Result<String, ActuateError> {
        read(self.as_str())
    }

    /// Whether this kernel has it (the advisor arrived in 6.7).
    pub fn exists(self) -> bool {
        path(self.as_str()).exists()
    }
}

impl std::fmt::Display for Knob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether `value` is one memfabric may write to `knob` (and so one its journal may hold):
/// within the kernel's range (mm/ksm.c), and never `run=2`, which unmerges every page of
/// the host.
pub fn validate(knob: Knob, value: &str) -> Result<(), String> {
    let num = |max: u64| -> Result<(), String> {
        match value.parse::<u64>() {
            Ok(n) if n <= max => Ok(()),
            Ok(n) => Err(format!("{n} is above {max}")),
            Err(_) => Err("not a number".into()),
        }
    };
    let one_of = |allowed: &[&str]| {
        if allowed.contains(&value) {
            Ok(())
        } else {
            Err(format!("not one of {}", allowed.join(", ")))
        }
    };
    match knob {
        Knob::Run | Knob::SmartScan | Knob::UseZeroPages => one_of(&["0", "1"]),
        Knob::AdvisorMode => one_of(&["none", "scan-time"]),
        Knob::PagesToScan => num(u64::from(u32::MAX)),
        Knob::SleepMillisecs => num(60_000),
        Knob::AdvisorMaxCpu => num(100),
        Knob::AdvisorTargetScanTime => num(u64::MAX).and_then(|()| {
            if value == "0" {
                Err("must be at least 1".into())
            } else {
                Ok(())
            }
        }),
        Knob::AdvisorMinPagesToScan | Knob::AdvisorMaxPagesToScan => num(u64::MAX),
    }
}

pub fn path(name: &str) -> PathBuf {
    Path::new(KSM_DIR).join(name)
}

/// Whether this kernel has KSM at all.
pub fn available() -> bool {
    Path::new(KSM_DIR).is_dir()
}

/// The value to write back for a value read from sysfs: choice knobs such as
/// `advisor_mode` read as `[none] scan-time`, with the current choice in brackets.
pub fn selected(value: &str) -> &str {
    match (value.find('['), value.find(']')) {
        (Some(a), Some(b)) if a < b => &value[a + 1..b],
        _ => value.trim(),
    }
}

/// The current value of a file under [`KSM_DIR`] (a knob or a counter), as written (the
/// selection of a choice knob).
pub fn read(name: &str) -> Result<String, ActuateError> {
    let p = path(name);
    fs::read_to_string(&p)
        .map(|s| selected(&s).to_owned())
        .map_err(|source| ActuateError::Read { path: p, source })
}

/// A numeric knob or counter.
pub fn read_u64(name: &str) -> Result<u64, ActuateError> {
    let v = read(name)?;
    v.parse().map_err(|_| ActuateError::Read {
        path: path(name),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not a number: {v:?}"),
        ),
    })
}

pub(super) fn write(knob: Knob, value: &str) -> Result<(), ActuateError> {
    let p = path(knob.as_str());
    fs::write(&p, value).map_err(|source| {
        let hint = match source.raw_os_error() {
            Some(libc::EINVAL) if knob == Knob::PagesToScan => {
                " (the kernel refuses pages_to_scan while advisor_mode is scan-time)"
            }
            Some(libc::EBUSY) => " (the kernel refuses this change while KSM pages exist)",
            Some(libc::EACCES) | Some(libc::EPERM) => " (needs root)",
            _ => "",
        };
        ActuateError::Write {
            path: p,
            value: value.into(),
            source,
            hint,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_knobs_write_back_their_selection() {
        assert_eq!(selected("[none] scan-time"), "none");
        assert_eq!(selected("none [scan-time]"), "scan-time");
        assert_eq!(selected("100"), "100");
        assert_eq!(selected(" 20\n"), "20");
    }

    #[test]
    fn only_values_in_the_kernels_range_are_accepted() {
        for (knob, ok) in [
            (Knob::Run, "0"),
            (Knob::Run, "1"),
            (Knob::PagesToScan, "4294967295"),
            (Knob::SleepMillisecs, "60000"),
            (Knob::AdvisorMode, "scan-time"),
            (Knob::AdvisorTargetScanTime, "200"),
        ] {
            assert_eq!(validate(knob, ok), Ok(()), "{knob}={ok}");
        }
        for (knob, bad) in [
            (Knob::Run, "2"),
            (Knob::Run, ""),
            (Knob::PagesToScan, "4294967296"),
            (Knob::PagesToScan, "-1"),
            (Knob::SleepMillisecs, "60001"),
            (Knob::AdvisorMode, "../x"),
            (Knob::AdvisorTargetScanTime, "0"),
            (Knob::UseZeroPages, "1\n1"),
        ] {
            assert!(validate(knob, bad).is_err(), "{knob}={bad:?}");
        }
    }

    #[test]
    fn knob_names_are_their_files_and_their_journal_names() {
        for k in Knob::ALL {
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{}\"", k.as_str()));
            assert_eq!(serde_json::from_str::<Knob>(&json).unwrap(), k);
        }
        assert!(serde_json::from_str::<Knob>("\"pages_sharing\"").is_err());
        assert!(serde_json::from_str::<Knob>("\"../../../../etc/passwd\"").is_err());
    }
}
