//! Helpers for memfabric's privileged integration tests (in `tests/`): a workload child
//! with known memory behaviour, a guard that restores KSM settings, kernel counters.
//!
//! These tests use the real kernel: real eBPF programs, real KSM, real processes.

use memfabric::actuate::knobs::Knob;
use std::{
    fs,
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::Duration,
};

pub use memfabric_harness::{poll_for, privileged, rss_kib, wait_for};
pub use xtask::ksm::KsmSession;

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
        Workload::spawn_with(exe, &[])
    }

    /// As [`Workload::spawn`], in another mode (e.g. `seccomp trap-madvise`).
    pub fn spawn_with(exe: &str, args: &[&str]) -> Workload {
        let mut child = Command::new(exe)
            .args(args)
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

    /// `pages` identical pages, madvised mergeable; returns the region.
    pub fn alloc_mergeable(&mut self, pages: i64) -> String {
        let region = self.cmd(&format!("alloc {pages} same"));
        self.cmd(&format!("mergeable {region}"));
        region
    }

    /// Waits up to 90 s until KSM merged at least `pages` of the child
    /// (`ksm_merging_pages`); fails the test, naming `what`, otherwise.
    pub fn await_merged(&self, pages: i64, what: &str) {
        assert!(
            wait_for(Duration::from_secs(90), || ksm_stat(
                self.pid,
                "ksm_merging_pages"
            ) >= pages),
            "KSM merged only {} of {pages} pages of {what} in 90 s",
            ksm_stat(self.pid, "ksm_merging_pages")
        );
    }

    /// Where region `region` (as `alloc` replied) lies: [start, end) in the child.
    pub fn span(&mut self, region: &str) -> (u64, u64) {
        let reply = self.cmd(&format!("where {region}"));
        let mut words = reply.split_whitespace();
        let start = words
            .next()
            .and_then(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok())
            .expect("where: start");
        let pages: u64 = words
            .next()
            .and_then(|w| w.parse().ok())
            .expect("where: pages");
        (start, start + pages * 4096)
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

/// A field of /proc/PID/status (trimmed), if the process and the field exist.
pub fn status_field(pid: u32, key: &str) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| Some(l.strip_prefix(key)?.strip_prefix(':')?.trim().to_owned()))
}

/// The full register set (general and floating-point) of `pid`'s main thread, as a
/// second tracer sees it: seize, interrupt, PTRACE_GETREGS + PTRACE_GETFPREGS, detach.
/// A thread blocked in the same system call shows the same bytes every time: it is first
/// awaited there (a thread just detached re-enters its interrupted call a moment later).
pub fn registers(pid: u32) -> Vec<u8> {
    let blocked = || {
        fs::read_to_string(format!("/proc/{pid}/syscall")).is_ok_and(|s| !s.starts_with("running"))
    };
    assert!(
        wait_for(Duration::from_secs(5), blocked),
        "PID {pid} never blocked in a system call"
    );
    fn bytes<T>(v: &T) -> &[u8] {
        // SAFETY: plain-old-data register structs, read as bytes.
        unsafe { std::slice::from_raw_parts(std::ptr::from_ref(v).cast(), size_of::<T>()) }
    }
    let p = pid as libc::pid_t;
    // SAFETY: ptrace requests on a process this test owns, all from this thread; the
    // structs are plain integers and written by the kernel.
    unsafe {
        assert_eq!(libc::ptrace(libc::PTRACE_SEIZE, p, 0, 0), 0, "seize {pid}");
        assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, p, 0, 0), 0);
        let mut st = 0;
        assert_eq!(libc::waitpid(p, &mut st, libc::__WALL), p);
        let mut regs: libc::user_regs_struct = std::mem::zeroed();
        let mut fp: libc::user_fpregs_struct = std::mem::zeroed();
        assert_eq!(libc::ptrace(libc::PTRACE_GETREGS, p, 0, &mut regs), 0);
        assert_eq!(libc::ptrace(libc::PTRACE_GETFPREGS, p, 0, &mut fp), 0);
        assert_eq!(libc::ptrace(libc::PTRACE_DETACH, p, 0, 0), 0);
        [bytes(&regs), bytes(&fp)].concat()
    }
}

