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
use clap::Parser;
use memfabric::probes::{LoadOptions, Probes};
use memfabric_tests::Workload;
use xtask::{
    bench_args::InProcess,
    plot::{self, Series},
};

mod fabric;
mod index;
mod proxy;
mod scale;
mod scale_daemon;
mod scan;
mod unmerge;

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
    which: InProcess,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Detached,
    /// Detached again: the A/A control. Its spread against `Detached` is the noise band
    /// no figure inside of which means anything.
    Control,
    Untracked,
    Tracked,
}

impl Mode {
    const ALL: [Mode; 4] = [
        Mode::Detached,
        Mode::Control,
        Mode::Untracked,
        Mode::Tracked,
    ];
    fn name(self) -> &'static str {
        match self {
            Mode::Detached => "detached",
            Mode::Control => "detached-again (A/A)",
            Mode::Untracked => "attached-untracked",
            Mode::Tracked => "attached-tracked",
        }
    }
}

/// Pins `pid` to the host's last CPU, so runs do not migrate between CPUs mid-measure.
fn pin_to_last_cpu(pid: u32) -> anyhow::Result<usize> {
    let cpus = std::thread::available_parallelism()?.get();
    let cpu = cpus - 1;
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and sched_setaffinity get valid pointers.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        anyhow::ensure!(
            libc::sched_setaffinity(pid as i32, size_of::<libc::cpu_set_t>(), &set) == 0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(cpu)
}

fn bench_probes(out: &Path, pages: usize, rounds: usize) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?.with_file_name("memfabric-workload");
    let exe = exe.to_str().context("workload path")?.to_owned();
    let mut samples: Vec<(usize, Mode, f64)> = Vec::new();
    let mut w = Workload::spawn(&exe);
    let cpu = pin_to_last_cpu(w.pid)?;
    // Warm-up: first-touch costs of the allocator and page tables.
    w.cmd(&format!("fault {pages}"));
    for round in 0..rounds {
        for i in 0..Mode::ALL.len() {
            let mode = Mode::ALL[(round + i) % Mode::ALL.len()];
            let probes = match mode {
                Mode::Detached | Mode::Control => None,
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
    // Per-round ratios to that round's detached run; the A/A control's spread is the band.
    let ratios = |mode: Mode| -> Vec<f64> {
        (0..rounds)
            .filter_map(|r| {
                let of = |m: Mode| samples.iter().find(|s| s.0 == r && s.1 == m).map(|s| s.2);
                Some(of(mode)? / of(Mode::Detached)?)
            })
            .collect()
    };
    // The band: the A/A ratios' 10th to 90th percentile (one stray round does not widen
    // it to everything).
    let mut aa = ratios(Mode::Control);
    aa.sort_by(f64::total_cmp);
    let cut = aa.len() / 10;
    let band = (aa[cut], aa[aa.len() - 1 - cut]);
    let mut md = format!(
        "# bench probes\n\n{rounds} interleaved rounds, {pages} fresh pages written per run \
         (one write fault each), the workload pinned to CPU {cpu}. Ratios are medians of \
         per-round ratios to that round's detached run; the A/A control (detached twice) \
         spans {:.3}-{:.3} (10th-90th percentile), and a ratio inside that band is no \
         measurable difference.\n\n\
         | mode | median ns/fault | min | max | ratio to detached | verdict |\n\
         |---|---|---|---|---|---|\n",
        band.0, band.1
    );
    for mode in Mode::ALL {
        let (med, min, max) = stats(mode);
        let mut r = ratios(mode);
        let ratio = xtask::report::median(&mut r);
        let verdict = if mode == Mode::Detached {
            "baseline".to_owned()
        } else if mode == Mode::Control {
            "A/A control".to_owned()
        } else if (band.0..=band.1).contains(&ratio) {
            "no measurable difference".to_owned()
        } else {
            format!("{:+.1} %", (ratio - 1.0) * 100.0)
        };
        writeln!(
            md,
            "| {} | {med:.1} | {min:.1} | {max:.1} | {ratio:.3} | {verdict} |",
            mode.name(),
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
        InProcess::Probes { pages, rounds } => bench_probes(&cli.out, pages, rounds.max(1)),
        InProcess::Scan { guests, rounds } => scan::run(&cli.out, guests, rounds.max(1)),
        InProcess::Fabric {
            hosts,
            vms,
            guests,
            gossip_interval_s,
        } => fabric::run(
            &cli.out,
            hosts.max(2),
            vms.max(1),
            guests,
            gossip_interval_s.max(0.1),
        ),
        InProcess::Index { gib, rounds } => index::run(&cli.out, gib.max(1), rounds.max(1)),
        InProcess::Proxy { mib, rounds } => proxy::run(&cli.out, mib.max(16), rounds.max(1)),
        InProcess::Unmerge { mib, rounds } => unmerge::run(&cli.out, mib.max(16), rounds.max(1)),
        InProcess::Scale {
            gib,
            rounds,
            window,
        } => scale::run(&cli.out, &gib, rounds.max(1), Duration::from_secs(window)),
    }
}
