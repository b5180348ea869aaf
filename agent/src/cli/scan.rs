//! `memfabric scan`: one-shot page scan of processes (passes at an interval), reporting
//! what is stable, volatile, duplicated, merged and still mergeable, with a progress bar
//! on a terminal. `--ranges` adds the ranked 2 MiB ranges (scan history only: the probes'
//! heat is the daemon's, see `/v1/ranges`).

use std::{io::IsTerminal as _, process::ExitCode, time::Duration};

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use memfabric::{
    heat::RangeHeatMap,
    model::rank::{RankPolicy, RankedRanges},
    scan::{Counts, Scanner},
};

#[derive(Args)]
pub(super) struct ScanArgs {
    /// Process to scan (repeatable): a VM's guest RAM, or any process's private anonymous
    /// memory.
    #[arg(long = "pid", required = true)]
    pids: Vec<u32>,
    /// Passes over all pages (stable needs `--stable-after` + 1).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    passes: u32,
    /// Pause between passes.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Unchanged scans after which a page is stable.
    #[arg(long, default_value_t = 2)]
    stable_after: u8,
    /// Also report every 2 MiB range with its class.
    #[arg(long)]
    ranges: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

const MIB: f64 = 1024.0 * 1024.0;

fn line(label: &str, c: &Counts) {
    println!(
        "{label:<10} {:>10} {:>8} {:>9} {:>9} {:>10} {:>10} {:>8} {:>10.1} {:>10.1}",
        c.pages_present,
        c.zero_pages,
        c.stable_pages,
        c.volatile_pages,
        c.duplicate_pages,
        c.mergeable_duplicate_pages,
        c.merged_pages,
        c.potential_savings_intra_bytes as f64 / MIB,
        c.potential_savings_inter_bytes as f64 / MIB,
    );
}

/// A progress bar over the pages of one pass. It starts hidden and shows on stderr, when
/// that is a terminal, once the pass has told how many pages it walks (so pipes and logs
/// stay clean, and no empty bar flashes first).
fn progress_bar(pass: u32, passes: u32) -> ProgressBar {
    let bar = ProgressBar::hidden();
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix} [{bar:40}] {percent:>3}% {pos}/{len} pages, {per_sec}, eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(format!("pass {pass}/{passes}"));
    bar
}

pub(super) fn run(args: ScanArgs) -> anyhow::Result<ExitCode> {
    let mut scanner = Scanner::new(args.stable_after);
    for i in 0..args.passes {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
        let bar = progress_bar(i + 1, args.passes);
        let terminal = std::io::stderr().is_terminal();
        scanner.pass_with_progress(&args.pids, &mut |walked, total| {
            if bar.length() != Some(total) {
                bar.set_length(total);
                if terminal {
                    bar.set_draw_target(ProgressDrawTarget::stderr());
                }
            }
            bar.set_position(walked);
        })?;
        bar.finish_and_clear();
    }
    let mut report = scanner.report();
    let ranked = args
        .ranges
        .then(|| RankedRanges::rank(&report, &RangeHeatMap::new(), 0.0, RankPolicy::default()));
    report.ranges.clear(); // the ranked ranges carry them
    if args.json {
        // The operator's own one-off scan of PIDs they named: addresses included.
        let mut value = memfabric::addresses::exposing(true, || serde_json::to_value(&report))?;
        if let Some(r) = &ranked {
            value["ranges"] =
                memfabric::addresses::exposing(true, || serde_json::to_value(&r.by_pid))?;
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<10} {:>10} {:>8} {:>9} {:>9} {:>10} {:>10} {:>8} {:>10} {:>10}",
        "PID",
        "PRESENT",
        "ZERO",
        "STABLE",
        "VOLATILE",
        "DUPLICATE",
        "MERGEABLE",
        "MERGED",
        "INTRA MiB",
        "INTER MiB"
    );
    for (pid, c) in &report.per_pid {
        line(&pid.to_string(), c);
    }
    line("total", &report.total);
    println!(
        "{} passes, {:.1} MiB read, {} bytes of state per page, {} distinct stable contents",
        report.passes,
        report.bytes_read as f64 / MIB,
        report.state_bytes_per_page,
        report.distinct_stable_contents,
    );
    println!("INTRA/INTER: what merging could still save within each VM / across VMs");
    let use_zero_pages =
        std::fs::read_to_string("/sys/kernel/mm/ksm/use_zero_pages").is_ok_and(|v| v.trim() == "1");
    let predicted = report.total.predicted_ksm_pages(use_zero_pages);
    println!(
        "KSM can save {predicted} pages ({:.1} MiB) here once it converges: mergeable duplicates \
         plus zero pages outside THPs (use_zero_pages={})",
        predicted as f64 * 4096.0 / MIB,
        u8::from(use_zero_pages)
    );
    if let Some(r) = ranked {
        for (pid, ranges) in &r.by_pid {
            println!("\nPID {pid}: 2 MiB ranges");
            println!(
                "{:<18} {:<16} {:>7} {:>7} {:>8} {:>9} {:>10} {:>7}",
                "START", "CLASS", "PRESENT", "STABLE", "VOLATILE", "MERGEABLE", "POTENTIAL", "ZERO"
            );
            for x in ranges {
                let c = &x.counts;
                println!(
                    "{:<#18x} {:<16} {:>7} {:>7} {:>8} {:>9} {:>10} {:>7}",
                    c.start,
                    x.class.as_str(),
                    c.pages_present,
                    c.stable_pages,
                    c.volatile_pages,
                    c.mergeable_intra_pages + c.mergeable_inter_pages,
                    c.potential_intra_pages + c.potential_inter_pages,
                    c.zero_pages,
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
