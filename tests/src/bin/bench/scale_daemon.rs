//! `bench scale`, the daemon's part: what `memfabric run` costs and how fast it knows,
//! on the holders of one size. Measured in one run, side by side:
//!
//! - agent CPU per hour and RSS at steady state, resting (the default: a quiet VM is read
//!   on its share of `--scan-quiet-cpu`, 0.05) and never resting (`--scan-quiet-cpu` equal to
//!   `--scan-cpu`: the scan spends its whole budget, as before), in windows of equal
//!   length, each after the daemon settled;
//! - with the resting daemon: the time to rank a new 4 GiB VM (first verdict: a range
//!   classed; final: 90 % of its ranges classed after a full pass), the time from a merged
//!   range's first rewrite to its volatile verdict, and the daemon's prediction of what
//!   KSM saves against what KSM saves.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use memfabric::{model::rank::RangeClass, wire::StatusV1};
use memfabric_harness::Daemon;
use memfabric_tests::Workload;
use std::collections::BTreeMap;

/// What the daemon did on one size.
#[derive(Clone, Debug, Default)]
pub(crate) struct DaemonFigures {
    /// Agent CPU seconds per hour: resting, never resting.
    pub cpu_per_hour: [f64; 2],
    /// Bytes the scanner read per hour, likewise.
    pub read_per_hour: [f64; 2],
    /// Agent RSS (MiB) at the end of each window.
    pub rss_mib: [f64; 2],
    /// Agent peak RSS (MiB, VmHWM) from its start to the end of each window: the content
    /// table of a report is built and dropped, and an operator sizes for the peak.
    pub rss_peak_mib: [f64; 2],
    /// How often a quiet VM is read (s), from its pass's cost and the quiet budget.
    pub quiet_interval_s: f64,
    /// Seconds the new VM took to fill its memory (its verdicts count from its start).
    pub filled_s: f64,
    pub first_rank_s: Option<f64>,
    pub final_rank_s: Option<f64>,
    pub churn_verdict_s: Option<f64>,
    /// The daemon's predicted KSM pages and KSM's (sharing + zero pages), when settled.
    pub predicted_pages: u64,
    pub ksm_pages: u64,
}

fn status(d: &Daemon) -> Option<StatusV1> {
    serde_json::from_str(&d.get("/v1/status")?).ok()
}

/// The daemon's CPU seconds, RSS and peak RSS (MiB).
fn cpu_rss(pid: u32) -> anyhow::Result<(f64, [f64; 2])> {
    let cpu = memfabric::host::ksm::cpu_seconds(pid).context("the daemon's CPU")?;
    let kib = |field: &str| -> anyhow::Result<f64> {
        memfabric_tests::status_field(pid, field)
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .with_context(|| format!("the daemon's {field}"))
    };
    Ok((cpu, [kib("VmRSS")? / 1024.0, kib("VmHWM")? / 1024.0]))
}

/// Waits up to `limit` for `cond` on the daemon's status; the seconds it took.
fn until(d: &Daemon, limit: Duration, mut cond: impl FnMut(&StatusV1) -> bool) -> Option<f64> {
    until_that(limit, || status(d).is_some_and(|s| cond(&s)))
}

