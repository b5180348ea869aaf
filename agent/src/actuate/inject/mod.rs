//! `madvise(MADV_MERGEABLE | MADV_UNMERGEABLE)` run inside a running process through
//! ptrace: no upstream interface marks another process's memory mergeable
//! (`process_madvise` takes only COLD, PAGEOUT, WILLNEED and COLLAPSE remotely).
//!
//! CRIU's discipline, for one thread (the main one; the others run on, madvise is safe
//! alongside them), hardened so that nothing that goes wrong can hurt the target:
//! - refuse a process that is already traced, a kernel thread, one in another user
//!   namespace, a range that is not mapped, a thread in seccomp strict mode;
//! - `PTRACE_SEIZE` + `PTRACE_INTERRUPT` (no SIGSTOP: job control and the process's own
//!   signals are untouched); a signal that arrives first is delivered as if we were not
//!   there, and the attempt is retried;
//! - at the interrupt stop, before any register changes: the process is still the one
//!   that was checked (its start time), the chosen `syscall` instruction is still `0f 05`,
//!   and every seccomp filter of the thread allows exactly this call ([`seccomp`]);
//! - save every register; run exactly one madvise (syscall-enter and syscall-exit stops);
//!   only a result of 0 is success;
//! - restore the registers, with the kernel's syscall-restart fix-up applied by hand, then
//!   detach; signals caught meanwhile are sent again to the same thread, with their
//!   siginfo where the kernel allows it.
//!
//! Bounded: `MADV_UNMERGEABLE` re-allocates every merged page under the mmap write lock,
//! so a large range is split into calls of at most [`UNMERGE_CHUNK_BYTES`], the target
//! running between them. A call that passes its deadline is interrupted
//! (`PTRACE_INTERRUPT` makes a signal pending; KSM's unmerge loop stops on it), and the
//! tracer waits for its exit stop, restores, and only then detaches.
//!
//! Survives its caller: the tracer is a helper process forked for each call
//! ([`helper`]), in a session of its own and deaf to SIGINT/SIGTERM/SIGHUP. If the daemon
//! is killed, or gives up waiting, mid-injection, the helper still restores the target's
//! registers before it detaches; a tracer that died with the daemon would have left the
//! target running on the injected registers.

mod helper;
pub mod seccomp;
mod session;

use std::{fmt, io, time::Duration};

use nix::errno::Errno;
use serde::{Deserialize, Serialize};

/// The longest range one injected `MADV_UNMERGEABLE` covers: 4096 pages, each a copy if
/// KSM had merged it (a few milliseconds under the target's mmap write lock, which its
/// vCPUs' faults wait for).
pub const UNMERGE_CHUNK_BYTES: u64 = 16 << 20;

/// Test hook: the helper holds the target this many milliseconds on the injected
/// registers (after the call, before the restore), so a test can kill the daemon there.
pub const HOLD_ENV: &str = "MEMFABRIC_TEST_INJECT_HOLD_MS";
/// Test hook: the helper holds the target this many milliseconds on the injected
/// registers before the call, so a test can send it a signal there.
pub const HOLD_BEFORE_ENV: &str = "MEMFABRIC_TEST_INJECT_HOLD_BEFORE_MS";

/// The test hooks' holds: (before the call, after it).
fn holds() -> (Duration, Duration) {
    let ms = |var: &str| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(Duration::ZERO, Duration::from_millis)
    };
    (ms(HOLD_BEFORE_ENV), ms(HOLD_ENV))
}

/// `madvise` advice values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Advice {
    Mergeable,
    Unmergeable,
}

impl Advice {
    fn value(self) -> u64 {
        match self {
            Advice::Mergeable => libc::MADV_MERGEABLE as u64,
            Advice::Unmergeable => libc::MADV_UNMERGEABLE as u64,
        }
    }
}

