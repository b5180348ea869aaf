//! The incoming QEMU as a process: started daemonized and paused, asked whether it loaded
//! the whole stream, resumed, or stopped and removed when it must not run.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::run;
use crate::actuate::qmp::Qmp;

/// How long a started QEMU may take to daemonize (listening on its socket).
const QEMU_START: Duration = Duration::from_secs(30);

/// This machine's boot id (one per kernel boot: two agents that read the same one run
/// on one machine).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Starts `qemu` with `args` (an incoming QEMU's, files in `dir`) and waits until it
/// daemonized, listening on its incoming socket: its PID. An error carries the tail of
/// QEMU's own complaint.
pub fn start(qemu: &Path, args: &[String], dir: &Path) -> Result<u32, String> {
    let log = dir.join("qemu.log");
    let stderr = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let mut child = Command::new(qemu)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", qemu.display()))?;
    // QEMU daemonizes once it listens on its incoming socket: its first process exits.
    let deadline = Instant::now() + QEMU_START;
    let exited = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => break None,
        }
    };
    let tail = || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" / ")
    };
    match exited {
        Some(s) if s.success() => {}
        Some(s) => {
            return Err(format!("the incoming QEMU did not start ({s}): {}", tail()));
        }
        None => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "the incoming QEMU did not get ready in {} s: {}",
                QEMU_START.as_secs(),
                tail()
            ));
        }
    }
    pidfile(dir).ok_or_else(|| "the incoming QEMU wrote no pidfile".into())
}

/// The PID an incoming QEMU wrote to its directory's pidfile.
fn pidfile(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join("qemu.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The QEMU that still runs from `dir`, if one does.
fn live_qemu(dir: &Path) -> Option<u32> {
    pidfile(dir).filter(|p| runs_from(*p, dir))
}

/// Gives the incoming QEMU the source's return path and multifd channels, before the
/// source connects.
pub fn configure(qmp: &Path, caps: &run::Capabilities) -> Result<(), String> {
    if *caps == run::Capabilities::default() {
        return Ok(());
    }
    let mut q = Qmp::connect(qmp).map_err(|e| e.to_string())?;
    let on: Vec<serde_json::Value> = [
        ("return-path", caps.return_path),
        ("multifd", caps.multifd > 0),
    ]
    .into_iter()
    .filter(|(_, on)| *on)
    .map(|(c, _)| serde_json::json!({ "capability": c, "state": true }))
    .collect();
    q.execute(
        "migrate-set-capabilities",
        serde_json::json!({ "capabilities": on }),
    )
    .map_err(|e| format!("the incoming QEMU's capabilities: {e}"))?;
    if caps.multifd > 0 {
        q.execute(
            "migrate-set-parameters",
            serde_json::json!({ "multifd-channels": caps.multifd }),
        )
        .map_err(|e| format!("the incoming QEMU's multifd channels: {e}"))?;
    }
    Ok(())
}

/// Waits until the incoming QEMU says the migration `completed` (it loaded every
/// section).
pub fn loaded(qmp: &Path) -> Result<(), String> {
    let mut q = Qmp::connect(qmp).map_err(|e| e.to_string())?;
    let (status, _) =
        run::await_status(&mut q, Duration::from_secs(30)).map_err(|e| e.to_string())?;
    if status == "completed" {
        Ok(())
    } else {
        Err(format!("the incoming QEMU's migration ended {status}"))
    }
}

/// Resumes the incoming guest and checks that it runs.
pub fn cont(qmp: &Path) -> Result<(), String> {
    let mut q = Qmp::connect(qmp).map_err(|e| e.to_string())?;
    q.execute("cont", serde_json::json!({}))
        .map_err(|e| e.to_string())?;
    let s = q
        .execute("query-status", serde_json::json!({}))
        .map_err(|e| e.to_string())?;
    if s["running"] == true {
        Ok(())
    } else {
        Err(format!("the guest is {} after cont", s["status"]))
    }
}

/// [`stop_qemu`] off the async threads (it waits up to 5 s).
pub async fn stop(pid: u32, dir: &Path) {
    let dir = dir.to_owned();
    let _ = tokio::task::spawn_blocking(move || stop_qemu(pid, &dir)).await;
}

/// Whether `pid` is the QEMU whose files are in `dir` (its command line names `dir`): not
/// a PID reused since.
fn runs_from(pid: u32, dir: &Path) -> bool {
    let d = dir.as_os_str().as_encoded_bytes();
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| !d.is_empty() && c.windows(d.len()).any(|w| w == d))
}

/// Removes the directories under `root` whose QEMU is gone (a migrated guest that shut
/// down since, an agent killed mid-migration): call it while no migration is being set
/// up.
pub fn sweep(root: &Path) {
    let Ok(dirs) = std::fs::read_dir(root) else {
        return;
    };
    for d in dirs.filter_map(Result::ok).map(|e| e.path()) {
        if live_qemu(&d).is_none() {
            let _ = std::fs::remove_dir_all(&d);
        }
    }
}

/// At the agent's start: stops the incoming QEMUs under `root` that a previous agent left
/// paused (it died before the source's start: the guest runs on the source, or waits
/// there for an operator, who is told so); guests that run are left alone. Returns how
/// many were stopped.
pub fn reap_leftovers(root: &Path) -> usize {
    let Ok(dirs) = std::fs::read_dir(root) else {
        return 0;
    };
    let mut stopped = 0;
    for d in dirs.filter_map(Result::ok).map(|e| e.path()) {
        let Some(pid) = live_qemu(&d) else {
            continue;
        };
        let running = Qmp::connect(&d.join("qmp.sock"))
            .and_then(|mut q| q.execute("query-status", serde_json::json!({})))
            .is_ok_and(|s| s["running"] == true);
        if !running {
            tracing::warn!(
                "stopping incoming QEMU {pid} ({}) that a previous agent left paused",
                d.display()
            );
            stop_qemu(pid, &d);
            stopped += 1;
        }
    }
    stopped
}

/// Stops an incoming QEMU that must not run (QMP `quit`, then SIGKILL if it lingers; only
/// while `pid` is still the QEMU of `dir`) and removes its files.
pub fn stop_qemu(pid: u32, dir: &Path) {
    let ours = || runs_from(pid, dir);
    if let Ok(mut q) = Qmp::connect(&dir.join("qmp.sock")) {
        let _ = q.execute("quit", serde_json::json!({}));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while ours() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if ours()
        && let Ok(p) = i32::try_from(pid)
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_keeps_only_directories_whose_qemu_still_runs_from_them() {
        let root = std::env::temp_dir().join(format!("memfabric-sweep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (live, dead, reused, empty) = (
            root.join("live"),
            root.join("dead"),
            root.join("reused"),
            root.join("empty"),
        );
        for d in [&live, &dead, &reused, &empty] {
            std::fs::create_dir_all(d).unwrap();
        }
        // A process whose command line names its directory, as an incoming QEMU's does.
        let mut child = Command::new("sh")
            .args(["-c", "sleep 30", live.to_str().unwrap()])
            .spawn()
            .unwrap();
        std::fs::write(live.join("qemu.pid"), child.id().to_string()).unwrap();
        let mut gone = Command::new("true").spawn().unwrap();
        let gone_pid = gone.id();
        gone.wait().unwrap();
        std::fs::write(dead.join("qemu.pid"), gone_pid.to_string()).unwrap();
        // A live PID that is not this directory's QEMU (reused).
        std::fs::write(reused.join("qemu.pid"), std::process::id().to_string()).unwrap();
        sweep(&root);
        let left: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(left, vec![std::ffi::OsString::from("live")]);
    }
}
