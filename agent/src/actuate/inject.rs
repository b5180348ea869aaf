//! `madvise(MADV_MERGEABLE | MADV_UNMERGEABLE)` run inside a running process through
//! ptrace: no upstream interface marks another process's memory mergeable
//! (`process_madvise` takes only COLD, PAGEOUT, WILLNEED and COLLAPSE remotely).
//!
//! CRIU's discipline, for one thread (the main one; the others run on, madvise is safe
//! alongside them):
//! - refuse a process that is already traced, a kernel thread, a range that is not mapped;
//! - `PTRACE_SEIZE` + `PTRACE_INTERRUPT` (no SIGSTOP: job control and the process's own
//!   signals are untouched); a signal that arrives first is delivered as if we were not
//!   there, and the attempt is retried;
//! - save every register; point the thread at a `syscall` instruction found in one of its
//!   executable mappings, with madvise's number and arguments, and run exactly that call
//!   (syscall-enter and syscall-exit stops);
//! - restore the registers, with the kernel's syscall-restart fix-up applied by hand: a
//!   thread stopped in a blocking or restartable call (`read`, `nanosleep`) re-enters it
//!   and it completes as if never interrupted;
//! - detach. Everything runs on a thread of its own: if anything goes wrong past the point
//!   of no return (a timeout, a panic), that thread ends and the kernel detaches the
//!   target; a guard restores and detaches on every ordinary error path.

use std::{
    io,
    sync::mpsc,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::{
        ptrace,
        signal::Signal,
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::Pid,
};

/// `madvise` advice values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

#[derive(Debug, thiserror::Error)]
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
    #[error("PID {0} exited during the injection")]
    Exited(u32),
    #[error("PID {pid}: {what} did not happen within {timeout:?}; the thread was detached")]
    Timeout {
        pid: u32,
        what: &'static str,
        timeout: Duration,
    },
    #[error("ptrace on PID {pid} ({what}): {errno}{hint}")]
    Ptrace {
        pid: u32,
        what: &'static str,
        errno: Errno,
        hint: &'static str,
    },
    #[error("madvise in PID {pid} failed: {errno} (registers restored, nothing changed)")]
    Madvise { pid: u32, errno: Errno },
    #[error("PID {pid}: unexpected stop {status} during the injection")]
    Unexpected { pid: u32, status: String },
}

/// What one injection did.
#[derive(Clone, Copy, Debug)]
pub struct Injected {
    /// From the interrupt until the detach: the time the thread did not run its own code.
    pub stopped: Duration,
    /// Signals that arrived meanwhile and were sent again after the detach.
    pub resent_signals: usize,
}

/// Runs `madvise(start, end - start, advice)` inside `pid` and restores it as it was.
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
    let maps = preflight(pid, start, end)?;
    let syscall_at = find_syscall_instruction(pid, &maps)?;
    // The tracer is a thread of its own (ptrace binds tracee to tracer *thread*): when it
    // ends, however it ends, the kernel detaches the target.
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("inject-{pid}"))
        .spawn(move || {
            let mut result = inject_once(pid, start, end, advice, syscall_at, timeout);
            // A signal was pending at the interrupt: it was delivered; try again once.
            if matches!(result, Err(InjectError::Unexpected { .. })) {
                std::thread::sleep(Duration::from_millis(10));
                result = inject_once(pid, start, end, advice, syscall_at, timeout);
            }
            let _ = tx.send(result);
        })
        .map_err(|e| InjectError::Ptrace {
            pid,
            what: "starting the tracer thread",
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
            hint: "",
        })?;
    rx.recv_timeout(timeout * 4)
        .unwrap_or(Err(InjectError::Timeout {
            pid,
            what: "the injection",
            timeout: timeout * 4,
        }))
}

