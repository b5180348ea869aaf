//! madvise injected through ptrace into real processes: a thread asleep in nanosleep, one
//! blocked in read(2) on a pipe, a multi-threaded one, one that exits meanwhile, and the
//! launcher. After each: the target runs on (its heartbeat continues), it is not stopped
//! (`t`), TracerPid is 0, and smaps shows `mg` exactly on the hinted range.
//!
//! And what must never hurt a target: a seccomp sandbox that traps the call, a signal
//! during the injection, a multi-GiB merged unmerge against a short deadline, the daemon
//! killed while the target holds the injected registers. There a second tracer compares
//! the target's full register set, and its memory is hashed, before and after.

use memfabric::actuate::knobs::Knob;
use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use memfabric::actuate::inject::{self, Advice, InjectError};
use memfabric_tests::{
    KsmSession, Workload, ksm_kb, memory_hash, privileged, registers, status_field, wait_for,
};
use serial_test::serial;

const WORKLOAD: &str = env!("CARGO_BIN_EXE_memfabric-workload");
const TIMEOUT: Duration = Duration::from_secs(2);

/// A heartbeat child: (child, heartbeat file, region start, pages).
struct Beating {
    child: Child,
    file: std::path::PathBuf,
    start: u64,
    pages: u64,
}

impl Beating {
    fn spawn(threads: usize) -> Beating {
        let file = std::env::temp_dir().join(format!(
            "memfabric-beat-{}-{threads}-{:?}",
            std::process::id(),
            Instant::now()
        ));
        let mut child = Command::new(WORKLOAD)
            .args(["heartbeat", file.to_str().unwrap(), "1024"])
            .arg(threads.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let w: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(w[0], "ready", "{line}");
        let start = u64::from_str_radix(w[2].trim_start_matches("0x"), 16).unwrap();
        Beating {
            child,
            file,
            start,
            pages: w[3].parse().unwrap(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every thread's counter.
    fn beats(&self) -> Vec<u64> {
        std::fs::read(&self.file)
            .unwrap_or_default()
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

impl Drop for Beating {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.file);
    }
}

/// (state letter, TracerPid) of `pid`.
fn state(pid: u32) -> (char, u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_owned()))
            .unwrap()
    };
    (
        field("State:").chars().next().unwrap(),
        field("TracerPid:").parse().unwrap(),
    )
}

/// Every mapping of `pid` with whether it carries `mg`: (start, end, mergeable).
fn mergeable_vmas(pid: u32) -> Vec<(u64, u64, bool)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut out = Vec::new();
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
        {
            out.push((a, b, false));
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            out.last_mut().unwrap().2 = flags.split_whitespace().any(|f| f == "mg");
        }
    }
    out
}

/// `mg` exactly on [start, end), nothing else changed against `before`.
fn assert_mg_exactly(pid: u32, before: &[(u64, u64, bool)], start: u64, end: u64, on: bool) {
    let after = mergeable_vmas(pid);
    for &(a, b, mg) in &after {
        if a >= start && b <= end {
            assert_eq!(mg, on, "{a:#x}-{b:#x} inside the hinted range");
        } else if b <= start || a >= end {
            // Outside: as it was (a mapping may have been split by the hint; compare the
            // flag of whichever mapping covered this one before).
            let was = before
                .iter()
                .find(|&&(x, y, _)| x <= a && b <= y)
                .map(|m| m.2);
            assert_eq!(
                Some(mg),
                was,
                "{a:#x}-{b:#x} outside the hinted range changed"
            );
        } else {
            panic!("{a:#x}-{b:#x} straddles the hinted range {start:#x}-{end:#x}");
        }
    }
}

/// The target still runs, is not stopped, nobody traces it.
fn assert_runs_on(b: &Beating) {
    let before = b.beats();
    assert!(
        wait_for(Duration::from_secs(5), || {
            let now = b.beats();
            now.len() == before.len() && now.iter().zip(&before).all(|(n, o)| n > o)
        }),
        "a thread's heartbeat stopped: {before:?} -> {:?}",
        b.beats()
    );
    let (st, tracer) = state(b.pid());
    assert_ne!(st, 't', "left stopped under ptrace");
    assert_ne!(st, 'T', "left stopped");
    assert_eq!(tracer, 0, "left traced");
}

