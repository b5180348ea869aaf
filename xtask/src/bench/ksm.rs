//! `cargo xtask bench ksm`: KSM policies against real lab guests. For each policy the lab
//! is booted afresh (same image, same profile), KSM runs under the policy for a fixed
//! time, and the host is sampled every second. Everything KSM-related is restored after
//! each policy.

use std::{
    fmt::Write as _,
    fs,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::ValueEnum;
use xtask::{
    ksm::{self, KsmSession},
    lab::{self, Profile, UpOptions, scenario::Scenario},
};

use xtask::plot::{self, Series};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Policy {
    /// Kernel defaults: 100 pages every 20 ms.
    Stock,
    /// The kernel's scan-time advisor (advisor_mode=scan-time) steers pages_to_scan.
    Advisor,
}

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Policy::Stock => "stock",
            Policy::Advisor => "advisor",
        }
    }

    fn apply(self, ksm: &mut KsmSession) -> anyhow::Result<()> {
        match self {
            Policy::Stock => {
                ksm.set("pages_to_scan", "100")?;
                ksm.set("sleep_millisecs", "20")?;
                if ksm::read("advisor_mode").is_some() {
                    ksm.set("advisor_mode", "none")?;
                }
            }
            Policy::Advisor => {
                if ksm::read("advisor_mode").is_none() {
                    bail!(
                        "this kernel has no KSM advisor (/sys/kernel/mm/ksm/advisor_mode, Linux >= 6.7)"
                    );
                }
                ksm.set("sleep_millisecs", "20")?;
                ksm.set("advisor_mode", "scan-time")?;
            }
        }
        ksm.set("run", "1")
    }
}

/// One sample of the host.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    t: f64,
    pages_shared: u64,
    pages_sharing: u64,
    general_profit: i64,
    zero_pages: u64,
    pages_to_scan: u64,
    full_scans: u64,
    ksmd_cpu_s: f64,
    cow_ksm: u64,
}

fn ksmd_pid() -> Option<u32> {
    fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            (fs::read_to_string(e.path().join("comm")).ok()?.trim() == "ksmd").then_some(pid)
        })
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised comm: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) as f64 / hz
}

