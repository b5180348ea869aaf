//! `bench scale`: what one scan pass costs as guest RAM grows, with the scanner reading
//! every present page (as before) and skipping pages whose content it knows from their
//! frame (the zero page, KSM frames read once), side by side on the same memory.
//!
//! Per size: four holder processes share the RAM; half of each is content all four hold
//! (KSM merges it), 40 % is unique, 10 % unique and rewritten every second. KSM merges
//! first (fast), then runs at its default pace while the passes are measured. Both
//! scanners pass over all four holders in turn, rounds interleaved; their first pass (cold:
//! nothing known) is reported apart from the steady ones (medians), and the skipping one
//! first passes until its unchanged memory is calm (sampled one page in eight). Their
//! reports must agree: a skipped page must account as if it had been read.

use memfabric::actuate::knobs::Knob;
use std::{fmt::Write as _, fs, path::Path, time::Duration};

use anyhow::Context as _;
use memfabric::{scan::Scanner, util::thread_cpu};
use memfabric_tests::{Workload, ksm_stat, wait_for};

use crate::LIVE_BYTES;

/// One measured pass.
struct Pass {
    gib: usize,
    skip: bool,
    cold: bool,
    cpu_s: f64,
    bytes_read: u64,
    skipped: u64,
    /// Calm pages not read (sampled out).
    kept: u64,
}

/// Per size: the figures that do not vary by pass.
struct Size {
    gib: usize,
    merged_pages: u64,
    /// Scanner state after a pass (bytes allocated and held), without and with skipping.
    state_bytes: [u64; 2],
    /// Potential savings each scanner reported (MiB), and the merged pages each counted.
    savings_mib: [f64; 2],
    merged_counted: [u64; 2],
    known_frames: usize,
    mismatched: u64,
    /// CPU of one report over every holder (the skipping scanner's, median of three).
    report_cpu_s: f64,
    /// CPU of a new VM's first sampled pass: one holder (a quarter of the RAM), cold.
    sampled_cpu_s: f64,
}