#[test]
fn a_sleeping_process_gets_its_range_hinted_and_sleeps_on() {
    if !privileged("a_sleeping_process_gets_its_range_hinted_and_sleeps_on") {
        return;
    }
    let b = Beating::spawn(1);
    assert!(wait_for(Duration::from_secs(5), || !b.beats().is_empty()));
    let before = mergeable_vmas(b.pid());
    // The middle half of the region: the hint splits its mapping.
    let (start, end) = (
        b.start + b.pages / 4 * 4096,
        b.start + b.pages * 3 / 4 * 4096,
    );
    let mut stops = Vec::new();
    let done = inject::madvise(b.pid(), start, end, Advice::Mergeable, TIMEOUT).unwrap();
    stops.push(done.stopped);
    assert_runs_on(&b);
    assert_mg_exactly(b.pid(), &before, start, end, true);
    // And back, a hundred times: the stop time per call.
    for i in 0..100 {
        let advice = if i % 2 == 0 {
            Advice::Unmergeable
        } else {
            Advice::Mergeable
        };
        stops.push(
            inject::madvise(b.pid(), start, end, advice, TIMEOUT)
                .unwrap()
                .stopped,
        );
    }
    assert_runs_on(&b);
    assert_mg_exactly(b.pid(), &before, start, end, true);
    stops.sort();
    let median = stops[stops.len() / 2];
    eprintln!(
        "stop time per injection: median {:.0} us, max {:.0} us ({} calls)",
        median.as_secs_f64() * 1e6,
        stops.last().unwrap().as_secs_f64() * 1e6,
        stops.len()
    );
}

#[test]
fn a_process_blocked_in_read_reads_the_right_bytes_after() {
    if !privileged("a_process_blocked_in_read_reads_the_right_bytes_after") {
        return;
    }
    let mut w = Workload::spawn(WORKLOAD);
    let region = w.cmd("alloc 512 same");
    let (start, end) = w.span(&region);
    let before = mergeable_vmas(w.pid);
    // The workload waits in read(2) on its stdin pipe.
    std::thread::sleep(Duration::from_millis(100));
    inject::madvise(w.pid, start, end, Advice::Mergeable, TIMEOUT).unwrap();
    let (st, tracer) = state(w.pid);
    assert!(st != 't' && st != 'T' && tracer == 0, "{st} {tracer}");
    assert_mg_exactly(w.pid, &before, start, end, true);
    // Its read resumed: the next command arrives whole, and the reply is right.
    assert_eq!(w.cmd("alloc 1 zero"), "1");
    assert_eq!(w.span("1").1 - w.span("1").0, 4096);
}

#[test]
fn a_multi_threaded_process_runs_on() {
    if !privileged("a_multi_threaded_process_runs_on") {
        return;
    }
    let b = Beating::spawn(4);
    assert!(wait_for(Duration::from_secs(5), || b.beats().len() == 4
        && b.beats().iter().all(|n| *n > 0)));
    let before = mergeable_vmas(b.pid());
    let end = b.start + b.pages * 4096;
    for _ in 0..20 {
        inject::madvise(b.pid(), b.start, end, Advice::Mergeable, TIMEOUT).unwrap();
    }
    assert_runs_on(&b);
    assert_mg_exactly(b.pid(), &before, b.start, end, true);
}

#[test]
fn a_process_that_exits_meanwhile_is_an_error_not_a_hang() {
    if !privileged("a_process_that_exits_meanwhile_is_an_error_not_a_hang") {
        return;
    }
    for round in 0..20 {
        let mut b = Beating::spawn(2);
        let (pid, start, end) = (b.pid(), b.start, b.start + b.pages * 4096);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_micros(200 * round));
            // SAFETY: our child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        });
        let t = Instant::now();
        let mut outcomes = Vec::new();
        for _ in 0..50 {
            let r = inject::madvise(pid, start, end, Advice::Mergeable, TIMEOUT);
            let gone = matches!(r, Err(InjectError::Exited(_) | InjectError::NoProcess(_)));
            assert!(r.is_ok() || gone, "round {round}: {r:?}");
            outcomes.push(r.is_ok());
            if gone {
                break;
            }
        }
        killer.join().unwrap();
        assert!(t.elapsed() < Duration::from_secs(10), "round {round} hung");
        let _ = b.child.wait();
    }
}

