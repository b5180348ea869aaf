//! `memfabric run --act ksmd` on the real KSM of this host: it steers ksmd and merges a
//! process's duplicates; SIGTERM puts every knob back exactly; after kill -9 the next start
//! puts them back from the journal; a second steering daemon is refused; an advisor the
//! operator had on comes back on; bad input changes nothing; a knob written just before a
//! crash is put back; knobs that could not be put back stay journaled; an untrusted state
//! directory is refused. KSM is one switch for the host: these tests run one at a time and
//! each puts the knobs back, even on panic.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use memfabric_harness::Daemon;

use memfabric_harness::wait_for;

const MEMFABRIC: &str = env!("CARGO_BIN_EXE_memfabric");

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

/// Whether this kernel has the KSM advisor (6.7+). Memfabric requires Linux 6.8: under
/// `cargo xtask test` (MEMFABRIC_REQUIRE_ROOT) a kernel without it fails the test rather
/// than passing it without a check.
fn advisor_or_skip() -> bool {
    if Path::new(KSM).join("advisor_mode").exists() {
        return true;
    }
    assert!(
        std::env::var_os("MEMFABRIC_REQUIRE_ROOT").is_none(),
        "this kernel has no KSM advisor (Linux < 6.7; memfabric requires 6.8)"
    );
    eprintln!("\n!!! SKIPPED: this kernel has no KSM advisor (Linux < 6.7) !!!\n");
    false
}

/// A fresh state directory as memfabric creates it (0700), with `journal.json` holding
/// `entries` for this boot, as a memfabric that died would have left it.
fn crashed_journal(test: &str, entries: serde_json::Value) -> PathBuf {
    use std::os::unix::fs::DirBuilderExt as _;
    let state = state_dir(test);
    fs::DirBuilder::new().mode(0o700).create(&state).unwrap();
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let journal = serde_json::json!({
        "format": 1,
        "owner_pid": 1,
        "boot_id": boot.trim(),
        "ksm": entries,
    });
    fs::write(state.join("journal.json"), journal.to_string()).unwrap();
    state
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
    Daemon::start(MEMFABRIC, &args)
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
    if !memfabric_harness::privileged("steers_ksmd_merges_and_puts_every_knob_back_on_sigterm") {
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
    if !memfabric_harness::privileged("after_kill_9_the_next_start_puts_the_knobs_back") {
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
    if !memfabric_harness::privileged(
        "a_second_steering_daemon_is_refused_before_it_loads_anything",
    ) {
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
    if !memfabric_harness::privileged("an_advisor_the_operator_turned_on_comes_back_on") {
        return;
    }
    if !advisor_or_skip() {
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
    if !memfabric_harness::privileged("bad_input_is_refused_and_the_host_left_untouched") {
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
    std::os::unix::fs::DirBuilderExt::mode(&mut fs::DirBuilder::new(), 0o700)
        .create(&state)
        .unwrap();
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

#[test]
fn a_knob_written_just_before_a_crash_is_put_back() {
    if !memfabric_harness::privileged("a_knob_written_just_before_a_crash_is_put_back") {
        return;
    }
    let (_one, before, _guard) = exclusive();
    // memfabric journaled 1500 as pending, wrote it, and died before confirming it.
    let original = read("sleep_millisecs");
    let state = crashed_journal(
        "pending",
        serde_json::json!([{
            "knob": "sleep_millisecs",
            "original": original,
            "ours": "1234",
            "pending": "1500",
        }]),
    );
    fs::write(Path::new(KSM).join("sleep_millisecs"), "1500").unwrap();
    let d = start(&state, &[]);
    assert!(
        wait_for(Duration::from_secs(20), || read("sleep_millisecs")
            == original),
        "the crashed write was taken for someone else's: {}",
        read("sleep_millisecs")
    );
    let err = d.stop();
    assert!(err.contains("sleep_millisecs="), "{err}");
    assert!(!state.join("journal.json").exists());
    assert_eq!(snapshot(), before);
    fs::remove_dir_all(&state).unwrap();
}

#[test]
fn knobs_that_could_not_be_put_back_stay_journaled() {
    if !memfabric_harness::privileged("knobs_that_could_not_be_put_back_stay_journaled")
        || !advisor_or_skip()
    {
        return;
    }
    let (_one, _, _guard) = exclusive();
    // memfabric set pages_to_scan and died; then the operator turned the advisor on,
    // and the kernel refuses pages_to_scan under it (EINVAL): the repair fails.
    fs::write(Path::new(KSM).join("run"), "0").unwrap();
    fs::write(Path::new(KSM).join("advisor_mode"), "scan-time").unwrap();
    let now = read("pages_to_scan");
    let original = if now == "100" { "200" } else { "100" };
    let state = crashed_journal(
        "failed",
        serde_json::json!([{ "knob": "pages_to_scan", "original": original, "ours": now }]),
    );
    // An observing daemon tries at start and again at exit, and keeps the entry.
    let up = |d: &Daemon| wait_for(Duration::from_secs(20), || d.json("/v1/status").is_some());
    let d = start(&state, &[]);
    assert!(up(&d));
    let err = d.stop();
    assert!(err.contains("FAILED"), "{err}");
    let journal = fs::read_to_string(state.join("journal.json"))
        .expect("the failed repair's journal was deleted");
    assert!(
        journal.contains("pages_to_scan") && journal.contains(&format!("\"{original}\"")),
        "{journal}"
    );
    // A second start still knows it; once the kernel allows it, it is put back.
    fs::write(Path::new(KSM).join("advisor_mode"), "none").unwrap();
    fs::write(Path::new(KSM).join("pages_to_scan"), &now).unwrap();
    let d = start(&state, &[]);
    assert!(up(&d));
    let err = d.stop();
    assert_eq!(read("pages_to_scan"), original, "{err}");
    assert!(!state.join("journal.json").exists(), "{err}");
    fs::remove_dir_all(&state).unwrap();
}

#[test]
fn an_untrusted_state_directory_is_refused_with_exit_3() {
    if !memfabric_harness::privileged("an_untrusted_state_directory_is_refused_with_exit_3") {
        return;
    }
    use std::os::unix::fs::PermissionsExt as _;
    let (_one, before, _guard) = exclusive();
    let base = state_dir("untrusted");
    fs::create_dir_all(&base).unwrap();
    let real = base.join("real");
    fs::create_dir(&real).unwrap();
    fs::set_permissions(&real, fs::Permissions::from_mode(0o700)).unwrap();
    let link = base.join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let open = base.join("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).unwrap();
    let theirs = base.join("theirs");
    fs::create_dir(&theirs).unwrap();
    fs::set_permissions(&theirs, fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    for (dir, says) in [
        (&link, "symbolic link"),
        (&open, "mode is 0755"),
        (&theirs, "owned by uid 65534"),
    ] {
        let (code, err) = start(dir, &["--act", "ksmd"]).wait();
        assert_eq!(code, Some(3), "{}: {err}", dir.display());
        assert!(err.contains(says) && err.contains("not safe"), "{err}");
        assert!(!dir.join("memfabric.lock").exists());
    }
    assert_eq!(snapshot(), before);
    fs::remove_dir_all(&base).unwrap();
}
