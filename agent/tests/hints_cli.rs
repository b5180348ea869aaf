//! `memfabric run --act ksmd,hints` end to end on a workload with a region it keeps
//! rewriting (every write to a merged page there is a COW break) and a region of stable
//! duplicates: the rewritten region is made unmergeable, the stable one stays merged,
//! COW breaks fall; SIGTERM puts the flags back; after kill -9 a restart puts them back.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use memfabric_harness::wait_for;

const MEMFABRIC: &str = env!("CARGO_BIN_EXE_memfabric");
const MIB: usize = 1 << 20;
const REGION: usize = 8 * MIB;

/// A forked child: region A (same content, rewritten in place every 20 ms) and region B
/// (same content, never written again), both madvised mergeable. Killed on drop.
struct Workload {
    pid: i32,
    a: u64,
    b: u64,
}

impl Workload {
    fn spawn() -> Workload {
        let mut fds = [0i32; 2];
        // SAFETY: a valid array for pipe(2).
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child only calls mmap, madvise, write, nanosleep and writes memory
        // (async-signal-safe), never returns into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: in the forked child: raw system calls on memory it maps itself.
            unsafe {
                let map = || {
                    libc::mmap(
                        std::ptr::null_mut(),
                        REGION,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    ) as *mut u8
                };
                let (a, b) = (map(), map());
                libc::memset(a.cast(), 0x42, REGION);
                libc::memset(b.cast(), 0x5a, REGION);
                libc::madvise(a.cast(), REGION, libc::MADV_MERGEABLE);
                libc::madvise(b.cast(), REGION, libc::MADV_MERGEABLE);
                let addrs = [a as u64, b as u64];
                libc::write(fds[1], addrs.as_ptr().cast(), 16);
                let nap = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 20_000_000,
                };
                loop {
                    let mut p = 0;
                    while p < REGION {
                        // The same bytes again: the content never changes, yet every write
                        // to a merged page breaks the merge.
                        std::ptr::write_volatile(a.add(p), 0x42);
                        p += 4096;
                    }
                    libc::nanosleep(&nap, std::ptr::null_mut());
                }
            }
        }
        let mut addrs = [0u64; 2];
        // SAFETY: reading 16 bytes into a 16-byte array.
        let n = unsafe { libc::read(fds[0], addrs.as_mut_ptr().cast(), 16) };
        assert_eq!(n, 16);
        // SAFETY: our fds.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        Workload {
            pid,
            a: addrs[0],
            b: addrs[1],
        }
    }

    /// Whether every mapping piece of [start, start+REGION) carries `mg`.
    fn mergeable(&self, start: u64) -> Option<bool> {
        let smaps = fs::read_to_string(format!("/proc/{}/smaps", self.pid)).ok()?;
        let (mut inside, mut all, mut any) = (false, true, false);
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = first.split_once('-')
                && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
            {
                inside = a < start + REGION as u64 && b > start;
            } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
                any = true;
                all &= flags.split_whitespace().any(|f| f == "mg");
            }
        }
        any.then_some(all)
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        // SAFETY: our child.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

fn cow_ksm() -> u64 {
    fs::read_to_string("/proc/vmstat")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("cow_ksm ")?.trim().parse().ok())
        .unwrap()
}

fn ksm_knobs() -> Vec<(String, String)> {
    ["run", "pages_to_scan", "sleep_millisecs"]
        .iter()
        .map(|k| {
            (
                k.to_string(),
                fs::read_to_string(format!("/sys/kernel/mm/ksm/{k}"))
                    .unwrap()
                    .trim()
                    .to_owned(),
            )
        })
        .collect()
}