/// xxh3 of `[start, end)` of `pid`'s memory, read through /proc/PID/mem (which neither
/// faults pages in for good nor unmerges KSM pages).
pub fn memory_hash(pid: u32, start: u64, end: u64) -> u64 {
    use std::os::unix::fs::FileExt as _;
    let mem = fs::File::open(format!("/proc/{pid}/mem")).expect("/proc/PID/mem");
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = start;
    while at < end {
        let n = ((end - at) as usize).min(buf.len());
        mem.read_exact_at(&mut buf[..n], at)
            .expect("reading /proc/PID/mem");
        h.update(&buf[..n]);
        at += n as u64;
    }
    h.digest()
}

/// KSM pages mapped by `pid`, in kB (smaps_rollup's `KSM:`; 0 when unreadable).
pub fn ksm_kb(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("KSM:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
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

/// Turns KSM on, scanning fast enough for a test (1000 pages every 20 ms). The settings
/// are saved first (also to disk, for a crash) and restored when the session drops, also
/// when the test panics. KSM is one switch for the whole host: tests using this must be
/// `#[serial(ksm)]`, and should declare the session before their workloads, so that the
/// workloads die first and ksmd reaps them before it is stopped.
pub fn ksm_fast() -> KsmSession {
    let mut ksm = KsmSession::begin().expect("KSM session");
    for (knob, value) in [
        (Knob::PagesToScan, "1000"),
        (Knob::SleepMillisecs, "20"),
        (Knob::Run, "1"),
    ] {
        ksm.set(knob, value).expect("setting KSM");
    }
    ksm
}

/// KSM as fast as a bench needs it to merge gigabytes in a minute (20,000 pages every
/// 10 ms), restored when the session drops.
pub fn ksm_bench() -> anyhow::Result<KsmSession> {
    let mut ksm = KsmSession::begin()?;
    for (knob, value) in [
        (Knob::PagesToScan, "20000"),
        (Knob::SleepMillisecs, "10"),
        (Knob::Run, "1"),
    ] {
        ksm.set(knob, value)?;
    }
    Ok(ksm)
}

/// A private VM lab for one test: its own state directory, so a developer's running lab is
/// never touched; on drop (also when the test panics) its guests are stopped and the
/// directory removed. Declare it after any KSM session, so the guests are gone before KSM
/// settings are restored. Sets `MEMFABRIC_LAB_STATE`: one per test binary.
pub struct TestLab {
    state: std::path::PathBuf,
}

impl TestLab {
    pub fn new(name: &str) -> TestLab {
        let state = std::env::temp_dir().join(format!("memfabric-{name}-{}", std::process::id()));
        // SAFETY: lab tests are alone in their binary; no other thread reads the
        // environment while it is set.
        unsafe { std::env::set_var("MEMFABRIC_LAB_STATE", &state) };
        TestLab { state }
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        if let Err(e) = xtask::lab::down() {
            eprintln!("stopping the test lab: {e:#}");
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// A source's and a destination's (`dst`) proxy credentials under `pki`, written into
/// `dir`: what the migration tests and `bench proxy` give the two proxies.
pub fn proxy_tls(
    pki: &memfabric_harness::Pki,
    dir: &std::path::Path,
) -> (memfabric::migrate::run::Tls, memfabric::migrate::run::Tls) {
    let mut tls = pki
        .write(dir, &["src", "dst"])
        .into_iter()
        .map(|(cert, key)| memfabric::migrate::run::Tls {
            ca: dir.join("ca.crt"),
            cert,
            key,
        });
    let src = tls.next().expect("the source's certificate");
    let dst = tls.next().expect("the destination's certificate");
    (src, dst)
}
