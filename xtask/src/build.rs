//! `build-ebpf` and `build`.

use std::path::PathBuf;

use anyhow::Context as _;

use xtask::cmd::{cargo, nightly_cargo, root, run};

/// `cargo SUBCOMMAND` for the eBPF crate on its own target, with the flags aya-build
/// uses (BTF kept). Shared by `build-ebpf` and `lint`.
pub(crate) fn ebpf_cargo(subcommand: &str) -> std::process::Command {
    let flags = [
        "--cfg=bpf_target_arch=\"x86_64\"",
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
    ]
    .join("\x1f");
    let mut c = nightly_cargo();
    c.args([
        subcommand,
        "--locked",
        "--package",
        "memfabric-ebpf",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ])
    .env("CARGO_ENCODED_RUSTFLAGS", flags);
    c
}

/// Builds the eBPF object alone, returns its path.
pub(crate) fn ebpf() -> anyhow::Result<PathBuf> {
    run(&mut ebpf_cargo("build"))
        .context("building the eBPF object (did `cargo xtask setup` run?)")?;
    let obj = root().join("target/bpfel-unknown-none/release/memfabric");
    eprintln!("eBPF object: {}", obj.display());
    Ok(obj)
}

/// Builds the agent in release mode (its build.rs builds and embeds the eBPF object).
pub(crate) fn agent() -> anyhow::Result<PathBuf> {
    run(cargo().args(["build", "--locked", "--release", "--package", "memfabric"]))?;
    Ok(root().join("target/release/memfabric"))
}