pub(crate) fn run(
    out: &Path,
    sizes: &[usize],
    rounds: usize,
    window: Duration,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?.with_file_name("memfabric-workload");
    let exe = exe.to_str().context("workload path")?.to_owned();
    let agent = std::env::current_exe()?.with_file_name("memfabric");
    let agent = agent.to_str().context("agent path")?.to_owned();
    anyhow::ensure!(
        window.is_zero() || Path::new(&agent).exists(),
        "{agent} is missing: `cargo xtask bench scale` builds it"
    );
    let mut passes = Vec::new();
    let mut figures = Vec::new();
    let mut daemon = Vec::new();
    for &gib in sizes {
        let mut ksm = memfabric_tests::ksm_bench()?;
        let (mut holders, churn_regions) = hold(&exe, gib)?;
        let shared_pages = (gib << 18) / 2 / 4;
        // Three of each four copies of the shared half become sharers of a KSM page.
        let want = (shared_pages * 4 * 9 / 10) as i64;
        let merged = || -> i64 {
            holders
                .iter()
                .map(|w| ksm_stat(w.pid, "ksm_merging_pages"))
                .sum()
        };
        let t = std::time::Instant::now();
        anyhow::ensure!(
            wait_for(Duration::from_secs(900), || merged() >= want),
            "KSM merged {} of {want} pages in 15 minutes",
            merged()
        );
        eprintln!(
            "{gib} GiB: {} pages merged in {:.0} s",
            merged(),
            t.elapsed().as_secs_f64()
        );
        // Steady state: KSM at its default pace, as a host runs it.
        ksm.set(Knob::PagesToScan, "100")?;
        ksm.set(Knob::SleepMillisecs, "20")?;
        let pids: Vec<u32> = holders.iter().map(|w| w.pid).collect();
        let mut scanners = Vec::new();
        let mut state_bytes = [0; 2];
        for (i, skip) in [false, true].into_iter().enumerate() {
            let before = LIVE_BYTES.load(std::sync::atomic::Ordering::Relaxed);
            let mut s = Scanner::new(2);
            s.set_skip_known(skip);
            passes.push(measure(&mut s, &pids, gib, skip, true)?);
            state_bytes[i] =
                (LIVE_BYTES.load(std::sync::atomic::Ordering::Relaxed) - before) as u64;
            scanners.push(s);
        }
        // Until unchanged memory is calm (the skipping scanner samples it).
        for _ in 0..=memfabric::scan::page_state::CALM_AFTER {
            scanners[1].pass(&pids)?;
        }
        for round in 0..rounds {
            for i in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
                let p = measure(&mut scanners[i], &pids, gib, i == 1, false)?;
                eprintln!(
                    "{gib} GiB round {round} {}: {:.3} s CPU, {} MiB read, {} pages known, {} \
                     calm pages sampled out",
                    if i == 1 { "skipping" } else { "reading all" },
                    p.cpu_s,
                    p.bytes_read >> 20,
                    p.skipped,
                    p.kept
                );
                passes.push(p);
            }
        }
        let reports: Vec<_> = scanners.iter().map(Scanner::report).collect();
        let (stats, frames) = scanners[1].known_stats();
        let mut report_cpu: Vec<f64> = (0..3)
            .map(|_| {
                let cpu0 = thread_cpu();
                drop(scanners[1].report());
                thread_cpu() - cpu0
            })
            .collect();
        let sampled_cpu_s = {
            let mut s = Scanner::new(2);
            let cpu0 = thread_cpu();
            s.pass_sampled(&pids[..1], memfabric::scan::schedule::SAMPLE_ONE_IN)?;
            thread_cpu() - cpu0
        };
        eprintln!(
            "{gib} GiB: report {:.3} s CPU, a cold sampled pass over one holder {sampled_cpu_s:.3} s",
            xtask::report::median(&mut report_cpu)
        );
        figures.push(Size {
            gib,
            merged_pages: merged() as u64,
            state_bytes,
            savings_mib: [0, 1]
                .map(|i| reports[i].total.potential_savings_bytes as f64 / 1048576.0),
            merged_counted: [0, 1].map(|i| reports[i].total.merged_pages),
            known_frames: frames,
            mismatched: stats.mismatched,
            report_cpu_s: xtask::report::median(&mut report_cpu),
            sampled_cpu_s,
        });
        drop(scanners);
        if !window.is_zero() {
            let f =
                crate::scale_daemon::run(&agent, &exe, &mut holders, &churn_regions, window, gib)?;
            daemon.push((gib, f));
        }
        drop(holders);
        drop(ksm);
    }
    report(out, rounds, &passes, &figures, &daemon)
}

/// Four holders of `gib` GiB in all: half shared content, 40 % unique, 10 % unique and
/// rewritten every second; all mergeable. Each also holds 16 MiB more of the shared
/// content, merged too, for the daemon's churn test (its region names are returned).
fn hold(exe: &str, gib: usize) -> anyhow::Result<(Vec<Workload>, Vec<String>)> {
    let pages = (gib << 18) / 4;
    let mut out = Vec::new();
    let mut churn = Vec::new();
    for _ in 0..4 {
        let mut w = Workload::spawn(exe);
        for (share, fill) in [(50, "ids 1"), (40, "unique"), (10, "unique")] {
            let region = w.cmd(&format!("alloc {} {fill}", pages * share / 100));
            w.cmd(&format!("mergeable {region}"));
            if share == 10 {
                w.cmd(&format!("flip {region} 1000"));
            }
        }
        let region = w.cmd("alloc 4096 ids 1");
        w.cmd(&format!("mergeable {region}"));
        churn.push(region);
        out.push(w);
    }
    Ok((out, churn))
}

