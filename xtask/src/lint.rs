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
    cmd::run(crate::build::ebpf_cargo("clippy").args(["--", "-D", "warnings"]))
}
