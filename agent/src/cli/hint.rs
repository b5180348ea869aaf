//! `memfabric hint --pid P (--range START-END | --all-guest-ram) (--merge | --unmerge)`:
//! marks a running process's memory mergeable (or not) by running madvise inside it
//! (ptrace injection, see `actuate::inject`). For a VMM that does not madvise its guest RAM
//! itself (Firecracker, Cloud Hypervisor, crosvm), or a range finer than a QEMU backend.

use std::{process::ExitCode, time::Duration};

use clap::Args;
use memfabric::actuate::inject::{self, Advice, InjectError};

#[derive(Args)]
pub(super) struct HintArgs {
    /// The process (a VMM).
    #[arg(long)]
    pid: u32,
    /// START-END in hex (0x...) or decimal, page-aligned.
    #[arg(
        long,
        conflicts_with_all = ["all_guest_ram", "qmp"],
        required_unless_present_any = ["all_guest_ram", "qmp"]
    )]
    range: Option<String>,
    /// Every guest-RAM mapping of the VMM.
    #[arg(long, conflicts_with = "qmp")]
    all_guest_ram: bool,
    /// A QEMU guest: switch its memory backends' `merge` over its QMP socket (no ptrace;
    /// refused for a guest started with mem-merge=off).
    #[arg(long)]
    qmp: bool,
    /// Make it mergeable (MADV_MERGEABLE).
    #[arg(long, conflicts_with = "unmerge", required_unless_present = "unmerge")]
    merge: bool,
    /// Make it unmergeable (MADV_UNMERGEABLE: KSM unmerges what it had merged there).
    #[arg(long)]
    unmerge: bool,
}

fn number(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    Ok(match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16)?,
        None => s.parse()?,
    })
}

/// Exit codes: 2 bad input (no such process, a range not mapped, a kernel thread, a process
/// another tracer holds, a sandboxed one), 3 not permitted, 1 anything else.
pub(super) fn exit_code(e: &InjectError) -> u8 {
    match e.root() {
        InjectError::NoProcess(_)
        | InjectError::KernelThread(_)
        | InjectError::AlreadyTraced { .. }
        | InjectError::OtherUserNamespace(_)
        | InjectError::NotMapped { .. }
        | InjectError::Seccomp { .. }
        | InjectError::Replaced(_)
        | InjectError::BadRange { .. } => 2,
        InjectError::Ptrace {
            errno: nix::errno::Errno::EPERM,
            ..
        } => 3,
        _ => 1,
    }
}

pub(super) fn run(args: HintArgs) -> anyhow::Result<ExitCode> {
    let advice = if args.merge {
        Advice::Mergeable
    } else {
        Advice::Unmergeable
    };
    if args.qmp {
        use memfabric::actuate::qmp::{self, QmpError};
        return Ok(match qmp::set_guest_merge(args.pid, args.merge) {
            Ok(backends) => {
                println!(
                    "{}: merge {} over QMP",
                    backends.join(", "),
                    if args.merge { "on" } else { "off" }
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("memfabric hint: {e}");
                ExitCode::from(match e {
                    QmpError::NoSocket(_) | QmpError::MergeOff(_) => 2,
                    _ => 1,
                })
            }
        });
    }
    let bad = |msg: String| {
        eprintln!("memfabric hint: {msg}");
        Ok(ExitCode::from(2))
    };
    let ranges = match &args.range {
        Some(r) => {
            let parsed = r
                .split_once('-')
                .and_then(|(a, b)| Some((number(a).ok()?, number(b).ok()?)));
            match parsed {
                Some(range) => vec![range],
                None => return bad(format!("--range must be START-END, got {r:?}")),
            }
        }
        None => match inject::guest_ram(args.pid) {
            Ok(r) => r,
            Err(_) => return bad(format!("no process with PID {}", args.pid)),
        },
    };
    if ranges.is_empty() {
        eprintln!("PID {} has no guest RAM to hint", args.pid);
        return Ok(ExitCode::from(2));
    }
    for (start, end) in ranges {
        match inject::madvise(args.pid, start, end, advice, Duration::from_secs(2)) {
            Ok(done) => println!(
                "{start:#x}-{end:#x}: {} ({} MiB; the process was stopped {:.0} us)",
                if args.merge {
                    "mergeable"
                } else {
                    "unmergeable"
                },
                (end - start) >> 20,
                done.stopped.as_secs_f64() * 1e6
            ),
            Err(e) => {
                eprintln!("memfabric hint: {e}");
                return Ok(ExitCode::from(exit_code(&e)));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
