//! Reading and writing `/sys/kernel/mm/ksm` knobs. Writing is private to `actuate`: only
//! [`super::KsmControl`] calls [`write`], after journaling the knob's original value.

use std::{
    fs,
    path::{Path, PathBuf},
};

use super::ActuateError;

pub const KSM_DIR: &str = "/sys/kernel/mm/ksm";

/// The knobs memfabric may change. Counters (`pages_sharing`, ...) are read-only, and
/// `max_page_sharing`/`merge_across_nodes` fail with EBUSY while KSM pages exist, so they
/// are not steered. `run` is never set to 2 (unmerge everything) by memfabric.
pub const KNOBS: &[&str] = &[
    "run",
    "pages_to_scan",
    "sleep_millisecs",
    "advisor_mode",
    "advisor_max_cpu",
    "advisor_min_pages_to_scan",
    "advisor_max_pages_to_scan",
    "advisor_target_scan_time",
    "smart_scan",
    "use_zero_pages",
];

/// Whether `value` is one memfabric may write to `knob` (and so one its journal may hold):
/// within the kernel's range (mm/ksm.c), and never `run=2`, which unmerges every page of
/// the host.
pub fn validate(knob: &str, value: &str) -> Result<(), String> {
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
        "run" => one_of(&["0", "1"]),
        "smart_scan" | "use_zero_pages" => one_of(&["0", "1"]),
        "advisor_mode" => one_of(&["none", "scan-time"]),
        "pages_to_scan" => num(u64::from(u32::MAX)),
        "sleep_millisecs" => num(60_000),
        "advisor_max_cpu" => num(100),
        "advisor_target_scan_time" => num(u64::MAX).and_then(|()| {
            if value == "0" {
                Err("must be at least 1".into())
            } else {
                Ok(())
            }
        }),
        "advisor_min_pages_to_scan" | "advisor_max_pages_to_scan" => num(u64::MAX),
        _ => Err("not a knob memfabric changes".into()),
    }
}

pub fn path(knob: &str) -> PathBuf {
    Path::new(KSM_DIR).join(knob)
}

/// Whether this kernel has KSM at all.
pub fn available() -> bool {
    Path::new(KSM_DIR).is_dir()
}

/// Whether this kernel has `knob` (the advisor arrived in 6.7).
pub fn exists(knob: &str) -> bool {
    path(knob).exists()
}

/// The value to write back for a value read from sysfs: choice knobs such as
/// `advisor_mode` read as `[none] scan-time`, with the current choice in brackets.
pub fn selected(value: &str) -> &str {
    match (value.find('['), value.find(']')) {
        (Some(a), Some(b)) if a < b => &value[a + 1..b],
        _ => value.trim(),
    }
}

/// A knob's current value, as written (the selection of a choice knob).
pub fn read(knob: &str) -> Result<String, ActuateError> {
    let p = path(knob);
    fs::read_to_string(&p)
        .map(|s| selected(&s).to_owned())
        .map_err(|source| ActuateError::Read { path: p, source })
}

/// A numeric knob or counter.
pub fn read_u64(knob: &str) -> Result<u64, ActuateError> {
    let v = read(knob)?;
    v.parse().map_err(|_| ActuateError::Read {
        path: path(knob),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not a number: {v:?}"),
        ),
    })
}

pub(super) fn write(knob: &str, value: &str) -> Result<(), ActuateError> {
    if !KNOBS.contains(&knob) {
        return Err(ActuateError::UnknownKnob { knob: knob.into() });
    }
    let p = path(knob);
    fs::write(&p, value).map_err(|source| {
        let hint = match source.raw_os_error() {
            Some(libc::EINVAL) if knob == "pages_to_scan" => {
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
            ("run", "0"),
            ("run", "1"),
            ("pages_to_scan", "4294967295"),
            ("sleep_millisecs", "60000"),
            ("advisor_mode", "scan-time"),
            ("advisor_target_scan_time", "200"),
        ] {
            assert_eq!(validate(knob, ok), Ok(()), "{knob}={ok}");
        }
        for (knob, bad) in [
            ("run", "2"),
            ("run", ""),
            ("pages_to_scan", "4294967296"),
            ("pages_to_scan", "-1"),
            ("sleep_millisecs", "60001"),
            ("advisor_mode", "../x"),
            ("advisor_target_scan_time", "0"),
            ("use_zero_pages", "1\n1"),
            ("pages_sharing", "1"),
        ] {
            assert!(validate(knob, bad).is_err(), "{knob}={bad:?}");
        }
    }

    #[test]
    fn only_known_knobs_are_written() {
        let e = write("pages_sharing", "1").unwrap_err();
        assert!(matches!(e, ActuateError::UnknownKnob { .. }), "{e}");
        let e = write("../../../../etc/passwd", "x").unwrap_err();
        assert!(matches!(e, ActuateError::UnknownKnob { .. }), "{e}");
    }
}
