//! `memfabric scan`: one-shot page scan of processes (passes at an interval), reporting
//! what is stable, volatile, duplicated, merged and still mergeable.

use std::{process::ExitCode, time::Duration};

use clap::Args;
use memfabric::scan::{Counts, Scanner};

#[derive(Args)]
pub struct ScanArgs {
    /// Process to scan (repeatable): a VM's guest RAM, or any process's private anonymous
    /// memory.
    #[arg(long = "pid", required = true)]
    pids: Vec<u32>,
    /// Passes over all pages.
    #[arg(long, default_value_t = 3)]
    passes: u32,
    /// Pause between passes.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Unchanged scans after which a page is stable.
    #[arg(long, default_value_t = 2)]
    stable_after: u8,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn line(label: &str, c: &Counts) {
    println!(
        "{label:<10} {:>10} {:>8} {:>9} {:>9} {:>10} {:>10} {:>8} {:>12.1}",
        c.pages_present,
        c.zero_pages,
        c.stable_pages,
        c.volatile_pages,
        c.duplicate_pages,
        c.mergeable_duplicate_pages,
        c.merged_pages,
        c.potential_savings_bytes as f64 / (1024.0 * 1024.0)
    );
}

pub fn run(args: ScanArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.passes >= 1, "--passes must be at least 1");
    let mut scanner = Scanner::new(args.stable_after);
    for i in 0..args.passes {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
        scanner.pass(&args.pids)?;
        if !args.json {
            eprintln!("pass {}/{} done", i + 1, args.passes);
        }
    }
    let report = scanner.report();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<10} {:>10} {:>8} {:>9} {:>9} {:>10} {:>10} {:>8} {:>12}",
        "PID",
        "PRESENT",
        "ZERO",
        "STABLE",
        "VOLATILE",
        "DUPLICATE",
        "MERGEABLE",
        "MERGED",
        "POTENTIAL MiB"
    );
    for (pid, c) in &report.per_pid {
        line(&pid.to_string(), c);
    }
    line("total", &report.total);
    println!(
        "{} passes, {:.1} MiB read, {} bytes of state per page",
        report.passes,
        report.bytes_read as f64 / (1024.0 * 1024.0),
        report.state_bytes_per_page
    );
    Ok(ExitCode::SUCCESS)
}
