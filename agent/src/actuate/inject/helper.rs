//! The tracer helper: each injection runs in a process forked for it, which reports its
//! result over a pipe and exits.
//!
//! ptrace binds a tracee to the tracer: when the tracer dies, the kernel detaches the
//! tracee and it runs on with whatever registers it has. A tracer inside the daemon dies
//! with it (a SIGKILL, an OOM kill, a crash), possibly while the target holds the injected
//! registers. The helper is a process of its own, in a session of its own (a Ctrl-C to the
//! daemon's terminal does not reach it) that ignores SIGINT, SIGTERM and SIGHUP: it
//! finishes the session, restores the registers and detaches whatever happens to the
//! daemon. Only a SIGKILL aimed at the helper itself can still cut a session short.
//!
//! After `fork` the child of a multi-threaded process may only rely on what fork keeps
//! consistent: glibc's allocator (its fork handlers reset the arenas' locks), plain system
//! calls. It must not log (the subscriber's locks may be held by a thread that is not
//! there) and leaves through `_exit`.

use std::{
    io::Read as _,
    os::fd::{AsFd as _, OwnedFd},
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::{
        signal::{SigSet, SigmaskHow, Signal, pthread_sigmask},
        wait::waitpid,
    },
    unistd::{ForkResult, Pid, fork, pipe2, setsid},
};

use super::{InjectError, Injected, Step};

/// A report larger than this is not one.
const MAX_REPORT: usize = 64 << 10;

type Report = Result<Injected, InjectError>;

fn fork_error(pid: u32, errno: Errno) -> InjectError {
    InjectError::Ptrace {
        pid,
        what: Step::Fork,
        errno,
        hint: String::new(),
    }
}

/// Runs `job` in a helper process and returns its report. Waits at most `patience`; the
/// helper is then left to finish on its own (and reaped by a thread when it does).
pub(super) fn run(pid: u32, patience: Duration, job: impl FnOnce() -> Report) -> Report {
    let (rd, wr) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| fork_error(pid, e))?;
    // No signal handler of the daemon may run in the child between fork and its own
    // dispositions: block everything around the fork.
    let mut old = SigSet::empty();
    let _ = pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old),
    );
    // SAFETY: the child only runs `child_main`, which keeps to what fork leaves consistent
    // (see the module doc) and ends in `_exit`.
    let forked = unsafe { fork() };
    match forked {
        Ok(ForkResult::Child) => {
            drop(rd);
            child_main(wr, job)
        }
        Ok(ForkResult::Parent { child }) => {
            let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
            drop(wr);
            parent_wait(pid, child, rd, patience)
        }
        Err(e) => {
            let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
            Err(fork_error(pid, e))
        }
    }
}

fn child_main(wr: OwnedFd, job: impl FnOnce() -> Report) -> ! {
    let _ = setsid();
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGPIPE,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        // SAFETY: SIG_IGN installs no handler.
        unsafe { libc::signal(sig as i32, libc::SIG_IGN) };
    }
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    let report = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).unwrap_or_else(|_| {
        Err(InjectError::Unexpected {
            pid: 0,
            status: "the tracer helper panicked".into(),
        })
    });
    let bytes = serde_json::to_vec(&report).unwrap_or_default();
    let mut left = &bytes[..];
    while !left.is_empty() {
        match nix::unistd::write(wr.as_fd(), left) {
            Ok(n) => left = &left[n..],
            Err(Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    // SAFETY: ends the helper without running the parent's atexit handlers or destructors.
    unsafe { libc::_exit(0) }
}

fn parent_wait(pid: u32, child: Pid, rd: OwnedFd, patience: Duration) -> Report {
    let deadline = Instant::now() + patience;
    let mut file = std::fs::File::from(rd);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let finished = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = u16::try_from(left.as_millis().min(10_000)).unwrap_or(10_000);
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) if Instant::now() >= deadline => break false,
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => match file.read(&mut chunk) {
                Ok(0) => break true,
                Ok(n) if buf.len() + n <= MAX_REPORT => buf.extend_from_slice(&chunk[..n]),
                Ok(_) => break true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break true,
            },
            Err(e) => return Err(fork_error(pid, e)),
        }
    };
    if !finished {
        // The helper goes on until it can restore the target; reap it when it ends.
        let _ = std::thread::Builder::new()
            .name(format!("reap-{child}"))
            .spawn(move || {
                let _ = waitpid(child, None);
            });
        return Err(InjectError::StillFinishing {
            pid,
            helper: child.as_raw() as u32,
            waited: patience,
        });
    }
    let _ = waitpid(child, None);
    serde_json::from_slice::<Report>(&buf).unwrap_or_else(|_| {
        Err(InjectError::Unexpected {
            pid,
            status: format!(
                "the tracer helper PID {child} ended without a report ({} bytes)",
                buf.len()
            ),
        })
    })
}
