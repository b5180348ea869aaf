//! `memfabric migrate --vm VM --to HOST|best`: one deduplicating live migration of a QEMU
//! guest to a peer whose agent accepts it (it starts the incoming QEMU; see
//! `memfabric::migrate`). `memfabric migrate send|receive`: the same with each side run by
//! hand, the incoming QEMU started by the operator (`-incoming unix:PATH -S`).
//! Exit 0: the guest runs on the destination (send: QEMU's migration completed and the
//! destination verified every byte); 1: the migration failed and the VM runs on the
//! source; 2: bad arguments; 3: the outcome is unknown and the VM is paused on the
//! source (the message says what to check).

use std::{
    io::IsTerminal as _,
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::{Args, Subcommand};
use memfabric::migrate::{
    Progress, outgoing,
    remote::{self, RemoteOptions},
    run::{self, ReceiveOptions, SendOptions, Summary, Tls},
};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub(super) struct MigrateArgs {
    #[command(subcommand)]
    side: Option<Side>,
    /// The VM: name, UUID or PID.
    #[arg(long, required = true)]
    vm: Option<String>,
    /// The destination: a peer's node name (`memfabric peers`), or `best`, the peer that
    /// holds most of the VM's pages (`memfabric candidates`).
    #[arg(long, required = true)]
    to: Option<String>,
    /// The daemon's config file: its `[fabric]` certificates are this side's.
    #[arg(long, required = true)]
    config: Option<PathBuf>,
    /// The local daemon, asked for the peers' addresses and the candidates.
    #[arg(long, env = "MEMFABRIC_ENDPOINT", default_value_t = format!("http://{}", memfabric::config::DEFAULT_LISTEN))]
    endpoint: String,
    /// The most the migration may put on the link, in bits per second (`100M`, `2.5G`).
    #[arg(long, value_parser = bits_per_second)]
    bandwidth: Option<u64>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Clone)]
struct TlsArgs {
    /// The cluster CA (PEM) that signs every agent's certificate (the fabric's).
    #[arg(long)]
    ca: PathBuf,
    /// This host's fabric certificate (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// This host's fabric key (PEM).
    #[arg(long)]
    key: PathBuf,
}

