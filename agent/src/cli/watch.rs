//! `memfabric watch`: track processes with the probes and show, every interval, what KSM
//! merged of each and what the probes saw (merges, COW breaks, faults), until Ctrl-C or
//! `--seconds`.

use std::{collections::BTreeMap, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::Args;
use memfabric::{
    host::inventory,
    host::ksm::{KsmHost, KsmStat, vmstat},
    probes::{LoadOptions, ProbeEvent, Probes},
};
use memfabric_common::TgidStats;

#[derive(Args)]
pub(super) struct WatchArgs {
    /// Process to track (repeatable), e.g. a QEMU PID.
    #[arg(long = "pid", required = true)]
    pids: Vec<u32>,
    /// Refresh interval in milliseconds.
    #[arg(long, default_value_t = 2000)]
    interval_ms: u64,
    /// Stop after this many seconds (default: until Ctrl-C / SIGTERM).
    #[arg(long)]
    seconds: Option<u64>,
}

/// RSS of a process in MiB (0 once it is gone).
fn rss_mib(pid: u32) -> u64 {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.status())
        .ok()
        .and_then(|s| s.vmrss)
        .unwrap_or(0)
        / 1024
}

const MIB: f64 = 1024.0 * 1024.0;

pub(super) fn run(args: WatchArgs) -> anyhow::Result<ExitCode> {
    let mut probes = Probes::load(&LoadOptions::default()).context("loading memfabric's probes")?;
    let mut names = BTreeMap::new();
    for &pid in &args.pids {
        probes.track(pid)?;
        let id = inventory::identity(pid);
        names.insert(pid, id.name.unwrap_or_else(|| format!("pid-{pid}")));
    }
    let missing: Vec<_> = probes
        .status()
        .iter()
        .filter(|s| !s.attached())
        .map(|s| s.tracepoint.clone())
        .collect();
    if !missing.is_empty() {
        tracing::warn!("running without: {}", missing.join(", "));
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut tick = tokio::time::interval(Duration::from_millis(args.interval_ms.max(100)));
        let start = tokio::time::Instant::now();
        let deadline = args.seconds.map(|s| start + Duration::from_secs(s));
        let cow_start = vmstat("cow_ksm").unwrap_or(0);
        let mut exited: BTreeMap<u32, TgidStats> = BTreeMap::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
            }
            probes.refresh_mm_learning()?;
            for ev in probes.drain_events() {
                let ProbeEvent::Exit { tgid, stats } = ev;
                exited.insert(tgid, stats);
            }
            print_table(&probes, &names, &exited, start.elapsed(), cow_start)?;
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                break;
            }
        }
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

fn print_table(
    probes: &Probes,
    names: &BTreeMap<u32, String>,
    exited: &BTreeMap<u32, TgidStats>,
    elapsed: Duration,
    cow_start: u64,
) -> anyhow::Result<()> {
    let page = 4096.0;
    let k = KsmHost::read();
    println!(
        "\n[{:>4} s] KSM run={} pages_shared={} pages_sharing={} (saving {:.1} MiB) \
         general_profit={:.1} MiB full_scans={} cow_ksm=+{}",
        elapsed.as_secs(),
        k.run,
        k.pages_shared,
        k.pages_sharing,
        k.pages_sharing as f64 * page / MIB,
        k.general_profit_bytes as f64 / MIB,
        k.full_scans,
        k.cow_ksm - cow_start,
    );
    println!(
        "{:<14} {:>8} {:>8} {:>9} {:>9} {:>9} {:>10} {:>10} {:>9}",
        "VM",
        "PID",
        "RSS MiB",
        "MERGING",
        "MERGED MiB",
        "MERGES",
        "COW BREAKS",
        "W FAULTS",
        "KVM FLT"
    );
    for (&pid, name) in names {
        let (stats, state) = match probes.stats(pid)? {
            Some(s) => (s, ""),
            None => (exited.get(&pid).copied().unwrap_or_default(), " (exited)"),
        };
        let merging = KsmStat::read(pid).merging_pages;
        println!(
            "{:<14} {:>8} {:>8} {:>9} {:>10.1} {:>9} {:>10} {:>10} {:>9}{state}",
            name,
            pid,
            rss_mib(pid),
            merging,
            merging as f64 * page / MIB,
            stats.ksm_merges,
            stats.ksm_cow_breaks,
            stats.write_faults,
            stats.kvm_faults,
        );
    }
    Ok(())
}
