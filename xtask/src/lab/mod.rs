//! The VM lab: real QEMU guests as the workload for the demo, tests and benchmarks.
//! `up` boots N guests in the background and records them in target/lab/guests.tsv;
//! `status` lists them; `down` stops exactly those guests (by PID, verified), and is safe
//! to run twice.

pub mod hosts;
pub mod initramfs;
pub mod kernel;
pub mod profile;
pub mod qemu;
pub mod scenario;

use std::{fs, path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
pub use profile::{Profile, Workload};
pub use qemu::Guest;

use crate::{cmd, ksm};

/// Where the lab records its guests: `MEMFABRIC_LAB_STATE`, or target/lab. (Tests use
/// their own, so that they never touch a developer's running lab.)
pub fn state_dir() -> PathBuf {
    std::env::var_os("MEMFABRIC_LAB_STATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| cmd::root().join("target/lab"))
}

fn state_file() -> PathBuf {
    state_dir().join("guests.tsv")
}

/// Options of `lab up`.
#[derive(Clone, Debug)]
pub struct UpOptions {
    pub guests: u32,
    pub mem_mb: u32,
    pub profile: Profile,
    /// Kernel versions, used round-robin; empty: today's Debian cloud kernel (and, for the
    /// mixed profile, the previous 6.1 one as well when the archive has it).
    pub kernels: Vec<String>,
    /// First guest number (names are lab-N).
    pub first: u32,
    pub boot_timeout: Duration,
    /// QEMU's `mem-merge` (on by default; off: the operator's "never merge this guest").
    pub mem_merge: bool,
}

impl Default for UpOptions {
    fn default() -> Self {
        UpOptions {
            guests: 3,
            mem_mb: 256,
            profile: Profile::Static,
            kernels: Vec::new(),
            first: 1,
            boot_timeout: Duration::from_secs(240),
            mem_merge: true,
        }
    }
}

/// Parses `256M`, `1G` or a plain number of MiB.
pub fn parse_mem(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('G' | 'g') => (&s[..s.len() - 1], 1024),
        Some('M' | 'm') => (&s[..s.len() - 1], 1),
        _ => (s, 1),
    };
    let n: u32 = num
        .parse()
        .map_err(|_| format!("bad memory size {s:?} (e.g. 256M, 1G)"))?;
    let mb = n * mult;
    if !(64..=16384).contains(&mb) {
        return Err(format!("guest memory {mb} MiB out of range (64M..16G)"));
    }
    Ok(mb)
}

/// The guests recorded by earlier `up`s.
pub fn guests() -> Vec<Guest> {
    let text = fs::read_to_string(state_file()).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let [name, pid, uuid, kernel, profile, console] = f[..] else {
                return None;
            };
            Some(Guest {
                name: name.into(),
                pid: pid.parse().ok()?,
                uuid: uuid.into(),
                kernel: kernel.into(),
                profile: profile.into(),
                console: console.into(),
            })
        })
        .collect()
}

fn save(guests: &[Guest]) -> anyhow::Result<()> {
    fs::create_dir_all(state_dir())?;
    let mut text = String::new();
    for g in guests {
        text.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\n",
            g.name,
            g.pid,
            g.uuid,
            g.kernel,
            g.profile,
            g.console.display()
        ));
    }
    fs::write(state_file(), text)?;
    Ok(())
}

/// Kernels and the initramfs the guests boot.
pub struct Images {
    pub kernels: Vec<kernel::Kernel>,
    pub initramfs: PathBuf,
}

impl Images {
    /// Resolves and fetches `versions` (empty: today's cloud kernel, plus the previous 6.1
    /// one when `two_kernels` and the archive has it) and builds the initramfs.
    pub fn prepare(versions: &[String], two_kernels: bool) -> anyhow::Result<Images> {
        let mut packages: Vec<String> = versions.iter().map(|k| kernel::package_name(k)).collect();
        if packages.is_empty() {
            let current = kernel::current_package()?;
            packages.push(current.clone());
            if two_kernels {
                // The 6.1 kernel just before today's (numerically ordered), or the newest
                // 6.1 if today's is another series.
                let all = kernel::available_6_1()?;
                let older = match all.iter().position(|p| *p == current) {
                    Some(i) => i.checked_sub(1).map(|j| all[j].clone()),
                    None => all.last().cloned(),
                };
                match older {
                    Some(p) => packages.push(p),
                    None => eprintln!("lab: the archive offers one 6.1 cloud kernel only"),
                }
            }
        }
        Ok(Images {
            kernels: packages
                .iter()
                .map(|p| kernel::fetch(p))
                .collect::<Result<_, _>>()?,
            initramfs: initramfs::build(&kernel::cache_dir())?,
        })
    }
}

