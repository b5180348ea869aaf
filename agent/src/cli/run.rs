//! `memfabric run`: the daemon.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;
use memfabric::{
    config::{Act, Config, FileConfig, Listen, Overrides},
    daemon,
};

#[derive(Args)]
pub(super) struct RunArgs {
    /// TOML config file (keys: listen, pids, match, refresh_ms, scan_cpu_percent, act,
    /// ksmd_cpu_percent, state_dir).
    #[arg(long, env = "MEMFABRIC_CONFIG")]
    config: Option<PathBuf>,
    /// Where /metrics, /healthz, /v1/status and /v1/ranges listen: HOST:PORT, or
    /// unix:/PATH for a socket only root can open [default: 127.0.0.1:9977].
    #[arg(long, env = "MEMFABRIC_LISTEN")]
    listen: Option<Listen>,
    /// Serve guest-RAM virtual addresses in /v1/status and /v1/ranges (off: they
    /// defeat the VMMs' address-space randomisation for anyone who can read them).
    #[arg(long, env = "MEMFABRIC_EXPOSE_ADDRESSES")]
    expose_addresses: bool,
    /// With --act hints: leave hinted ranges as they are when the daemon stops (by
    /// default every range is put back as it was).
    #[arg(long, env = "MEMFABRIC_KEEP_HINTS")]
    keep_hints: bool,
    /// Also track this process as a VM (repeatable; env: comma-separated).
    #[arg(long = "pid", env = "MEMFABRIC_PIDS", value_delimiter = ',')]
    pids: Vec<u32>,
    /// Also track processes whose command line matches this regex (repeatable).
    #[arg(long = "match", env = "MEMFABRIC_MATCH")]
    matches: Vec<String>,
    /// How often to rescan VMs and refresh the state while anything happens; three times
    /// less often after three ticks that saw nothing happen [default: 2000].
    #[arg(long, env = "MEMFABRIC_REFRESH_MS")]
    refresh_ms: Option<u64>,
    /// Percent of one core the page scanner may use; 0 turns it off [default: 5].
    #[arg(long, env = "MEMFABRIC_SCAN_CPU")]
    scan_cpu: Option<f64>,
    /// Percent of one core the page scanner uses while nothing changes (it rests between
    /// passes; new VMs, new memory, broken merges and moved rankings wake it) [default: a
    /// hundredth of --scan-cpu, 0.05].
    #[arg(long, env = "MEMFABRIC_SCAN_QUIET_CPU")]
    scan_quiet_cpu: Option<f64>,
    /// Change the host: `ksmd` steers ksmd's scan rate; `hints` makes VM ranges mergeable
    /// or unmergeable (only VMs of a `[[domain]]` in the config). Without it the daemon
    /// only recommends (/v1/recommendations, /v1/status, `status`, `top`).
    #[arg(long = "act", env = "MEMFABRIC_ACT", value_delimiter = ',')]
    act: Vec<Act>,
    /// Percent of one core ksmd may use while steered (0.1-100) [default: 10].
    #[arg(long, env = "MEMFABRIC_KSMD_CPU")]
    ksmd_cpu: Option<f64>,
    /// Journal of every setting changed, and the lock one steering daemon holds
    /// [default: /var/lib/memfabric].
    #[arg(long, env = "MEMFABRIC_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Turn the fabric on: its HTTPS (TCP) and gossip (UDP) address. The certificates and
    /// the gossip key come from the config's [fabric] table.
    #[arg(long, env = "MEMFABRIC_FABRIC_LISTEN")]
    fabric_listen: Option<std::net::SocketAddr>,
    /// A fabric peer to gossip with, HOST:PORT (repeatable).
    #[arg(long = "peer", env = "MEMFABRIC_PEERS", value_delimiter = ',')]
    peers: Vec<String>,
}

pub(super) fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let cfg = Config::merge(
        file,
        Overrides {
            listen: args.listen,
            expose_addresses: args.expose_addresses,
            keep_hints: args.keep_hints,
            pids: args.pids,
            matches: args.matches,
            refresh_ms: args.refresh_ms,
            scan_cpu_percent: args.scan_cpu,
            scan_quiet_cpu_percent: args.scan_quiet_cpu,
            act: args.act,
            ksmd_cpu_percent: args.ksmd_cpu,
            state_dir: args.state_dir,
            fabric_listen: args.fabric_listen,
            peers: args.peers,
        },
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(daemon::run(cfg))?;
    Ok(ExitCode::SUCCESS)
}
