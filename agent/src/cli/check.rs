//! `memfabric check`: can this kernel run memfabric's probes?

use std::{path::Path, process::ExitCode};

use anyhow::Context as _;
use clap::Args;
use memfabric::probes::{LoadOptions, ProbeState, Probes};

#[derive(Args)]
pub(super) struct CheckArgs {
    /// Attach PROGRAM to another tracepoint, as PROGRAM=CATEGORY:NAME (repeatable), for
    /// kernels that renamed one.
    #[arg(long = "tracepoint", value_name = "PROGRAM=CATEGORY:NAME")]
    tracepoints: Vec<String>,
}

pub(super) fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let mut opts = LoadOptions::default();
    for t in &args.tracepoints {
        opts.add_override(t)?;
    }
    let probes = Probes::load(&opts).context("loading memfabric's probes")?;

    println!(
        "{:<26} {:<36} {:<12} VERIFIED INSNS",
        "PROGRAM", "TRACEPOINT", "STATE"
    );
    for s in probes.status() {
        let (state, insns, why) = match &s.state {
            ProbeState::Attached { verified_insns } => (
                "attached",
                verified_insns.map_or("?".into(), |n| n.to_string()),
                None,
            ),
            ProbeState::Unavailable(r) => ("unavailable", "-".into(), Some(r)),
            ProbeState::Failed(r) => ("FAILED", "-".into(), Some(r)),
        };
        println!(
            "{:<26} {:<36} {:<12} {insns}",
            s.program, s.tracepoint, state
        );
        if s.attached() && memfabric::probes::catalog::find(s.program).is_some_and(|p| p.on_demand)
        {
            println!("    attaches on demand: only while a tracked process's mm is unknown");
        }
        if let Some(why) = why {
            println!("    {why}");
            println!("    without it memfabric has no {}", s.signal);
        }
    }
    println!("kernel: {}", probes.kernel());
    println!("KSM: {}", ksm_summary());

    let failed: Vec<_> = probes
        .status()
        .iter()
        .filter(|s| !s.attached())
        .map(|s| s.tracepoint.clone())
        .collect();
    drop(probes); // detach before reporting the verdict
    if failed.is_empty() {
        println!(
            "all {} probes attached and detached cleanly",
            memfabric::probes::catalog::PROBES.len()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("memfabric: probes not attached: {}", failed.join(", "));
        Ok(ExitCode::FAILURE)
    }
}

fn ksm_summary() -> String {
    let dir = Path::new("/sys/kernel/mm/ksm");
    if !dir.is_dir() {
        return "not available (/sys/kernel/mm/ksm missing: the kernel needs CONFIG_KSM=y)".into();
    }
    let read = |k: &str| {
        std::fs::read_to_string(dir.join(k))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "?".into())
    };
    format!(
        "run={} pages_to_scan={} sleep_millisecs={} pages_sharing={}",
        read("run"),
        read("pages_to_scan"),
        read("sleep_millisecs"),
        read("pages_sharing")
    )
}
