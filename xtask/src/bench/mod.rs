//! `cargo xtask bench ...`: `probes` builds the in-process benchmark driver (release) and
//! runs it; `ksm` drives lab guests and KSM from here.

mod agent;
mod ksm;
pub(crate) mod migrate;

use std::process::Command;

use anyhow::bail;
use clap::Subcommand;

use xtask::cmd;

use crate::setup;

#[derive(Subcommand)]
pub(crate) enum Bench {
    /// The benchmarks of the bench binary (probes, scan, fabric, unmerge).
    #[command(flatten)]
    InProcess(xtask::bench_args::InProcess),
    /// What `memfabric run` costs (CPU, RSS) while it tracks lab guests.
    Agent {
        #[arg(long, default_value_t = 3)]
        guests: u32,
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// KSM policies side by side on fresh lab guests: savings, time to 90 %, ksmd CPU,
    /// COW breaks; CSV, Markdown and PNG plots.
    Ksm {
        #[arg(
            long,
            value_enum,
            default_value = "static",
            conflicts_with = "scenario"
        )]
        profile: xtask::lab::Profile,
        /// Play a scenario instead (`timeline` or a TOML file); its duration replaces
        /// --seconds.
        #[arg(long)]
        scenario: Option<String>,
        /// Run the scenario this many seconds instead of its own duration: the host stays
        /// quiet after its last event (`--scenario timeline --duration 1200`: the timeline,
        /// then a quiet host; the last phase of the report is the quiet one).
        #[arg(long, requires = "scenario")]
        duration: Option<u64>,
        /// Comma-separated policies.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "stock,advisor,memfabric"
        )]
        policy: Vec<ksm::Policy>,
        /// Seconds each policy runs.
        #[arg(long, default_value_t = 180)]
        seconds: u64,
        #[arg(long, default_value_t = 3)]
        guests: u32,
    },
    /// A lab guest migrated between two lab hosts (network namespaces joined by a
    /// rate-limited veth), plainly and through memfabric, side by side: bytes on the link,
    /// time, downtime, proxy CPU.
    Migrate {
        /// Comma-separated guest profiles.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "static,churn"
        )]
        profile: Vec<xtask::lab::Profile>,
        /// Comma-separated link speeds in Mbit/s (0: unlimited).
        #[arg(long, value_delimiter = ',', default_value = "100,1000,0")]
        rate: Vec<u32>,
        /// Seconds after which a migration that has not completed is cancelled (and
        /// reported so).
        #[arg(long, default_value_t = 90)]
        limit: u64,
        /// Migrations of each kind per setting, interleaved; medians are reported.
        #[arg(long, default_value_t = 3)]
        repeat: u32,
        /// Guest RAM of the migrated guest and its twin (e.g. 256M, 2G); a larger guest
        /// holds proportionally more data.
        #[arg(long, default_value = "256M", value_parser = xtask::lab::parse_mem)]
        mem: u32,
        /// QEMU's multifd channels on both ends, for both ways (0: multifd off, QEMU's
        /// default).
        #[arg(long, default_value_t = 0)]
        multifd: u8,
    },
}

pub(crate) fn run(which: Bench) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("benchmarks load eBPF programs: run them as root");
    }
    setup::run()?;
    if let Bench::Ksm {
        profile,
        scenario,
        duration,
        policy,
        seconds,
        guests,
    } = &which
    {
        let load = match scenario {
            Some(spec) => {
                let mut s = xtask::lab::scenario::Scenario::load(spec)?;
                if let Some(d) = *duration {
                    anyhow::ensure!(
                        d >= s.duration_s,
                        "--duration {d} is shorter than the scenario's own {} s",
                        s.duration_s
                    );
                    s.duration_s = d;
                }
                ksm::Load::Scenario(s)
            }
            None => ksm::Load::Profile {
                profile: *profile,
                guests: *guests,
                seconds: *seconds,
            },
        };
        let agent = if policy.contains(&ksm::Policy::Memfabric)
            || policy.contains(&ksm::Policy::MemfabricHints)
        {
            Some(crate::build::agent()?)
        } else {
            None
        };
        return ksm::run(
            &load,
            policy,
            agent.as_deref(),
            &cmd::root().join("reports"),
        );
    }
    if let Bench::Migrate {
        profile,
        rate,
        limit,
        repeat,
        mem,
        multifd,
    } = &which
    {
        return migrate::run(&migrate::Options {
            agent: crate::build::agent()?,
            profiles: profile.clone(),
            rates: rate.clone(),
            limit: std::time::Duration::from_secs(*limit),
            repeat: (*repeat).max(1),
            donors: vec!["none", "twin"],
            verify: false,
            mem_mb: *mem,
            multifd: *multifd,
            out: cmd::root().join("reports"),
        });
    }
    if let Bench::Agent { guests, seconds } = &which {
        let agent = crate::build::agent()?;
        return agent::run(&agent, *guests, *seconds, &cmd::root().join("reports"));
    }
    if matches!(
        which,
        Bench::InProcess(xtask::bench_args::InProcess::Scale { window, .. }) if window > 0
    ) {
        // Its daemon part runs `memfabric run`, found beside the bench binary.
        crate::build::agent()?;
    }
    cmd::run(cmd::cargo().args([
        "build",
        "--locked",
        "--release",
        "--package",
        "memfabric-tests",
        "--bins",
    ]))?;
    // The bench binary parses the same subcommands (`xtask::bench_args`): what followed
    // `bench` on this command line goes to it unchanged.
    let args: Vec<String> = std::env::args()
        .skip_while(|a| a != "bench")
        .skip(1)
        .collect();
    cmd::run(
        Command::new(cmd::root().join("target/release/memfabric-bench"))
            .arg("--out")
            .arg(cmd::root().join("reports"))
            .args(args),
    )
}

/// A plain HTTP/1.0 GET on loopback (xtask keeps no HTTP client dependency).
pub(crate) fn get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    head.split_whitespace().nth(1).filter(|c| *c == "200")?;
    Some(body.to_owned())
}