/// One unpaced pass over `pids`, its CPU and reads.
fn measure(
    s: &mut Scanner,
    pids: &[u32],
    gib: usize,
    skip: bool,
    cold: bool,
) -> anyhow::Result<Pass> {
    let (bytes0, k0) = (s.bytes_read(), s.known_stats().0);
    let cpu0 = thread_cpu();
    s.pass(pids)?;
    Ok(Pass {
        gib,
        skip,
        cold,
        cpu_s: thread_cpu() - cpu0,
        bytes_read: s.bytes_read() - bytes0,
        skipped: s.known_stats().0.skipped - k0.skipped,
        kept: s.known_stats().0.kept - k0.kept,
    })
}

fn report(
    out: &Path,
    rounds: usize,
    passes: &[Pass],
    sizes: &[Size],
    daemon: &[(usize, crate::scale_daemon::DaemonFigures)],
) -> anyhow::Result<()> {
    let dir = xtask::report::dir(out, "scale")?;
    let mut csv = String::from("gib,skip_known,cold,cpu_s,bytes_read,pages_known,pages_kept\n");
    for p in passes {
        writeln!(
            csv,
            "{},{},{},{:.4},{},{},{}",
            p.gib, p.skip, p.cold, p.cpu_s, p.bytes_read, p.skipped, p.kept
        )?;
    }
    fs::write(dir.join("passes.csv"), csv)?;
    let med = |gib: usize, skip: bool, f: fn(&Pass) -> f64| {
        let mut v: Vec<f64> = passes
            .iter()
            .filter(|p| p.gib == gib && p.skip == skip && !p.cold)
            .map(f)
            .collect();
        xtask::report::median(&mut v)
    };
    let mut md = format!(
        "# bench scale\n\nFour holders per size: 50 % content all four hold (merged by KSM), \
         40 % unique, 10 % unique and rewritten every second. One pass = all four holders, \
         unpaced. The skipping scanner skips the zero page and known KSM frames, and reads \
         calm memory (unchanged since the last pass) one page in eight. Steady passes: \
         medians of {rounds} interleaved rounds after a cold first pass each. CPU is the scan thread's.\n\n\
         | guest RAM | reads all: CPU s/pass | skips known: CPU s/pass | ratio | reads all: \
         MiB read/pass | skips known: MiB read/pass | CPU ms per GiB per pass (all / skip) \
         |\n|---|---|---|---|---|---|---|\n"
    );
    for s in sizes {
        let (a, b) = (
            med(s.gib, false, |p| p.cpu_s),
            med(s.gib, true, |p| p.cpu_s),
        );
        writeln!(
            md,
            "| {} GiB | {a:.3} | {b:.3} | {:.2} | {:.0} | {:.0} | {:.1} / {:.1} |",
            s.gib,
            b / a,
            med(s.gib, false, |p| p.bytes_read as f64) / 1048576.0,
            med(s.gib, true, |p| p.bytes_read as f64) / 1048576.0,
            a * 1e3 / s.gib as f64,
            b * 1e3 / s.gib as f64,
        )?;
    }
    writeln!(
        md,
        "\n| guest RAM | pages merged (KSM) | merged pages counted (all / skip) | potential \
         savings MiB (all / skip) | scanner state MiB (all / skip) | state bytes per GiB of \
         guest RAM (skip) | KSM frames remembered | checks that differed | report CPU s \
         (skip) | a new VM's sampled pass, CPU s |\n\
         |---|---|---|---|---|---|---|---|---|---|"
    )?;
    for s in sizes {
        writeln!(
            md,
            "| {} GiB | {} | {} / {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.0} | {} | {} | {:.3} | \
             {:.3} |",
            s.gib,
            s.merged_pages,
            s.merged_counted[0],
            s.merged_counted[1],
            s.savings_mib[0],
            s.savings_mib[1],
            s.state_bytes[0] as f64 / 1048576.0,
            s.state_bytes[1] as f64 / 1048576.0,
            s.state_bytes[1] as f64 / s.gib as f64,
            s.known_frames,
            s.mismatched,
            s.report_cpu_s,
            s.sampled_cpu_s
        )?;
    }
    daemon_table(&mut md, daemon)?;
    fs::write(dir.join("summary.md"), &md)?;
    println!("{md}\nreport: {}", dir.display());
    Ok(())
}

