//! `memfabric run --act ksmd` on the real KSM of this host: it steers ksmd and merges a
//! process's duplicates; SIGTERM puts every knob back exactly; after kill -9 the next start
//! puts them back from the journal; a second steering daemon is refused; an advisor the
//! operator had on comes back on; bad input changes nothing. KSM is one switch for the
//! host: these tests run one at a time and each puts the knobs back, even on panic.

mod common;
#[path = "common/daemon.rs"]
mod daemon;

use std::{
    fs,
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use daemon::Daemon;

const KSM: &str = "/sys/kernel/mm/ksm";
/// The knobs the daemon may touch, in the order a restore must write them.
const KNOBS: [&str; 4] = ["advisor_mode", "pages_to_scan", "sleep_millisecs", "run"];

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn read(knob: &str) -> String {
    let v = fs::read_to_string(Path::new(KSM).join(knob)).unwrap();
    // Choice knobs read as "[none] scan-time".
    match (v.find('['), v.find(']')) {
        (Some(a), Some(b)) => v[a + 1..b].to_owned(),
        _ => v.trim().to_owned(),
    }
}

fn snapshot() -> Vec<(&'static str, String)> {
    KNOBS
        .iter()
        .filter(|k| Path::new(KSM).join(k).exists())
        .map(|k| (*k, read(k)))
        .collect()
}

/// Puts the knobs back as the test found them, whatever happened (the test's own safety
/// net; the assertions check that memfabric did it first).
struct KnobGuard(Vec<(&'static str, String)>);

impl Drop for KnobGuard {
    fn drop(&mut self) {
        for (k, v) in &self.0 {
            if read(k) != *v {
                let _ = fs::write(Path::new(KSM).join(k), v);
            }
        }
    }
}

fn state_dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("memfabric-steer-{test}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    d
}

/// A daemon on `state`, tracking this process, refreshing every 500 ms.
fn start(state: &Path, extra: &[&str]) -> Daemon {
    let me = std::process::id().to_string();
    let mut args = vec!["--refresh-ms", "500", "--state-dir"];
    args.push(state.to_str().unwrap());
    args.extend(["--pid", &me]);
    args.extend(extra);
    Daemon::start(&args)
}

/// This test alone on KSM, and the knobs as found now (put back at the end, whatever
/// happens: the test's own safety net).
fn exclusive() -> (
    MutexGuard<'static, ()>,
    Vec<(&'static str, String)>,
    KnobGuard,
) {
    let one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let before = snapshot();
    (one, before.clone(), KnobGuard(before))
}

fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cond()
}

/// 16 MiB of this process's memory: 4,096 pages in 16 distinct contents, mergeable.
struct Duplicates {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Duplicates {
    fn new() -> Duplicates {
        let len = 16 << 20;
        // SAFETY: a fresh private anonymous mapping, filled and advised below.
        unsafe {
            let ptr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(ptr, libc::MAP_FAILED);
            for page in 0..len / 4096 {
                std::ptr::write_bytes(
                    ptr.cast::<u8>().add(page * 4096),
                    1 + (page % 16) as u8,
                    4096,
                );
            }
            assert_eq!(libc::madvise(ptr, len, libc::MADV_MERGEABLE), 0);
            Duplicates { ptr, len }
        }
    }
}

impl Drop for Duplicates {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

fn merging_pages() -> i64 {
    fs::read_to_string("/proc/self/ksm_stat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("ksm_merging_pages ")?.trim().parse().ok())
        .unwrap_or(0)
}

fn changed(before: &[(&str, String)]) -> bool {
    before.iter().any(|(k, v)| read(k) != *v)
}

#[test]
fn steers_ksmd_merges_and_puts_every_knob_back_on_sigterm() {
    if !common::root_or_skip("steers_ksmd_merges_and_puts_every_knob_back_on_sigterm") {
        return;
    }
    let (_one, before, _guard) = exclusive();
    let dups = Duplicates::new();
    let state = state_dir("sigterm");
    let d = start(&state, &["--act", "ksmd"]);
    assert!(
        wait_for(Duration::from_secs(20), || read("run") == "1"),
        "ksmd was not started"
    );
    assert!(
        state.join("journal.json").exists(),
        "no journal while steering"
    );
    assert!(
        wait_for(Duration::from_secs(90), || merging_pages() >= 3_000),
        "KSM merged only {} of 4,080 duplicate pages",
        merging_pages()
    );
    let status = d.json("/v1/status").expect("/v1/status");
    let ksmd = &status["ksmd"];
    assert_eq!(ksmd["steering"], true, "{ksmd}");
    assert_eq!(
        ksmd["decision"]["knobs"]["pages_to_scan"]
            .as_u64()
            .unwrap()
            .to_string(),
        read("pages_to_scan"),
        "the daemon reports what it applied: {ksmd}"
    );
    let err = d.stop();
    assert_eq!(snapshot(), before, "knobs not restored on SIGTERM: {err}");
    assert!(!state.join("journal.json").exists(), "journal left behind");
    // run=0 keeps every merge: restoring the knobs unmerged nothing.
    assert!(merging_pages() >= 3_000, "{}", merging_pages());
    drop(dups);
    fs::remove_dir_all(&state).unwrap();
}

#[test]
fn after_kill_9_the_next_start_puts_the_knobs_back() {
    if !common::root_or_skip("after_kill_9_the_next_start_puts_the_knobs_back") {
        return;
    }
    let (_one, before, _guard) = exclusive();
    let state = state_dir("kill9");
    let d = start(&state, &["--act", "ksmd"]);
    assert!(wait_for(Duration::from_secs(20), || changed(&before)));
    d.signal(libc::SIGKILL);
    let _ = d.wait();
    assert!(
        changed(&before),
        "a killed daemon cannot have restored anything"
    );
    assert!(state.join("journal.json").exists());
    // The next start, even one that only observes, repairs the host first.
    let d = start(&state, &[]);
    assert!(
        wait_for(Duration::from_secs(20), || snapshot() == before),
        "not restored after kill -9: {:?} vs {before:?}",
        snapshot()
    );
    assert!(!state.join("journal.json").exists());
    let err = d.stop();
    assert!(err.contains("did not exit cleanly"), "{err}");
    assert_eq!(snapshot(), before);
    fs::remove_dir_all(&state).unwrap();
}

#[test]
fn a_second_steering_daemon_is_refused_before_it_loads_anything() {
    if !common::root_or_skip("a_second_steering_daemon_is_refused_before_it_loads_anything") {
        return;
    }
    let (_one, before, _guard) = exclusive();
    let state = state_dir("second");
    let first = start(&state, &["--act", "ksmd"]);
    assert!(wait_for(Duration::from_secs(20), || first
        .json("/v1/status")
        .is_some()));
    let t = Instant::now();
    let (code, err) = start(&state, &["--act", "ksmd"]).wait();
    assert_eq!(code, Some(4), "{err}");
    assert!(
        err.contains("another memfabric process") && err.contains("steering KSM"),
        "{err}"
    );
    assert!(!err.contains("probe"), "it got as far as the probes: {err}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // The first one still steers, and still restores.
    assert!(first.json("/v1/status").is_some());
    first.stop();
    assert_eq!(snapshot(), before);
    fs::remove_dir_all(&state).unwrap();
}

#[test]
fn an_advisor_the_operator_turned_on_comes_back_on() {
    if !common::root_or_skip("an_advisor_the_operator_turned_on_comes_back_on") {
        return;
    }
    if !Path::new(KSM).join("advisor_mode").exists() {
        eprintln!("this kernel has no KSM advisor (Linux < 6.7): nothing to test");
        return;
    }
    let (_one, _, _guard) = exclusive();
    // The operator's choice, made before memfabric starts (ksmd stays off, so the
    // advisor does not move pages_to_scan meanwhile).
    fs::write(Path::new(KSM).join("run"), "0").unwrap();
    fs::write(Path::new(KSM).join("advisor_mode"), "scan-time").unwrap();
    let before = snapshot();
    let state = state_dir("advisor");
    let d = start(&state, &["--act", "ksmd"]);
    assert!(
        wait_for(Duration::from_secs(20), || read("advisor_mode") == "none"
            && read("run") == "1"),
        "the controller needs the advisor off to set pages_to_scan"
    );
    let err = d.stop();
    assert_eq!(snapshot(), before, "{err}");
    fs::remove_dir_all(&state).unwrap();
}

#[test]
fn bad_input_is_refused_and_the_host_left_untouched() {
    if !common::root_or_skip("bad_input_is_refused_and_the_host_left_untouched") {
        return;
    }
    let (_one, before, _guard) = exclusive();
    let state = state_dir("bad");
    for (budget, code) in [("0", 2), ("250", 2), ("-5", 2)] {
        let flag = format!("--ksmd-cpu={budget}");
        let (c, err) = start(&state, &["--act", "ksmd", &flag]).wait();
        assert_eq!(c, Some(code), "--ksmd-cpu {budget}: {err}");
        assert!(err.contains("ksmd CPU budget"), "{err}");
    }
    let (c, err) = start(&state, &["--act", "everything"]).wait();
    assert_eq!(c, Some(2), "{err}");
    // A state directory that cannot be created: under a regular file.
    let file = std::env::temp_dir().join(format!("memfabric-steer-file-{}", std::process::id()));
    fs::write(&file, "not a directory").unwrap();
    let (c, err) = start(&file.join("state"), &["--act", "ksmd"]).wait();
    assert_eq!(c, Some(3), "{err}");
    assert!(err.contains("state directory"), "{err}");
    fs::remove_file(&file).unwrap();
    // A corrupt journal: refused, kept for the operator, nothing written.
    fs::create_dir_all(&state).unwrap();
    fs::write(state.join("journal.json"), "{ not json").unwrap();
    let (c, err) = start(&state, &["--act", "ksmd"]).wait();
    assert_eq!(c, Some(2), "{err}");
    assert!(
        err.contains("corrupt") && err.contains("untouched"),
        "{err}"
    );
    assert_eq!(
        fs::read_to_string(state.join("journal.json")).unwrap(),
        "{ not json"
    );
    assert_eq!(snapshot(), before, "bad input changed KSM");
    fs::remove_dir_all(&state).unwrap();
}
