//! `cargo xtask load`: the first thing to run on a new host.

use std::process::Command;

use anyhow::bail;

use xtask::cmd;

use crate::{build, setup};

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    setup::run()?;
    let agent = build::agent()?;
    cmd::run(Command::new(&agent).arg("check").args(args))
        .map_err(|e| e.context("some probes did not load or attach (see above)"))?;
    if !agent.exists() {
        bail!("{} was not built", agent.display());
    }
    Ok(())
}