#[test]
fn bad_input_leaves_the_target_untouched() {
    if !privileged("bad_input_leaves_the_target_untouched") {
        return;
    }
    let b = Beating::spawn(1);
    let before = mergeable_vmas(b.pid());
    let cases: Vec<(u32, u64, u64, &str)> = vec![
        (4_000_000, b.start, b.start + 4096, "no process"),
        (2, 0x1000, 0x2000, "kernel thread"),
        (b.pid(), 0x1000, 0x2000, "not entirely mapped"),
        (b.pid(), b.start + 1, b.start + 4096, "not page-aligned"),
        (b.pid(), b.start, b.start, "empty"),
    ];
    for (pid, s, e, says) in cases {
        let err = inject::madvise(pid, s, e, Advice::Mergeable, TIMEOUT).unwrap_err();
        assert!(err.to_string().contains(says), "{says}: {err}");
    }
    // A process someone else traces: this test seizes it from a thread of its own (a
    // debugger would), memfabric must refuse and leave that tracer alone.
    let pid = b.pid() as libc::pid_t;
    let (seized_tx, seized_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let tracer = std::thread::spawn(move || {
        // SAFETY: PTRACE_SEIZE with no options; detached below by this same thread.
        let rc = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0) };
        seized_tx.send(rc).unwrap();
        let _ = done_rx.recv();
        // SAFETY: a seized, running tracee: PTRACE_DETACH needs it stopped, so interrupt
        // first and wait for the stop.
        unsafe {
            libc::ptrace(libc::PTRACE_INTERRUPT, pid, 0, 0);
            let mut st = 0;
            libc::waitpid(pid, &mut st, libc::__WALL);
            libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0);
        }
    });
    assert_eq!(
        seized_rx.recv().unwrap(),
        0,
        "seizing the target for the test"
    );
    let err =
        inject::madvise(b.pid(), b.start, b.start + 4096, Advice::Mergeable, TIMEOUT).unwrap_err();
    assert!(matches!(err, InjectError::AlreadyTraced { .. }), "{err}");
    eprintln!("refused: {err}");
    done_tx.send(()).unwrap();
    tracer.join().unwrap();
    assert_mg_exactly(b.pid(), &before, 0, 0, false);
    assert!(wait_for(Duration::from_secs(5), || state(b.pid()).1 == 0));
    assert_runs_on(&b);
}

/// A workload blocked in read(2) with one region: (workload, start, end).
fn blocked_target(args: &[&str], pages: usize, fill: &str) -> (Workload, u64, u64) {
    let mut w = Workload::spawn_with(WORKLOAD, args);
    let region = w.cmd(&format!("alloc {pages} {fill}"));
    let (start, end) = w.span(&region);
    // Let it block in read(2) again after replying.
    std::thread::sleep(Duration::from_millis(100));
    (w, start, end)
}

/// A daemon stand-in: memfabric's injection (MADV_MERGEABLE over `[start, end)` of
/// `pid`) run by a process of its own, with a test hook's hold set in its environment.
/// Returns once it holds the target (TracerPid set).
fn stand_in_daemon(pid: u32, start: u64, end: u64, hold: (&str, &str)) -> Child {
    let child = Command::new(WORKLOAD)
        .args(["inject", &pid.to_string()])
        .arg(format!("{start:#x}"))
        .arg(format!("{end:#x}"))
        .args(["merge", "2000"])
        .env(hold.0, hold.1)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || status_field(pid, "TracerPid")
            .is_some_and(|t| t != "0")),
        "the injection never attached"
    );
    child
}

/// Still alive, not stopped, not traced, and answering.
fn assert_alive(w: &mut Workload) {
    assert!(
        wait_for(Duration::from_secs(5), || status_field(w.pid, "TracerPid")
            .as_deref()
            == Some("0")),
        "still traced"
    );
    let st = status_field(w.pid, "State").unwrap_or_default();
    assert!(!st.starts_with('t') && !st.starts_with('T'), "state {st}");
    assert_eq!(w.cmd("alloc 1 zero").split_whitespace().count(), 1);
}

#[test]
fn a_sandboxed_vmm_is_refused_and_lives() {
    if !privileged("a_sandboxed_vmm_is_refused_and_lives") {
        return;
    }
    // Firecracker's VMM thread filter: madvise traps unless MADV_DONTNEED.
    let (mut w, start, end) = blocked_target(&["seccomp", "trap-madvise"], 256, "same");
    assert_eq!(status_field(w.pid, "Seccomp").as_deref(), Some("2"));
    let before = mergeable_vmas(w.pid);
    let regs = registers(w.pid);
    for advice in [Advice::Mergeable, Advice::Unmergeable] {
        let err = inject::madvise(w.pid, start, end, advice, TIMEOUT).unwrap_err();
        assert!(matches!(err, InjectError::Seccomp { .. }), "{err}");
        assert!(err.to_string().contains("TRAP"), "{err}");
        eprintln!("refused: {err}");
    }
    assert_eq!(registers(w.pid), regs, "registers changed");
    assert_mg_exactly(w.pid, &before, 0, 0, false);
    assert_alive(&mut w);
}

