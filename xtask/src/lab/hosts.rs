//! Two lab "hosts" on one machine: two network namespaces joined by a veth pair whose
//! egress is rate-limited with `tc` (a token bucket at the link's speed), so that a
//! migration between them crosses a link of a known speed and its bytes can be counted
//! on the interfaces. The namespaces carry only the link: QEMU and the lab guests stay in
//! the machine's namespace and talk to the proxies through unix sockets (a pathname unix
//! socket is reachable from any network namespace). Dropping the value deletes both
//! namespaces (and with them the veth pair).

use std::{fs, net::Ipv4Addr, os::fd::AsRawFd as _, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::cmd;

/// One side of the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Src,
    Dst,
}

/// The two namespaces and the link between them.
#[derive(Debug)]
pub struct TwoHosts {
    src_ns: String,
    dst_ns: String,
    src_if: String,
    dst_if: String,
}

/// The source's address on the link.
pub const SRC_ADDR: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
/// The destination's address on the link.
pub const DST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 2);

fn ip(args: &[&str]) -> anyhow::Result<()> {
    cmd::run(Command::new("ip").args(args)).with_context(|| format!("ip {}", args.join(" ")))
}

impl TwoHosts {
    /// Creates the namespaces (named after this process, so two runs never share one)
    /// and the link, unlimited.
    pub fn up() -> anyhow::Result<TwoHosts> {
        if !cmd::is_root() {
            bail!("the two lab hosts are network namespaces: run as root");
        }
        remove_stale();
        let id = std::process::id();
        let hosts = TwoHosts {
            src_ns: format!("memfabric-src-{id}"),
            dst_ns: format!("memfabric-dst-{id}"),
            src_if: format!("mfs{id}"),
            dst_if: format!("mfd{id}"),
        };
        // From here on, Drop removes whatever was made.
        ip(&["netns", "add", &hosts.src_ns])?;
        ip(&["netns", "add", &hosts.dst_ns])?;
        ip(&[
            "link",
            "add",
            &hosts.src_if,
            "netns",
            &hosts.src_ns,
            "type",
            "veth",
            "peer",
            "name",
            &hosts.dst_if,
            "netns",
            &hosts.dst_ns,
        ])?;
        for (ns, dev, addr) in [
            (&hosts.src_ns, &hosts.src_if, SRC_ADDR),
            (&hosts.dst_ns, &hosts.dst_if, DST_ADDR),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }

    fn ns(&self, side: Side) -> &str {
        match side {
            Side::Src => &self.src_ns,
            Side::Dst => &self.dst_ns,
        }
    }

    fn dev(&self, side: Side) -> &str {
        match side {
            Side::Src => &self.src_if,
            Side::Dst => &self.dst_if,
        }
    }

    /// Limits both directions of the link to `rate_mbit` (None: unlimited). A token
    /// bucket whose burst is 10 ms at that rate (at least 64 KiB), as an operator's link
    /// shaper would be.
    pub fn set_rate(&self, rate_mbit: Option<u32>) -> anyhow::Result<()> {
        for side in [Side::Src, Side::Dst] {
            let (ns, dev) = (self.ns(side), self.dev(side));
            // Nothing to delete on the first call: its error is expected.
            let _ = Command::new("ip")
                .args([
                    "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root",
                ])
                .stderr(std::process::Stdio::null())
                .status();
            if let Some(r) = rate_mbit {
                let burst = (u64::from(r) * 1_000_000 / 8 / 100).max(64 << 10);
                ip(&[
                    "netns",
                    "exec",
                    ns,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    dev,
                    "root",
                    "tbf",
                    "rate",
                    &format!("{r}mbit"),
                    "burst",
                    &burst.to_string(),
                    "latency",
                    "100ms",
                ])
                .with_context(|| format!("limiting {dev} to {r} Mbit/s"))?;
            }
        }
        Ok(())
    }

    /// Bytes sent by `side`'s interface so far (IP packets with their headers: what the
    /// link carried).
    pub fn tx_bytes(&self, side: Side) -> anyhow::Result<u64> {
        let out = cmd::output(Command::new("ip").args([
            "netns",
            "exec",
            self.ns(side),
            "cat",
            &format!("/sys/class/net/{}/statistics/tx_bytes", self.dev(side)),
        ]))
        .context("reading the link's byte counter")?;
        out.trim()
            .parse()
            .with_context(|| format!("tx_bytes {out:?}"))
    }

    /// Bytes the link carried so far, both directions.
    pub fn link_bytes(&self) -> anyhow::Result<u64> {
        Ok(self.tx_bytes(Side::Src)? + self.tx_bytes(Side::Dst)?)
    }

    /// `program` run on `side` (`ip netns exec`, which execs it: the child's PID is the
    /// program's).
    pub fn command(&self, side: Side, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.ns(side)]).arg(program);
        c
    }

    /// What moves a thread onto `side` (see [`Entry::enter`]); it can be sent to the
    /// thread that needs it.
    pub fn entry(&self, side: Side) -> Entry {
        Entry(PathBuf::from(format!("/run/netns/{}", self.ns(side))))
    }
}

/// A namespace to move a thread into.
#[derive(Clone, Debug)]
pub struct Entry(PathBuf);

impl Entry {
    /// Moves the calling thread (only it) into the namespace: sockets it creates from
    /// now on are on that host.
    pub fn enter(self) -> anyhow::Result<()> {
        let f = fs::File::open(&self.0).with_context(|| format!("opening {}", self.0.display()))?;
        // SAFETY: setns on a valid namespace fd; it changes only this thread's namespace.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns");
        }
        Ok(())
    }
}

/// Deletes the namespaces of runs that died without cleaning up (their process is gone).
pub fn remove_stale() {
    let Ok(dir) = fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let owner = name
            .strip_prefix("memfabric-src-")
            .or_else(|| name.strip_prefix("memfabric-dst-"))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = owner
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in [&self.src_ns, &self.dst_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
