//! A process is a PID *and* a start time: PIDs are reused. A VM whose PID a new VMM took is
//! a new VM (new name, new counters), a `--pid` whose process exited does not adopt
//! whatever takes its number, and a kernel thread is no process to track.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    process::{Child, Command},
    time::Duration,
};

use memfabric_harness::Daemon;
use memfabric_harness::{Children, poll_for};

const MEMFABRIC: &str = env!("CARGO_BIN_EXE_memfabric");

/// Spawns `cmd` as PID `pid` (free again after its process was reaped), through
/// ns_last_pid; other processes forking meanwhile can take it first, so it retries.
fn spawn_as(pid: u32, mut cmd: impl FnMut() -> Command) -> Child {
    for _ in 0..50 {
        fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let mut c = cmd().spawn().unwrap();
        if c.id() == pid {
            return c;
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    panic!("could not get PID {pid} again");
}

/// name of the VM with `pid` in /v1/status (None: not listed).
fn listed(d: &Daemon, pid: u32) -> Option<Option<String>> {
    let v = d.json("/v1/status")?;
    Some(
        v["vms"]
            .as_array()?
            .iter()
            .find(|vm| vm["pid"] == pid)
            .map(|vm| vm["name"].as_str().unwrap_or("").to_owned()),
    )
}

#[test]
fn a_kernel_thread_is_refused() {
    let log = std::env::temp_dir().join(format!("memfabric-kthread-{}.log", std::process::id()));
    let mut child = Command::new(MEMFABRIC)
        .args([
            "run",
            "--scan-cpu",
            "0",
            "--listen",
            "127.0.0.1:0",
            "--pid",
            "2",
        ])
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let status = poll_for(Duration::from_secs(20), || child.try_wait().unwrap());
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let err = fs::read_to_string(&log).unwrap_or_default();
    let _ = fs::remove_file(&log);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(2),
        "--pid 2 was not refused: {err}"
    );
    assert!(err.contains("kernel thread"), "{err}");
}

#[test]
fn reused_pids_are_new_processes() {
    if !memfabric_harness::privileged("reused_pids_are_new_processes") {
        return;
    }
    // A trusted VMM named QEMU that carries a `-name`: a root-owned copy of bash.
    let dir = std::env::temp_dir().join(format!("memfabric-reuse-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.join("qemu-system-x86_64");
    fs::copy("/bin/bash", &exe).unwrap();
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
    let vmm = |name: &str| {
        let mut c = Command::new(&exe);
        // bash waits in its own `read` (no child that would outlive it), on a pipe nobody
        // writes; none of the test harness's descriptors are inherited.
        c.args(["-c", "read -t 600 x; :", "-name", name])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    };
    let sleeper = || {
        let mut c = Command::new("sleep");
        c.arg("600")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    };
    let mut kids = Children(vec![
        memfabric_harness::spawn_fresh(&mut vmm("first")),
        sleeper().spawn().unwrap(),
    ]);
    let (vm_pid, given_pid) = (kids.0[0].id(), kids.0[1].id());
    // A slow refresh: both swaps below happen between two refreshes.
    let d = Daemon::start(
        MEMFABRIC,
        &["--refresh-ms", "4000", "--pid", &given_pid.to_string()],
    );
    let name = poll_for(Duration::from_secs(30), || listed(&d, vm_pid).flatten());
    assert_eq!(name.as_deref(), Some("first"), "the VM was not listed");
    assert!(poll_for(Duration::from_secs(10), || listed(&d, given_pid).flatten()).is_some());

    // Both processes exit and new ones take their PIDs at once.
    for k in &mut kids.0 {
        k.kill().unwrap();
        k.wait().unwrap();
    }
    kids.0.clear();
    kids.0.push(spawn_as(vm_pid, || vmm("second")));
    kids.0.push(spawn_as(given_pid, sleeper));

    let renamed = poll_for(Duration::from_secs(15), || {
        listed(&d, vm_pid).flatten().filter(|n| n == "second")
    });
    assert!(
        renamed.is_some(),
        "PID {vm_pid} kept the identity of the VM that exited: {:?}",
        listed(&d, vm_pid)
    );
    // The process given with --pid is gone; the one with its number is nobody's VM.
    let dropped = poll_for(Duration::from_secs(15), || {
        listed(&d, given_pid).filter(Option::is_none)
    });
    assert!(
        dropped.is_some(),
        "a new process with the PID given by --pid {given_pid} was taken for it"
    );
    drop(d);
    drop(kids);
    fs::remove_dir_all(&dir).unwrap();
}
