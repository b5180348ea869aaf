//! Helpers for memfabric's privileged integration tests (in `tests/`): a workload child
//! with known memory behaviour, a guard that restores KSM settings, kernel counters.
//!
//! These tests use the real kernel: real eBPF programs, real KSM, real processes.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

/// True when the tests may use root-only kernel facilities. Run by hand without root, a
/// test skips loudly; under CI or `cargo xtask test` (which set `MEMFABRIC_REQUIRE_ROOT`)
/// a missing root fails the test instead.
pub fn privileged(test: &str) -> bool {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("MEMFABRIC_REQUIRE_ROOT").is_some() || std::env::var_os("CI").is_some() {
        panic!("{test} needs root (eBPF, KSM), and this run requires privileged tests");
    }
    eprintln!("\n!!! SKIPPED {test}: needs root (eBPF, KSM). Run `sudo cargo xtask test`. !!!\n");
    false
}

/// A running `memfabric-workload` child. Killed on drop.
pub struct Workload {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub pid: u32,
}

impl Workload {
    /// Starts the workload binary at `exe` and waits for its `ready` line.
    pub fn spawn(exe: &str) -> Workload {
        let mut child = Command::new(exe)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {exe}: {e}"));
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let pid = child.id();
        let mut w = Workload {
            child,
            stdin,
            stdout,
            pid,
        };
        let ready = w.read_line();
        assert_eq!(ready, format!("ready {pid}"));
        w
    }

    fn read_line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("reading workload");
        line.trim().to_owned()
    }

    /// Sends one command and returns the reply after `ok` (panics on `err`).
    pub fn cmd(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").expect("writing to workload");
        self.stdin.flush().unwrap();
        let reply = self.read_line();
        match reply.strip_prefix("ok") {
            Some(rest) => rest.trim().to_owned(),
            None => panic!("workload: {cmd:?} -> {reply:?}"),
        }
    }

    /// Asks the child to exit and reaps it.
    pub fn exit(mut self) {
        let _ = writeln!(self.stdin, "exit");
        let _ = self.stdin.flush();
        let status = self.child.wait().expect("waiting for workload");
        assert!(status.success(), "workload exited with {status}");
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A counter from /proc/vmstat.
pub fn vmstat(name: &str) -> u64 {
    let text = fs::read_to_string("/proc/vmstat").expect("/proc/vmstat");
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == name).then(|| v.trim().parse().ok()).flatten()
        })
        .unwrap_or_else(|| panic!("/proc/vmstat has no {name}"))
}

/// A field of /proc/PID/ksm_stat (0 if the process is not in KSM yet).
pub fn ksm_stat(pid: u32, field: &str) -> i64 {
    let text = fs::read_to_string(format!("/proc/{pid}/ksm_stat")).unwrap_or_default();
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == field).then(|| v.trim().parse().ok()).flatten()
        })
        .unwrap_or(0)
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

const KSM: &str = "/sys/kernel/mm/ksm";

/// Saves the KSM knobs it changes and restores them on drop, also when the test panics.
/// KSM is one switch for the whole host: tests using this must be `#[serial(ksm)]`.
pub struct KsmGuard {
    saved: Vec<(&'static str, String)>,
    /// `pages_shared + pages_sharing` when the guard started.
    merged_before: u64,
}

fn ksm_counter(name: &str) -> Option<u64> {
    fs::read_to_string(Path::new(KSM).join(name))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

fn ksm_merged() -> u64 {
    ksm_counter("pages_shared").unwrap_or(0) + ksm_counter("pages_sharing").unwrap_or(0)
}

impl KsmGuard {
    /// Turns KSM on, scanning fast enough for a test (1000 pages every 20 ms).
    pub fn start_fast() -> KsmGuard {
        let mut g = KsmGuard {
            saved: Vec::new(),
            merged_before: ksm_merged(),
        };
        g.set("pages_to_scan", "1000");
        g.set("sleep_millisecs", "20");
        g.set("run", "1");
        g
    }

    fn set(&mut self, knob: &'static str, value: &str) {
        let path = Path::new(KSM).join(knob);
        let old = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        if !self.saved.iter().any(|(k, _)| *k == knob) {
            self.saved.push((knob, old.trim().to_owned()));
        }
        fs::write(&path, value).unwrap_or_else(|e| panic!("writing {value} to {path:?}: {e}"));
    }
}

impl Drop for KsmGuard {
    fn drop(&mut self) {
        // ksmd frees the KSM state of processes that exited while it was mid-scan only on
        // its next pass: let it get there (merged pages back to where they were, or two
        // more full scans) before stopping it, or the merged pages of our dead workloads
        // stay counted and allocated until KSM runs again. So declare the guard before
        // the workloads: they drop (die) first.
        let scans = ksm_counter("full_scans").unwrap_or(0);
        wait_for(Duration::from_secs(10), || {
            ksm_merged() <= self.merged_before
                || ksm_counter("full_scans").unwrap_or(0) >= scans + 2
        });
        // Restore in reverse: `run` first goes back to what it was, then the scan knobs.
        for (knob, value) in self.saved.iter().rev() {
            let path = Path::new(KSM).join(knob);
            if let Err(e) = fs::write(&path, value) {
                eprintln!("KsmGuard: restoring {path:?} to {value}: {e}");
            }
        }
    }
}
