//! `bench unmerge`: what taking 1 GiB of merged pages out of KSM costs the guest, done the
//! way memfabric does it (injected calls of at most 16 MiB, the target running between
//! them) and in one call over the whole range (what an unbounded injection did, or the
//! process's own madvise), interleaved round by round. The guest's real stall is not the
//! main thread's stop time: a thread of the target faults a page of the same mapping again
//! and again (MADV_DONTNEED, then a write: the mmap lock a vCPU's fault takes), and the
//! longest wait of one fault is recorded.

use std::{fmt::Write as _, fs, path::Path, time::Duration};

use anyhow::Context as _;
use memfabric::actuate::inject::{self, Advice};
use memfabric_tests::{Workload, ksm_kb};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    Bounded,
    OneCall,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Bounded => "memfabric (16 MiB calls)",
            Way::OneCall => "one call",
        }
    }
}

struct Sample {
    way: Way,
    merged_mib: u64,
    wall_ms: f64,
    /// The longest single fault of the watcher thread during the unmerge.
    stall_ms: f64,
    /// The same, measured for as long before it, with nothing going on.
    idle_stall_ms: f64,
    /// Main thread stopped (bounded only), longest single stop.
    longest_stop_ms: f64,
}

pub(crate) fn run(out: &Path, mib: usize, rounds: usize) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?.with_file_name("memfabric-workload");
    let exe = exe.to_str().context("workload path")?.to_owned();
    let ksm = memfabric_tests::ksm_bench()?;
    let mut samples = Vec::new();
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Way::Bounded, Way::OneCall]
        } else {
            [Way::OneCall, Way::Bounded]
        };
        for way in order {
            let s = one(&exe, mib * 256, way)?;
            eprintln!(
                "round {round} {:<26} {} MiB merged: {:7.1} ms wall, longest fault {:6.1} ms \
                 (idle {:.1} ms), main thread stopped at most {:6.1} ms",
                way.name(),
                s.merged_mib,
                s.wall_ms,
                s.stall_ms,
                s.idle_stall_ms,
                s.longest_stop_ms
            );
            samples.push(s);
        }
    }
    drop(ksm);
    report(out, mib, rounds, &samples)
}

/// One unmerge of a fresh merged region, `way`.
fn one(exe: &str, pages: usize, way: Way) -> anyhow::Result<Sample> {
    let mut w = Workload::spawn(exe);
    let region = w.alloc_mergeable(pages as i64);
    let (start, end) = w.span(&region);
    w.await_merged(pages as i64 * 9 / 10, "the bench region");
    let merged_kb = ksm_kb(w.pid);
    w.cmd(&format!("stallwatch {region}"));
    w.cmd("stall");
    std::thread::sleep(Duration::from_millis(300));
    let idle_us: f64 = w.cmd("stall").parse()?;
    let t = std::time::Instant::now();
    let longest_stop = match way {
        Way::Bounded => {
            inject::madvise(
                w.pid,
                start,
                end,
                Advice::Unmergeable,
                Duration::from_secs(2),
            )?
            .longest_stop
        }
        Way::OneCall => {
            w.cmd(&format!("unmergeable {region}"));
            t.elapsed()
        }
    };
    let wall = t.elapsed();
    // The watcher records a fault when it returns: let the last one that waited finish.
    std::thread::sleep(Duration::from_millis(100));
    let stall_us: f64 = w.cmd("stall").parse()?;
    anyhow::ensure!(ksm_kb(w.pid) == 0, "KSM pages left after the unmerge");
    w.exit();
    Ok(Sample {
        way,
        merged_mib: merged_kb >> 10,
        wall_ms: wall.as_secs_f64() * 1e3,
        stall_ms: stall_us / 1e3,
        idle_stall_ms: idle_us / 1e3,
        longest_stop_ms: longest_stop.as_secs_f64() * 1e3,
    })
}

fn report(out: &Path, mib: usize, rounds: usize, samples: &[Sample]) -> anyhow::Result<()> {
    let dir = xtask::report::dir(out, "unmerge")?;
    let mut csv =
        String::from("way,merged_mib,wall_ms,longest_fault_ms,idle_fault_ms,longest_stop_ms\n");
    for s in samples {
        writeln!(
            csv,
            "{},{},{:.2},{:.2},{:.2},{:.2}",
            s.way.name(),
            s.merged_mib,
            s.wall_ms,
            s.stall_ms,
            s.idle_stall_ms,
            s.longest_stop_ms
        )?;
    }
    fs::write(dir.join("samples.csv"), csv)?;
    let med = |way: Way, f: fn(&Sample) -> f64| {
        let mut v: Vec<f64> = samples.iter().filter(|s| s.way == way).map(f).collect();
        xtask::report::median(&mut v)
    };
    let mut md = format!(
        "# bench unmerge\n\n{rounds} interleaved rounds; each takes a {mib} MiB region that KSM \
         merged out of KSM again. Medians.\n\n\
         | way | wall ms | longest fault in the range, ms | idle longest fault, ms | main \
         thread's longest stop, ms |\n|---|---|---|---|---|\n"
    );
    for way in [Way::Bounded, Way::OneCall] {
        writeln!(
            md,
            "| {} | {:.1} | {:.1} | {:.2} | {:.1} |",
            way.name(),
            med(way, |s| s.wall_ms),
            med(way, |s| s.stall_ms),
            med(way, |s| s.idle_stall_ms),
            med(way, |s| s.longest_stop_ms)
        )?;
    }
    let ratio = med(Way::Bounded, |s| s.stall_ms) / med(Way::OneCall, |s| s.stall_ms);
    writeln!(
        md,
        "\nThe guest's longest stall with memfabric's bounded calls is {:.1} % of one call's.",
        ratio * 100.0
    )?;
    fs::write(dir.join("summary.md"), &md)?;
    println!("{md}");
    println!("report: {}", dir.display());
    Ok(())
}
