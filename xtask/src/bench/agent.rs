//! `cargo xtask bench agent`: what the daemon costs while it tracks lab guests. Boots the
//! lab with KSM on, runs `memfabric run` (release) on them, scrapes /metrics every 5 s as
//! a Prometheus would, and samples the daemon's CPU and RSS every second. Goal: at most
//! 1 % of a core and 64 MiB RSS (medians).

use memfabric::actuate::knobs::Knob;
use std::{
    fmt::Write as _,
    fs,
    net::TcpListener,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::get;
use xtask::{
    ksm::KsmSession,
    lab::{self, UpOptions},
    plot::{self, Series},
    report::median,
};

/// utime + stime (s) and RSS (KiB) of a process.
fn usage(pid: u32) -> Option<(f64, u64)> {
    let cpu = memfabric::host::ksm::cpu_seconds(pid)?;
    let rss = lab::proc_field(pid, "status", "VmRSS:")?;
    Some((cpu, rss))
}

type Rows = Vec<(f64, f64, f64)>;

/// Runs `memfabric run --scan-cpu SCAN` on the lab and samples its CPU and RSS every second.
fn measure(agent: &Path, started: &[lab::Guest], seconds: u64, scan: &str) -> anyhow::Result<Rows> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut daemon = Command::new(agent)
        .args([
            "run",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--scan-cpu",
            scan,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting memfabric run")?;
    let pid = daemon.id();
    let measured = (|| {
        let t0 = Instant::now();
        // Wait until it serves, then measure from a clean baseline.
        let text = loop {
            if let Some(body) = get(port, "/metrics") {
                break body;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("the daemon did not serve /metrics within 30 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        for g in started {
            if !text.contains(&format!("vm=\"{}\"", g.name)) {
                bail!("/metrics does not show {}", g.name);
            }
        }
        let (mut cpu_prev, _) = usage(pid).context("daemon gone")?;
        let start = Instant::now();
        let mut rows = Vec::new();
        for i in 1..=seconds {
            std::thread::sleep(
                (start + Duration::from_secs(i)).saturating_duration_since(Instant::now()),
            );
            if i % 5 == 0 {
                get(port, "/metrics").context("scrape failed")?;
            }
            let (cpu, rss) = usage(pid).context("daemon exited during the benchmark")?;
            rows.push((i as f64, 100.0 * (cpu - cpu_prev), rss as f64 / 1024.0));
            cpu_prev = cpu;
        }
        Ok(rows)
    })();
    // SAFETY: our own child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let status = daemon.wait()?;
    let rows = measured?;
    if !status.success() {
        bail!("memfabric run exited with {status} on SIGTERM");
    }
    Ok(rows)
}

/// The daemon without its page scanner (the always-on cost) and with the default 5 %
/// scan budget (is the budget held?), one after the other on the same guests.
const CONFIGS: [(&str, &str); 2] = [("scan off", "0"), ("scan budget 5 %", "5")];

pub(super) fn run(agent: &Path, guests: u32, seconds: u64, out: &Path) -> anyhow::Result<()> {
    let state = xtask::cmd::root().join("target/lab-bench");
    // SAFETY: single-threaded here; nothing else reads the environment.
    unsafe { std::env::set_var("MEMFABRIC_LAB_STATE", &state) };
    let mut ksm = KsmSession::begin()?;
    let result = (|| {
        let started = lab::up(&UpOptions {
            guests,
            ..UpOptions::default()
        })?;
        ksm.set(Knob::PagesToScan, "1000")?;
        ksm.set(Knob::Run, "1")?;
        CONFIGS
            .iter()
            .map(|(_, scan)| measure(agent, &started, seconds, scan))
            .collect::<anyhow::Result<Vec<Rows>>>()
    })();
    let down = lab::down();
    let restore = ksm.restore();
    let runs = result?;
    down?;
    restore?;

    let dir = xtask::report::dir(out, "agent")?;
    let mut csv = String::from("config,t_s,cpu_percent_of_core,rss_mib\n");
    let mut md = format!(
        "# bench agent: memfabric run tracking {guests} lab guests, {seconds} s per config, /metrics scraped every 5 s\n\n\
         | config | CPU mean (% of a core) | CPU median of 1 s samples | RSS median (MiB) | RSS max (MiB) |\n\
         |---|---|---|---|---|\n"
    );
    let mut series = Vec::new();
    for ((name, _), rows) in CONFIGS.iter().zip(&runs) {
        for (t, c, r) in rows {
            writeln!(csv, "{name},{t:.0},{c:.2},{r:.1}")?;
        }
        let cpu_mean = rows.iter().map(|r| r.1).sum::<f64>() / rows.len().max(1) as f64;
        writeln!(
            md,
            "| {name} | {cpu_mean:.2} | {:.2} | {:.1} | {:.1} |",
            median(&mut rows.iter().map(|r| r.1).collect::<Vec<_>>()),
            median(&mut rows.iter().map(|r| r.2).collect::<Vec<_>>()),
            rows.iter().map(|r| r.2).fold(0.0, f64::max)
        )?;
        series.push(Series {
            name: format!("CPU %, {name}"),
            points: rows.iter().map(|r| (r.0, r.1)).collect(),
        });
    }
    md.push_str("\nGoals: scan off <= 1 % of a core and <= 64 MiB RSS; with the scan, CPU within its budget plus the scan-off cost.\nPlot: cpu.png. Samples: samples.csv (CPU from utime+stime, 10 ms ticks).\n");
    fs::write(dir.join("samples.csv"), csv)?;
    plot::lines(
        &dir.join("cpu.png"),
        "memfabric run: CPU",
        "seconds",
        "CPU % of a core",
        &series,
    )?;
    fs::write(dir.join("summary.md"), &md)?;
    println!("{md}");
    println!("report: {}", dir.display());
    Ok(())
}
