//! `cargo xtask bench ...`: builds the benchmark driver (release) and runs it as root.

use std::process::Command;

use anyhow::bail;
use clap::Subcommand;

use xtask::cmd;

use crate::setup;

#[derive(Subcommand)]
pub enum Bench {
    /// Write-fault loop with the probes detached vs attached (untracked / tracked).
    Probes {
        /// Fresh pages written per run (262144 = 1 GiB).
        #[arg(long, default_value_t = 262_144)]
        pages: usize,
        /// Interleaved rounds.
        #[arg(long, default_value_t = 9)]
        rounds: usize,
    },
}

pub fn run(which: Bench) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("benchmarks load eBPF programs: run them as root");
    }
    setup::run()?;
    cmd::run(cmd::cargo().args([
        "build",
        "--locked",
        "--release",
        "--package",
        "memfabric-tests",
        "--bins",
    ]))?;
    let bench = cmd::root().join("target/release/memfabric-bench");
    let out = cmd::root().join("reports");
    let mut c = Command::new(bench);
    c.arg("--out").arg(out);
    match which {
        Bench::Probes { pages, rounds } => c.args([
            "probes",
            "--pages",
            &pages.to_string(),
            "--rounds",
            &rounds.to_string(),
        ]),
    };
    cmd::run(&mut c)
}