/// The daemon's figures per size, and their growth from the smallest size.
fn daemon_table(
    md: &mut String,
    daemon: &[(usize, crate::scale_daemon::DaemonFigures)],
) -> anyhow::Result<()> {
    if daemon.is_empty() {
        return Ok(());
    }
    let secs = |v: Option<f64>| v.map_or("not in time".to_owned(), |s| format!("{s:.0} s"));
    writeln!(
        md,
        "\n## The daemon (`memfabric run --scan-cpu 5`, observing)\n\n\
         Steady windows of equal length, one daemon after the other on the same holders: \
         never resting (`--scan-quiet-cpu 5`, the budget always spent) and resting (the \
         default, {quiet}). A quiet VM is read about every `its pass's CPU x VMs / {quiet} %`: \
         when that is longer than the window, the resting figure is the daemon's refresh \
         and rechecks alone and the quiet passes' share comes on top, at most {quiet} % of a \
         core ({per_hour:.1} s/h) at any size. Then, with \
         the resting daemon: a merged 16 MiB range of one holder \
         starts being rewritten every second (time to its volatile verdict), and a new \
         4 GiB VM arrives (half content the others hold; from its start, time to its first \
         verdict and to 90 % of its ranges classed after a full pass). Prediction: the daemon's KSM pages \
         against KSM's (sharing + zero pages), all VMs scanned.\n\n\
         | guest RAM | agent CPU s/h resting | never resting | ratio | a quiet VM read every \
         | MiB read/h resting / never | agent RSS MiB resting, peak (peak % of guest RAM) | new 4 GiB VM: first / final verdict | \
         churn to verdict | prediction vs KSM |\n|---|---|---|---|---|---|---|---|---|---|",
        quiet = 5.0 / memfabric::config::QUIET_SHARE,
        per_hour = 36.0 * 5.0 / memfabric::config::QUIET_SHARE,
    )?;
    for (gib, f) in daemon {
        let guest_mib = (*gib as f64) * 1024.0;
        writeln!(
            md,
            "| {gib} GiB | {:.0} | {:.0} | {:.2} | {:.0} s | {:.0} / {:.0} | {:.1}, {:.1} ({:.2} %) | {} / {} \
             (filled in {:.0} s) | {} | {} vs {} pages ({:+.1} %) |",
            f.cpu_per_hour[0],
            f.cpu_per_hour[1],
            f.cpu_per_hour[0] / f.cpu_per_hour[1].max(1e-9),
            f.quiet_interval_s,
            f.read_per_hour[0] / 1048576.0,
            f.read_per_hour[1] / 1048576.0,
            f.rss_mib[0],
            f.rss_peak_mib[0],
            100.0 * f.rss_peak_mib[0] / guest_mib,
            secs(f.first_rank_s),
            secs(f.final_rank_s),
            f.filled_s,
            secs(f.churn_verdict_s),
            f.predicted_pages,
            f.ksm_pages,
            100.0 * (f.predicted_pages as f64 - f.ksm_pages as f64) / (f.ksm_pages.max(1) as f64),
        )?;
    }
    if let (Some((g0, a)), Some((g1, b))) = (daemon.first(), daemon.last()) {
        writeln!(
            md,
            "\nResting agent CPU per hour from {g0} GiB to {g1} GiB: x{:.2} (goal: at most x2).",
            b.cpu_per_hour[0] / a.cpu_per_hour[0].max(1e-9)
        )?;
    }
    Ok(())
}