impl TlsArgs {
    fn tls(&self) -> Tls {
        Tls {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }
}

#[derive(Subcommand)]
enum Side {
    /// Send a local QEMU guest to a destination running `migrate receive`.
    Send {
        /// The VM: name, UUID or PID (its QMP socket from its command line).
        #[arg(long, required_unless_present_any = ["qmp", "qemu_socket"])]
        vm: Option<String>,
        /// The VM's QMP socket, if not found from its command line.
        #[arg(long)]
        qmp: Option<PathBuf>,
        /// When something else drives QEMU (libvirt holds its QMP socket): listen on this
        /// unix socket and relay the migration QEMU sends there (`virsh migrate
        /// --migrateuri unix://PATH`); its capabilities are not checked and a failure is
        /// left to whoever drives it.
        #[arg(long, conflicts_with_all = ["vm", "qmp"])]
        qemu_socket: Option<PathBuf>,
        /// With --qemu-socket: the multifd channels QEMU opens besides the main one
        /// (libvirt's `--parallel-connections`; 0: multifd off). Found over QMP otherwise.
        #[arg(long, default_value_t = 0, requires = "qemu_socket", value_parser = clap::value_parser!(u8).range(0..=64))]
        multifd: u8,
        /// The destination proxy's address (HOST:PORT).
        #[arg(long)]
        to: String,
        /// The destination's node name, which its certificate must carry.
        #[arg(long)]
        node: String,
        #[command(flatten)]
        tls: TlsArgs,
        /// The most the migration may put on the link, in bits per second with an SI
        /// suffix (`100M`, `2.5G`); default: as fast as the link takes it.
        #[arg(long, value_parser = bits_per_second)]
        bandwidth: Option<u64>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Receive one migration into an incoming QEMU, resolving references from this host's
    /// VMs.
    Receive {
        /// Where the source proxy connects (HOST:PORT).
        #[arg(long)]
        listen: String,
        /// The unix socket the incoming QEMU listens on (`-incoming unix:PATH`).
        #[arg(long)]
        incoming: PathBuf,
        /// The migrating VM's UUID: QEMUs with it are not used as donors.
        #[arg(long)]
        uuid: Option<String>,
        #[command(flatten)]
        tls: TlsArgs,
        /// Seconds to wait for the source.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
}

/// `100M`, `2.5G`, `800k` or a plain number: bits per second, as bytes per second.
pub(super) fn bits_per_second(s: &str) -> Result<u64, String> {
    let (num, scale) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1e3),
        Some((i, 'M')) => (&s[..i], 1e6),
        Some((i, 'G')) => (&s[..i], 1e9),
        _ => (s, 1.0),
    };
    match num.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v * scale >= 8_000.0 && v * scale <= 1e12 => {
            Ok((v * scale / 8.0) as u64)
        }
        _ => Err(format!(
            "{s:?}: a link speed in bits per second from 8k to 1000G, such as 100M or 1G"
        )),
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// The QMP socket of the VM named `which` (name, UUID or PID).
fn qmp_of(which: &str) -> Result<PathBuf, String> {
    let vms = memfabric::host::inventory::discover(&Default::default());
    let vm = vms
        .values()
        .find(|v| v.name == which || v.uuid.as_deref() == Some(which) || v.pid.to_string() == which)
        .ok_or_else(|| {
            format!("no VM named {which:?} on this host (memfabric status lists them)")
        })?;
    memfabric::actuate::qmp::socket_of(vm.pid).map_err(|e| format!("VM {which}: {e}; give --qmp"))
}

/// A progress line on stderr every second while `fut` runs (and the migration's record
/// for the daemon's metrics, when one is kept).
async fn with_progress<T>(
    progress: Arc<Progress>,
    what: &'static str,
    record: Option<&outgoing::Recorder>,
    fut: impl std::future::Future<Output = T>,
) -> T {
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let every = if tty { 1 } else { 5 };
    let ticker = async {
        let mut tick = tokio::time::interval(Duration::from_secs(every));
        tick.tick().await;
        loop {
            tick.tick().await;
            let p = &progress;
            if let Some(r) = record {
                r.write(p, outgoing::Outcome::Sending);
            }
            let eta = p
                .eta(started.elapsed())
                .map_or_else(String::new, |d| format!(", ETA {:.0} s", d.as_secs_f64()));
            let line = format!(
                "{what}: {:.0} s, {}{eta}",
                started.elapsed().as_secs_f64(),
                moved(p)
            );
            if tty {
                eprint!("\r{line}   ");
            } else {
                eprintln!("{line}");
            }
        }
    };
    tokio::select! {
        r = fut => {
            if tty {
                eprintln!();
            }
            r
        }
        () = ticker => unreachable!("the ticker never ends"),
    }
}

fn print(s: &Summary, json: bool) {
    if json {
        println!("{}", serde_json::to_string(s).unwrap_or_default());
        return;
    }
    let pct = |a: u64, b: u64| {
        if b == 0 {
            0.0
        } else {
            100.0 * a as f64 / b as f64
        }
    };
    println!(
        "QEMU's stream     {:>10.1} MiB (what a plain migration sends)",
        mib(s.stream_bytes)
    );
    println!(
        "on the wire       {:>10.1} MiB ({:.1} % of the stream; filter {:.2} MiB)",
        mib(s.wire_bytes),
        pct(s.wire_bytes, s.stream_bytes),
        mib(s.filter_bytes)
    );
    println!(
        "pages             {:>10} referenced, {} sent again",
        s.referenced, s.resent
    );
    println!("time              {:>10.1} s", s.seconds);
    if s.channels > 1 {
        println!(
            "channels          {:>10} (QEMU's main channel and {} multifd channels, a link each)",
            s.channels,
            s.channels - 1
        );
    }
    if let Some(d) = s.downtime_ms {
        println!("downtime          {d:>10} ms (QEMU's query-migrate)");
    }
    if let Some(l) = s.downtime_limit_ms {
        println!(
            "downtime limit    {l:>10} ms at the lowest (QEMU's limit scaled by the wire's share \
             of its stream; the operator's put back)"
        );
    }
}

/// The local VM `which` (name, UUID or PID).
fn local_vm(which: &str) -> Result<memfabric::host::inventory::Vm, String> {
    memfabric::host::inventory::discover(&Default::default())
        .into_values()
        .find(|v| v.name == which || v.uuid.as_deref() == Some(which) || v.pid.to_string() == which)
        .ok_or_else(|| format!("no VM named {which:?} on this host (memfabric status lists them)"))
}

/// Whether a candidates entry is about `vm` (keyed by its UUID, else its name).
fn is_vm(entry: &serde_json::Value, vm: &memfabric::host::inventory::Vm) -> bool {
    let id = vm.uuid.as_deref().unwrap_or(&vm.name);
    entry["vm"] == id || entry["vm"] == vm.name.as_str()
}

/// The fabric's estimate of the bytes a migration of `vm` to `node` need not send (its
/// candidate pair), when the local agent has one.
fn predicted_saving(
    candidates: &serde_json::Value,
    vm: &memfabric::host::inventory::Vm,
    node: &str,
) -> Option<u64> {
    candidates["candidates"]["pairs"]
        .as_array()?
        .iter()
        .find(|p| is_vm(p, vm) && p["host"] == node)
        .and_then(|p| p["shared_bytes"].as_u64())
}

/// The destination's node name and fabric address, from the local daemon: the peer `to`,
/// or for `best` the peer its `candidates` say holds most of the VM.
fn destination(
    endpoint: &str,
    to: &str,
    vm: &memfabric::host::inventory::Vm,
    candidates: &Result<serde_json::Value, (ExitCode, String)>,
) -> Result<(String, std::net::SocketAddr), (ExitCode, String)> {
    let node = if to == "best" {
        candidates.as_ref().map_err(Clone::clone)?["candidates"]["best"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| is_vm(b, vm))
            .and_then(|b| b["host"].as_str().map(str::to_owned))
            .ok_or_else(|| {
                (
                    ExitCode::from(1),
                    format!(
                        "no peer is known to hold any of {}'s pages yet (memfabric candidates): name the destination with --to NODE",
                        vm.name
                    ),
                )
            })?
    } else {
        to.to_owned()
    };
    let peers = super::fabric::daemon_json(endpoint, "/v1/peers")?;
    let peer = peers["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["node"] == node.as_str())
        .ok_or_else(|| {
            (
                ExitCode::from(2),
                format!("{node:?} is not a peer of this host's agent (memfabric peers)"),
            )
        })?;
    let addr = peer["addr"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| (ExitCode::from(1), format!("{node}: no address known")))?;
    Ok((node, addr))
}

/// `memfabric migrate --vm --to`.
fn to_peer(args: MigrateArgs, rt: &tokio::runtime::Runtime) -> anyhow::Result<ExitCode> {
    let (Some(which), Some(to), Some(config)) = (args.vm, args.to, args.config) else {
        unreachable!("clap requires them");
    };
    Ok(migrate_one(
        &ToPeer {
            config,
            endpoint: args.endpoint,
            bandwidth: args.bandwidth,
            json: args.json,
        },
        &which,
        &to,
        rt,
    ))
}

/// What every migration to a peer needs besides the VM and the destination.
pub(super) struct ToPeer {
    pub(super) config: PathBuf,
    pub(super) endpoint: String,
    pub(super) bandwidth: Option<u64>,
    pub(super) json: bool,
}

/// Migrates the local VM `which` to the peer `to` (or `best`) through its agent; the exit
/// code the module's doc lists.
pub(super) fn migrate_one(
    p: &ToPeer,
    which: &str,
    to: &str,
    rt: &tokio::runtime::Runtime,
) -> ExitCode {
    let config = &p.config;
    let fail = |code: u8, msg: String| {
        eprintln!("memfabric migrate: {msg}");
        ExitCode::from(code)
    };
    let (tls, state_dir) = match memfabric::config::FileConfig::load(config) {
        Ok(f) => match (f.fabric.ca_file, f.fabric.cert_file, f.fabric.key_file) {
            (Some(ca), Some(cert), Some(key)) => (
                Tls { ca, cert, key },
                f.state_dir
                    .unwrap_or_else(|| memfabric::config::DEFAULT_STATE_DIR.into()),
            ),
            _ => {
                return fail(
                    2,
                    format!(
                        "{}: no [fabric] ca_file, cert_file and key_file",
                        config.display()
                    ),
                );
            }
        },
        Err(e) => return fail(2, e.to_string()),
    };
    let vm = match local_vm(which) {
        Ok(v) => v,
        Err(e) => return fail(2, e),
    };
    let qmp = match memfabric::actuate::qmp::socket_of(vm.pid) {
        Ok(q) => q,
        Err(e) => return fail(2, format!("VM {which}: {e}")),
    };
    // Asked once: for `best`, and for the prediction printed beside the result.
    let candidates = super::fabric::daemon_json(&p.endpoint, "/v1/candidates");
    let (node, addr) = match destination(&p.endpoint, to, &vm, &candidates) {
        Ok(d) => d,
        Err((code, msg)) => {
            eprintln!("memfabric migrate: {msg}");
            return code;
        }
    };
    let predicted = candidates
        .as_ref()
        .ok()
        .and_then(|c| predicted_saving(c, &vm, &node));
    eprintln!(
        "migrating {} (pid {}) to {node} at {addr}{}",
        vm.name,
        vm.pid,
        predicted.map_or_else(String::new, |b| format!(
            "; the fabric predicts {:.1} MiB not sent",
            mib(b)
        ))
    );
    let progress = Arc::new(Progress::default());
    let opts = RemoteOptions {
        pid: vm.pid,
        qmp,
        name: vm.name.clone(),
        uuid: vm.uuid.clone(),
        node: node.clone(),
        addr,
        tls,
        work_dir: std::env::temp_dir().join(format!("memfabric-migrate-{}", std::process::id())),
        bandwidth: p.bandwidth,
    };
    // Kept in the daemon's state directory for its metrics (the daemon does not see this
    // process's migration otherwise).
    let record = outgoing::Recorder::open(&state_dir);
    let r = rt.block_on(with_progress(
        progress.clone(),
        "migrating",
        record.as_ref(),
        remote::migrate(opts, progress.clone()),
    ));
    let outcome = match &r {
        Ok(_) => outgoing::Outcome::Completed,
        Err(memfabric::migrate::Failure::Undecided(_)) => outgoing::Outcome::Undecided,
        Err(_) => outgoing::Outcome::Failed,
    };
    if let Some(rec) = &record {
        rec.write(&progress, outcome);
    }
    match r {
        Ok(s) => {
            print(&s, p.json);
            if let Some(predicted) = predicted {
                let saved = s.stream_bytes.saturating_sub(s.wire_bytes);
                eprintln!(
                    "saved {:.1} MiB on the wire; the fabric predicted {:.1} MiB ({:+.0} %)",
                    mib(saved),
                    mib(predicted),
                    if saved == 0 {
                        0.0
                    } else {
                        100.0 * (predicted as f64 - saved as f64) / saved as f64
                    }
                );
            }
            eprintln!("{} runs on {node}", vm.name);
            ExitCode::SUCCESS
        }
        Err(e) => {
            let sofar = print_failure(&progress, outcome, &e.to_string(), p.json);
            if outcome == outgoing::Outcome::Undecided {
                fail(3, format!("{e} ({sofar})"))
            } else {
                fail(
                    1,
                    format!("{e}; the VM keeps running on the source ({sofar})"),
                )
            }
        }
    }
}

/// What a migration that did not complete had moved: as JSON on stdout with `--json` (a
/// script reading the summary gets the outcome and the error instead of nothing), and as
/// the returned text for the error line. An operator deciding whether to try again at
/// another time or to another host wants to know how far it got.
fn print_failure(
    progress: &Progress,
    outcome: outgoing::Outcome,
    error: &str,
    json: bool,
) -> String {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "outcome": outcome,
                "error": error,
                "stream_bytes": Progress::get(&progress.qemu_bytes),
                "wire_bytes": Progress::get(&progress.wire_bytes),
                "referenced": Progress::get(&progress.referenced),
                "resent": Progress::get(&progress.resent),
            })
        );
    }
    format!("before it ended: {}", moved(progress))
}

