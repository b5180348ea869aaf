//! `memfabric launch [--no-merge] -- CMD ARGS...`: runs a VMM with KSM merging of its whole
//! address space turned on (`PR_SET_MEMORY_MERGE`, what systemd's `MemoryKSM=` does) or
//! off. The setting is inherited across fork and exec, so the VMM needs no flag of its own:
//! the only way to make Firecracker, Cloud Hypervisor or crosvm guest RAM mergeable from
//! the start.

use std::{os::unix::process::CommandExt as _, process::ExitCode};

use clap::Args;

#[derive(Args)]
pub(super) struct LaunchArgs {
    /// Turn merging off instead (and unmerge what was merged: the kernel does on 0).
    #[arg(long)]
    no_merge: bool,
    /// The program and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// `prctl(PR_SET_MEMORY_MERGE)` (Linux 6.4+).
const PR_SET_MEMORY_MERGE: libc::c_int = 67;

pub(super) fn run(args: LaunchArgs) -> anyhow::Result<ExitCode> {
    let on = libc::c_ulong::from(!args.no_merge);
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(PR_SET_MEMORY_MERGE, on, 0, 0, 0) } != 0 {
        let e = std::io::Error::last_os_error();
        let why = match e.raw_os_error() {
            Some(libc::EINVAL) => {
                "the kernel has no PR_SET_MEMORY_MERGE (Linux 6.4+ with CONFIG_KSM=y)"
            }
            Some(libc::EPERM) => "it needs CAP_SYS_RESOURCE (run as root)",
            Some(libc::EAGAIN) => "the kernel is out of memory for KSM's bookkeeping",
            _ => "",
        };
        anyhow::bail!(
            "prctl(PR_SET_MEMORY_MERGE, {on}): {e}{}{why}",
            if why.is_empty() { "" } else { ": " }
        );
    }
    let err = std::process::Command::new(&args.command[0])
        .args(&args.command[1..])
        .exec();
    anyhow::bail!("cannot run {}: {err}", args.command[0])
}
