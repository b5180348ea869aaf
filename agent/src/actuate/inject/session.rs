//! One ptrace session: seize, interrupt, check, run exactly one madvise, restore, detach.
//! Runs in the tracer helper ([`super::helper`]), so it may wait as long as the target's
//! call takes: it never leaves the target running on injected registers.

use std::time::{Duration, Instant};

use nix::{
    errno::Errno,
    sys::{
        ptrace,
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::Pid,
};

use super::{Advice, InjectError, Injected, Step, exiting, seccomp};

/// `madvise`'s system call number on x86-64, as the seccomp filter sees it.
const MADVISE_NR: u32 = 28;
const _: () = assert!(libc::SYS_madvise == MADVISE_NR as libc::c_long);

/// Everything the session needs, decided before the fork.
pub(super) struct Plan {
    pub pid: u32,
    /// The start time the checks saw: the identity re-checked at the interrupt stop.
    pub start_time: u64,
    /// The main thread runs under seccomp filters: evaluate them for this call.
    pub seccomp_filtered: bool,
    pub start: u64,
    pub end: u64,
    pub advice: Advice,
    pub syscall_at: u64,
    /// For each wait for a stop, and for the call before it is interrupted.
    pub timeout: Duration,
    /// Test hooks ([`super::HOLD_BEFORE_ENV`], [`super::HOLD_ENV`]).
    pub hold: (Duration, Duration),
}

/// The ptrace state of one injection: on drop, restores the registers and detaches if
/// the thread is in a ptrace stop, then sends again the signals it caught.
struct Attached {
    pid: Pid,
    saved: Option<libc::user_regs_struct>,
    stopped: bool,
    held: Vec<(i32, libc::siginfo_t)>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        if self.stopped {
            if let Some(regs) = self.saved {
                let _ = ptrace::setregs(self.pid, resume_regs(regs));
            }
            let _ = ptrace::detach(self.pid, None);
        }
        // Not stopped: the thread runs its own code (it was never given injected
        // registers, or it is exiting); the helper's exit detaches it.
        for (sig, info) in &self.held {
            resend(self.pid.as_raw(), *sig, info);
        }
    }
}

/// Sends a caught signal again to the thread it was delivered to: with its siginfo
/// (`rt_tgsigqueueinfo`) when the kernel lets another process send that kind (negative
/// `si_code`: sigqueue, timers, AIO, but not `kill` or kernel-generated ones, SI_TKILL
/// aside), else as a plain `tgkill`.
fn resend(tid: i32, sig: i32, info: &libc::siginfo_t) {
    const SI_TKILL: i32 = -6;
    // The main thread: its TID is the process's TGID.
    let tgid = tid;
    if info.si_code < 0 && info.si_code != SI_TKILL {
        // SAFETY: a valid siginfo the kernel gave us for this very signal.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_rt_tgsigqueueinfo,
                tgid,
                tid,
                sig,
                std::ptr::from_ref(info),
            )
        };
        if rc == 0 {
            return;
        }
    }
    // SAFETY: plain syscall with integer arguments.
    unsafe { libc::syscall(libc::SYS_tgkill, tgid, tid, sig) };
}

