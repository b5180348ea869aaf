//! `memfabric run`: the daemon.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::Args;
use memfabric::{
    config::{Config, FileConfig},
    daemon,
};

#[derive(Args)]
pub struct RunArgs {
    /// TOML config file (keys: listen, pids, match, refresh_ms).
    #[arg(long, env = "MEMFABRIC_CONFIG")]
    config: Option<PathBuf>,
    /// HTTP address for /metrics, /healthz, /v1/status [default: 127.0.0.1:9977].
    #[arg(long, env = "MEMFABRIC_LISTEN")]
    listen: Option<SocketAddr>,
    /// Also track this process as a VM (repeatable; env: comma-separated).
    #[arg(long = "pid", env = "MEMFABRIC_PIDS", value_delimiter = ',')]
    pids: Vec<u32>,
    /// Also track processes whose command line matches this regex (repeatable).
    #[arg(long = "match", env = "MEMFABRIC_MATCH")]
    matches: Vec<String>,
    /// How often to rescan VMs and refresh the state [default: 2000].
    #[arg(long, env = "MEMFABRIC_REFRESH_MS")]
    refresh_ms: Option<u64>,
    /// Percent of one core the page scanner may use; 0 turns it off [default: 5].
    #[arg(long, env = "MEMFABRIC_SCAN_CPU")]
    scan_cpu: Option<f64>,
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let cfg = Config::merge(
        file,
        args.listen,
        args.pids,
        args.matches,
        args.refresh_ms,
        args.scan_cpu,
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(daemon::run(cfg))?;
    Ok(ExitCode::SUCCESS)
}