/// `memfabric run --act ksmd,hints` with a domain that shares, tracking `pid`; stopped
/// with SIGTERM if the test fails while it runs (so it puts KSM and the hints back).
fn daemon(state: &Path, cfg: &Path, pid: i32, log: &Path) -> memfabric_harness::Guarded {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    Command::new(MEMFABRIC)
        .args([
            "run",
            "--act",
            "ksmd,hints",
            "--scan-cpu",
            "50",
            "--refresh-ms",
            "300",
        ])
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--state-dir")
        .arg(state)
        .arg("--config")
        .arg(cfg)
        .args(["--pid", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).unwrap())
        .spawn()
        .map(memfabric_harness::Guarded::new)
        .unwrap()
}

fn term(child: &mut Child) -> std::process::ExitStatus {
    // SAFETY: our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap()
}

#[test]
fn rewritten_ranges_leave_ksm_and_come_back_at_exit() {
    if !memfabric_harness::privileged("rewritten_ranges_leave_ksm_and_come_back_at_exit") {
        return;
    }
    let knobs = ksm_knobs();
    let dir: PathBuf = std::env::temp_dir().join(format!("memfabric-hints-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let (state, cfg, log) = (
        dir.join("state"),
        dir.join("memfabric.toml"),
        dir.join("log"),
    );
    fs::write(
        &cfg,
        "[[domain]]\nname = \"test\"\nmatch = \"^pid-\"\nshare = true\n",
    )
    .unwrap();
    let w = Workload::spawn();
    assert_eq!(
        (w.mergeable(w.a), w.mergeable(w.b)),
        (Some(true), Some(true))
    );

    let mut d = daemon(&state, &cfg, w.pid, &log);
    let cow0 = cow_ksm();
    let t0 = Instant::now();
    let out = wait_for(Duration::from_secs(120), || w.mergeable(w.a) == Some(false));
    let log_text = || fs::read_to_string(&log).unwrap_or_default();
    assert!(out, "the rewritten region stayed mergeable: {}", log_text());
    let took = t0.elapsed();
    let before_rate = (cow_ksm() - cow0) as f64 / took.as_secs_f64();
    assert_eq!(w.mergeable(w.b), Some(true), "the stable region lost mg");
    // COW breaks of the workload fall once its rewritten region is out of KSM.
    std::thread::sleep(Duration::from_secs(2)); // ksmd unmerged it
    let c = cow_ksm();
    std::thread::sleep(Duration::from_secs(5));
    let after_rate = (cow_ksm() - c) as f64 / 5.0;
    eprintln!(
        "region out of KSM after {:.1} s; cow_ksm {before_rate:.0}/s before, {after_rate:.0}/s after",
        took.as_secs_f64()
    );
    assert!(
        after_rate < before_rate / 4.0,
        "COW breaks did not fall: {before_rate:.0}/s -> {after_rate:.0}/s"
    );
    assert!(
        fs::read_to_string(state.join("hints.json")).is_ok(),
        "no hints journal while ranges are changed"
    );

    // SIGTERM: the flag comes back; KSM knobs as found.
    assert!(term(&mut d).success(), "{}", log_text());
    assert_eq!(
        w.mergeable(w.a),
        Some(true),
        "not restored on SIGTERM: {}",
        log_text()
    );
    assert!(!state.join("hints.json").exists());
    assert_eq!(ksm_knobs(), knobs);

    // Again, then kill -9: the next start puts the flag back first.
    let mut d = daemon(&state, &cfg, w.pid, &log);
    assert!(
        wait_for(Duration::from_secs(120), || w.mergeable(w.a) == Some(false)),
        "{}",
        log_text()
    );
    // SAFETY: our child.
    unsafe { libc::kill(d.id() as i32, libc::SIGKILL) };
    d.wait().unwrap();
    assert_eq!(w.mergeable(w.a), Some(false));
    let status = fs::read_to_string(format!("/proc/{}/status", w.pid)).unwrap();
    assert!(status.contains("TracerPid:\t0"), "left traced: {status}");
    let mut d = daemon(&state, &cfg, w.pid, &log);
    assert!(
        wait_for(Duration::from_secs(10), || w.mergeable(w.a) == Some(true)),
        "not restored after kill -9 and a restart: {}",
        log_text()
    );
    assert!(term(&mut d).success());
    assert_eq!(w.mergeable(w.a), Some(true));
    assert_eq!(ksm_knobs(), knobs, "KSM knobs not as found");
    drop(w);
    let _ = fs::remove_dir_all(&dir);
}

/// A state directory for the journal tests, locked.
fn locked_state(test: &str) -> (PathBuf, std::sync::Arc<memfabric::actuate::StateLock>) {
    let dir = std::env::temp_dir().join(format!("memfabric-{test}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let lock = memfabric::actuate::StateLock::acquire(&dir, None, |_| {}).unwrap();
    (dir, std::sync::Arc::new(lock))
}

#[test]
fn hinted_ranges_are_forgotten_only_with_their_process() {
    use memfabric::actuate::hints::{Applied, HintControl};
    if !memfabric_harness::privileged("hinted_ranges_are_forgotten_only_with_their_process") {
        return;
    }
    let w = Workload::spawn();
    let (dir, lock) = locked_state("forget");
    let (mut hints, _) = HintControl::begin(lock.clone(), false).unwrap();
    let b = w.b;
    let applied = hints
        .apply(w.pid as u32, b, b + REGION as u64, false)
        .unwrap();
    assert!(matches!(applied, Applied::Injected(_)), "{applied:?}");
    assert_eq!(w.mergeable(b), Some(false));
    // The VM stopped matching the selection, say: its process lives, its range is still
    // memfabric's to put back.
    hints.forget(w.pid as u32);
    assert_eq!(hints.changed(), 1, "a live process's range was forgotten");
    let restored = hints.restore().unwrap();
    assert_eq!(restored.restored, 1, "not put back at exit: {restored}");
    drop(hints);
    assert_eq!(w.mergeable(b), Some(true), "not put back at exit");
    assert!(!dir.join("hints.json").exists(), "{restored}");
    drop(lock);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hint_repairs_that_fail_stay_journaled_until_their_process_is_gone() {
    use memfabric::actuate::hints::HintControl;
    if !memfabric_harness::privileged(
        "hint_repairs_that_fail_stay_journaled_until_their_process_is_gone",
    ) {
        return;
    }
    let w = Workload::spawn();
    let pid = w.pid as u32;
    let (dir, lock) = locked_state("repairs");
    // A crashed memfabric's entry that cannot be put back (the range is not mapped).
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let entry = serde_json::json!({
        "pid": pid,
        "start_time": memfabric::host::inventory::start_time(pid).unwrap(),
        "start": 0x1000, "end": 0x2000, "was_mergeable": false,
    });
    let journal = serde_json::json!({"format": 1, "boot_id": boot.trim(), "ranges": [entry]});
    fs::write(dir.join("hints.json"), journal.to_string()).unwrap();
    for round in 0..2 {
        // An observing daemon takes the journal over and drops it again at once.
        let (hints, restored) = HintControl::begin(lock.clone(), false).unwrap();
        let restored = restored.expect("a journal was there");
        assert_eq!(restored.failed.len(), 1, "round {round}: {restored}");
        assert_eq!(hints.changed(), 1);
        drop(hints);
        let kept = fs::read_to_string(dir.join("hints.json"))
            .unwrap_or_else(|_| panic!("round {round}: the failed repair was forgotten"));
        assert!(kept.contains(&format!("\"pid\": {pid}")), "{kept}");
    }
    // Its process is gone: nothing left to put back.
    drop(w);
    let (hints, restored) = HintControl::begin(lock.clone(), false).unwrap();
    assert_eq!(restored.map(|r| r.gone), Some(1));
    assert_eq!(hints.changed(), 0);
    assert!(!dir.join("hints.json").exists());
    drop(hints);
    drop(lock);
    fs::remove_dir_all(&dir).unwrap();
}
