//! Benchmarks that need the probes in-process; `cargo xtask bench ...` builds and runs
//! this. Each writes CSV and a Markdown summary into a report directory and prints the
//! headline ratios. The machine is shared and noisy: runs are interleaved and compared by
//! median, never as lone absolute times.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use memfabric::probes::{LoadOptions, Probes};
use memfabric_tests::Workload;
use xtask::plot::{self, Series};

mod scan;

/// Bytes the bench has allocated and not freed: memory figures are measured, not
/// computed from a layout.
pub struct CountingAlloc;

pub static LIVE_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only counting sizes.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller's layout, as GlobalAlloc requires.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: allocated by `alloc` above with this layout.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

#[derive(Parser)]
struct Cli {
    /// Report directory (created).
    #[arg(long, default_value = "reports")]
    out: PathBuf,
    #[command(subcommand)]
    which: Which,
}

#[derive(Subcommand)]
enum Which {
    /// Cost of the probes on a write-fault loop: detached vs attached (process not
    /// tracked: the in-kernel filter) vs attached and tracked (full accounting).
    Probes {
        /// Fresh pages written per run (262144 = 1 GiB).
        #[arg(long, default_value_t = 262_144)]
        pages: usize,
        /// Interleaved rounds; each round runs every mode once, in rotating order.
        #[arg(long, default_value_t = 9)]
        rounds: usize,
    },
    /// The page scanner on lab guests: xxh3 vs memcpy of the same bytes, scan throughput,
    /// state bytes per page, and hash grouping against an exact byte-for-byte recount.
    Scan {
        #[arg(long, default_value_t = 2)]
        guests: u32,
        #[arg(long, default_value_t = 7)]
        rounds: usize,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Detached,
    Untracked,
    Tracked,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Detached, Mode::Untracked, Mode::Tracked];
    fn name(self) -> &'static str {
        match self {
            Mode::Detached => "detached",
            Mode::Untracked => "attached-untracked",
            Mode::Tracked => "attached-tracked",
        }
    }
}

fn bench_probes(out: &Path, pages: usize, rounds: usize) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?.with_file_name("memfabric-workload");
    let exe = exe.to_str().context("workload path")?.to_owned();
    let mut samples: Vec<(usize, Mode, f64)> = Vec::new();
    let mut w = Workload::spawn(&exe);
    // Warm-up: first-touch costs of the allocator and page tables.
    w.cmd(&format!("fault {pages}"));
    for round in 0..rounds {
        for i in 0..Mode::ALL.len() {
            let mode = Mode::ALL[(round + i) % Mode::ALL.len()];
            let probes = match mode {
                Mode::Detached => None,
                Mode::Untracked | Mode::Tracked => {
                    let mut p = Probes::load(&LoadOptions::default())?;
                    anyhow::ensure!(p.all_attached(), "not every probe attached");
                    if mode == Mode::Tracked {
                        p.track(w.pid)?;
                    }
                    Some(p)
                }
            };
            let ns: f64 = w.cmd(&format!("fault {pages}")).parse()?;
            if let (Some(p), Mode::Tracked) = (&probes, mode) {
                let s = p.stats(w.pid)?.context("tracked workload vanished")?;
                anyhow::ensure!(
                    s.write_faults >= pages as u64,
                    "tracked run counted {} faults < {pages}",
                    s.write_faults
                );
            }
            drop(probes);
            let per_fault = ns / pages as f64;
            eprintln!("round {round} {:<20} {per_fault:8.1} ns/fault", mode.name());
            samples.push((round, mode, per_fault));
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    w.exit();

    let dir = xtask::report::dir(out, "probes")?;
    let mut csv = String::from("round,mode,pages,ns_per_fault\n");
    for (r, m, v) in &samples {
        writeln!(csv, "{r},{},{pages},{v:.2}", m.name())?;
    }
    fs::write(dir.join("samples.csv"), csv)?;

    let stats = |mode: Mode| {
        let mut v: Vec<f64> = samples
            .iter()
            .filter(|s| s.1 == mode)
            .map(|s| s.2)
            .collect();
        let med = xtask::report::median(&mut v);
        (med, v[0], v[v.len() - 1])
    };
    let (base, _, _) = stats(Mode::Detached);
    let mut md = format!(
        "# bench probes\n\n{rounds} interleaved rounds, {pages} fresh pages written per run \
         (one write fault each).\n\n| mode | median ns/fault | min | max | ratio to detached |\n\
         |---|---|---|---|---|\n"
    );
    for mode in Mode::ALL {
        let (med, min, max) = stats(mode);
        writeln!(
            md,
            "| {} | {med:.1} | {min:.1} | {max:.1} | {:.3} |",
            mode.name(),
            med / base
        )?;
    }
    let series: Vec<Series> = Mode::ALL
        .iter()
        .map(|&mode| Series {
            name: mode.name().into(),
            points: samples
                .iter()
                .filter(|s| s.1 == mode)
                .map(|s| (s.0 as f64, s.2))
                .collect(),
        })
        .collect();
    plot::lines(
        &dir.join("ns-per-fault.png"),
        "write-fault cost per round",
        "round",
        "ns per fault",
        &series,
    )?;
    md.push_str("\nPlot: ns-per-fault.png. Samples: samples.csv.\n");
    fs::write(dir.join("summary.md"), &md)?;
    println!("{md}");
    println!("report: {}", dir.display());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.which {
        Which::Probes { pages, rounds } => bench_probes(&cli.out, pages, rounds.max(1)),
        Which::Scan { guests, rounds } => scan::run(&cli.out, guests, rounds.max(1)),
    }
}