#[test]
fn a_sandbox_that_allows_ksm_advice_is_hinted() {
    if !privileged("a_sandbox_that_allows_ksm_advice_is_hinted") {
        return;
    }
    let (mut w, start, end) = blocked_target(&["seccomp", "allow-ksm"], 256, "same");
    let before = mergeable_vmas(w.pid);
    inject::madvise(w.pid, start, end, Advice::Mergeable, TIMEOUT).unwrap();
    assert_mg_exactly(w.pid, &before, start, end, true);
    assert_alive(&mut w);
}

#[test]
fn registers_and_memory_are_exactly_as_before() {
    if !privileged("registers_and_memory_are_exactly_as_before") {
        return;
    }
    let (mut w, start, end) = blocked_target(&[], 1024, "unique");
    let (regs, hash) = (registers(w.pid), memory_hash(w.pid, start, end));
    let half = start + (end - start) / 2;
    for (s, e, advice) in [
        (start, end, Advice::Mergeable),
        (start, half, Advice::Unmergeable),
        (start, end, Advice::Unmergeable),
    ] {
        inject::madvise(w.pid, s, e, advice, TIMEOUT).unwrap();
        assert_eq!(
            registers(w.pid),
            regs,
            "registers after {advice:?} {s:#x}-{e:#x}"
        );
        assert_eq!(
            memory_hash(w.pid, start, end),
            hash,
            "memory after {advice:?}"
        );
    }
    assert_alive(&mut w);
}

#[test]
fn a_signal_during_the_injection_arrives_once_with_its_siginfo() {
    if !privileged("a_signal_during_the_injection_arrives_once_with_its_siginfo") {
        return;
    }
    let (mut w, start, end) = blocked_target(&[], 64, "unique");
    w.cmd("sigwatch");
    std::thread::sleep(Duration::from_millis(50));
    // The daemon stand-in holds the target on the injected registers, before the call,
    // for 600 ms; a sigqueue'd SIGUSR1 (si_code SI_QUEUE, a value) arrives meanwhile.
    let daemon = stand_in_daemon(w.pid, start, end, (inject::HOLD_BEFORE_ENV, "600"));
    std::thread::sleep(Duration::from_millis(100));
    let value = libc::sigval {
        sival_ptr: 4242 as *mut libc::c_void,
    };
    // SAFETY: sigqueue to our own child.
    let queued = unsafe { libc::sigqueue(w.pid as i32, libc::SIGUSR1, value) };
    assert_eq!(queued, 0);
    let out = daemon.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    assert!(wait_for(Duration::from_secs(5), || w
        .cmd("signals")
        .starts_with("1 ")));
    // Once, as sent: SI_QUEUE (-1) with its value, not a plain kill.
    assert_eq!(w.cmd("signals"), "1 -1 4242");
    assert_alive(&mut w);
}

#[test]
fn the_daemon_killed_mid_injection_leaves_the_target_as_it_was() {
    if !privileged("the_daemon_killed_mid_injection_leaves_the_target_as_it_was") {
        return;
    }
    let (mut w, start, end) = blocked_target(&[], 1024, "unique");
    let (regs, hash) = (registers(w.pid), memory_hash(w.pid, start, end));
    let before = mergeable_vmas(w.pid);
    // The daemon stand-in runs memfabric's injection and holds the target on the
    // injected registers, after the call, for 1.5 s; it is SIGKILLed there.
    let mut daemon = stand_in_daemon(w.pid, start, end, (inject::HOLD_ENV, "1500"));
    std::thread::sleep(Duration::from_millis(300));
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    // Its helper finishes the session: registers restored, then detached.
    assert!(
        wait_for(Duration::from_secs(5), || status_field(w.pid, "TracerPid")
            .as_deref()
            == Some("0")),
        "still traced after the daemon died"
    );
    assert_eq!(registers(w.pid), regs, "registers changed");
    assert_eq!(memory_hash(w.pid, start, end), hash, "memory changed");
    assert_mg_exactly(w.pid, &before, start, end, true);
    assert_alive(&mut w);
}

