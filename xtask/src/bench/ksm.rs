//! `cargo xtask bench ksm`: KSM policies against real lab guests. For each policy the lab
//! is booted afresh (same image, same profile), KSM runs under the policy for a fixed
//! time, and the host is sampled every second. Everything KSM-related is restored after
//! each policy. The `memfabric` policy is the release daemon steering ksmd
//! (`memfabric run --act ksmd`); its bill is ksmd's CPU plus the daemon's own (every
//! thread), so every policy gets an agent CPU and a total CPU column.

use memfabric::actuate::knobs::Knob;
use std::{
    fmt::Write as _,
    fs,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::ValueEnum;
use memfabric::host::ksm as ksm_host;
use xtask::{
    ksm::{self, KsmSession},
    lab::{self, Profile, UpOptions, scenario::Scenario},
};

use xtask::plot::{self, Series};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Policy {
    /// Kernel defaults: 100 pages every 20 ms.
    Stock,
    /// The kernel's scan-time advisor (advisor_mode=scan-time) steers pages_to_scan.
    Advisor,
    /// `memfabric run --act ksmd` (release, scanner off) steers ksmd.
    Memfabric,
    /// `memfabric run --act ksmd,hints` (scanner at 5 %, every guest in one sharing
    /// domain): ksmd steered, and rewritten ranges taken out of KSM.
    #[value(name = "memfabric-hints")]
    MemfabricHints,
}

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Policy::Stock => "stock",
            Policy::Advisor => "advisor",
            Policy::Memfabric => "memfabric",
            Policy::MemfabricHints => "memfabric-hints",
        }
    }

    /// Sets KSM up for the policy; for `memfabric` starts the daemon that steers it.
    fn apply(self, ksm: &mut KsmSession, agent: Option<&Path>) -> anyhow::Result<Option<Daemon>> {
        match self {
            Policy::Stock => {
                ksm.set(Knob::PagesToScan, "100")?;
                ksm.set(Knob::SleepMillisecs, "20")?;
                if ksm::read("advisor_mode").is_some() {
                    ksm.set(Knob::AdvisorMode, "none")?;
                }
            }
            Policy::Advisor => {
                if ksm::read("advisor_mode").is_none() {
                    bail!(
                        "this kernel has no KSM advisor (/sys/kernel/mm/ksm/advisor_mode, Linux >= 6.7)"
                    );
                }
                ksm.set(Knob::SleepMillisecs, "20")?;
                ksm.set(Knob::AdvisorMode, "scan-time")?;
            }
            Policy::Memfabric | Policy::MemfabricHints => {
                // The daemon takes it from here (it turns ksmd on itself).
                let agent = agent.context("the memfabric policy needs the agent binary")?;
                return Daemon::start(agent, self == Policy::MemfabricHints).map(Some);
            }
        }
        ksm.set(Knob::Run, "1")?;
        Ok(None)
    }
}

/// The steering daemon of the `memfabric` policy: its own state directory (the bench's
/// session holds xtask's), stopped with SIGTERM, which must put ksmd's knobs back.
struct Daemon {
    child: std::process::Child,
    state: std::path::PathBuf,
    port: u16,
}