/// A step of an injection, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    Fork,
    Seize,
    Interrupt,
    InterruptStop,
    GetRegs,
    SetRegs,
    PeekCode,
    GetSigInfo,
    Syscall,
    Madvise,
    Waitpid,
    Helper,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Fork => "starting the tracer helper",
            Step::Seize => "PTRACE_SEIZE",
            Step::Interrupt => "PTRACE_INTERRUPT",
            Step::InterruptStop => "the interrupt stop",
            Step::GetRegs => "PTRACE_GETREGS",
            Step::SetRegs => "PTRACE_SETREGS",
            Step::PeekCode => "reading the syscall instruction",
            Step::GetSigInfo => "PTRACE_GETSIGINFO",
            Step::Syscall => "PTRACE_SYSCALL",
            Step::Madvise => "the injected madvise",
            Step::Waitpid => "waitpid",
            Step::Helper => "the tracer helper's report",
        })
    }
}

/// `Errno` as its number on the wire between the helper and its caller.
mod errno_serde {
    use nix::errno::Errno;
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(e: &Errno, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i32(*e as i32)
    }
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Errno, D::Error> {
        Ok(Errno::from_raw(i32::deserialize(d)?))
    }
}

#[derive(Debug, thiserror::Error, Serialize, Deserialize)]
pub enum InjectError {
    #[error("no process with PID {0}")]
    NoProcess(u32),
    #[error("PID {0} is a kernel thread: it has no user memory")]
    KernelThread(u32),
    #[error(
        "PID {0} lives in another user namespace (a container's): not a VMM memfabric \
         manages; left alone"
    )]
    OtherUserNamespace(u32),
    #[error("PID {pid} is already traced by PID {tracer} (a debugger?): left alone")]
    AlreadyTraced { pid: u32, tracer: u32 },
    #[error("{start:#x}-{end:#x} is not entirely mapped in PID {pid}: nothing done")]
    NotMapped { pid: u32, start: u64, end: u64 },
    #[error("range {start:#x}-{end:#x} is empty or not page-aligned")]
    BadRange { start: u64, end: u64 },
    #[error("no `syscall` instruction in any executable mapping of PID {0}")]
    NoSyscallInstruction(u32),
    #[error(
        "PID {pid} is sandboxed (seccomp): {reason}; refused, nothing done (a sandboxed \
         VMM must madvise its own RAM: for QEMU, the memory backend's merge=on, or \
         `memfabric launch`)"
    )]
    Seccomp { pid: u32, reason: String },
    #[error("PID {0} now names another process (its start time changed): nothing done")]
    Replaced(u32),
    #[error(
        "PID {pid}: the code at {at:#x} changed before the injection (no longer a syscall \
         instruction): nothing done"
    )]
    CodeChanged { pid: u32, at: u64 },
    #[error("PID {0} exited during the injection")]
    Exited(u32),
    #[error("PID {pid}: {what} did not happen within {timeout:?}; nothing was changed")]
    Timeout {
        pid: u32,
        what: Step,
        timeout: Duration,
    },
    #[error(
        "PID {pid}: madvise was interrupted at its deadline ({timeout:?}); registers \
         restored, the range is as it was or partly unmerged (KSM stops between pages)"
    )]
    Interrupted { pid: u32, timeout: Duration },
    #[error(
        "PID {pid}: the injection did not report within {waited:?}; its helper (PID \
         {helper}) keeps the thread until the call returns, restores its registers, then \
         detaches"
    )]
    StillFinishing {
        pid: u32,
        helper: u32,
        waited: Duration,
    },
    #[error("ptrace on PID {pid} ({what}): {errno}{hint}")]
    Ptrace {
        pid: u32,
        what: Step,
        #[serde(with = "errno_serde")]
        errno: Errno,
        hint: String,
    },
    #[error("madvise in PID {pid} failed: {errno} (registers restored)")]
    Madvise {
        pid: u32,
        #[serde(with = "errno_serde")]
        errno: Errno,
    },
    #[error(
        "madvise in PID {pid} returned {value}, not 0 (a sandbox or another tracer \
         interfered?): taken as failed, registers restored"
    )]
    UnexpectedResult { pid: u32, value: i64 },
    #[error("PID {pid}: unexpected stop {status} during the injection")]
    Unexpected { pid: u32, status: String },
    #[error("{source} ({done_mib} of {total_mib} MiB done before)")]
    Partly {
        done_mib: u64,
        total_mib: u64,
        source: Box<InjectError>,
    },
}

