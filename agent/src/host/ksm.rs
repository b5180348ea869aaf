//! The host's KSM state as the kernel reports it: /sys/kernel/mm/ksm, the `cow_ksm`
//! counter of /proc/vmstat, ksmd's CPU time, and per-process /proc/PID/ksm_stat.

use std::fs;

use serde::{Deserialize, Serialize};

const KSM: &str = "/sys/kernel/mm/ksm";

fn read_i64(knob: &str) -> Option<i64> {
    fs::read_to_string(format!("{KSM}/{knob}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Host-wide KSM figures (absent ones read as 0; `available` says whether KSM exists).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KsmHost {
    pub available: bool,
    pub run: i64,
    pub pages_to_scan: i64,
    pub sleep_millisecs: i64,
    pub pages_shared: i64,
    pub pages_sharing: i64,
    pub pages_unshared: i64,
    pub pages_volatile: i64,
    pub pages_skipped: i64,
    /// Page visits by ksmd since boot (6.7+; 0 where missing).
    #[serde(default)]
    pub pages_scanned: i64,
    pub ksm_zero_pages: i64,
    pub full_scans: i64,
    pub general_profit_bytes: i64,
    /// `cow_ksm` from /proc/vmstat: writes that broke a KSM merge, host-wide.
    pub cow_ksm: u64,
    pub ksmd_cpu_seconds: f64,
    /// What could not be read (see [`KsmHost::known`]); the fields read 0.
    #[serde(default)]
    pub unreadable: Vec<String>,
}

impl KsmHost {
    /// Reads everything, looking ksmd up among all processes.
    pub fn read() -> KsmHost {
        Self::read_with(ksmd_pid())
    }

    /// Reads everything, with ksmd's PID already known (the daemon caches it).
    pub fn read_with(ksmd: Option<u32>) -> KsmHost {
        let mut unreadable = Vec::new();
        let mut r = |k: &'static str| {
            read_i64(k).unwrap_or_else(|| {
                unreadable.push(k.to_owned());
                0
            })
        };
        let mut host = KsmHost {
            available: fs::metadata(KSM).is_ok(),
            run: r("run"),
            pages_to_scan: r("pages_to_scan"),
            sleep_millisecs: r("sleep_millisecs"),
            pages_shared: r("pages_shared"),
            pages_sharing: r("pages_sharing"),
            pages_unshared: r("pages_unshared"),
            pages_volatile: r("pages_volatile"),
            pages_skipped: r("pages_skipped"),
            pages_scanned: r("pages_scanned"),
            ksm_zero_pages: r("ksm_zero_pages"),
            full_scans: r("full_scans"),
            general_profit_bytes: r("general_profit"),
            cow_ksm: 0,
            ksmd_cpu_seconds: 0.0,
            unreadable: Vec::new(),
        };
        host.cow_ksm = vmstat("cow_ksm").unwrap_or_else(|| {
            unreadable.push("cow_ksm".into());
            0
        });
        host.ksmd_cpu_seconds = ksmd.and_then(ksmd_cpu_seconds).unwrap_or_else(|| {
            unreadable.push("ksmd".into());
            0.0
        });
        host.unreadable = unreadable;
        host
    }

    /// Whether `knob` (a file of /sys/kernel/mm/ksm, `cow_ksm` or `ksmd`) was read: one
    /// that could not be is absent from the metrics, never exported as 0.
    pub fn known(&self, knob: &str) -> bool {
        !self.unreadable.iter().any(|u| u == knob)
    }
}

/// A counter of /proc/vmstat.
pub fn vmstat(key: &str) -> Option<u64> {
    vmstat_in(&fs::read_to_string("/proc/vmstat").ok()?, key)
}

/// The value of `key` in /proc/vmstat's text (`key value` lines).
pub fn vmstat_in(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The PID of the ksmd kernel thread.
/// MemTotal and MemAvailable in bytes (0 if unreadable).
pub fn meminfo() -> (u64, u64) {
    use procfs::Current as _;
    procfs::Meminfo::current().map_or((0, 0), |m| (m.mem_total, m.mem_available.unwrap_or(0)))
}

pub fn ksmd_pid() -> Option<u32> {
    fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            (fs::read_to_string(e.path().join("comm")).ok()?.trim_end() == "ksmd").then_some(pid)
        })
}

/// CPU seconds (user + system) a process has used, with its `comm`.
fn cpu_and_comm(pid: u32) -> Option<(f64, String)> {
    let stat = procfs::process::Process::new(pid as i32)
        .ok()?
        .stat()
        .ok()?;
    let seconds = (stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64;
    Some((seconds, stat.comm))
}

/// CPU seconds (user + system) process `pid` has used, every thread.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    cpu_and_comm(pid).map(|(s, _)| s)
}

/// CPU seconds (user + system) the process `ksmd` (ksmd's PID) has used since boot.
pub fn ksmd_cpu_seconds(ksmd: u32) -> Option<f64> {
    cpu_and_comm(ksmd).and_then(|(s, comm)| (comm == "ksmd").then_some(s))
}

/// /proc/PID/ksm_stat of one process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KsmStat {
    pub merging_pages: i64,
    pub zero_pages: i64,
    pub process_profit_bytes: i64,
    pub rmap_items: i64,
}

impl KsmStat {
    pub fn read(pid: u32) -> KsmStat {
        Self::parse(&fs::read_to_string(format!("/proc/{pid}/ksm_stat")).unwrap_or_default())
    }

    /// /proc/PID/ksm_stat's text (`key value` lines; absent keys read 0).
    pub fn parse(text: &str) -> KsmStat {
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix(' ')?.trim().parse().ok())
                .unwrap_or(0)
        };
        KsmStat {
            merging_pages: get("ksm_merging_pages"),
            zero_pages: get("ksm_zero_pages"),
            process_profit_bytes: get("ksm_process_profit"),
            rmap_items: get("ksm_rmap_items"),
        }
    }
}
