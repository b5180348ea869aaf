//! `cargo xtask lint`: rustfmt and clippy with warnings denied. The eBPF crate is checked
//! for its own target, as it only builds there.

use xtask::cmd;

use crate::setup;

pub fn run() -> anyhow::Result<()> {
    setup::run()?;
    cmd::run(cmd::cargo().args(["fmt", "--all", "--", "--check"]))?;
    cmd::run(cmd::cargo().args([
        "clippy",
        "--locked",
        "--workspace",
        "--exclude",
        "memfabric-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    cmd::run(
        cmd::nightly_cargo()
            .args([
                "clippy",
                "--locked",
                "--package",
                "memfabric-ebpf",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ])
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                "--cfg=bpf_target_arch=\"x86_64\"",
            ),
    )
}
