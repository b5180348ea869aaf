//! Command line: one file per subcommand.

mod check;
mod fabric;
mod hint;
mod launch;
mod migrate;
mod run;
mod scan;
mod status;
mod top;
mod watch;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "memfabric",
    version,
    about = "Kernel-assisted page sharing for hypervisor hosts"
)]
pub(crate) struct Cli {
    /// More logging (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Log format on stderr.
    #[arg(
        long,
        value_enum,
        default_value = "human",
        env = "MEMFABRIC_LOG_FORMAT",
        global = true
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Load and attach every probe, report verifier instruction counts and attach status,
    /// detach. Exits non-zero if any probe could not attach: the "does this kernel support
    /// memfabric" check to run first.
    Check(check::CheckArgs),
    /// Track processes (e.g. QEMU guests) with the probes and show what KSM merged of each
    /// and what the probes saw, refreshing until Ctrl-C or --seconds.
    Watch(watch::WatchArgs),
    /// The daemon: find VMs, track them with the probes, serve /metrics, /healthz and
    /// /v1/status (default 127.0.0.1:9977) until SIGINT/SIGTERM.
    Run(Box<run::RunArgs>),
    /// The VMs and KSM state from a running daemon, or one-shot from /proc and /sys.
    Status(status::StatusArgs),
    /// One-shot page scan: stable, volatile, duplicate, merged and mergeable pages.
    Scan(scan::ScanArgs),
    /// `status`, refreshing in place; sort by savings (s), churn (c) or name (n).
    Top(top::TopArgs),
    /// Run a VMM (any command) with KSM merging of all its memory turned on
    /// (PR_SET_MEMORY_MERGE, inherited by children), or off with --no-merge.
    Launch(launch::LaunchArgs),
    /// Mark a running process's memory mergeable or unmergeable (madvise injected
    /// through ptrace; the process is stopped for well under a millisecond).
    Hint(hint::HintArgs),
    /// The fabric's peer hosts and their state (from the daemon).
    Peers(fabric::FabricArgs),
    /// For each local VM, how much of it each peer host already holds (from the daemon).
    Candidates(fabric::FabricArgs),
    /// A sharing-aware consolidation plan of this host and its peers, beside first-fit
    /// decreasing (from the daemon); `--apply` carries out this host's moves.
    Plan(fabric::PlanArgs),
    /// Live-migrate a QEMU guest to another host, sending as references the pages that
    /// host already holds: `--vm VM --to HOST|best` through the destination's agent, or
    /// `receive` and `send` by hand.
    Migrate(Box<migrate::MigrateArgs>),
}

impl Cli {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Commands::Check(args) => check::run(args),
            Commands::Watch(args) => watch::run(args),
            Commands::Run(args) => run::run(*args),
            Commands::Status(args) => status::run(args),
            Commands::Top(args) => top::run(args),
            Commands::Scan(args) => scan::run(args),
            Commands::Launch(args) => launch::run(args),
            Commands::Hint(args) => hint::run(args),
            Commands::Peers(args) => fabric::peers(args),
            Commands::Candidates(args) => fabric::candidates(args),
            Commands::Plan(args) => fabric::plan(args),
            Commands::Migrate(args) => migrate::run(*args),
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Human,
    Json,
}

/// Logs on stderr, human-readable or JSON; aya-log records from the probes arrive through
/// the `log` bridge.
pub(crate) fn init_logging(verbose: u8, format: LogFormat) {
    use tracing_subscriber::{EnvFilter, util::SubscriberInitExt as _};
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.finish().try_init(),
        LogFormat::Json => builder.json().finish().try_init(),
    };
}