/// Checks that leave the target untouched when they fail.
/// Returns the process's mappings (read once, for the syscall search too).
fn preflight(pid: u32, start: u64, end: u64) -> Result<procfs::process::MemoryMaps, InjectError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|_| InjectError::NoProcess(pid))?;
    if crate::inventory::is_kernel_thread(pid) {
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
    // One of our own tracer threads that is detaching from a process killed under it:
    // the link goes when that thread ends; wait for it briefly.
    let ours = |t: u32| std::fs::metadata(format!("/proc/{}/task/{t}", std::process::id())).is_ok();
    for _ in 0..100 {
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
                return Ok(maps);
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
            let n = ((end - at) as usize).min(buf.len());
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

/// The ptrace state of one injection: restores the registers and detaches on drop
/// unless the thread is known to be running on its own.
struct Attached {
    pid: Pid,
    saved: Option<libc::user_regs_struct>,
    stopped: bool,
}

impl Drop for Attached {
    fn drop(&mut self) {
        if self.stopped {
            if let Some(regs) = self.saved {
                let _ = ptrace::setregs(self.pid, resume_regs(regs));
            }
            let _ = ptrace::detach(self.pid, None);
        }
        // Not stopped: the tracer thread's exit detaches it.
    }
}

/// The registers to resume with: the saved ones, with the kernel's syscall-restart
/// handling done here (it only runs on the signal path, which a detach from a
/// syscall-exit-stop does not take). A thread interrupted in a restartable call re-enters
/// it; `nanosleep` and friends continue through `restart_syscall`.
fn resume_regs(mut r: libc::user_regs_struct) -> libc::user_regs_struct {
    const ERESTARTSYS: i64 = -512;
    const ERESTARTNOINTR: i64 = -513;
    const ERESTARTNOHAND: i64 = -514;
    const ERESTART_RESTARTBLOCK: i64 = -516;
    if (r.orig_rax as i64) >= 0 {
        match r.rax as i64 {
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
                r.rax = r.orig_rax;
                r.rip -= 2;
            }
            ERESTART_RESTARTBLOCK => {
                r.rax = libc::SYS_restart_syscall as u64;
                r.rip -= 2;
            }
            _ => {}
        }
        r.orig_rax = u64::MAX;
    }
    r
}

fn ptrace_err(pid: u32, what: &'static str) -> impl Fn(Errno) -> InjectError {
    move |errno| {
        // After the seize, ESRCH means the tracee left its ptrace-stop without being
        // resumed by us: only SIGKILL (or its process exiting) does that.
        if errno == Errno::ESRCH {
            return InjectError::Exited(pid);
        }
        ptrace_error(pid, what, errno)
    }
}

fn ptrace_error(pid: u32, what: &'static str, errno: Errno) -> InjectError {
    InjectError::Ptrace {
        pid,
        what,
        errno,
        hint: match errno {
            Errno::EPERM => " (needs root or CAP_SYS_PTRACE, and no other tracer)",
            _ => "",
        },
    }
}

/// Whether `pid` is gone or exiting: a zombie, dead, or past `exit` (`PF_EXITING`; its
/// memory may already be gone while the state still reads running).
fn exiting(pid: u32) -> bool {
    const PF_EXITING: u64 = 0x4;
    crate::inventory::state_and_flags(pid).is_none_or(|(state, flags)| {
        matches!(state.as_str(), "Z" | "X" | "x") || flags & PF_EXITING != 0
    })
}

/// Waits for the next stop of `pid` until `deadline`.
fn wait_stop(
    pid: Pid,
    deadline: Instant,
    what: &'static str,
    timeout: Duration,
) -> Result<WaitStatus, InjectError> {
    let raw = pid.as_raw() as u32;
    loop {
        match waitpid(pid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(Errno::ECHILD) => {
                return Err(InjectError::Exited(raw));
            }
            Ok(s) => return Ok(s),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(ptrace_err(raw, "waitpid")(e)),
        }
        if Instant::now() >= deadline {
            return Err(InjectError::Timeout {
                pid: raw,
                what,
                timeout,
            });
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn inject_once(
    raw: u32,
    start: u64,
    end: u64,
    advice: Advice,
    syscall_at: u64,
    timeout: Duration,
) -> Result<Injected, InjectError> {
    let pid = Pid::from_raw(raw as i32);
    let deadline = Instant::now() + timeout;
    ptrace::seize(pid, ptrace::Options::PTRACE_O_TRACESYSGOOD).map_err(|e| match e {
        Errno::ESRCH => InjectError::NoProcess(raw),
        // An exiting process (a zombie) cannot be attached to: EPERM, but it is gone.
        Errno::EPERM if exiting(raw) => InjectError::Exited(raw),
        e => ptrace_err(raw, "PTRACE_SEIZE")(e),
    })?;
    let t0 = Instant::now();
    let mut att = Attached {
        pid,
        saved: None,
        stopped: false,
    };
    ptrace::interrupt(pid).map_err(ptrace_err(raw, "PTRACE_INTERRUPT"))?;
    match wait_stop(pid, deadline, "the interrupt stop", timeout)? {
        WaitStatus::PtraceEvent(_, _, ev) if ev == libc::PTRACE_EVENT_STOP => att.stopped = true,
        WaitStatus::Stopped(_, sig) => {
            // A signal was on its way: deliver it as if we were not there, retry later.
            att.stopped = false;
            let _ = ptrace::detach(pid, Some(sig));
            return Err(InjectError::Unexpected {
                pid: raw,
                status: format!("signal {sig} before the interrupt"),
            });
        }
        other => {
            att.stopped = true;
            return Err(InjectError::Unexpected {
                pid: raw,
                status: format!("{other:?}"),
            });
        }
    }
    let saved = ptrace::getregs(pid).map_err(ptrace_err(raw, "PTRACE_GETREGS"))?;
    att.saved = Some(saved);
    let mut call = saved;
    call.rip = syscall_at;
    call.rax = libc::SYS_madvise as u64;
    call.orig_rax = u64::MAX; // not in a syscall: no restart fix-up on the way out
    call.rdi = start;
    call.rsi = end - start;
    call.rdx = advice.value();
    ptrace::setregs(pid, call).map_err(ptrace_err(raw, "PTRACE_SETREGS"))?;

    // Enter, then exit, of exactly our call. A signal arriving meanwhile is held and sent
    // again after the detach.
    let mut resend: Vec<Signal> = Vec::new();
    let mut exits = 0;
    let mut result = 0i64;
    while exits < 2 {
        att.stopped = false;
        ptrace::syscall(pid, None).map_err(ptrace_err(raw, "PTRACE_SYSCALL"))?;
        match wait_stop(pid, deadline, "the injected madvise", timeout)? {
            WaitStatus::PtraceSyscall(_) => {
                att.stopped = true;
                exits += 1;
                if exits == 2 {
                    result = ptrace::getregs(pid)
                        .map_err(ptrace_err(raw, "PTRACE_GETREGS"))?
                        .rax as i64;
                }
            }
            WaitStatus::Stopped(_, sig) => {
                att.stopped = true;
                resend.push(sig);
            }
            other => {
                att.stopped = true;
                return Err(InjectError::Unexpected {
                    pid: raw,
                    status: format!("{other:?}"),
                });
            }
        }
    }
    // Restore and detach (the guard does both).
    drop(att);
    let stopped = t0.elapsed();
    for sig in &resend {
        let _ = nix::sys::signal::kill(pid, *sig);
    }
    if result < 0 {
        return Err(InjectError::Madvise {
            pid: raw,
            errno: Errno::from_raw(-result as i32),
        });
    }
    Ok(Injected {
        stopped,
        resent_signals: resend.len(),
    })
}

/// The guest-RAM mappings of `pid` (what `--all-guest-ram` hints), or its private
/// anonymous read-write mappings of 1 MiB or more for a process that is not a VMM.
pub fn guest_ram(pid: u32) -> io::Result<Vec<(u64, u64)>> {
    crate::scan::targets(pid).map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(rip: u64, rax: i64, orig: i64) -> libc::user_regs_struct {
        // SAFETY: plain integers; all-zero is a valid value.
        let mut r: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        r.rip = rip;
        r.rax = rax as u64;
        r.orig_rax = orig as u64;
        r
    }

    #[test]
    fn interrupted_calls_restart_and_others_resume_as_they_were() {
        // read(2) interrupted: back to its syscall instruction, same number.
        let r = resume_regs(regs(0x1002, -512, 0));
        assert_eq!((r.rip, r.rax, r.orig_rax), (0x1000, 0, u64::MAX));
        // nanosleep: continues through restart_syscall.
        let r = resume_regs(regs(0x1002, -516, 35));
        assert_eq!((r.rip, r.rax), (0x1000, libc::SYS_restart_syscall as u64));
        // A call that completed (or failed for good) keeps its result.
        let r = resume_regs(regs(0x1002, -4, 0));
        assert_eq!((r.rip, r.rax as i64), (0x1002, -4));
        // Stopped in user code: untouched.
        let r = resume_regs(regs(0x1002, 7, -1));
        assert_eq!((r.rip, r.rax, r.orig_rax), (0x1002, 7, u64::MAX));
    }
}
