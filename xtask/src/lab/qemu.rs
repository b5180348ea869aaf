//! Starting, watching and stopping QEMU TCG guests. /dev/kvm here is paravirtual and runs
//! no stock guest, so guests use TCG; QEMU marks their RAM MADV_MERGEABLE by default.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{kernel::Kernel, profile::Workload};
use crate::cmd;

/// Printed by /init once the workload's data is in place.
pub const READY: &str = "memfabric-lab: ready";

/// A lab guest as recorded in the state file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Guest {
    pub name: String,
    pub pid: u32,
    pub uuid: String,
    pub kernel: String,
    pub profile: String,
    pub console: PathBuf,
}

/// What to boot.
pub struct GuestSpec<'a> {
    pub name: String,
    pub mem_mb: u32,
    pub kernel: &'a Kernel,
    pub initramfs: &'a Path,
    pub workload: Workload,
    /// QEMU's `-machine mem-merge` (QEMU's default: on).
    pub mem_merge: bool,
}

fn new_uuid() -> anyhow::Result<String> {
    Ok(fs::read_to_string("/proc/sys/kernel/random/uuid")?
        .trim()
        .to_owned())
}

/// Starts a guest in the background (QEMU daemonizes); returns once its PID is known.
pub fn boot(spec: &GuestSpec<'_>, dir: &Path) -> anyhow::Result<Guest> {
    let uuid = new_uuid()?;
    let console = dir.join(format!("{}.console.log", spec.name));
    let pidfile = dir.join(format!("{}.pid", spec.name));
    let _ = fs::remove_file(&pidfile);
    let _ = fs::remove_file(&console);
    cmd::run(
        Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-smp", "1", "-nodefaults", "-no-reboot"])
            .args(["-display", "none", "-monitor", "none"])
            .arg("-m")
            .arg(spec.mem_mb.to_string())
            .arg("-name")
            .arg(&spec.name)
            .arg("-uuid")
            .arg(&uuid)
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(&spec.kernel.vmlinuz)
            .arg("-initrd")
            .arg(spec.initramfs)
            .arg("-append")
            .arg(spec.workload.append())
            .arg("-pidfile")
            .arg(&pidfile)
            // QMP, for memfabric's merge switch (`qom-set /objects/pc.ram merge`).
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                dir.join(format!("{}.qmp", spec.name)).display()
            ))
            .args(if spec.mem_merge {
                &[][..]
            } else {
                &["-machine", "mem-merge=off"][..]
            })
            .arg("-daemonize"),
    )
    .with_context(|| {
        format!(
            "starting guest {} (qemu-system-x86 installed? cargo xtask setup)",
            spec.name
        )
    })?;
    let pid = fs::read_to_string(&pidfile)
        .with_context(|| format!("{} not written", pidfile.display()))?
        .trim()
        .parse()
        .context("QEMU pidfile")?;
    Ok(Guest {
        name: spec.name.clone(),
        pid,
        uuid,
        kernel: spec.kernel.release().to_owned(),
        profile: spec.workload.profile.name().to_owned(),
        console,
    })
}

/// Whether `pid` is still this guest's QEMU (not a reused PID).
pub fn alive(g: &Guest) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{}/cmdline", g.pid)) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.first()
        .is_some_and(|a| a.ends_with(b"qemu-system-x86_64"))
        && args
            .windows(2)
            .any(|w| w[0] == b"-name" && w[1] == g.name.as_bytes())
}

/// The last `n` lines of a guest's console.
pub fn console_tail(g: &Guest, n: usize) -> String {
    let text = fs::read_to_string(&g.console).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits until every guest printed the ready marker. A guest that died or timed out is
/// reported with the tail of its console.
pub fn wait_ready(guests: &[Guest], timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut pending: Vec<&Guest> = guests.iter().collect();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for g in pending {
            let console = fs::read_to_string(&g.console).unwrap_or_default();
            if console.contains(READY) {
                eprintln!("lab: {} ready (pid {})", g.name, g.pid);
            } else if !alive(g) {
                bail!(
                    "guest {} (pid {}) died while booting; console tail:\n{}",
                    g.name,
                    g.pid,
                    console_tail(g, 20)
                );
            } else {
                still.push(g);
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            let g = pending[0];
            bail!(
                "guest {} (pid {}) not ready after {} s; console tail:\n{}",
                g.name,
                g.pid,
                timeout.as_secs(),
                console_tail(g, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}

/// Stops a guest: SIGTERM, then SIGKILL after 5 s. Only if the PID is still that guest.
pub fn stop(g: &Guest) {
    if !alive(g) {
        return;
    }
    let pid = g.pid as libc::pid_t;
    // SAFETY: plain kill(2) on a PID we verified is our QEMU.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(g) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if alive(g) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        while alive(g) && Instant::now() < deadline + Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The QMP socket of a lab guest.
pub fn qmp_socket(g: &Guest) -> PathBuf {
    super::state_dir().join(format!("{}.qmp", g.name))
}

/// A running QEMU's command line made the incoming side of a migration of it: its own
/// console and QMP socket in `dir` (`incoming.console`, `incoming.qmp`), no pidfile, not
/// daemonized, listening on the unix socket `incoming`, paused (`-S`) until `cont`.
pub fn incoming_command(pid: u32, dir: &Path, incoming: &Path) -> anyhow::Result<Command> {
    let raw = fs::read(format!("/proc/{pid}/cmdline"))
        .with_context(|| format!("reading the command line of QEMU {pid}"))?;
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let Some((program, rest)) = args.split_first() else {
        bail!("QEMU {pid} has no command line (exited?)");
    };
    let mut cmd = Command::new(program);
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-daemonize" => {}
            "-pidfile" | "-serial" | "-qmp" => {
                it.next();
            }
            _ => {
                cmd.arg(a);
            }
        }
    }
    cmd.arg("-serial")
        .arg(format!("file:{}", dir.join("incoming.console").display()))
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            dir.join("incoming.qmp").display()
        ))
        .arg("-incoming")
        .arg(format!("unix:{}", incoming.display()))
        .arg("-S");
    Ok(cmd)
}