/// The registers to resume with: the saved ones, with the kernel's syscall-restart
/// handling done here (it only runs on the signal path, which a detach from a
/// syscall-exit-stop does not take). A thread interrupted in a restartable call re-enters
/// it; `nanosleep` and friends continue through `restart_syscall`.
pub(super) fn resume_regs(mut r: libc::user_regs_struct) -> libc::user_regs_struct {
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

/// The least time given to a thread to reach its interrupt stop (a loaded host may not
/// schedule it for a while; it is running its own code meanwhile, nothing is changed).
const STOP_WAIT_MIN: Duration = Duration::from_secs(1);

const ERESTARTSYS: i64 = -512;
const ERESTARTNOINTR: i64 = -513;
const ERESTARTNOHAND: i64 = -514;
const ERESTART_RESTARTBLOCK: i64 = -516;

fn ptrace_err(pid: u32, what: Step) -> impl Fn(Errno) -> InjectError {
    move |errno| {
        // After the seize, ESRCH means the tracee left its ptrace-stop without being
        // resumed by us: only SIGKILL (or its process exiting) does that.
        if errno == Errno::ESRCH {
            return InjectError::Exited(pid);
        }
        InjectError::Ptrace {
            pid,
            what,
            errno,
            hint: match errno {
                Errno::EPERM => " (needs root or CAP_SYS_PTRACE, and no other tracer)".into(),
                _ => String::new(),
            },
        }
    }
}

/// Waits for the next stop of `pid`; None when `deadline` passes first.
fn wait_stop(pid: Pid, deadline: Option<Instant>) -> Result<Option<WaitStatus>, InjectError> {
    let raw = pid.as_raw() as u32;
    let mut nap = Duration::from_micros(20);
    loop {
        match waitpid(pid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(Errno::ECHILD) => {
                return Err(InjectError::Exited(raw));
            }
            Ok(s) => return Ok(Some(s)),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(ptrace_err(raw, Step::Waitpid)(e)),
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(None);
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(1));
    }
}

/// The call's registers: the saved ones pointed at the `syscall` instruction with
/// madvise's number and arguments (the unused argument registers zeroed, as the seccomp
/// check assumed).
fn call_regs(saved: libc::user_regs_struct, plan: &Plan) -> libc::user_regs_struct {
    let mut call = saved;
    call.rip = plan.syscall_at;
    call.rax = libc::SYS_madvise as u64;
    call.orig_rax = u64::MAX; // not in a syscall: no restart fix-up on the way out
    call.rdi = plan.start;
    call.rsi = plan.end - plan.start;
    call.rdx = plan.advice.value();
    call.r10 = 0;
    call.r8 = 0;
    call.r9 = 0;
    call
}

pub(super) fn inject(plan: &Plan) -> Result<Injected, InjectError> {
    let raw = plan.pid;
    let pid = Pid::from_raw(raw as i32);
    ptrace::seize(pid, ptrace::Options::PTRACE_O_TRACESYSGOOD).map_err(|e| match e {
        Errno::ESRCH => InjectError::NoProcess(raw),
        // An exiting process (a zombie) cannot be attached to: EPERM, but it is gone.
        Errno::EPERM if exiting(raw) => InjectError::Exited(raw),
        e => ptrace_err(raw, Step::Seize)(e),
    })?;
    let mut att = Attached {
        pid,
        saved: None,
        stopped: false,
        held: Vec::new(),
    };
    ptrace::interrupt(pid).map_err(ptrace_err(raw, Step::Interrupt))?;
    let timeout = plan.timeout;
    // Reaching the stop waits for the scheduler, not for the call: never less than
    // STOP_WAIT_MIN, however short the call's deadline.
    let stop_wait = timeout.max(STOP_WAIT_MIN);
    match wait_stop(pid, Some(Instant::now() + stop_wait))? {
        Some(WaitStatus::PtraceEvent(_, _, ev)) if ev == libc::PTRACE_EVENT_STOP => {
            att.stopped = true;
        }
        Some(WaitStatus::Stopped(_, sig)) => {
            // A signal was on its way: deliver it as if we were not there, retry later.
            let _ = ptrace::detach(pid, Some(sig));
            return Err(InjectError::Unexpected {
                pid: raw,
                status: format!("signal {sig} before the interrupt"),
            });
        }
        Some(other) => {
            att.stopped = true;
            return Err(InjectError::Unexpected {
                pid: raw,
                status: format!("{other:?}"),
            });
        }
        // Still running its own code (blocked uninterruptibly?): nothing changed; the
        // helper's exit detaches it.
        None => {
            return Err(InjectError::Timeout {
                pid: raw,
                what: Step::InterruptStop,
                timeout: stop_wait,
            });
        }
    }
    let t0 = Instant::now();
    // Between the checks and the seize the PID may have been reused, or the code remapped.
    if crate::host::inventory::start_time(raw) != Some(plan.start_time) {
        return Err(if exiting(raw) {
            InjectError::Exited(raw)
        } else {
            InjectError::Replaced(raw)
        });
    }
    let word = ptrace::read(pid, plan.syscall_at as ptrace::AddressType)
        .map_err(ptrace_err(raw, Step::PeekCode))?;
    if word.to_le_bytes()[..2] != [0x0f, 0x05] {
        return Err(InjectError::CodeChanged {
            pid: raw,
            at: plan.syscall_at,
        });
    }
    let saved = ptrace::getregs(pid).map_err(ptrace_err(raw, Step::GetRegs))?;
    let call = call_regs(saved, plan);
    if plan.seccomp_filtered {
        let data = seccomp::Call {
            nr: MADVISE_NR,
            ip: plan.syscall_at + 2,
            args: [call.rdi, call.rsi, call.rdx, 0, 0, 0],
        };
        seccomp::check(pid, &data).map_err(|reason| InjectError::Seccomp { pid: raw, reason })?;
    }
    att.saved = Some(saved);
    ptrace::setregs(pid, call).map_err(ptrace_err(raw, Step::SetRegs))?;
    if !plan.hold.0.is_zero() {
        std::thread::sleep(plan.hold.0);
    }

    // Enter, then exit, of exactly our call. A signal arriving meanwhile is held and sent
    // again after the detach. Past the deadline the call is interrupted, and the session
    // waits for its exit however long it takes: detaching earlier would leave the thread
    // on the injected registers.
    let deadline = Instant::now() + timeout;
    let mut interrupted = false;
    let mut stops = 0;
    let result = loop {
        att.stopped = false;
        ptrace::syscall(pid, None).map_err(ptrace_err(raw, Step::Syscall))?;
        let status = loop {
            let until = (!interrupted).then_some(deadline);
            if let Some(s) = wait_stop(pid, until)? {
                break s;
            }
            ptrace::interrupt(pid).map_err(ptrace_err(raw, Step::Interrupt))?;
            interrupted = true;
        };
        att.stopped = true;
        match status {
            WaitStatus::PtraceSyscall(_) => {
                stops += 1;
                if stops == 2 {
                    break ptrace::getregs(pid)
                        .map_err(ptrace_err(raw, Step::GetRegs))?
                        .rax as i64;
                }
            }
            WaitStatus::Stopped(_, sig) => {
                let info = ptrace::getsiginfo(pid).map_err(ptrace_err(raw, Step::GetSigInfo))?;
                att.held.push((sig as i32, info));
            }
            // Our interrupt landed before the call was entered: nothing ran.
            WaitStatus::PtraceEvent(_, _, ev) if ev == libc::PTRACE_EVENT_STOP && stops == 0 => {
                return Err(InjectError::Timeout {
                    pid: raw,
                    what: Step::Madvise,
                    timeout,
                });
            }
            // A group stop between the calls' stops: resume.
            WaitStatus::PtraceEvent(_, _, ev) if ev == libc::PTRACE_EVENT_STOP => {}
            other => {
                return Err(InjectError::Unexpected {
                    pid: raw,
                    status: format!("{other:?}"),
                });
            }
        }
    };
    if !plan.hold.1.is_zero() {
        std::thread::sleep(plan.hold.1);
    }
    // Restore and detach (the guard does both, then resends what it held).
    let resent = att.held.len();
    drop(att);
    let stopped = t0.elapsed();
    match result {
        0 => Ok(Injected {
            stopped,
            longest_stop: stopped,
            calls: 1,
            resent_signals: resent,
        }),
        // Our interrupt at the deadline stopped the unmerge loop (it checks for a
        // pending signal between pages).
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND | ERESTART_RESTARTBLOCK if interrupted => {
            Err(InjectError::Interrupted { pid: raw, timeout })
        }
        r if interrupted && r == -(libc::EINTR as i64) => {
            Err(InjectError::Interrupted { pid: raw, timeout })
        }
        // A signal for the process did: it is delivered now; the caller tries again.
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND | ERESTART_RESTARTBLOCK => {
            Err(InjectError::Unexpected {
                pid: raw,
                status: "a signal interrupted the call".into(),
            })
        }
        r if r < 0 && r > -4096 => Err(InjectError::Madvise {
            pid: raw,
            errno: Errno::from_raw(i32::try_from(-r).unwrap_or(libc::EIO)),
        }),
        r => Err(InjectError::UnexpectedResult { pid: raw, value: r }),
    }
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
