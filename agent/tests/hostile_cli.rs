//! Processes that look like VMs but are not: anyone can copy `sleep` to a file named
//! `qemu-system-x86_64`. The daemon must not take an untrusted executable for a VMM, and
//! thousands of (trusted) ones must not bring it down.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use memfabric_harness::Daemon;
use memfabric_harness::{Children, poll_for, spawn_fresh};

const MEMFABRIC: &str = env!("CARGO_BIN_EXE_memfabric");

/// A copy of `sleep` named `name` in a fresh directory, owned by `uid`.
fn fake_vmm(test: &str, name: &str, uid: u32) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("memfabric-{test}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.join(name);
    fs::copy("/bin/sleep", &exe).unwrap();
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&exe, Some(uid), Some(uid)).unwrap();
    (dir, exe)
}

/// PIDs in /v1/status, once it answers.
fn vm_pids(d: &Daemon) -> Option<Vec<u64>> {
    let v = d.json("/v1/status")?;
    Some(
        v["vms"]
            .as_array()?
            .iter()
            .filter_map(|vm| vm["pid"].as_u64())
            .collect(),
    )
}

fn metric(d: &Daemon, name: &str) -> Option<f64> {
    d.get("/metrics")?
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn spawn(exe: &Path, n: usize) -> Children {
    Children(
        (0..n)
            .map(|_| spawn_fresh(Command::new(exe).arg("600")))
            .collect(),
    )
}

#[test]
fn a_vmm_name_on_an_untrusted_executable_is_not_a_vm() {
    if !memfabric_harness::privileged("a_vmm_name_on_an_untrusted_executable_is_not_a_vm") {
        return;
    }
    // Owned by `nobody`: what an unprivileged user can make.
    let (dir, exe) = fake_vmm("untrusted", "qemu-system-x86_64", 65534);
    let fake = spawn(&exe, 1);
    let pid = u64::from(fake.0[0].id());
    let d = Daemon::start(MEMFABRIC, &[]);
    let pids = poll_for(Duration::from_secs(20), || vm_pids(&d)).expect("daemon up");
    assert!(
        !pids.contains(&pid),
        "an untrusted fake QEMU was taken for a VM"
    );
    let refused = metric(&d, "memfabric_untrusted_vmm_processes_total").expect("metric");
    assert!(refused >= 1.0, "{refused}");
    drop(d);
    // The operator can choose to trust them.
    let cfg = dir.join("trust.toml");
    fs::write(&cfg, "untrusted_vmm_executables = true\n").unwrap();
    let d = Daemon::start(MEMFABRIC, &["--config", cfg.to_str().unwrap()]);
    let listed = poll_for(Duration::from_secs(20), || {
        vm_pids(&d).filter(|p| p.contains(&pid))
    });
    assert!(listed.is_some(), "trusted by config, yet not listed");
    drop(d);
    drop(fake);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn thousands_of_vmms_do_not_bring_the_daemon_down() {
    if !memfabric_harness::privileged("thousands_of_vmms_do_not_bring_the_daemon_down") {
        return;
    }
    // Root-owned and not writable by others: trusted, so every one is a "VM". One more
    // than the probes' map holds.
    const N: usize = 4_097;
    let (dir, exe) = fake_vmm("capacity", "qemu-system-x86_64", 0);
    let fakes = spawn(&exe, N);
    let d = Daemon::start(MEMFABRIC, &[]);
    let all = poll_for(Duration::from_secs(120), || {
        vm_pids(&d).filter(|p| p.len() >= N)
    });
    assert!(all.is_some(), "the daemon did not list {N} VMs (or died)");
    let failures = metric(&d, "memfabric_vm_track_failures_total").expect("metric");
    assert!(failures >= 1.0, "the map holds 4,096: {failures}");
    // Still serving, still refreshing.
    assert!(d.get("/healthz").is_some_and(|h| h.starts_with("ok")));
    let rss = memfabric_harness::rss_kib(d.pid());
    assert!(rss < 512 * 1024, "RSS {rss} KiB with {N} fake VMs");
    eprintln!("{N} fake VMs: {failures} not tracked by the probes, daemon RSS {rss} KiB");
    drop(d);
    drop(fakes);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_vmm_run_by_another_user_or_with_a_foreign_preload_is_not_a_vm() {
    use std::os::unix::process::CommandExt as _;
    if !memfabric_harness::privileged(
        "a_vmm_run_by_another_user_or_with_a_foreign_preload_is_not_a_vm",
    ) {
        return;
    }
    // A trusted executable (root-owned, not writable by others) ...
    let (dir, exe) = fake_vmm("users", "qemu-system-x86_64", 0);
    // ... run by `nobody`, who could give it any VM's -name and -uuid;
    let nobody = spawn_fresh(Command::new(&exe).arg("600").uid(65534).gid(65534));
    // ... run by root with a library `nobody` could have written preloaded;
    let lib = dir.join("libhook.so");
    fs::write(&lib, b"").unwrap();
    std::os::unix::fs::chown(&lib, Some(65534), Some(65534)).unwrap();
    let preloaded = spawn_fresh(
        Command::new(&exe)
            .arg("600")
            .env("LD_PRELOAD", &lib)
            .stderr(std::process::Stdio::null()),
    );
    // ... and run by root as it is: the only VM of the three.
    let plain = spawn_fresh(Command::new(&exe).arg("600"));
    let kids = Children(vec![nobody, preloaded, plain]);
    let [nobody, preloaded, plain] = [0, 1, 2].map(|i| u64::from(kids.0[i].id()));
    let d = Daemon::start(MEMFABRIC, &[]);
    let pids = poll_for(Duration::from_secs(20), || {
        vm_pids(&d).filter(|p| p.contains(&plain))
    })
    .expect("the plain VMM listed");
    assert!(
        !pids.contains(&nobody),
        "a VMM run by nobody was taken for a VM"
    );
    assert!(
        !pids.contains(&preloaded),
        "a foreign LD_PRELOAD was trusted"
    );
    let refused = metric(&d, "memfabric_untrusted_vmm_processes_total").expect("metric");
    assert!(refused >= 2.0, "{refused}");
    drop(d);
    // The operator names the user its VMMs run as.
    let cfg = dir.join("users.toml");
    fs::write(&cfg, "vmm_users = [\"nobody\"]\n").unwrap();
    let d = Daemon::start(MEMFABRIC, &["--config", cfg.to_str().unwrap()]);
    let listed = poll_for(Duration::from_secs(20), || {
        vm_pids(&d).filter(|p| p.contains(&nobody))
    });
    assert!(listed.is_some(), "vmm_users = [\"nobody\"], yet not listed");
    drop(d);
    // An unknown user is a configuration error.
    fs::write(&cfg, "vmm_users = [\"no-such-user-here\"]\n").unwrap();
    let (code, err) = Daemon::start(MEMFABRIC, &["--config", cfg.to_str().unwrap()]).wait();
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no-such-user-here"), "{err}");
    drop(kids);
    fs::remove_dir_all(&dir).unwrap();
}
