//! `cargo xtask test`: setup, then every test. The privileged integration tests run for
//! real here: MEMFABRIC_REQUIRE_ROOT turns a missing root into a failure, not a skip.

use anyhow::bail;

use xtask::cmd;

use crate::setup;

pub fn run(args: &[String]) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!(
            "the test suite loads eBPF programs and drives KSM: run it as root \
             (e.g. `sudo -E cargo xtask test`)"
        );
    }
    setup::run()?;
    cmd::run(
        cmd::cargo()
            .args([
                "test",
                "--locked",
                "--workspace",
                "--exclude",
                "memfabric-ebpf",
            ])
            .args(args)
            .env("MEMFABRIC_REQUIRE_ROOT", "1"),
    )
}
