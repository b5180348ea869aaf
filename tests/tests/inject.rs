//! madvise injected through ptrace into real processes: a thread asleep in nanosleep, one
//! blocked in read(2) on a pipe, a multi-threaded one, one that exits meanwhile, and the
//! launcher. After each: the target runs on (its heartbeat continues), it is not stopped
//! (`t`), TracerPid is 0, and smaps shows `mg` exactly on the hinted range.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use memfabric::actuate::inject::{self, Advice, InjectError};
use memfabric_tests::{Workload, privileged, wait_for};

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