fn vmstat(key: &str) -> u64 {
    fs::read_to_string("/proc/vmstat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

fn sample(t: f64, ksmd: Option<u32>, cpu0: f64, cow0: u64, scans0: u64) -> Sample {
    Sample {
        t,
        pages_shared: ksm::read_u64("pages_shared"),
        pages_sharing: ksm::read_u64("pages_sharing"),
        general_profit: ksm::read_i64("general_profit"),
        zero_pages: ksm::read_u64("ksm_zero_pages"),
        pages_to_scan: ksm::read_u64("pages_to_scan"),
        full_scans: ksm::read_u64("full_scans") - scans0,
        ksmd_cpu_s: ksmd.map_or(0.0, cpu_seconds) - cpu0,
        cow_ksm: vmstat("cow_ksm") - cow0,
    }
}

fn progress(policy: Policy, s: &Sample) {
    if (s.t.round() as u64).is_multiple_of(15) {
        eprintln!(
            "bench: {} t={:>4.0}s pages_sharing={} pages_to_scan={} ksmd_cpu={:.1}s cow_ksm=+{}",
            policy.name(),
            s.t,
            s.pages_sharing,
            s.pages_to_scan,
            s.ksmd_cpu_s,
            s.cow_ksm
        );
    }
}

/// What the guests run: one profile for all, or a scenario.
pub enum Load {
    Profile {
        profile: Profile,
        guests: u32,
        seconds: u64,
    },
    Scenario(Scenario),
}

impl Load {
    fn name(&self) -> String {
        match self {
            Load::Profile { profile, .. } => profile.name().to_owned(),
            Load::Scenario(s) => s.name.clone(),
        }
    }

    fn title(&self) -> String {
        match self {
            Load::Profile {
                profile,
                guests,
                seconds,
            } => format!(
                "# bench ksm: profile {}, {guests} guests, {seconds} s per policy\n\n",
                profile.name()
            ),
            Load::Scenario(s) => format!(
                "# bench ksm: scenario {}, {} s per policy\n\nEvents: {}\n\n",
                s.name,
                s.duration_s,
                s.event_times()
                    .iter()
                    .map(|(t, e)| format!("t={t}s {e}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        }
    }
}

/// Baselines taken while KSM is still off, so the figures count only the policy's work.
struct Baseline {
    ksmd: Option<u32>,
    cpu0: f64,
    cow0: u64,
    scans0: u64,
}

impl Baseline {
    fn take() -> Baseline {
        let ksmd = ksmd_pid();
        if ksmd.is_none() {
            eprintln!("bench: ksmd not found; its CPU is not measured");
        }
        Baseline {
            ksmd,
            cpu0: ksmd.map_or(0.0, cpu_seconds),
            cow0: vmstat("cow_ksm"),
            scans0: ksm::read_u64("full_scans"),
        }
    }

    fn sample(&self, t: f64) -> Sample {
        sample(t, self.ksmd, self.cpu0, self.cow0, self.scans0)
    }
}

/// Runs one policy on a fresh lab; returns its samples. The lab goes down and KSM back to
/// what it was, also on error.
fn run_policy(policy: Policy, load: &Load) -> anyhow::Result<Vec<Sample>> {
    let mut ksm = KsmSession::begin()?;
    ksm.set("run", "0")?;
    let result = match load {
        Load::Profile {
            profile,
            guests,
            seconds,
        } => run_profile(policy, &mut ksm, *profile, *guests, *seconds),
        Load::Scenario(s) => run_scenario(policy, &mut ksm, s),
    };
    let down = lab::down();
    let restore = ksm.restore();
    let samples = result?;
    down?;
    restore?;
    Ok(samples)
}

fn run_profile(
    policy: Policy,
    ksm: &mut KsmSession,
    profile: Profile,
    guests: u32,
    seconds: u64,
) -> anyhow::Result<Vec<Sample>> {
    lab::up(&UpOptions {
        guests,
        profile,
        ..UpOptions::default()
    })?;
    let base = Baseline::take();
    policy.apply(ksm)?;
    let t0 = Instant::now();
    let mut samples = Vec::new();
    for i in 1..=seconds {
        std::thread::sleep((t0 + Duration::from_secs(i)).saturating_duration_since(Instant::now()));
        let s = base.sample(t0.elapsed().as_secs_f64());
        progress(policy, &s);
        samples.push(s);
    }
    Ok(samples)
}

fn run_scenario(
    policy: Policy,
    ksm: &mut KsmSession,
    scenario: &Scenario,
) -> anyhow::Result<Vec<Sample>> {
    let images = lab::Images::prepare(&[], false)?;
    let base = Baseline::take();
    let mut samples = Vec::new();
    scenario.play(
        &images,
        || policy.apply(ksm),
        |t| {
            let s = base.sample(t as f64);
            progress(policy, &s);
            samples.push(s);
            Ok(())
        },
    )?;
    Ok(samples)
}

/// Seconds from `from` until pages_sharing first reached 90 % of its value at the end of
/// `samples` ("never" if it ended at 0).
fn time_to_90(samples: &[&Sample], from: f64) -> String {
    let Some(last) = samples.last().map(|s| s.pages_sharing).filter(|n| *n > 0) else {
        return "never".into();
    };
    samples
        .iter()
        .find(|s| s.pages_sharing * 10 >= last * 9)
        .map_or("never".into(), |s| format!("{:.0}", s.t - from))
}

const MIB: f64 = 1024.0 * 1024.0;

fn mib(pages: u64) -> f64 {
    pages as f64 * 4096.0 / MIB
}

pub fn run(load: &Load, policies: &[Policy], out: &Path) -> anyhow::Result<()> {
    // The benchmark's own lab state: a developer's running lab is left alone.
    let state = xtask::cmd::root().join("target/lab-bench");
    // SAFETY: single-threaded at this point; nothing else reads the environment.
    unsafe { std::env::set_var("MEMFABRIC_LAB_STATE", &state) };
    let dir = xtask::report::dir(out, &format!("ksm-{}", load.name()))?;
    let mut runs = Vec::new();
    for &policy in policies {
        eprintln!(
            "bench: policy {} on a fresh lab running {}",
            policy.name(),
            load.name()
        );
        let samples =
            run_policy(policy, load).with_context(|| format!("policy {}", policy.name()))?;
        let mut csv = String::from(
            "t_s,pages_shared,pages_sharing,general_profit_bytes,ksm_zero_pages,pages_to_scan,full_scans,ksmd_cpu_s,cow_ksm\n",
        );
        for s in &samples {
            writeln!(
                csv,
                "{:.1},{},{},{},{},{},{},{:.2},{}",
                s.t,
                s.pages_shared,
                s.pages_sharing,
                s.general_profit,
                s.zero_pages,
                s.pages_to_scan,
                s.full_scans,
                s.ksmd_cpu_s,
                s.cow_ksm
            )?;
        }
        fs::write(dir.join(format!("samples-{}.csv", policy.name())), csv)?;
        runs.push((policy, samples));
    }

    let mut md = load.title();
    md.push_str(
        "| policy | saved MiB (pages_sharing) | general_profit MiB | time to 90 % of final (s) \
         | ksmd CPU s | ksmd CPU % of a core | COW breaks (cow_ksm) | full scans |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for (policy, samples) in &runs {
        let last = samples.last().copied().unwrap_or_default();
        let all: Vec<&Sample> = samples.iter().collect();
        writeln!(
            md,
            "| {} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {} | {} |",
            policy.name(),
            mib(last.pages_sharing),
            last.general_profit as f64 / MIB,
            time_to_90(&all, 0.0),
            last.ksmd_cpu_s,
            100.0 * last.ksmd_cpu_s / last.t.max(1.0),
            last.cow_ksm,
            last.full_scans
        )?;
    }
    if let Load::Scenario(sc) = load {
        md.push_str(&phases(sc, &runs)?);
    }
    let series = |f: fn(&Sample) -> f64| -> Vec<Series> {
        runs.iter()
            .map(|(p, s)| Series {
                name: p.name().into(),
                points: s.iter().map(|x| (x.t, f(x))).collect(),
            })
            .collect()
    };
    plot::lines(
        &dir.join("saved.png"),
        &format!("KSM savings, {}", load.name()),
        "seconds",
        "MiB saved (pages_sharing)",
        &series(|s| mib(s.pages_sharing)),
    )?;
    plot::lines(
        &dir.join("ksmd-cpu.png"),
        "ksmd CPU",
        "seconds",
        "CPU seconds (cumulative)",
        &series(|s| s.ksmd_cpu_s),
    )?;
    plot::lines(
        &dir.join("cow.png"),
        "KSM COW breaks (cow_ksm)",
        "seconds",
        "breaks (cumulative)",
        &series(|s| s.cow_ksm as f64),
    )?;
    md.push_str("\nPlots: saved.png, ksmd-cpu.png, cow.png. Samples: samples-POLICY.csv (1 s).\n");
    fs::write(dir.join("summary.md"), &md)?;
    println!("{md}");
    println!("report: {}", dir.display());
    Ok(())
}

/// Per scenario phase (between two events): savings at the phase's end, seconds from the
/// phase's start to 90 % of that, ksmd CPU and COW breaks within the phase.
fn phases(sc: &Scenario, runs: &[(Policy, Vec<Sample>)]) -> anyhow::Result<String> {
    let mut bounds = sc.event_times();
    bounds.push((sc.duration_s, "end".into()));
    let mut md = String::from(
        "\n## Phases\n\n| phase | policy | saved MiB at end | time to 90 % (s) | ksmd CPU s | COW breaks |\n\
         |---|---|---|---|---|---|\n",
    );
    for w in bounds.windows(2) {
        let ((from, what), (to, _)) = (&w[0], &w[1]);
        if to <= from {
            continue;
        }
        for (policy, samples) in runs {
            let inside: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.t > *from as f64 && s.t <= *to as f64)
                .collect();
            let Some(last) = inside.last() else {
                continue;
            };
            let before = samples
                .iter()
                .rfind(|s| s.t <= *from as f64)
                .copied()
                .unwrap_or_default();
            writeln!(
                md,
                "| {from}-{to} s ({what}) | {} | {:.1} | {} | {:.1} | {} |",
                policy.name(),
                mib(last.pages_sharing),
                time_to_90(&inside, *from as f64),
                last.ksmd_cpu_s - before.ksmd_cpu_s,
                last.cow_ksm - before.cow_ksm,
            )?;
        }
    }
    Ok(md)
}
