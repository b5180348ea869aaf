//! `cargo xtask lint`: rustfmt and clippy with warnings denied (the eBPF crate checked for
//! its own target, as it only builds there), and cargo-deny over the dependency graph
//! (deny.toml: licenses, bans, sources; advisories need GitHub, which build hosts here
//! cannot reach).

use xtask::cmd;

use crate::setup;

pub(crate) fn run() -> anyhow::Result<()> {
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
    cmd::run(crate::build::ebpf_cargo("clippy").args(["--", "-D", "warnings"]))?;
    setup::cargo_deny()?;
    cmd::run(cmd::cargo().args(["deny", "--locked", "check", "licenses", "bans", "sources"]))
}
