//! `cargo xtask setup`: installs what building and running memfabric needs, skipping what
//! is already there, so a fresh machine needs no other step. Each step says what it did.

use std::{path::Path, process::Command, time::Instant};

use anyhow::{Context as _, bail};

use xtask::cmd::{self, PROMTOOL, output};

/// Debian packages: LLVM 22 for bpf-linker, QEMU/cpio/busybox for the VM lab, a font.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "qemu-system-x86",
    "cpio",
    "busybox-static",
    // A font for the benchmark plots.
    "fonts-dejavu-core",
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// cargo-deny, for `cargo xtask lint` (licenses, bans, sources of the dependency graph).
const CARGO_DENY_VERSION: &str = "0.20.2";
/// The toolchain aya-build uses for the eBPF crate (`rustup run nightly`).
const NIGHTLY: &str = "nightly";

pub(crate) fn run() -> anyhow::Result<()> {
    let start = Instant::now();
    if !cmd::is_root() {
        bail!(
            "setup needs root: it installs Debian packages and mounts tracefs. \
             Run it as root (e.g. `sudo -E cargo xtask setup`)"
        );
    }
    packages()?;
    nightly()?;
    bpf_linker()?;
    promtool()?;
    tracefs()?;
    kernel_features();
    eprintln!("setup: done in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

fn installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        eprintln!(
            "setup: [ok] Debian packages present: {}",
            PACKAGES.join(" ")
        );
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    cmd::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("apt-get update")?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("installing {}", missing.join(" ")))?;
    if let Some(p) = missing.iter().find(|p| !installed(p)) {
        bail!("package {p} is still not installed after apt-get install");
    }
    Ok(())
}

/// promtool, from Debian's `prometheus` package, unpacked rather than installed: installing
/// the package would also start a Prometheus server on the host.
fn promtool() -> anyhow::Result<()> {
    if Path::new(PROMTOOL).exists() {
        eprintln!("setup: [ok] promtool ({PROMTOOL})");
        return Ok(());
    }
    eprintln!("setup: unpacking promtool from Debian's prometheus package to {PROMTOOL}");
    let dir = std::env::temp_dir().join(format!("memfabric-promtool-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = (|| {
        let download =
            |c: &mut Command| cmd::run(c.current_dir(&dir).arg("download").arg("prometheus"));
        if download(&mut Command::new("apt-get")).is_err() {
            cmd::run(Command::new("apt-get").arg("update"))?;
            download(&mut Command::new("apt-get")).context("apt-get download prometheus")?;
        }
        let deb = std::fs::read_dir(&dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .context("apt-get download left no .deb")?;
        cmd::run(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(&deb)
                .arg(dir.join("x")),
        )?;
        std::fs::copy(dir.join("x/usr/bin/promtool"), PROMTOOL)
            .with_context(|| format!("copying promtool to {PROMTOOL}"))?;
        anyhow::Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn nightly() -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to manage the nightly toolchain for the eBPF crate")?;
    if !toolchains.lines().any(|l| l.starts_with(NIGHTLY)) {
        eprintln!("setup: installing the nightly toolchain (for the eBPF crate)");
        cmd::run(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))
    .unwrap_or_default();
    if components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: [ok] {NIGHTLY} toolchain with rust-src");
    } else {
        eprintln!("setup: adding rust-src to {NIGHTLY} (build-std for the BPF target)");
        cmd::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            NIGHTLY,
        ]))?;
    }
    // bpf-linker links the eBPF crate's LLVM bitcode with the system's LLVM 22: rustc's
    // LLVM must not be newer.
    let vv =
        output(Command::new("rustup").args(["run", NIGHTLY, "rustc", "-vV"])).unwrap_or_default();
    if let Some(llvm) = vv.lines().find_map(|l| l.strip_prefix("LLVM version: "))
        && !llvm.starts_with("22.")
    {
        eprintln!(
            "setup: WARNING: {NIGHTLY} rustc uses LLVM {llvm}, bpf-linker uses LLVM 22; if \
             linking the eBPF object fails, install a nightly built on LLVM 22"
        );
    }
    Ok(())
}

fn bpf_linker() -> anyhow::Result<()> {
    let have = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if have.contains(BPF_LINKER_VERSION) {
        eprintln!("setup: [ok] bpf-linker {BPF_LINKER_VERSION}");
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes)");
    if !Path::new(LLVM_PREFIX).join("lib").is_dir() {
        bail!("{LLVM_PREFIX} is missing: llvm-22-dev did not install where expected");
    }
    cmd::run(
        cmd::cargo()
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
    .context("building bpf-linker")?;
    if output(Command::new("bpf-linker").arg("--version")).is_none() {
        bail!("bpf-linker was installed but is not on PATH; add ~/.cargo/bin to PATH");
    }
    Ok(())
}

/// Installs cargo-deny (idempotent): `cargo xtask lint` checks the dependency graph with
/// it. Not part of [`run`]: the demo and the tests do not need it.
pub(crate) fn cargo_deny() -> anyhow::Result<()> {
    let have = output(cmd::cargo().args(["deny", "--version"])).unwrap_or_default();
    if have.contains(CARGO_DENY_VERSION) {
        eprintln!("setup: [ok] cargo-deny {CARGO_DENY_VERSION}");
        return Ok(());
    }
    eprintln!("setup: building cargo-deny {CARGO_DENY_VERSION} (a few minutes)");
    cmd::run(cmd::cargo().args([
        "install",
        "cargo-deny",
        "--locked",
        "--version",
        CARGO_DENY_VERSION,
    ]))
    .context("building cargo-deny")
}

fn tracefs() -> anyhow::Result<()> {
    let mounted = [
        "/sys/kernel/tracing/events",
        "/sys/kernel/debug/tracing/events",
    ]
    .iter()
    .any(|p| Path::new(p).is_dir());
    if mounted {
        eprintln!("setup: [ok] tracefs mounted");
        return Ok(());
    }
    eprintln!("setup: mounting tracefs at /sys/kernel/tracing");
    cmd::run(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))
        .context("mounting tracefs (the kernel needs CONFIG_TRACING)")
}

/// Reports (does not fail on) kernel features memfabric uses, naming how to get them.
fn kernel_features() {
    let checks = [
        (
            "/sys/kernel/btf/vmlinux",
            "kernel BTF (CONFIG_DEBUG_INFO_BTF=y)",
        ),
        ("/sys/kernel/mm/ksm/run", "KSM (CONFIG_KSM=y)"),
        (
            "/sys/kernel/tracing/events/ksm",
            "KSM tracepoints (Linux >= 6.4)",
        ),
        (
            "/sys/kernel/tracing/events/exceptions/page_fault_user",
            "page-fault tracepoints (x86)",
        ),
    ];
    for (path, what) in checks {
        if Path::new(path).exists() {
            eprintln!("setup: [ok] {what}");
        } else {
            eprintln!("setup: WARNING: {what} missing ({path}); memfabric loses that signal");
        }
    }
}
