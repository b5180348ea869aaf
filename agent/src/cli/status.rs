//! `memfabric status`: the VMs and the host's KSM state, from a running daemon, or
//! one-shot from /proc and /sys when none answers (then without the probes' counters).

use std::process::ExitCode;

use clap::Args;
use memfabric::{
    config::DEFAULT_LISTEN,
    host::inventory::{self, Selector},
    host::ksm::{KsmHost, KsmStat},
    model::VmState,
    wire::StatusV1,
};

#[derive(Args)]
pub(super) struct StatusArgs {
    /// Print the state as JSON.
    #[arg(long)]
    json: bool,
    /// Daemon to ask.
    #[arg(long, env = "MEMFABRIC_ENDPOINT", default_value_t = format!("http://{DEFAULT_LISTEN}"))]
    endpoint: String,
}

fn from_daemon(endpoint: &str) -> Option<StatusV1> {
    let url = format!("{}/v1/status", endpoint.trim_end_matches('/'));
    let mut resp = ureq::get(&url).call().ok()?;
    let body = resp.body_mut().read_to_string().ok()?;
    serde_json::from_str(&body).ok()
}

/// What /proc and /sys tell without the daemon.
fn one_shot() -> StatusV1 {
    let vms = inventory::discover(&Selector::default())
        .into_values()
        .map(|vm| VmState {
            ksm: KsmStat::read(vm.pid),
            vm,
            probes: None,
            scan: None,
            range_classes: None,
            scan_pass_seconds: None,
            write_faults_per_sec: 0.0,
            cow_breaks_per_sec: 0.0,
        })
        .collect();
    StatusV1 {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        taken_at_unix_ms: memfabric::util::clock::unix_ms(),
        ksm: KsmHost::read(),
        vms,
        probes: Default::default(),
        ..Default::default()
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// One VM's cells under [`COLUMNS`] (shared with `top`). Rates need the probes: "-"
/// without them.
pub(super) fn row(v: &VmState) -> [String; 9] {
    let rate = |x: f64| {
        if v.probes.is_some() {
            format!("{x:.1}")
        } else {
            "-".into()
        }
    };
    [
        v.vm.name.clone(),
        v.vm.pid.to_string(),
        v.vm.kind.as_str().to_owned(),
        (v.vm.guest_memory_bytes >> 20).to_string(),
        format!("{:.1}", v.ksm.merging_pages as f64 * 4096.0 / MIB),
        format!("{:.1}", v.ksm.process_profit_bytes as f64 / MIB),
        rate(v.write_faults_per_sec),
        rate(v.cow_breaks_per_sec),
        // What merging could still save (page scanner): "-" until a pass completed.
        v.scan.map_or("-".into(), |c| {
            format!("{:.1}", c.potential_savings_bytes as f64 / MIB)
        }),
    ]
}

/// The host's KSM state on one line (shared with `top`).
pub(super) fn ksm_line(k: &memfabric::host::ksm::KsmHost) -> String {
    format!(
        "KSM: run={} pages_to_scan={} sleep={} ms | shared={} sharing={} (saving {:.1} MiB) \
         zero={} | general_profit={:.1} MiB | full_scans={} | cow_ksm={} | ksmd CPU {:.1} s",
        k.run,
        k.pages_to_scan,
        k.sleep_millisecs,
        k.pages_shared,
        k.pages_sharing,
        k.pages_sharing as f64 * 4096.0 / MIB,
        k.ksm_zero_pages,
        k.general_profit_bytes as f64 / MIB,
        k.full_scans,
        k.cow_ksm,
        k.ksmd_cpu_seconds
    )
}

/// The ksmd controller's line: what it applies (or recommends) and why.
pub(super) fn ksmd_line(state: &StatusV1) -> Option<String> {
    let k = state.ksmd.as_ref()?;
    let d = &k.decision;
    Some(format!(
        "ksmd: {} pages_to_scan={} sleep_millisecs={} ({:.0} pages/s, {}{}); ksmd CPU {:.1} % of a core (budget {:.1} %){}",
        if k.steering {
            "steered to"
        } else {
            "memfabric recommends"
        },
        d.knobs.pages_to_scan,
        d.knobs.sleep_millisecs,
        d.knobs.pace(),
        d.reason.as_str(),
        if d.capped {
            ", capped by the budget"
        } else {
            ""
        },
        k.ksmd_cpu_recent * 100.0,
        k.ksmd_cpu_budget * 100.0,
        k.last_error
            .as_deref()
            .map(|e| format!("; last error: {e}"))
            .unwrap_or_default(),
    ))
}

/// The merge hints' line: acting or not (and why), what was done, the latest decision.
pub(super) fn hints_line(state: &StatusV1) -> Option<String> {
    let h = state.hints.as_ref()?;
    let last = h.recent.last().map(|d| {
        format!(
            "; last: {} {} MiB of {} {:?} ({:?}, {})",
            if d.outcome == memfabric::wire::HintOutcome::Applied {
                "made"
            } else {
                "make"
            },
            d.span.bytes >> 20,
            memfabric::host::inventory::clean_name(&d.vm),
            d.target,
            d.reason,
            d.outcome
        )
    });
    let left: String = h
        .left_alone
        .iter()
        .map(|w| {
            let w: String = w
                .chars()
                .take(512)
                .map(|c| if c.is_control() { '?' } else { c })
                .collect();
            format!("\n  left alone: {w}")
        })
        .collect();
    Some(format!(
        "hints: {}; {} applied, {} already so, {} failed, {} range(s) changed{}{left}",
        if h.acting {
            "applied".to_owned()
        } else {
            h.note.clone().unwrap_or_else(|| "recommended".into())
        },
        h.applied_total,
        h.already_total,
        h.failed_total,
        h.changed_ranges,
        last.unwrap_or_default()
    ))
}

/// Column titles of [`row`].
pub(super) const COLUMNS: [&str; 9] = [
    "VM",
    "PID",
    "KIND",
    "RAM MiB",
    "MERGED MiB",
    "PROFIT MiB",
    "WF/s",
    "COW/s",
    "COULD MiB",
];

/// The state from the daemon at `endpoint`, or one-shot; with a line saying which.
pub(super) fn load(endpoint: &str) -> (StatusV1, String) {
    match from_daemon(endpoint) {
        Some(s) => (s, format!("daemon at {endpoint}")),
        None => (
            one_shot(),
            "one-shot from /proc and /sys (no daemon answered; probe columns empty)".to_owned(),
        ),
    }
}

pub(super) fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let (state, source) = load(&args.endpoint);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&state)?);
        return Ok(ExitCode::SUCCESS);
    }
    let k = &state.ksm;
    println!("source: {source}");
    println!("{}", ksm_line(k));
    if let Some(line) = ksmd_line(&state) {
        println!("{line}");
    }
    if let Some(line) = hints_line(&state) {
        println!("{line}");
    }
    let [c0, c1, c2, c3, c4, c5, c6, c7, c8] = COLUMNS;
    println!(
        "{c0:<16} {c1:>8} {c2:<12} {c3:>9} {c4:>11} {c5:>11} {c6:>9} {c7:>9} {c8:>10}  MERGEABLE"
    );
    for v in &state.vms {
        let [name, pid, kind, ram, merged, profit, wf, cow, could] = row(v);
        println!(
            "{name:<16} {pid:>8} {kind:<12} {ram:>9} {merged:>11} {profit:>11} {wf:>9} {cow:>9} {could:>10}  {:?}",
            v.vm.mergeability
        );
    }
    println!("COULD: what merging could still save, from the page scanner (intra + inter VM)");
    if state.vms.is_empty() {
        println!("(no VMs found)");
    }
    Ok(ExitCode::SUCCESS)
}
