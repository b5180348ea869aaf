//! `cargo xtask demo`: the README's first command. Setup, build, boot lab guests, turn KSM
//! on (settings saved first, restored at the end, repaired after a crash), run the agent
//! on the guests and show what is merged as it grows; then stop the guests and restore
//! KSM.

use memfabric::actuate::knobs::Knob;
use std::process::Command;

use anyhow::Context as _;
use clap::Args;
use xtask::{cmd, ksm::KsmSession, lab};

use crate::{build, lab_cli::UpArgs, setup};

#[derive(Args)]
pub(crate) struct DemoArgs {
    #[command(flatten)]
    up: UpArgs,
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long)]
    seconds: Option<u64>,
    /// KSM pages_to_scan during the demo (the kernel default, 100, takes minutes to show
    /// anything on 3 guests).
    #[arg(long, default_value_t = 1000)]
    pages_to_scan: u32,
}

pub(crate) fn run(args: DemoArgs) -> anyhow::Result<()> {
    anyhow::ensure!(cmd::is_root(), "the demo needs root (eBPF, KSM, QEMU)");
    setup::run()?;
    let agent = build::agent()?;

    // Ctrl-C reaches the whole process group: the agent stops its display, and we clean up.
    cmd::catch_interrupts()?;

    let mut ksm = KsmSession::begin()?;
    let result = (|| {
        let guests = lab::up(&args.up.options())?;
        if cmd::interrupted() {
            return Ok(());
        }
        // Before KSM runs: what the page scanner says merging can save, and where.
        eprintln!("demo: page scan of the guests' RAM before KSM runs");
        scan(&agent, &guests)?;
        ksm.set(Knob::PagesToScan, &args.pages_to_scan.to_string())?;
        ksm.set(Knob::SleepMillisecs, "20")?;
        ksm.set(Knob::Run, "1")?;
        eprintln!(
            "demo: KSM on (pages_to_scan={}, sleep 20 ms); watching {} guests{}",
            args.pages_to_scan,
            guests.len(),
            args.seconds
                .map_or(" until Ctrl-C".into(), |s| format!(" for {s} s"))
        );
        let mut watch = Command::new(&agent);
        watch.arg("watch").arg("--interval-ms").arg("3000");
        for g in &guests {
            watch.arg("--pid").arg(g.pid.to_string());
        }
        if let Some(s) = args.seconds {
            watch.arg("--seconds").arg(s.to_string());
        }
        let status = watch.status().context("running memfabric watch")?;
        if cmd::interrupted() {
            return Ok(());
        }
        if !status.success() {
            anyhow::bail!("memfabric watch failed ({status})");
        }
        eprintln!("demo: page scan again: what KSM merged and what is left");
        scan(&agent, &guests)
    })();
    eprintln!("demo: stopping the lab and restoring KSM settings");
    let down = lab::down();
    let restore = ksm.restore();
    result?;
    down?;
    restore
}

/// `memfabric scan` over the guests (three passes, so pages can prove stable).
fn scan(agent: &std::path::Path, guests: &[lab::Guest]) -> anyhow::Result<()> {
    let mut c = Command::new(agent);
    c.args(["scan", "--passes", "3", "--interval-ms", "500"]);
    for g in guests {
        c.arg("--pid").arg(g.pid.to_string());
    }
    let status = c.status().context("running memfabric scan")?;
    anyhow::ensure!(status.success(), "memfabric scan failed ({status})");
    Ok(())
}