impl Daemon {
    fn start(agent: &Path, hints: bool) -> anyhow::Result<Daemon> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let state = xtask::cmd::root().join("target/lab-bench/memfabric-state");
        let log = fs::File::create(xtask::cmd::root().join("target/lab-bench/memfabric.log"))?;
        let cfg = xtask::cmd::root().join("target/lab-bench/hints.toml");
        // Every lab guest in one domain that shares: the hints may act on all of them.
        fs::write(
            &cfg,
            "[[domain]]\nname = \"lab\"\nmatch = \".*\"\nshare = true\n",
        )?;
        let child = std::process::Command::new(agent)
            .args(if hints {
                ["run", "--act", "ksmd,hints", "--scan-cpu", "5"]
            } else {
                ["run", "--act", "ksmd", "--scan-cpu", "0"]
            })
            .arg("--config")
            .arg(&cfg)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--state-dir")
            .arg(&state)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting memfabric run --act ksmd")?;
        Ok(Daemon { child, state, port })
    }

    /// The controller's own CPU seconds, from the daemon's /metrics.
    fn controller_cpu(&self) -> Option<f64> {
        super::get(self.port, "/metrics")?.lines().find_map(|l| {
            l.strip_prefix("memfabric_ksmd_controller_cpu_seconds_total ")?
                .trim()
                .parse()
                .ok()
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `vm=N` per VM: the mappings the hints added to its process (each isolated hint
    /// splits one), from the daemon's /metrics.
    fn mappings_added(&self) -> Option<String> {
        let text = super::get(self.port, "/metrics")?;
        let rows: Vec<String> = text
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("memfabric_hint_vm_mappings_added{")?;
                let vm = rest.split("vm=\"").nth(1)?.split('"').next()?;
                Some(format!("{vm}={}", rest.rsplit(' ').next()?))
            })
            .collect();
        (!rows.is_empty()).then(|| rows.join(" "))
    }

    /// SIGTERM, then checks that it exited cleanly and left no journal.
    fn stop(mut self) -> anyhow::Result<()> {
        // SAFETY: our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let status = self.child.wait()?;
        if !status.success() {
            bail!("memfabric run exited with {status} on SIGTERM");
        }
        if self.state.join("hints.json").exists() {
            bail!(
                "memfabric left a hints journal in {}: ranges not restored",
                self.state.display()
            );
        }
        if self.state.join("journal.json").exists() {
            bail!(
                "memfabric left a journal in {}: knobs not restored",
                self.state.display()
            );
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: our own child.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            let _ = self.child.wait();
        }
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
    /// The steering daemon's CPU (every thread); 0 for the kernel's own policies.
    agent_cpu_s: f64,
    cow_ksm: u64,
}

/// CPU seconds a process has used (0 once it is gone).
fn cpu_seconds(pid: u32) -> f64 {
    ksm_host::cpu_seconds(pid).unwrap_or(0.0)
}

fn vmstat(key: &str) -> u64 {
    ksm_host::vmstat(key).unwrap_or(0)
}

fn sample(
    t: f64,
    ksmd: Option<u32>,
    cpu0: f64,
    cow0: u64,
    scans0: u64,
    agent: Option<(u32, f64)>,
) -> Sample {
    Sample {
        agent_cpu_s: agent.map_or(0.0, |(pid, cpu0)| cpu_seconds(pid) - cpu0),
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
            "bench: {} t={:>4.0}s pages_sharing={} pages_to_scan={} ksmd_cpu={:.1}s agent_cpu={:.1}s cow_ksm=+{}",
            policy.name(),
            s.t,
            s.pages_sharing,
            s.pages_to_scan,
            s.ksmd_cpu_s,
            s.agent_cpu_s,
            s.cow_ksm
        );
    }
}

/// What the guests run: one profile for all, or a scenario.
pub(super) enum Load {
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
    /// The steering daemon and its CPU when it started.
    agent: Option<(u32, f64)>,
}

impl Baseline {
    fn take() -> Baseline {
        let ksmd = ksm_host::ksmd_pid();
        if ksmd.is_none() {
            eprintln!("bench: ksmd not found; its CPU is not measured");
        }
        Baseline {
            ksmd,
            cpu0: ksmd.map_or(0.0, cpu_seconds),
            cow0: vmstat("cow_ksm"),
            scans0: ksm::read_u64("full_scans"),
            agent: None,
        }
    }

    fn watch(&mut self, daemon: Option<&Daemon>) {
        self.agent = daemon.map(|d| (d.pid(), cpu_seconds(d.pid())));
    }

    fn sample(&self, t: f64) -> Sample {
        sample(t, self.ksmd, self.cpu0, self.cow0, self.scans0, self.agent)
    }
}

/// Runs one policy on a fresh lab; returns its samples. The lab goes down and KSM back to
/// what it was, also on error.
/// One policy's run: its samples and, for `memfabric`, the controller's own CPU seconds.
type Run = (Vec<Sample>, Option<f64>);

/// After Ctrl-C or SIGTERM ([`xtask::cmd::catch_interrupts`]): the run under way ends at
/// its next sample and is torn down as on an error (its daemon stopped, its guests
/// stopped, KSM's settings restored). A signal used to end xtask at once, and its `Drop`
/// teardown with it: the lab's guests and the daemon ran on, ksmd steered.
fn not_interrupted() -> anyhow::Result<()> {
    if xtask::cmd::interrupted() {
        bail!("interrupted; the lab is stopped and KSM's settings are restored");
    }
    Ok(())
}

fn run_policy(policy: Policy, load: &Load, agent: Option<&Path>) -> anyhow::Result<Run> {
    let mut ksm = KsmSession::begin()?;
    ksm.set(Knob::Run, "0")?;
    let mut daemon = None;
    let result = match load {
        Load::Profile {
            profile,
            guests,
            seconds,
        } => run_profile(
            policy,
            &mut ksm,
            &mut daemon,
            agent,
            *profile,
            *guests,
            *seconds,
        ),
        Load::Scenario(s) => run_scenario(policy, &mut ksm, &mut daemon, agent, s),
    };
    let controller = daemon.as_ref().and_then(Daemon::controller_cpu);
    if let Some(pieces) = daemon.as_ref().and_then(Daemon::mappings_added) {
        eprintln!("bench: memory mappings the hints added per VM: {pieces}");
    }
    let stopped = daemon.map_or(Ok(()), Daemon::stop);
    let result = result.and_then(|s| stopped.map(|()| (s, controller)));
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
    daemon: &mut Option<Daemon>,
    agent: Option<&Path>,
    profile: Profile,
    guests: u32,
    seconds: u64,
) -> anyhow::Result<Vec<Sample>> {
    lab::up(&UpOptions {
        guests,
        profile,
        ..UpOptions::default()
    })?;
    not_interrupted()?;
    let mut base = Baseline::take();
    *daemon = policy.apply(ksm, agent)?;
    base.watch(daemon.as_ref());
    let t0 = Instant::now();
    let mut samples = Vec::new();
    for i in 1..=seconds {
        std::thread::sleep((t0 + Duration::from_secs(i)).saturating_duration_since(Instant::now()));
        not_interrupted()?;
        let s = base.sample(t0.elapsed().as_secs_f64());
        progress(policy, &s);
        samples.push(s);
    }
    Ok(samples)
}

fn run_scenario(
    policy: Policy,
    ksm: &mut KsmSession,
    daemon: &mut Option<Daemon>,
    agent: Option<&Path>,
    scenario: &Scenario,
) -> anyhow::Result<Vec<Sample>> {
    let images = lab::Images::prepare(&[], false)?;
    let mut base = Baseline::take();
    let mut samples = Vec::new();
    let base_cell = std::cell::RefCell::new(&mut base);
    scenario.play(
        &images,
        || {
            not_interrupted()?;
            *daemon = policy.apply(ksm, agent)?;
            base_cell.borrow_mut().watch(daemon.as_ref());
            Ok(())
        },
        |t| {
            not_interrupted()?;
            let base = base_cell.borrow();
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

pub(super) fn run(
    load: &Load,
    policies: &[Policy],
    agent: Option<&Path>,
    out: &Path,
) -> anyhow::Result<()> {
    // The benchmark's own lab state: a developer's running lab is left alone.
    let state = xtask::cmd::root().join("target/lab-bench");
    // SAFETY: single-threaded at this point; nothing else reads the environment.
    unsafe { std::env::set_var("MEMFABRIC_LAB_STATE", &state) };
    let dir = xtask::report::dir(out, &format!("ksm-{}", load.name()))?;
    xtask::cmd::catch_interrupts()?;
    let mut runs = Vec::new();
    let mut controller_cpu = None;
    for &policy in policies {
        eprintln!(
            "bench: policy {} on a fresh lab running {}",
            policy.name(),
            load.name()
        );
        let (samples, controller) =
            run_policy(policy, load, agent).with_context(|| format!("policy {}", policy.name()))?;
        if let Some(c) = controller {
            controller_cpu = Some(c);
        }
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
         | ksmd CPU s | agent CPU s | total CPU s | total CPU % of a core | COW breaks (cow_ksm) | full scans |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (policy, samples) in &runs {
        let last = samples.last().copied().unwrap_or_default();
        let all: Vec<&Sample> = samples.iter().collect();
        let total = last.ksmd_cpu_s + last.agent_cpu_s;
        writeln!(
            md,
            "| {} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {} | {} |",
            policy.name(),
            mib(last.pages_sharing),
            last.general_profit as f64 / MIB,
            time_to_90(&all, 0.0),
            last.ksmd_cpu_s,
            last.agent_cpu_s,
            total,
            100.0 * total / last.t.max(1.0),
            last.cow_ksm,
            last.full_scans
        )?;
    }
    let bounds = match load {
        Load::Scenario(sc) => {
            let mut b = sc.event_times();
            b.push((sc.duration_s, "end".into()));
            b
        }
        Load::Profile { seconds, .. } => vec![(0, "start".into()), (*seconds, "end".into())],
    };
    md.push_str(&phases(&bounds, &runs)?);
    md.push_str(&goals(&bounds, &runs));
    md.push_str(&hint_goals(&runs));
    md.push_str(&cpu_goals(&runs));
    if let Some(c) = controller_cpu {
        let secs = runs
            .iter()
            .find(|(p, _)| matches!(p, Policy::Memfabric | Policy::MemfabricHints))
            .and_then(|(_, s)| s.last())
            .map_or(1.0, |x| x.t.max(1.0));
        writeln!(
            md,
            "The ksmd controller itself (observe, decide, act; from the daemon's /metrics): \
             {c:.3} s, {:.3} % of a core (goal < 0.2 %: {}).",
            100.0 * c / secs,
            if 100.0 * c / secs < 0.2 {
                "met"
            } else {
                "NOT met"
            }
        )?;
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

/// (from, to, what started it, each policy's figures).
type PhaseRows = (u64, u64, String, Vec<(Policy, Phase)>);

/// One policy's figures over one phase.
struct Phase {
    saved_end: u64,
    t90: Option<f64>,
    ksmd_cpu: f64,
    agent_cpu: f64,
    cow: u64,
    starved_s: f64,
}

/// The phases between `bounds` with each policy's figures; "savings left" and "90 %" are
/// measured against the best policy's savings at the phase's end.
fn phase_figures(bounds: &[(u64, String)], runs: &[(Policy, Vec<Sample>)]) -> Vec<PhaseRows> {
    let mut out = Vec::new();
    for w in bounds.windows(2) {
        let ((from, what), (to, _)) = (&w[0], &w[1]);
        if to <= from {
            continue;
        }
        let inside = |s: &Vec<Sample>| -> Vec<Sample> {
            s.iter()
                .filter(|x| x.t > *from as f64 && x.t <= *to as f64)
                .copied()
                .collect()
        };
        let best = runs
            .iter()
            .filter_map(|(_, s)| inside(s).last().map(|x| x.pages_sharing))
            .max()
            .unwrap_or(0);
        let mut rows = Vec::new();
        for (policy, samples) in runs {
            let within = inside(samples);
            let Some(last) = within.last() else { continue };
            let before = samples
                .iter()
                .rfind(|s| s.t <= *from as f64)
                .copied()
                .unwrap_or_default();
            let t90 = (best > 0)
                .then(|| within.iter().find(|s| s.pages_sharing * 10 >= best * 9))
                .flatten()
                .map(|s| s.t - *from as f64);
            // Longest stretch with savings left (under 98 % of the best) and no merge.
            let (mut run_s, mut longest, mut prev) = (0.0f64, 0.0f64, before);
            for s in &within {
                if s.pages_sharing * 50 < best * 49 && s.pages_sharing <= prev.pages_sharing {
                    run_s += s.t - prev.t;
                    longest = longest.max(run_s);
                } else {
                    run_s = 0.0;
                }
                prev = *s;
            }
            rows.push((
                *policy,
                Phase {
                    saved_end: last.pages_sharing,
                    t90,
                    ksmd_cpu: last.ksmd_cpu_s - before.ksmd_cpu_s,
                    agent_cpu: last.agent_cpu_s - before.agent_cpu_s,
                    cow: last.cow_ksm - before.cow_ksm,
                    starved_s: longest,
                },
            ));
        }
        out.push((*from, *to, what.clone(), rows));
    }
    out
}

/// Per phase: savings at the phase's end, seconds from the phase's start to 90 % of the
/// best policy's savings, CPU, COW breaks, starvation.
fn phases(bounds: &[(u64, String)], runs: &[(Policy, Vec<Sample>)]) -> anyhow::Result<String> {
    let mut md = String::from(
        "\n## Phases\n\nTime to 90 %: from the phase's start to 90 % of the best policy's savings at \
         the phase's end. Starved: longest stretch with savings left (under 98 % of the best) and \
         no merge.\n\n| phase | policy | saved MiB at end | time to 90 % (s) | ksmd CPU s | agent CPU s \
         | COW breaks | starved s |\n|---|---|---|---|---|---|---|---|\n",
    );
    for (from, to, what, rows) in phase_figures(bounds, runs) {
        for (policy, p) in rows {
            writeln!(
                md,
                "| {from}-{to} s ({what}) | {} | {:.1} | {} | {:.1} | {:.1} | {} | {:.0} |",
                policy.name(),
                mib(p.saved_end),
                p.t90.map_or("never".into(), |t| format!("{t:.0}")),
                p.ksmd_cpu,
                p.agent_cpu,
                p.cow,
                p.starved_s,
            )?;
        }
    }
    Ok(md)
}

/// Seconds at the end of a run over which the goal's savings are taken (the median).
const SETTLED_SECONDS: f64 = 30.0;

/// Pages saved over the run's last [`SETTLED_SECONDS`], the median: where guests churn,
/// ksmd merges rewritten pages now and then and they break seconds later, so one sample
/// can be off by megabytes (a stock run ended 1,700 pages up in its last second).
fn settled_sharing(samples: &[Sample]) -> u64 {
    let Some(end) = samples.last().map(|s| s.t) else {
        return 0;
    };
    let mut v: Vec<f64> = samples
        .iter()
        .filter(|s| s.t >= end - SETTLED_SECONDS)
        .map(|s| s.pages_sharing as f64)
        .collect();
    xtask::report::median(&mut v) as u64
}

/// The merge-hint goals: COW breaks <= 20 % of stock's while savings stay >= 98 % of
/// stock's (over the whole run: the bench cannot split stable from rewritten memory).
fn hint_goals(runs: &[(Policy, Vec<Sample>)]) -> String {
    let run = |p: Policy| runs.iter().find(|(q, _)| *q == p).map(|(_, s)| s);
    let (Some(h), Some(stock)) = (run(Policy::MemfabricHints), run(Policy::Stock)) else {
        return String::new();
    };
    let (Some(h_last), Some(stock_last)) = (h.last(), stock.last()) else {
        return String::new();
    };
    let cow = h_last.cow_ksm as f64 / stock_last.cow_ksm.max(1) as f64;
    let (h_saved, stock_saved) = (settled_sharing(h), settled_sharing(stock));
    let saved = h_saved as f64 / stock_saved.max(1) as f64;
    let ok = |b: bool| if b { "met" } else { "NOT met" };
    format!(
        "\n## Goals (memfabric-hints vs stock)\n\n- COW breaks {} vs {} = {:.1} % of stock's \
         (goal <= 20 %: {})\n- savings over the last {SETTLED_SECONDS:.0} s (median) {:.1} MiB \
         vs {:.1} MiB = {:.1} % of stock's (goal >= 98 % on stable memory; this is all memory: \
         {}); the last samples: {:.1} vs {:.1} MiB\n",
        h_last.cow_ksm,
        stock_last.cow_ksm,
        cow * 100.0,
        ok(cow <= 0.2),
        mib(h_saved),
        mib(stock_saved),
        saved * 100.0,
        ok(saved >= 0.98),
        mib(h_last.pages_sharing),
        mib(stock_last.pages_sharing),
    )
}

/// Total CPU (ksmd + agent) per policy over the run and over its second half (on
/// `--scenario timeline --duration 1200`, a quiet host), against stock's: memfabric with
/// hints at most stock's over the run and half of it in the quiet half; memfabric
/// steering ksmd alone at most half of stock's in the quiet half.
fn cpu_goals(runs: &[(Policy, Vec<Sample>)]) -> String {
    let total = |s: &Sample| s.ksmd_cpu_s + s.agent_cpu_s;
    let figures = |samples: &Vec<Sample>| -> Option<(f64, f64, f64)> {
        let last = samples.last()?;
        let half = last.t / 2.0;
        let mid = samples
            .iter()
            .rfind(|s| s.t <= half)
            .copied()
            .unwrap_or_default();
        Some((total(last), total(last) - total(&mid), last.t - mid.t))
    };
    let Some((st_run, st_quiet, _)) = runs
        .iter()
        .find(|(p, _)| *p == Policy::Stock)
        .and_then(|(_, s)| figures(s))
    else {
        return String::new();
    };
    let ok = |b: bool| if b { "met" } else { "NOT met" };
    let mut md = String::from(
        "\n## CPU against stock (ksmd + agent)\n\n| policy | run: CPU s (% of stock's) | \
         second half: CPU s, % of a core (% of stock's) | goal |\n|---|---|---|---|\n",
    );
    for (policy, samples) in runs {
        let Some((run, quiet, secs)) = figures(samples) else {
            continue;
        };
        let (r, q) = (
            100.0 * run / st_run.max(1e-9),
            100.0 * quiet / st_quiet.max(1e-9),
        );
        let goal = match policy {
            Policy::MemfabricHints => format!(
                "run <= 100 % ({}), second half <= 50 % ({})",
                ok(r <= 100.0),
                ok(q <= 50.0)
            ),
            Policy::Memfabric => format!("second half <= 50 % ({})", ok(q <= 50.0)),
            _ => "-".into(),
        };
        let _ = writeln!(
            md,
            "| {} | {run:.1} ({r:.0} %) | {quiet:.1}, {:.2} % ({q:.0} %) | {goal} |",
            policy.name(),
            100.0 * quiet / secs.max(1.0),
        );
    }
    md
}

/// The goals for `memfabric`, per phase and over the run, met or not.
fn goals(bounds: &[(u64, String)], runs: &[(Policy, Vec<Sample>)]) -> String {
    let find = |p: Policy| runs.iter().find(|(q, _)| *q == p).map(|(_, s)| s);
    let (Some(mf), Some(stock)) = (find(Policy::Memfabric), find(Policy::Stock)) else {
        return String::new();
    };
    let mut md = String::from(
        "\n## Goals (memfabric)\n\n| phase | savings vs better of stock/advisor (>= 98 %) \
         | time to 90 % vs faster (<=) | starved s (0) |\n|---|---|---|---|\n",
    );
    let ok = |b: bool| if b { "met" } else { "NOT met" };
    for (from, to, what, rows) in phase_figures(bounds, runs) {
        let get = |p: Policy| rows.iter().find(|(q, _)| *q == p).map(|(_, x)| x);
        let Some(m) = get(Policy::Memfabric) else {
            continue;
        };
        let others: Vec<&Phase> = [Policy::Stock, Policy::Advisor]
            .into_iter()
            .filter_map(get)
            .collect();
        let better = others.iter().map(|p| p.saved_end).max().unwrap_or(0);
        let faster = others
            .iter()
            .filter_map(|p| p.t90)
            .fold(f64::INFINITY, f64::min);
        let ratio = if better == 0 {
            1.0
        } else {
            m.saved_end as f64 / better as f64
        };
        let t_ok = match m.t90 {
            Some(t) => t <= faster,
            None => faster.is_infinite(),
        };
        let _ = writeln!(
            md,
            "| {from}-{to} s ({what}) | {:.1} % ({}) | {} vs {} ({}) | {:.0} ({}) |",
            ratio * 100.0,
            ok(ratio >= 0.98),
            m.t90.map_or("never".into(), |t| format!("{t:.0} s")),
            if faster.is_finite() {
                format!("{faster:.0} s")
            } else {
                "never".into()
            },
            ok(t_ok),
            m.starved_s,
            ok(m.starved_s == 0.0),
        );
    }
    let total = |s: &Vec<Sample>| s.last().map_or(0.0, |x| x.ksmd_cpu_s + x.agent_cpu_s);
    let (m, st) = (total(mf), total(stock));
    let agent = mf.last().map_or(0.0, |x| x.agent_cpu_s);
    let secs = mf.last().map_or(1.0, |x| x.t.max(1.0));
    let _ = writeln!(
        md,
        "\nTotal CPU (ksmd + agent) over the run: memfabric {m:.1} s vs stock {st:.1} s = {:.0} % \
         (goal <= 50 %: {}). The agent alone: {agent:.1} s, {:.2} % of a core.",
        100.0 * m / st.max(1e-9),
        ok(m <= 0.5 * st),
        100.0 * agent / secs,
    );
    md
}