/// What a migration moved so far, for the progress line and the error line.
fn moved(p: &Progress) -> String {
    format!(
        "stream {:.1} MiB, on the wire {:.1} MiB, {} pages referenced, {} resent",
        mib(Progress::get(&p.qemu_bytes)),
        mib(Progress::get(&p.wire_bytes)),
        Progress::get(&p.referenced),
        Progress::get(&p.resent),
    )
}

/// The runtime a migration runs on: two threads, so that the source proxy's reading,
/// splitting and hashing of QEMU's stream and its encrypting and sending of frames (tasks
/// of their own) run side by side; on one thread they took turns.
pub(super) fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

pub(super) fn run(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    let Some(side) = args.side else {
        return to_peer(args, &rt);
    };
    let progress = Arc::new(Progress::default());
    let (result, json) = match side {
        Side::Send {
            qemu_socket: Some(socket),
            to,
            node,
            tls,
            bandwidth,
            json,
            multifd,
            ..
        } => {
            let opts = run::SocketSendOptions {
                socket,
                to,
                node,
                tls: tls.tls(),
                bandwidth,
                multifd,
                accept_timeout: Duration::from_secs(600),
            };
            let r = rt.block_on(with_progress(
                progress.clone(),
                "sending",
                None,
                run::send_via_socket(opts, progress.clone()),
            ));
            (r, json)
        }
        Side::Send {
            vm,
            qmp,
            to,
            node,
            tls,
            bandwidth,
            json,
            qemu_socket: None,
            multifd: _,
        } => {
            let qmp = match (qmp, vm) {
                (Some(q), _) => q,
                (None, Some(vm)) => match qmp_of(&vm) {
                    Ok(q) => q,
                    Err(e) => {
                        eprintln!("memfabric migrate: {e}");
                        return Ok(ExitCode::from(2));
                    }
                },
                (None, None) => unreachable!("clap requires one"),
            };
            let opts = SendOptions {
                qmp,
                to,
                node,
                tls: tls.tls(),
                work_dir: std::env::temp_dir()
                    .join(format!("memfabric-migrate-{}", std::process::id())),
                bandwidth,
                token: None,
            };
            let r = rt.block_on(with_progress(
                progress.clone(),
                "sending",
                None,
                run::send(opts, progress.clone()),
            ));
            (r, json)
        }
        Side::Receive {
            listen,
            incoming,
            uuid,
            tls,
            timeout,
            json,
        } => {
            let opts = ReceiveOptions {
                listen,
                incoming,
                uuid,
                tls: tls.tls(),
                accept_timeout: Duration::from_secs(timeout),
            };
            let ready = |addr: std::net::SocketAddr, h: &memfabric::migrate::holdings::Holdings| {
                eprintln!("receiving on {addr}: this host holds {}", h.summary());
            };
            let r = rt.block_on(with_progress(
                progress.clone(),
                "receiving",
                None,
                run::receive(opts, ready, progress.clone()),
            ));
            (r, json)
        }
    };
    match result {
        Ok(s) => {
            print(&s, json);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let sofar = print_failure(&progress, outgoing::Outcome::Failed, &e.to_string(), json);
            eprintln!("memfabric migrate: {e}; the VM keeps running on the source ({sofar})");
            Ok(ExitCode::from(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::bits_per_second;

    #[test]
    fn link_speeds_are_bits_per_second() {
        assert_eq!(bits_per_second("100M"), Ok(12_500_000));
        assert_eq!(bits_per_second("2.5G"), Ok(312_500_000));
        assert_eq!(bits_per_second("800k"), Ok(100_000));
        assert_eq!(bits_per_second("8000"), Ok(1_000));
        for bad in ["", "M", "-1M", "0", "1", "NaNM", "infG", "5000G", "100 M"] {
            assert!(bits_per_second(bad).is_err(), "{bad:?}");
        }
    }
}
