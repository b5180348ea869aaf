//! `memfabric migrate send|receive`: one deduplicating live migration of a QEMU guest,
//! each side run on its host (see `memfabric::migrate`). The receiving side first, with
//! the incoming QEMU listening (`-incoming unix:PATH -S`); then the sending side.
//! Exit 0: QEMU's migration completed and the destination verified every byte; 1: the
//! migration failed and the VM runs on the source; 2: bad arguments.

use std::{
    io::IsTerminal as _,
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::{Args, Subcommand};
use memfabric::migrate::{
    Progress,
    run::{self, ReceiveOptions, SendOptions, Summary, Tls},
};

#[derive(Args)]
pub(super) struct MigrateArgs {
    #[command(subcommand)]
    side: Side,
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
        #[arg(long, required_unless_present = "qmp")]
        vm: Option<String>,
        /// The VM's QMP socket, if not found from its command line.
        #[arg(long)]
        qmp: Option<PathBuf>,
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
fn bits_per_second(s: &str) -> Result<u64, String> {
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

/// A progress line on stderr every second while `fut` runs.
async fn with_progress<T>(
    progress: Arc<Progress>,
    what: &'static str,
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
            let eta = p
                .eta(started.elapsed())
                .map_or_else(String::new, |d| format!(", ETA {:.0} s", d.as_secs_f64()));
            let line = format!(
                "{what}: {:.0} s, stream {:.1} MiB, on the wire {:.1} MiB, {} pages referenced, {} resent{eta}",
                started.elapsed().as_secs_f64(),
                mib(Progress::get(&p.qemu_bytes)),
                mib(Progress::get(&p.wire_bytes)),
                Progress::get(&p.referenced),
                Progress::get(&p.resent),
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
    if let Some(d) = s.downtime_ms {
        println!("downtime          {d:>10} ms (QEMU's query-migrate)");
    }
}

pub(super) fn run(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let progress = Arc::new(Progress::default());
    let (result, json) = match args.side {
        Side::Send {
            vm,
            qmp,
            to,
            node,
            tls,
            bandwidth,
            json,
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
            };
            let r = rt.block_on(with_progress(
                progress.clone(),
                "sending",
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
                eprintln!(
                    "receiving on {addr}: this host holds {} distinct pages ({:.0} MiB of guest RAM read)",
                    h.pages(),
                    mib(h.scanned_bytes)
                );
            };
            let r = rt.block_on(with_progress(
                progress.clone(),
                "receiving",
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
            eprintln!("memfabric migrate: {e}; the VM keeps running on the source");
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
