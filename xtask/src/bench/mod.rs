//! `cargo xtask bench ...`: `probes` builds the in-process benchmark driver (release) and
//! runs it; `ksm` drives lab guests and KSM from here.

mod agent;
mod ksm;

use std::process::Command;

use anyhow::bail;
use clap::Subcommand;

use xtask::cmd;

use crate::setup;

#[derive(Subcommand)]
pub enum Bench {
    /// Write-fault loop with the probes detached vs attached (untracked / tracked).
    Probes {
        /// Fresh pages written per run (262144 = 1 GiB).
        #[arg(long, default_value_t = 262_144)]
        pages: usize,
        /// Interleaved rounds (each with an A/A control run).
        #[arg(long, default_value_t = 15)]
        rounds: usize,
    },
    /// The page scanner on lab guests: xxh3 vs memcpy, scan throughput, state bytes per
    /// page, accuracy against an exact recount.
    Scan {
        #[arg(long, default_value_t = 2)]
        guests: u32,
        #[arg(long, default_value_t = 7)]
        rounds: usize,
    },
    /// The fabric on a simulated fleet (1,000 hosts x 20 VMs) seeded with lab guests' page
    /// hashes: estimate error per k, candidate time, exchange, hosts freed vs FFD.
    Fabric {
        #[arg(long, default_value_t = 1000)]
        hosts: usize,
        #[arg(long, default_value_t = 20)]
        vms: usize,
        #[arg(long, default_value_t = 3)]
        guests: u32,
        /// The fleet's gossip interval (s) for the exchange figure.
        #[arg(long, default_value_t = 60.0)]
        gossip_interval_s: f64,
    },
    /// Taking a merged range out of KSM: memfabric's bounded injected calls vs one call;
    /// the guest's longest fault stall.
    Unmerge {
        #[arg(long, default_value_t = 1024)]
        mib: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
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
}

pub fn run(which: Bench) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("benchmarks load eBPF programs: run them as root");
    }
    setup::run()?;
    if let Bench::Ksm {
        profile,
        scenario,
        policy,
        seconds,
        guests,
    } = &which
    {
        let load = match scenario {
            Some(spec) => ksm::Load::Scenario(xtask::lab::scenario::Scenario::load(spec)?),
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
    if let Bench::Agent { guests, seconds } = &which {
        let agent = crate::build::agent()?;
        return agent::run(&agent, *guests, *seconds, &cmd::root().join("reports"));
    }
    cmd::run(cmd::cargo().args([
        "build",
        "--locked",
        "--release",
        "--package",
        "memfabric-tests",
        "--bins",
    ]))?;
    let bench = cmd::root().join("target/release/memfabric-bench");
    let out = cmd::root().join("reports");
    let mut c = Command::new(bench);
    c.arg("--out").arg(out);
    match which {
        Bench::Probes { pages, rounds } => c.args([
            "probes",
            "--pages",
            &pages.to_string(),
            "--rounds",
            &rounds.to_string(),
        ]),
        Bench::Scan { guests, rounds } => c.args([
            "scan",
            "--guests",
            &guests.to_string(),
            "--rounds",
            &rounds.to_string(),
        ]),
        Bench::Fabric {
            hosts,
            vms,
            guests,
            gossip_interval_s,
        } => c.args([
            "fabric",
            "--hosts",
            &hosts.to_string(),
            "--vms",
            &vms.to_string(),
            "--guests",
            &guests.to_string(),
            "--gossip-interval-s",
            &gossip_interval_s.to_string(),
        ]),
        Bench::Unmerge { mib, rounds } => c.args([
            "unmerge",
            "--mib",
            &mib.to_string(),
            "--rounds",
            &rounds.to_string(),
        ]),
        Bench::Ksm { .. } | Bench::Agent { .. } => unreachable!("handled above"),
    };
    cmd::run(&mut c)
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