/// Waits up to `limit` for `cond`, polling every 250 ms (each poll is a request the daemon
/// serves: not faster, its CPU is measured); the seconds it took.
fn until_that(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<f64> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if cond() {
            return Some(t.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    None
}

/// One steady window of `window`: CPU per hour, bytes read per hour, RSS and peak (MiB).
fn steady(d: &Daemon, window: Duration) -> anyhow::Result<(f64, f64, [f64; 2])> {
    // The kernel's count of bytes the daemon read (`rchar`: guest pages through
    // /proc/PID/mem, and pagemap and kpageflags, 16 bytes a page): the status's scan
    // counter moves only when a round ends, and a round of 16 GiB at 5 % is longer than
    // a window (it read 0 bytes in one).
    let read = |d: &Daemon| {
        std::fs::read_to_string(format!("/proc/{}/io", d.pid()))
            .ok()
            .and_then(|io| {
                io.lines()
                    .find_map(|l| l.strip_prefix("rchar:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .unwrap_or(0)
    };
    let (cpu0, _) = cpu_rss(d.pid())?;
    let (read0, t) = (read(d), Instant::now());
    std::thread::sleep(window);
    let (cpu1, rss) = cpu_rss(d.pid())?;
    let hours = t.elapsed().as_secs_f64() / 3600.0;
    Ok((
        (cpu1 - cpu0) / hours,
        read(d).saturating_sub(read0) as f64 / hours,
        rss,
    ))
}

/// The daemon on the holders (found by name, so a new one is tracked too); `quiet`: its
/// `--scan-quiet-cpu` (None: the default).
fn start(agent: &str, quiet: Option<&str>) -> Daemon {
    // The bracket keeps the pattern from matching a daemon's command line (another one
    // left running would be tracked as a VM; a daemon never takes itself for one).
    // Addresses exposed: the churn test finds its region's ranges in /v1/ranges.
    let mut args = vec!["--match", "memfabric-workloa[d]", "--expose-addresses"];
    if let Some(q) = quiet {
        args.extend(["--scan-quiet-cpu", q]);
    }
    Daemon::start_with(agent, &args, "5")
}

/// Whether every one of `vms` VMs has been scanned and rests.
fn settled(s: &StatusV1, vms: usize) -> bool {
    s.scan_quiet_vms as usize >= vms && s.scan_busy_vms == 0
}

pub(crate) fn run(
    agent: &str,
    workload: &str,
    holders: &mut [Workload],
    churn_regions: &[String],
    window: Duration,
    gib: usize,
) -> anyhow::Result<DaemonFigures> {
    let mut f = DaemonFigures::default();
    let n = holders.len();
    // Never resting: its budget spent whatever happens (a minute to scan everything).
    {
        let d = start(agent, Some("5"));
        std::thread::sleep(Duration::from_secs(60));
        let (cpu, read, [rss, peak]) = steady(&d, window)?;
        (f.cpu_per_hour[1], f.read_per_hour[1]) = (cpu, read);
        (f.rss_mib[1], f.rss_peak_mib[1]) = (rss, peak);
        eprintln!(
            "never resting: {cpu:.0} CPU s/h, {:.0} MiB read/h",
            read / 1048576.0
        );
    }
    let d = start(agent, None);
    // A new VM is read in full 8 times at the 5 % pace before it may rest: about 45 s per
    // GiB of guest RAM here (16 GiB took over 12 minutes); twice that, and 5 minutes.
    let limit = Duration::from_secs(300 + 90 * gib as u64);
    let took = until(&d, limit, |s| settled(s, n)).with_context(|| {
        format!(
            "the resting daemon did not settle (every VM quiet) in {:.0} minutes",
            limit.as_secs_f64() / 60.0
        )
    })?;
    eprintln!("resting daemon settled in {took:.0} s");
    let (cpu, read, [rss, peak]) = steady(&d, window)?;
    (f.cpu_per_hour[0], f.read_per_hour[0]) = (cpu, read);
    (f.rss_mib[0], f.rss_peak_mib[0]) = (rss, peak);
    eprintln!(
        "resting: {cpu:.0} CPU s/h, {:.0} MiB read/h",
        read / 1048576.0
    );
    // The prediction, with every VM scanned and resting: the daemon's figure against KSM's.
    if let Some(s) = status(&d) {
        // How often a quiet VM is read: its pass's CPU (wall time at the 5 % pace) times
        // the VMs over the quiet budget (the default: 5 % / QUIET_SHARE), the median VM.
        let mut every: Vec<f64> = s
            .vms
            .iter()
            .filter_map(|v| v.scan_pass_seconds)
            .map(|wall| wall * 0.05 * n as f64 / (0.05 / memfabric::config::QUIET_SHARE))
            .collect();
        f.quiet_interval_s = xtask::report::median(&mut every);
        let zero_pages = s.ksm.ksm_zero_pages > 0;
        f.predicted_pages = s
            .vms
            .iter()
            .filter_map(|v| v.scan.map(|c| c.predicted_ksm_pages(zero_pages)))
            .sum();
        f.ksm_pages = u64::try_from(s.ksm.pages_sharing + s.ksm.ksm_zero_pages).unwrap_or(0);
    }
    // A merged range starts churning: its COW breaks wake the VM. Its verdict is read on
    // its own ranges: the VM's count of volatile ranges moves by more than eight as its
    // other churning ranges (10 % of it, rewritten with two contents in turn) are seen
    // rewritten in one pass and not in the next.
    let region = holders[0].span(&churn_regions[0]);
    let pid = holders[0].pid;
    let (inside, already) = volatile_in(&d, pid, region).context("the first holder's ranges")?;
    anyhow::ensure!(inside > 0, "no range of the churn region was ranked");
    if already > 0 {
        eprintln!(
            "warning: {already} of the churn region's {inside} ranges volatile before it churns"
        );
    }
    holders[0].cmd(&format!("flip {} 1000", churn_regions[0]));
    // Three quarters of its ranges (a range's verdict may flicker like the others').
    f.churn_verdict_s = until_that(Duration::from_secs(600), || {
        volatile_in(&d, pid, region).is_some_and(|(_, v)| v * 4 >= inside * 3)
    });
    // A new VM of 4 GiB: half the content the others hold, half its own. Its times count
    // from its start, as a VM's would from its boot: filling its memory takes seconds, and
    // the daemon finds it meanwhile.
    let t = Instant::now();
    let mut new = Workload::spawn(workload);
    let pages = 1 << 20;
    for fill in ["ids 1", "unique"] {
        let r = new.cmd(&format!("alloc {} {fill}", pages / 2));
        new.cmd(&format!("mergeable {r}"));
    }
    let pid = new.pid;
    f.filled_s = t.elapsed().as_secs_f64();
    f.first_rank_s = until(&d, Duration::from_secs(300), |s| {
        classes(s, pid).is_some_and(|(classed, _)| classed > 0)
    })
    .map(|_| t.elapsed().as_secs_f64());
    f.final_rank_s = until(&d, Duration::from_secs(900), |s| {
        let full = s
            .vms
            .iter()
            .find(|v| v.vm.pid == pid)
            .and_then(|v| v.scan)
            .is_some_and(|c| c.pages_present >= pages * 9 / 10);
        full && classes(s, pid).is_some_and(|(classed, all)| classed * 10 >= all * 9)
    })
    .map(|_| t.elapsed().as_secs_f64());
    eprintln!(
        "new 4 GiB VM: filled in {:.1} s, first verdict {:?} s, final {:?} s; churn verdict \
         {:?} s",
        f.filled_s, f.first_rank_s, f.final_rank_s, f.churn_verdict_s
    );
    new.exit();
    Ok(f)
}

/// A VM's ranges per class (absent until it is ranked).
fn range_classes(s: &StatusV1, pid: u32) -> Option<&BTreeMap<RangeClass, u32>> {
    s.vms
        .iter()
        .find(|v| v.vm.pid == pid)?
        .range_classes
        .as_ref()
}

/// A VM's ranges classed (not cold-unknown), and all its ranges.
fn classes(s: &StatusV1, pid: u32) -> Option<(u32, u32)> {
    let c = range_classes(s, pid)?;
    let all: u32 = c.values().sum();
    let unknown = c.get(&RangeClass::ColdUnknown).copied().unwrap_or(0);
    Some((all - unknown, all))
}

/// The ranges of VM `pid` that lie inside `span`, and how many of them are ranked
/// volatile (None: not ranked yet, or the daemon did not answer).
fn volatile_in(d: &Daemon, pid: u32, span: (u64, u64)) -> Option<(usize, usize)> {
    let mut offset = 0;
    let (mut inside, mut volatile) = (0, 0);
    loop {
        let page: serde_json::Value =
            serde_json::from_str(&d.get(&format!("/v1/ranges?vm={pid}&offset={offset}"))?).ok()?;
        for r in page["ranges"].as_array()? {
            let start = r["start"].as_u64()?;
            if start >= span.0 && start + (2 << 20) <= span.1 {
                inside += 1;
                volatile += usize::from(r["class"] == "volatile");
            }
        }
        match page["next_offset"].as_u64() {
            Some(next) => offset = next,
            None => return Some((inside, volatile)),
        }
    }
}
