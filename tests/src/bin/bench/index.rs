//! `bench index`: what the destination pays before a migration can begin. It reads and
//! BLAKE3-hashes every page its VMs hold in RAM (the index its filter is built from) while
//! the source waits; on a large host that was the operator's longest wait. The same four
//! holders (half their pages one shared content, half unique) are indexed by one thread
//! and by the default number of threads, in alternating order round by round.

use std::{fmt::Write as _, fs, path::Path, time::Instant};

use anyhow::Context as _;
use memfabric::{
    addresses::GuestSpan,
    host::inventory::{Mergeability, RamMapping, Vm, VmKind},
    migrate::holdings::{Holdings, default_threads},
};
use memfabric_tests::Workload;

struct Sample {
    threads: usize,
    wall_s: f64,
    pages: usize,
    read_bytes: u64,
}

pub(crate) fn run(out: &Path, gib: usize, rounds: usize) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?.with_file_name("memfabric-workload");
    let exe = exe.to_str().context("workload path")?.to_owned();
    let pages = (gib << 18) / 4;
    let mut holders = Vec::new();
    let mut vms = Vec::new();
    for i in 0..4 {
        let mut w = Workload::spawn(&exe);
        let mut ram = Vec::new();
        for fill in ["ids 1", "unique"] {
            let region = w.cmd(&format!("alloc {} {fill}", pages / 2));
            let at = w.cmd(&format!("where {region}"));
            let (addr, n) = at.split_once(' ').context("`where` answer")?;
            let start = u64::from_str_radix(addr.trim_start_matches("0x"), 16)?;
            let n: u64 = n.trim().parse()?;
            ram.push(RamMapping {
                span: GuestSpan::new(start, start + n * 4096),
                backing: "anon".into(),
                mergeable: false,
            });
        }
        vms.push(Vm {
            pid: w.pid,
            kind: VmKind::Qemu,
            name: format!("holder-{i}"),
            uuid: None,
            guest_memory_bytes: (pages * 4096) as u64,
            ram,
            mergeability: Mergeability::Unknown,
            merge_off: false,
        });
        holders.push(w);
    }
    let many = default_threads();
    let mut samples = Vec::new();
    for round in 0..rounds {
        let order = if round % 2 == 0 { [1, many] } else { [many, 1] };
        for threads in order {
            let t = Instant::now();
            let h = Holdings::scan_with(&vms, None, threads);
            let wall_s = t.elapsed().as_secs_f64();
            eprintln!(
                "round {round}, {threads} thread(s): {wall_s:.2} s, {} distinct pages, {} MiB read",
                h.pages(),
                h.scanned_bytes >> 20
            );
            samples.push(Sample {
                threads,
                wall_s,
                pages: h.pages(),
                read_bytes: h.scanned_bytes,
            });
        }
    }
    drop(holders);
    report(out, gib, rounds, many, &samples)
}

fn report(
    out: &Path,
    gib: usize,
    rounds: usize,
    many: usize,
    samples: &[Sample],
) -> anyhow::Result<()> {
    let dir = xtask::report::dir(out, "index")?;
    let mut csv = String::from("threads,wall_s,pages,read_bytes\n");
    for s in samples {
        writeln!(
            csv,
            "{},{:.4},{},{}",
            s.threads, s.wall_s, s.pages, s.read_bytes
        )?;
    }
    fs::write(dir.join("samples.csv"), csv)?;
    let median = |threads: usize| {
        let mut v: Vec<f64> = samples
            .iter()
            .filter(|s| s.threads == threads)
            .map(|s| s.wall_s)
            .collect();
        xtask::report::median(&mut v)
    };
    let (one, all) = (median(1), median(many));
    let read = samples.first().map_or(0, |s| s.read_bytes) as f64;
    let pages = samples.first().map_or(0, |s| s.pages);
    let mut md = format!(
        "# bench index: {gib} GiB of holders (half one shared content), {rounds} rounds\n\n\
         | threads | wall s (median) | GB/s | distinct pages |\n|---|---|---|---|\n"
    );
    for (threads, wall) in [(1, one), (many, all)] {
        writeln!(
            md,
            "| {threads} | {wall:.2} | {:.2} | {pages} |",
            read / wall / 1e9
        )?;
    }
    writeln!(
        md,
        "\n{many} threads take {:.0} % of one thread's time.",
        100.0 * all / one
    )?;
    fs::write(dir.join("summary.md"), &md)?;
    println!("{md}");
    println!("report: {}", dir.display());
    Ok(())
}