#[test]
#[serial(ksm)]
fn a_large_merged_unmerge_is_bounded_and_a_deadline_interrupts_it_cleanly() {
    if !privileged("a_large_merged_unmerge_is_bounded_and_a_deadline_interrupts_it_cleanly") {
        return;
    }
    const PAGES: usize = 2 << 18; // 2 GiB
    let mut ksm = KsmSession::begin().expect("KSM session"); // dropped after the workload
    for (knob, value) in [
        (Knob::PagesToScan, "20000"),
        (Knob::SleepMillisecs, "10"),
        (Knob::Run, "1"),
    ] {
        ksm.set(knob, value).unwrap();
    }
    let (mut w, start, end) = blocked_target(&[], PAGES, "same");
    w.cmd("mergeable 0");
    w.await_merged(PAGES as i64 * 9 / 10, "the 2 GiB region");
    // Hash everything but the last page, which the stall watcher rewrites.
    let hashed_end = end - 4096;
    w.cmd("stallwatch 0");
    w.cmd("stall");
    // Commands run the main thread: the registers are compared only across injections.
    std::thread::sleep(Duration::from_millis(100));
    let (regs, hash) = (registers(w.pid), memory_hash(w.pid, start, hashed_end));
    let merged_kb = ksm_kb(w.pid);

    // A deadline far shorter than one 16 MiB call: interrupted, registers restored. On a
    // loaded host the thread may not even reach the call within the deadline (then nothing
    // ran, which the error says): try again with a longer one, up to 16 ms.
    let mut done_kb = 0;
    let mut interrupted = None;
    for ms in [1, 2, 4, 8, 16] {
        let err = inject::madvise(
            w.pid,
            start,
            end,
            Advice::Unmergeable,
            Duration::from_millis(ms),
        )
        .unwrap_err();
        eprintln!("deadline {ms} ms: {err}");
        assert_eq!(
            registers(w.pid),
            regs,
            "registers after the call cut at {ms} ms"
        );
        assert_eq!(memory_hash(w.pid, start, hashed_end), hash);
        // Calls that finished before the cut one (a loaded host may let a few through
        // within the deadline) are said.
        if let InjectError::Partly { done_mib, .. } = &err {
            done_kb += done_mib << 10;
        }
        match err.root() {
            InjectError::Interrupted { .. } => {
                interrupted = Some(ms);
                break;
            }
            InjectError::Timeout { .. } => continue,
            other => panic!("deadline {ms} ms: unexpected {other}"),
        }
    }
    assert!(
        interrupted.is_some(),
        "no call was interrupted with deadlines of 1-16 ms"
    );
    // The interrupted call unmerged at most its 16 MiB.
    let unmerged_early = merged_kb.saturating_sub(ksm_kb(w.pid));
    assert!(
        unmerged_early <= done_kb + (16 << 10),
        "{unmerged_early} kB unmerged, {done_kb} kB by calls that finished"
    );

    // With time enough: 128 bounded calls, every page unmerged, nothing else changed.
    w.cmd("stall");
    std::thread::sleep(Duration::from_millis(100));
    let regs = registers(w.pid);
    let t = Instant::now();
    let done = inject::madvise(w.pid, start, end, Advice::Unmergeable, TIMEOUT).unwrap();
    let wall = t.elapsed();
    assert_eq!(registers(w.pid), regs, "registers after the unmerge");
    // The watcher records a fault when it returns: let the last one that waited finish.
    std::thread::sleep(Duration::from_millis(100));
    let stall_us: u64 = w.cmd("stall").parse().unwrap();
    assert_eq!(done.calls, 128);
    // Every KSM page of the range was replaced by a private copy (smaps' `KSM:`; the
    // `ksm_merging_pages` count only follows at ksmd's next pass).
    assert_eq!(ksm_kb(w.pid), 0, "KSM pages left after the unmerge");
    assert_eq!(memory_hash(w.pid, start, hashed_end), hash);
    eprintln!(
        "unmerged {} MiB of KSM pages in {} calls, {:.0} ms wall: the main \
         thread stopped {:.1} ms in all, {:.1} ms at most; the longest fault another \
         thread waited for in the range: {:.1} ms",
        merged_kb >> 10,
        done.calls,
        wall.as_secs_f64() * 1e3,
        done.stopped.as_secs_f64() * 1e3,
        done.longest_stop.as_secs_f64() * 1e3,
        stall_us as f64 / 1e3
    );
    assert_alive(&mut w);
    drop(w);
}
