//! The benchmarks that run in the bench binary (`memfabric-bench`, in the tests crate:
//! they need the probes in-process). `cargo xtask bench` parses the same subcommands and
//! hands its arguments on unchanged, so both read one definition.

use clap::Subcommand;

#[derive(Subcommand)]
pub enum InProcess {
    /// Cost of the probes on a write-fault loop: detached vs attached (process not
    /// tracked: the in-kernel filter) vs attached and tracked (full accounting).
    Probes {
        /// Fresh pages written per run (262144 = 1 GiB).
        #[arg(long, default_value_t = 262_144)]
        pages: usize,
        /// Interleaved rounds; each round runs every mode once, in rotating order.
        #[arg(long, default_value_t = 15)]
        rounds: usize,
    },
    /// The page scanner on lab guests: xxh3 vs memcpy of the same bytes, scan throughput,
    /// state bytes per page, and hash grouping against an exact byte-for-byte recount.
    Scan {
        #[arg(long, default_value_t = 2)]
        guests: u32,
        #[arg(long, default_value_t = 7)]
        rounds: usize,
    },
    /// The fabric on a simulated fleet built from lab guests' page hashes: estimate
    /// error per k, candidate time, exchange bytes, hosts freed vs first-fit decreasing.
    Fabric {
        #[arg(long, default_value_t = 1000)]
        hosts: usize,
        #[arg(long, default_value_t = 20)]
        vms: usize,
        /// Lab guests whose page hashes seed the fleet's images (0: synthetic only).
        #[arg(long, default_value_t = 3)]
        guests: u32,
        /// The fleet's gossip interval in seconds (`[fabric] gossip_interval_ms`).
        #[arg(long, default_value_t = 60.0)]
        gossip_interval_s: f64,
    },
    /// Indexing a destination's pages before a migration (the index its filter is built
    /// from): holders of `gib` GiB in all indexed by one thread and by the default number
    /// (the host's cores, at most 8), interleaved rounds; wall time and throughput.
    Index {
        #[arg(long, default_value_t = 4)]
        gib: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// The two proxies' throughput without QEMU or a link: a synthetic stream of a `mib`
    /// MiB guest (half held by the destination) through mutual TLS on loopback, the
    /// source proxy on one thread and on two, interleaved rounds.
    Proxy {
        #[arg(long, default_value_t = 512)]
        mib: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Taking a merged range out of KSM: memfabric's bounded injected calls vs one call
    /// over the whole range; the guest's longest fault stall, interleaved rounds.
    Unmerge {
        #[arg(long, default_value_t = 1024)]
        mib: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// What one scan pass costs as guest RAM grows (holders of 1, 4, 16 GiB, half of it
    /// merged by KSM): reading every page vs skipping pages whose content the frame tells;
    /// then the daemon on them: CPU per hour and RSS resting and never resting, time to
    /// rank a new 4 GiB VM, churn to verdict, prediction.
    Scale {
        /// Sizes of guest RAM in GiB, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
        gib: Vec<usize>,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Seconds of each steady window of the daemon (0: the daemon's part is skipped).
        #[arg(long, default_value_t = 120)]
        window: u64,
    },
}