impl InjectError {
    /// The process is gone: nothing to put back.
    pub fn is_gone(&self) -> bool {
        match self {
            InjectError::Exited(_) | InjectError::NoProcess(_) | InjectError::Replaced(_) => true,
            InjectError::Partly { source, .. } => source.is_gone(),
            _ => false,
        }
    }

    /// The error itself, without the "partly done" wrapper.
    pub fn root(&self) -> &InjectError {
        match self {
            InjectError::Partly { source, .. } => source.root(),
            e => e,
        }
    }
}

/// What one injection did.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Injected {
    /// From the interrupt until the detach, summed over the calls: the time the thread
    /// did not run its own code.
    pub stopped: Duration,
    /// The longest single stop.
    pub longest_stop: Duration,
    /// Injected calls (a large unmerge is split).
    pub calls: u32,
    /// Signals that arrived meanwhile and were sent again after the detach.
    pub resent_signals: usize,
}

impl Injected {
    fn add(&mut self, o: Injected) {
        self.stopped += o.stopped;
        self.longest_stop = self.longest_stop.max(o.longest_stop);
        self.calls += o.calls;
        self.resent_signals += o.resent_signals;
    }
}

/// The calls a range is split into: unmerging is bounded per call, marking mergeable
/// only sets a flag and is one call.
fn calls(start: u64, end: u64, advice: Advice) -> Vec<(u64, u64)> {
    match advice {
        Advice::Mergeable => vec![(start, end)],
        Advice::Unmergeable => (start..end)
            .step_by(crate::util::convert::usize_of(UNMERGE_CHUNK_BYTES))
            .map(|s| (s, (s + UNMERGE_CHUNK_BYTES).min(end)))
            .collect(),
    }
}

/// Runs `madvise(start, end - start, advice)` inside `pid` and restores it as it was.
/// `timeout` bounds each injected call, and the wait for the thread's stop (at least 1 s
/// for the latter).
pub fn madvise(
    pid: u32,
    start: u64,
    end: u64,
    advice: Advice,
    timeout: Duration,
) -> Result<Injected, InjectError> {
    if end <= start || !start.is_multiple_of(4096) || !end.is_multiple_of(4096) {
        return Err(InjectError::BadRange { start, end });
    }
    let hold = holds();
    let mut total = Injected::default();
    for (s, e) in calls(start, end, advice) {
        match madvise_call(pid, s, e, advice, timeout, hold) {
            Ok(one) => total.add(one),
            Err(err) if s == start => return Err(err),
            Err(err) => {
                return Err(InjectError::Partly {
                    done_mib: (s - start) >> 20,
                    total_mib: (end - start) >> 20,
                    source: Box::new(err),
                });
            }
        }
    }
    Ok(total)
}