/// Starts one guest (not waiting for it to be ready) and records it.
pub fn start(
    images: &Images,
    name: &str,
    workload: Workload,
    mem_mb: u32,
    kernel: usize,
    mem_merge: bool,
) -> anyhow::Result<Guest> {
    let mut all = guests();
    all.retain(qemu::alive);
    if all.iter().any(|g| g.name == name) {
        bail!("{name} is already running: `cargo xtask lab down` first");
    }
    let need = workload.data_mb() + 96;
    if mem_mb < need {
        bail!("{mem_mb} MiB is too little for {name}'s workload: give it {need} MiB or more");
    }
    let dir = state_dir();
    fs::create_dir_all(&dir)?;
    let spec = qemu::GuestSpec {
        name: name.to_owned(),
        mem_mb,
        kernel: &images.kernels[kernel % images.kernels.len()],
        initramfs: &images.initramfs,
        workload,
        mem_merge,
    };
    let g = qemu::boot(&spec, &dir)?;
    eprintln!(
        "lab: booting {} (pid {}, kernel {}, {})",
        g.name, g.pid, g.kernel, g.profile
    );
    all.push(g.clone());
    save(&all)?;
    Ok(g)
}

/// Stops one guest and drops it from the state.
pub fn stop(guest: &Guest) -> anyhow::Result<()> {
    qemu::stop(guest);
    let mut all = guests();
    all.retain(|g| g.name != guest.name && qemu::alive(g));
    save(&all)
}

/// Boots guests and waits until all are ready. On failure stops what it started.
pub fn up(opts: &UpOptions) -> anyhow::Result<Vec<Guest>> {
    let images = Images::prepare(&opts.kernels, opts.profile == Profile::Mixed)?;
    let mut started = Vec::new();
    for i in 0..opts.guests {
        let n = opts.first + i;
        match start(
            &images,
            &format!("lab-{n}"),
            Workload::new(opts.profile, n).scaled_to(opts.mem_mb),
            opts.mem_mb,
            i as usize,
            opts.mem_merge,
        ) {
            Ok(g) => started.push(g),
            Err(e) => {
                started.iter().for_each(qemu::stop);
                return Err(e);
            }
        }
    }
    if let Err(e) = qemu::wait_ready(&started, opts.boot_timeout) {
        for g in &started {
            let _ = stop(g);
        }
        return Err(e);
    }
    Ok(started)
}

/// One line per guest: alive or not, RSS, KSM merging pages.
pub fn status() -> Vec<(Guest, bool, u64, u64)> {
    guests()
        .into_iter()
        .map(|g| {
            let alive = qemu::alive(&g);
            let rss_kb = proc_field(g.pid, "status", "VmRSS:").unwrap_or(0);
            let merging = proc_field(g.pid, "ksm_stat", "ksm_merging_pages").unwrap_or(0);
            (g, alive, rss_kb, merging)
        })
        .collect()
}

/// A numeric field of /proc/PID/FILE (`Key: value [kB]` or `key value`).
pub fn proc_field(pid: u32, file: &str, key: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Stops every lab guest and clears the state; repairs KSM settings a crashed session
/// left. Safe to run twice.
pub fn down() -> anyhow::Result<usize> {
    let all = guests();
    let mut stopped = 0;
    for g in &all {
        if qemu::alive(g) {
            qemu::stop(g);
            stopped += 1;
            eprintln!("lab: stopped {} (pid {})", g.name, g.pid);
        }
    }
    if let Some(g) = all.iter().find(|g| qemu::alive(g)) {
        bail!("{} (pid {}) did not stop", g.name, g.pid);
    }
    let _ = fs::remove_file(state_file());
    ksm::restore_leftover().context("repairing KSM settings")?;
    Ok(stopped)
}
