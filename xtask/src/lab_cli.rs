//! `cargo xtask lab up|status|down|migrate`.

use std::time::Duration;

use anyhow::bail;
use clap::{Args, Subcommand};
use xtask::lab::{self, Profile, UpOptions};

use crate::setup;

#[derive(Subcommand)]
pub(crate) enum LabCmd {
    /// Boot guests in the background (kernel and initramfs cached under target/lab).
    Up(LabUpArgs),
    /// List the lab's guests: PID, name, RSS, KSM merging pages.
    Status,
    /// Stop exactly the lab's guests (by PID); safe to run twice.
    Down,
    /// Two lab hosts (network namespaces joined by a rate-limited link), a guest on the
    /// source and its twin on the destination: the guest migrated plainly and through
    /// memfabric, the bytes on the link side by side, and started on the destination.
    Migrate {
        /// The link's speed in Mbit/s (0: unlimited).
        #[arg(long, default_value_t = 100)]
        rate: u32,
        #[arg(long, value_enum, default_value = "static")]
        profile: Profile,
        /// Guest RAM (e.g. 256M, 2G); a larger guest holds proportionally more data.
        #[arg(long, default_value = "256M", value_parser = lab::parse_mem)]
        mem: u32,
        /// QEMU's multifd channels (0: multifd off).
        #[arg(long, default_value_t = 0)]
        multifd: u8,
    },
}

#[derive(Args, Clone)]
pub(crate) struct UpArgs {
    #[arg(long, default_value_t = 3)]
    pub guests: u32,
    /// Guest RAM (e.g. 256M, 1G).
    #[arg(long, default_value = "256M", value_parser = lab::parse_mem)]
    pub mem: u32,
    #[arg(long, value_enum, default_value = "static")]
    pub profile: Profile,
    /// Guest kernel version(s), e.g. 6.1.0-50 (comma-separated: guests take them in
    /// turn). Default: today's Debian cloud kernel.
    #[arg(long, value_delimiter = ',')]
    pub kernel: Vec<String>,
    /// Seconds to wait for every guest to be ready.
    #[arg(long, default_value_t = 240)]
    pub boot_timeout: u64,
    /// Boot with `-machine mem-merge=off` (what libvirt's `<nosharepages/>` does): guests
    /// whose operator turned merging off, which memfabric must leave alone.
    #[arg(long)]
    pub no_mem_merge: bool,
}

#[derive(Args, Clone)]
pub(crate) struct LabUpArgs {
    #[command(flatten)]
    pub up: UpArgs,
    /// Play a scenario (`timeline` or a TOML file) in the foreground instead: guests start
    /// and stop on its schedule; those still planned to run stay up at the end.
    #[arg(long, conflicts_with_all = ["guests", "profile"])]
    pub scenario: Option<String>,
}

impl UpArgs {
    pub(crate) fn options(&self) -> UpOptions {
        UpOptions {
            guests: self.guests,
            mem_mb: self.mem,
            profile: self.profile,
            kernels: self.kernel.clone(),
            first: 1,
            boot_timeout: Duration::from_secs(self.boot_timeout),
            mem_merge: !self.no_mem_merge,
        }
    }
}

pub(crate) fn run(c: LabCmd) -> anyhow::Result<()> {
    match c {
        LabCmd::Up(args) => {
            if !xtask::cmd::is_root() {
                bail!("the lab needs root (apt-get download, KSM)");
            }
            setup::run()?;
            if let Some(spec) = &args.scenario {
                let sc = lab::scenario::Scenario::load(spec)?;
                let images = lab::Images::prepare(&args.up.kernel, false)?;
                eprintln!("lab: playing scenario {} ({} s)", sc.name, sc.duration_s);
                sc.play(&images, || Ok(()), |_| Ok(()))?;
                print_status();
                return Ok(());
            }
            let guests = lab::up(&args.up.options())?;
            eprintln!(
                "lab: {} guest(s) up; `cargo xtask lab status`, `cargo xtask lab down`",
                guests.len()
            );
            print_status();
            Ok(())
        }
        LabCmd::Status => {
            print_status();
            Ok(())
        }
        LabCmd::Migrate {
            rate,
            profile,
            mem,
            multifd,
        } => {
            if !xtask::cmd::is_root() {
                bail!("the lab hosts are network namespaces: run as root");
            }
            setup::run()?;
            crate::bench::migrate::run(&crate::bench::migrate::Options {
                agent: crate::build::agent()?,
                profiles: vec![profile],
                rates: vec![rate],
                limit: Duration::from_secs(300),
                out: xtask::cmd::root().join("reports"),
                repeat: 1,
                donors: vec!["twin"],
                verify: true,
                mem_mb: mem,
                multifd,
            })
        }
        LabCmd::Down => {
            let n = lab::down()?;
            eprintln!("lab: {n} guest(s) stopped");
            Ok(())
        }
    }
}

pub(crate) fn print_status() {
    let rows = lab::status();
    if rows.is_empty() {
        println!("no lab guests");
        return;
    }
    println!(
        "{:<8} {:>8} {:<8} {:<22} {:>8} {:>9} {:<37}",
        "NAME", "PID", "STATE", "KERNEL", "RSS MiB", "MERGING", "UUID"
    );
    for (g, alive, rss_kb, merging) in rows {
        println!(
            "{:<8} {:>8} {:<8} {:<22} {:>8} {:>9} {:<37}",
            g.name,
            g.pid,
            if alive { "running" } else { "gone" },
            g.kernel,
            rss_kb / 1024,
            merging,
            g.uuid
        );
    }
}