/// One injected call, in a helper process; retried once when a signal came first.
fn madvise_call(
    pid: u32,
    start: u64,
    end: u64,
    advice: Advice,
    timeout: Duration,
    hold: (Duration, Duration),
) -> Result<Injected, InjectError> {
    let mut attempt = 0;
    loop {
        let target = preflight(pid, start, end)?;
        let syscall_at = find_syscall_instruction(pid, &target.maps)?;
        let plan = session::Plan {
            pid,
            start_time: target.start_time,
            seccomp_filtered: target.seccomp == Some(2),
            start,
            end,
            advice,
            syscall_at,
            timeout,
            hold,
        };
        let patience = timeout * 2 + hold.0 + hold.1 + Duration::from_secs(3);
        let result = helper::run(pid, patience, || session::inject(&plan));
        attempt += 1;
        match result {
            // A signal was pending at the interrupt, or interrupted the call: it was
            // delivered; try again once.
            Err(InjectError::Unexpected { .. }) if attempt < 2 => {
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// What the checks found out about the target.
struct Target {
    maps: procfs::process::MemoryMaps,
    start_time: u64,
    /// `Seccomp:` of its main thread.
    seccomp: Option<u32>,
}

/// Checks that leave the target untouched when they fail.
/// Returns the process's mappings (read once, for the syscall search too).
fn preflight(pid: u32, start: u64, end: u64) -> Result<Target, InjectError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|_| InjectError::NoProcess(pid))?;
    if crate::host::inventory::is_kernel_thread(pid) {
        return Err(InjectError::KernelThread(pid));
    }
    let ns = |p: &str| {
        std::fs::metadata(format!("/proc/{p}/ns/user")).map(|m| {
            use std::os::unix::fs::MetadataExt as _;
            (m.dev(), m.ino())
        })
    };
    if ns(&pid.to_string()).map_err(|_| InjectError::NoProcess(pid))?
        != ns("self").unwrap_or_default()
    {
        return Err(InjectError::OtherUserNamespace(pid));
    }
    let tracer = |status: &str| -> u32 {
        status
            .lines()
            .find_map(|l| l.strip_prefix("TracerPid:")?.trim().parse().ok())
            .unwrap_or(0)
    };
    let mut tracer_now = tracer(&status);
    // One of our own tracer helpers, finishing: the link goes when it detaches; wait
    // for it a little.
    let ours = |t: u32| crate::host::inventory::parent_pid(t) == Some(std::process::id());
    for _ in 0..1000 {
        if tracer_now == 0 || !ours(tracer_now) {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
        let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            return Err(InjectError::Exited(pid));
        };
        tracer_now = tracer(&s);
    }
    if tracer_now != 0 {
        if exiting(pid) {
            return Err(InjectError::Exited(pid));
        }
        return Err(InjectError::AlreadyTraced {
            pid,
            tracer: tracer_now,
        });
    }
    let maps = procfs::process::Process::new(pid as i32)
        .and_then(|p| p.maps())
        .map_err(|_| InjectError::NoProcess(pid))?;
    // Covered without a hole by consecutive mappings.
    let mut at = start;
    for m in maps.iter() {
        if m.address.0 <= at && at < m.address.1 {
            at = m.address.1;
            if at >= end {
                let seccomp = seccomp::mode(&status);
                if seccomp == Some(1) {
                    return Err(InjectError::Seccomp {
                        pid,
                        reason: "it runs in seccomp strict mode (read, write, exit only)".into(),
                    });
                }
                let start_time =
                    crate::host::inventory::start_time(pid).ok_or(InjectError::Exited(pid))?;
                return Ok(Target {
                    maps,
                    start_time,
                    seccomp,
                });
            }
        }
    }
    if exiting(pid) {
        return Err(InjectError::Exited(pid));
    }
    Err(InjectError::NotMapped { pid, start, end })
}

/// The address of a `syscall` instruction (0f 05) in an executable mapping of `pid`
/// (the vDSO first: small and always there).
fn find_syscall_instruction(
    pid: u32,
    maps: &procfs::process::MemoryMaps,
) -> Result<u64, InjectError> {
    use std::os::unix::fs::FileExt as _;
    let mem =
        std::fs::File::open(format!("/proc/{pid}/mem")).map_err(|_| InjectError::NoProcess(pid))?;
    let mut exec: Vec<_> = maps
        .iter()
        .filter(|m| m.perms.contains(procfs::process::MMPermissions::EXECUTE))
        .collect();
    exec.sort_by_key(|m| !matches!(&m.pathname, procfs::process::MMapPath::Vdso));
    let mut buf = vec![0u8; 64 * 1024];
    for m in exec {
        let mut at = m.address.0;
        let end = m.address.1.min(m.address.0 + (8 << 20));
        while at < end {
            let n = crate::util::convert::usize_of(end - at).min(buf.len());
            let Ok(got) = mem.read_at(&mut buf[..n], at) else {
                break;
            };
            if let Some(i) = buf[..got].windows(2).position(|w| w == [0x0f, 0x05]) {
                return Ok(at + i as u64);
            }
            if got < 2 {
                break;
            }
            at += (got - 1) as u64; // overlap one byte: an instruction across the edge
        }
    }
    if exiting(pid) {
        return Err(InjectError::Exited(pid));
    }
    Err(InjectError::NoSyscallInstruction(pid))
}

/// Whether `pid` is gone or exiting: a zombie, dead, or past `exit` (`PF_EXITING`; its
/// memory may already be gone while the state still reads running).
pub(super) fn exiting(pid: u32) -> bool {
    const PF_EXITING: u64 = 0x4;
    crate::host::inventory::state_and_flags(pid).is_none_or(|(state, flags)| {
        matches!(state.as_str(), "Z" | "X" | "x") || flags & PF_EXITING != 0
    })
}

/// The guest-RAM mappings of `pid` (what `--all-guest-ram` hints), or its private
/// anonymous read-write mappings of 1 MiB or more for a process that is not a VMM.
pub fn guest_ram(pid: u32) -> io::Result<Vec<(u64, u64)>> {
    crate::host::maps::targets(pid).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unmerging_is_split_and_the_pieces_cover_the_range() {
        let (a, mib) = (0x7f00_0000_0000u64, 1u64 << 20);
        assert_eq!(
            calls(a, a + 100 * mib, Advice::Mergeable),
            vec![(a, a + 100 * mib)]
        );
        let parts = calls(a, a + 40 * mib + 4096, Advice::Unmergeable);
        assert_eq!(
            parts,
            vec![
                (a, a + 16 * mib),
                (a + 16 * mib, a + 32 * mib),
                (a + 32 * mib, a + 40 * mib + 4096)
            ]
        );
        assert_eq!(calls(a, a + 4096, Advice::Unmergeable), vec![(a, a + 4096)]);
    }

    /// At the interrupt stop, before any register changes: a process whose start time is
    /// not the one checked (its PID reused) and code that is no longer a `syscall`
    /// instruction are refused, and the target runs on untraced. On a real `sleep`.
    #[test]
    fn identity_and_code_are_checked_again_at_the_stop() {
        if !memfabric_harness::privileged("identity_and_code_are_checked_again_at_the_stop") {
            return;
        }
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        let pid = child.id();
        std::thread::sleep(Duration::from_millis(100));
        let maps = procfs::process::Process::new(pid as i32)
            .unwrap()
            .maps()
            .unwrap();
        let syscall_at = find_syscall_instruction(pid, &maps).unwrap();
        let stack = maps
            .iter()
            .find(|m| matches!(m.pathname, procfs::process::MMapPath::Stack))
            .map(|m| m.address)
            .unwrap();
        let start_time = crate::host::inventory::start_time(pid).unwrap();
        let plan = |start_time, syscall_at| session::Plan {
            pid,
            start_time,
            seccomp_filtered: false,
            start: stack.0,
            end: stack.1,
            advice: Advice::Mergeable,
            syscall_at,
            timeout: Duration::from_secs(2),
            hold: (Duration::ZERO, Duration::ZERO),
        };
        let run =
            |p: session::Plan| helper::run(pid, Duration::from_secs(10), || session::inject(&p));
        // Another process now has this PID (as far as the start time says).
        let e = run(plan(start_time + 1, syscall_at)).unwrap_err();
        assert!(matches!(e, InjectError::Replaced(p) if p == pid), "{e}");
        // The chosen address no longer holds `0f 05` (the stack's first bytes are not code).
        let e = run(plan(start_time, stack.0)).unwrap_err();
        assert!(matches!(e, InjectError::CodeChanged { .. }), "{e}");
        // Nothing changed: not mergeable, not traced; and the right plan works.
        let mergeable = || {
            crate::actuate::hints::pieces(pid, stack.0, stack.1)
                .unwrap()
                .iter()
                .all(|p| p.2)
        };
        let status = || std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(!mergeable());
        assert!(status().contains("TracerPid:\t0"), "{}", status());
        run(plan(start_time, syscall_at)).unwrap();
        assert!(mergeable());
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn errors_cross_the_helper_boundary_intact() {
        let e = InjectError::Partly {
            done_mib: 16,
            total_mib: 64,
            source: Box::new(InjectError::Ptrace {
                pid: 7,
                what: Step::Seize,
                errno: Errno::EPERM,
                hint: " (needs root)".into(),
            }),
        };
        let back: InjectError = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back.to_string(), e.to_string());
        assert!(matches!(
            back.root(),
            InjectError::Ptrace {
                errno: Errno::EPERM,
                ..
            }
        ));
        assert!(
            InjectError::Partly {
                done_mib: 1,
                total_mib: 2,
                source: Box::new(InjectError::Exited(3))
            }
            .is_gone()
        );
    }
}
