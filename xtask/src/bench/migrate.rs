//! `cargo xtask bench migrate`: a lab guest migrated between the two lab hosts (network
//! namespaces joined by a rate-limited veth, see `xtask::lab::hosts`), plainly and through
//! memfabric's proxies, side by side, at each link speed, with and without a twin guest
//! (same image, another seed) on the destination. Reported per migration: bytes the link
//! carried (both directions, IP headers included, read from the interfaces), QEMU's
//! stream, time from `migrate` to completion, QEMU's downtime, the proxies' CPU and the
//! pages referenced and sent again.
//!
//! The plain migration goes through a byte relay on each host (QEMU's unix socket to TCP
//! across the link and back), the way memfabric's proxies sit, so that the two differ only
//! in what the proxies do (the relays' CPU is reported as the plain way's proxy CPU). QEMU's own bandwidth cap (`max-bandwidth`) is raised to 8 GiB/s
//! for both, so that the link, not QEMU's default of 128 MiB/s, is what limits.
//! Everything else is QEMU's default (downtime limit 300 ms, no capabilities) unless
//! `--multifd N` turns on QEMU's multifd with N channels at both ends: then each relay
//! carries N + 1 connections, in the order QEMU opened them, as memfabric's proxies do.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use memfabric::{actuate::qmp::Qmp, util::thread_cpu};
use memfabric_harness::{Children, wait_for};
use serde_json::json;
use xtask::lab::{
    self, Profile, UpOptions,
    hosts::{DST_ADDR, Side, TwoHosts},
};

/// How a guest is moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    Plain,
    Memfabric,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Plain => "plain",
            Way::Memfabric => "memfabric",
        }
    }
}

/// One migration's figures.
#[derive(Clone, Debug)]
struct Row {
    profile: &'static str,
    donors: &'static str,
    rate: String,
    way: Way,
    /// `completed`, or why not.
    outcome: String,
    stream_bytes: u64,
    link_bytes: u64,
    /// From before the migration is asked for until it ended and was checked: what an
    /// operator waits (for memfabric: the command's whole run, its connection and the
    /// destination's filter included).
    seconds: f64,
    /// QEMU's own `total-time`: from its `migrate` command to completion.
    qemu_ms: Option<u64>,
    downtime_ms: Option<u64>,
    proxy_cpu_s: f64,
    referenced: u64,
    resent: u64,
    /// The fabric's prediction of the bytes a migration to the destination would not
    /// send (with a twin there), made before migrating.
    predicted_saving: Option<u64>,
}

/// What the bench runs.
pub(crate) struct Options {
    pub agent: PathBuf,
    pub profiles: Vec<Profile>,
    /// Link speeds in Mbit/s; 0: unlimited.
    pub rates: Vec<u32>,
    /// A migration not completed by then is cancelled and reported so.
    pub limit: Duration,
    /// Migrations of each kind per setting (their medians are reported).
    pub repeat: u32,
    /// What the destination holds: `none` (nothing of the guest's), `twin` (a guest of
    /// the same image with another seed), each in turn.
    pub donors: Vec<&'static str>,
    /// Guest RAM of the migrated guest and its twin, in MiB (the workload scaled to it).
    pub mem_mb: u32,
    /// QEMU's multifd channels on both ends (0: off), for both ways.
    pub multifd: u8,
    /// After each completed migration, start the guest on the destination and check that
    /// it runs there (then stop it).
    pub verify: bool,
    pub out: PathBuf,
}

/// What every migration of a run shares.
struct Ctx<'a> {
    opts: &'a Options,
    hosts: TwoHosts,
    dir: PathBuf,
    tls: [(PathBuf, PathBuf); 2],
    runs: u32,
    /// The prediction for the guest and the destination's VMs now (none without any).
    predicted: Option<u64>,
}

/// Lab guests this bench booted, stopped when it ends (also on error).
struct Booted(Vec<lab::Guest>);

impl Drop for Booted {
    fn drop(&mut self) {
        for g in &self.0 {
            let _ = lab::stop(g);
        }
    }
}

pub(crate) fn run(opts: &Options) -> anyhow::Result<()> {
    let report = xtask::report::dir(&opts.out, "migrate")?;
    let work = std::env::temp_dir().join(format!("memfabric-bench-migrate-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let pki = memfabric_harness::Pki::new("memfabric lab");
    let mut leaves = pki.write(&work, &["src", "dst"]).into_iter();
    let (Some(src), Some(dst)) = (leaves.next(), leaves.next()) else {
        bail!("writing the lab's certificates");
    };
    let mut ctx = Ctx {
        opts,
        hosts: TwoHosts::up()?,
        dir: work.clone(),
        tls: [src, dst],
        runs: 0,
        predicted: None,
    };
    let mut rows = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        for &profile in &opts.profiles {
            // Guests numbered apart from a developer's lab (lab-1 ...).
            let up = |first: u32| {
                lab::up(&UpOptions {
                    guests: 1,
                    first,
                    profile,
                    mem_mb: opts.mem_mb,
                    ..UpOptions::default()
                })
            };
            let mut booted = Booted(up(101)?);
            for &donors in &opts.donors {
                ctx.predicted = None;
                if donors == "twin" {
                    booted.0.extend(up(102)?);
                    let p = predict(booted.0[0].pid, booted.0[1].pid)?;
                    eprintln!(
                        "  the fabric predicts {:.1} MB not sent (of the guest's stable pages)",
                        mb(p)
                    );
                    ctx.predicted = Some(p);
                }
                for &rate in &opts.rates {
                    let limit = (rate > 0).then_some(rate);
                    ctx.hosts.set_rate(limit)?;
                    for rep in 0..opts.repeat {
                        // Interleaved, each first in turn: drift on the noisy machine
                        // falls on both.
                        let mut ways = [Way::Plain, Way::Memfabric];
                        if rep % 2 == 1 {
                            ways.reverse();
                        }
                        for way in ways {
                            let row = ctx.migrate(&booted.0[0], profile, donors, limit, way)?;
                            eprintln!("{}", line(&row));
                            rows.push(row);
                        }
                    }
                }
            }
        }
        Ok(())
    })();
    let _ = fs::remove_dir_all(&work);
    write_report(&report, &rows)?;
    result?;
    println!("{}", fs::read_to_string(report.join("summary.md"))?);
    println!("report: {}", report.display());
    Ok(())
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

fn line(r: &Row) -> String {
    format!(
        "{} / donors {} / {} / {}: {}, stream {:.1} MB, link {:.1} MB, {:.1} s (QEMU's {} ms), downtime {} ms, proxy CPU {:.2} s, {} referenced, {} resent",
        r.profile,
        r.donors,
        r.rate,
        r.way.name(),
        r.outcome,
        mb(r.stream_bytes),
        mb(r.link_bytes),
        r.seconds,
        r.qemu_ms.map_or("-".into(), |d| d.to_string()),
        r.downtime_ms.map_or("-".into(), |d| d.to_string()),
        r.proxy_cpu_s,
        r.referenced,
        r.resent
    )
}

impl Ctx<'_> {
    fn migrate(
        &mut self,
        src: &lab::Guest,
        profile: Profile,
        donors: &'static str,
        rate: Option<u32>,
        way: Way,
    ) -> anyhow::Result<Row> {
        self.runs += 1;
        let dir = self.dir.join(format!("run-{}", self.runs));
        fs::create_dir_all(&dir)?;
        let incoming = dir.join("incoming.sock");
        let _dst_qemu = Children(vec![
            lab::qemu::incoming_command(src.pid, &dir, &incoming)?
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting the incoming QEMU")?,
        ]);
        if !wait_for(Duration::from_secs(30), || incoming.exists()) {
            bail!("{} did not appear in 30 s", incoming.display());
        }
        let src_qmp = lab::qemu::qmp_socket(src);
        // QEMU's QMP socket serves one client at a time: each step connects anew.
        Qmp::connect(&src_qmp)?.execute(
            "migrate-set-parameters",
            json!({ "max-bandwidth": 8u64 << 30 }),
        )?;
        let dst_qmp = dir.join("incoming.qmp");
        if !wait_for(Duration::from_secs(30), || dst_qmp.exists()) {
            bail!("{} did not appear in 30 s", dst_qmp.display());
        }
        let multifd = self.opts.multifd;
        for q in [&src_qmp, &dst_qmp] {
            let on = json!([{ "capability": "multifd", "state": multifd > 0 }]);
            Qmp::connect(q)?.execute("migrate-set-capabilities", json!({ "capabilities": on }))?;
            if multifd > 0 {
                Qmp::connect(q)?.execute(
                    "migrate-set-parameters",
                    json!({ "multifd-channels": multifd }),
                )?;
            }
        }
        let link0 = self.hosts.link_bytes()?;
        let started = Instant::now();
        let mut row = Row {
            profile: profile.name(),
            donors,
            rate: rate.map_or("unlimited".into(), |r| format!("{r} Mbit/s")),
            way,
            outcome: String::new(),
            stream_bytes: 0,
            link_bytes: 0,
            seconds: 0.0,
            qemu_ms: None,
            downtime_ms: None,
            proxy_cpu_s: 0.0,
            referenced: 0,
            resent: 0,
            predicted_saving: self.predicted,
        };
        match way {
            Way::Plain => self.plain(&dir, &incoming, &mut Qmp::connect(&src_qmp)?, &mut row)?,
            Way::Memfabric => self.memfabric(src, &incoming, &src_qmp, &mut row)?,
        }
        row.seconds = started.elapsed().as_secs_f64();
        let mut qmp = Qmp::connect(&src_qmp)?;
        let info = qmp.execute("query-migrate", json!({}))?;
        let status = info["status"].as_str().unwrap_or("?").to_owned();
        if row.outcome.is_empty() {
            row.outcome = status.clone();
        }
        if row.outcome == "completed" {
            row.downtime_ms = info["downtime"].as_u64();
            row.qemu_ms = info["total-time"].as_u64();
        }
        if row.outcome == "completed" && self.opts.verify {
            row.outcome = runs_on_destination(&dir.join("incoming.qmp"))?;
        }
        row.link_bytes = self.hosts.link_bytes()? - link0;
        // The source guest runs on for the next migration (the incoming one is dropped).
        let state = qmp.execute("query-status", json!({}))?;
        if state["running"].as_bool() != Some(true) {
            qmp.execute("cont", json!({}))?;
        }
        Ok(row)
    }

    /// Polls QEMU until the migration ends or the limit passes (then cancels it).
    fn await_end(&self, qmp: &mut Qmp, row: &mut Row, started: Instant) -> anyhow::Result<()> {
        let left = self.opts.limit.saturating_sub(started.elapsed());
        let (status, _) = memfabric::migrate::run::await_status(qmp, left)?;
        if !memfabric::migrate::settled(&status) {
            qmp.execute("migrate_cancel", json!({}))?;
            row.outcome = format!("not done in {} s (cancelled)", self.opts.limit.as_secs());
        }
        Ok(())
    }

    /// QEMU -> unix socket -> relay on the source host -> link -> relay on the destination
    /// host -> the incoming QEMU's socket.
    fn plain(
        &self,
        dir: &Path,
        incoming: &Path,
        qmp: &mut Qmp,
        row: &mut Row,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let (ready_tx, ready_rx) = mpsc::channel();
        let forwarded = Arc::new(AtomicU64::new(0));
        let out = dir.join("out.sock");
        let dst_ns = self.hosts.entry(Side::Dst);
        let incoming = incoming.to_owned();
        // QEMU's channels: the main one and its multifd ones, each a connection taken and
        // passed on in order (each connected before the next is taken).
        let channels = usize::from(self.opts.multifd) + 1;
        let dst_relay = thread::spawn(move || -> anyhow::Result<f64> {
            dst_ns.enter()?;
            let l = TcpListener::bind((DST_ADDR, 0))?;
            ready_tx.send(l.local_addr()?).ok();
            let mut relays = Vec::new();
            for _ in 0..channels {
                let (tcp, _) = l.accept()?;
                let unix = UnixStream::connect(&incoming)?;
                relays.push(thread::spawn(move || relay(tcp, unix, None)));
            }
            joined(relays)
        });
        let addr: SocketAddr = ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the destination relay did not start")?;
        let listener = UnixListener::bind(&out)?;
        let src_ns = self.hosts.entry(Side::Src);
        let counted = forwarded.clone();
        let src_relay = thread::spawn(move || -> anyhow::Result<f64> {
            src_ns.enter()?;
            let mut relays = Vec::new();
            for _ in 0..channels {
                let (unix, _) = listener.accept()?;
                let tcp = TcpStream::connect(addr)?;
                let counted = counted.clone();
                relays.push(thread::spawn(move || relay(unix, tcp, Some(counted))));
            }
            joined(relays)
        });
        qmp.execute(
            "migrate",
            json!({ "uri": format!("unix:{}", out.display()) }),
        )?;
        self.await_end(qmp, row, started)?;
        // A cancelled migration closes QEMU's socket: both relays end.
        for t in [src_relay, dst_relay] {
            match t.join() {
                Ok(Ok(cpu)) => row.proxy_cpu_s += cpu,
                Ok(Err(e)) if row.outcome.is_empty() => row.outcome = format!("relay: {e}"),
                _ => {}
            }
        }
        row.stream_bytes = forwarded.load(Ordering::Relaxed);
        Ok(())
    }

    /// Through `memfabric migrate receive` on the destination host and `memfabric migrate
    /// send` on the source host, as an operator runs them.
    fn memfabric(
        &self,
        src: &lab::Guest,
        incoming: &Path,
        src_qmp: &Path,
        row: &mut Row,
    ) -> anyhow::Result<()> {
        let ca = self.dir.join("ca.crt");
        let tls = |i: usize| -> Vec<String> {
            let (cert, key) = &self.tls[i];
            vec![
                "--ca".into(),
                ca.display().to_string(),
                "--cert".into(),
                cert.display().to_string(),
                "--key".into(),
                key.display().to_string(),
            ]
        };
        let to = format!("{DST_ADDR}:{}", 7400 + self.runs);
        let mut receive = Children(vec![
            self.hosts
                .command(Side::Dst, &self.opts.agent)
                .args(["migrate", "receive", "--listen", &to, "--incoming"])
                .arg(incoming)
                .args(["--uuid", &src.uuid, "--json", "--timeout", "120"])
                .args(tls(1))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting memfabric migrate receive")?,
        ]);
        let stderr = receive.0[0].stderr.take().context("receive's stderr")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.starts_with("receiving on") => {
                    eprintln!("  destination: {l}");
                    break;
                }
                Ok(_) => {}
                Err(_) => bail!("memfabric migrate receive did not get ready"),
            }
        }
        let started = Instant::now();
        let send = self
            .hosts
            .command(Side::Src, &self.opts.agent)
            .args(["migrate", "send", "--qmp"])
            .arg(src_qmp)
            .args(["--to", &to, "--node", "dst", "--json"])
            .args(tls(0))
            .stdout(Stdio::piped())
            .stderr(fs::File::create(self.dir.join("send.log"))?)
            .spawn()
            .context("starting memfabric migrate send")?;
        let send_pid = send.id();
        let mut send = Children(vec![send]);
        let mut stdout = send.0[0].stdout.take().context("send's stdout")?;
        // The limit: cancelled through QMP like an operator would (send then fails and
        // puts the guest back).
        let limit = self.opts.limit;
        let qmp_path = src_qmp.to_owned();
        // Set (under its lock) before `send` is reaped: its PID is ours to signal until then.
        let exited = Arc::new(std::sync::Mutex::new(false));
        let (gone, exited_now) = (exited.clone(), exited.clone());
        let has_exited = move || *gone.lock().unwrap_or_else(|e| e.into_inner());
        let watchdog = thread::spawn(move || {
            while started.elapsed() < limit {
                if has_exited() {
                    return false;
                }
                thread::sleep(Duration::from_millis(200));
            }
            let _ =
                Qmp::connect(&qmp_path).and_then(|mut q| q.execute("migrate_cancel", json!({})));
            // A proxy that does not give up once QEMU stopped is stopped (the bench must end).
            let grace = Instant::now();
            while grace.elapsed() < Duration::from_secs(30) {
                if has_exited() {
                    return true;
                }
                thread::sleep(Duration::from_millis(200));
            }
            let reaped = exited.lock().unwrap_or_else(|e| e.into_inner());
            if !*reaped && let Ok(pid) = i32::try_from(send_pid) {
                // SAFETY: a signal to our own child, not reaped (the lock keeps it so).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            true
        });
        let mut summary = String::new();
        stdout.read_to_string(&mut summary)?;
        *exited_now.lock().unwrap_or_else(|e| e.into_inner()) = true;
        let (code, cpu_send) = reap(&mut send)?;
        if code != 0
            && let Some(r) = receive.0.first_mut()
        {
            // The source gave up: the destination would wait out its own timeout.
            let _ = r.kill();
        }
        let (_, cpu_receive) = reap(&mut receive)?;
        row.proxy_cpu_s = cpu_send + cpu_receive;
        if watchdog.join().unwrap_or(false) {
            row.outcome = format!("not done in {} s (cancelled)", limit.as_secs());
        } else if code != 0 {
            let log = fs::read_to_string(self.dir.join("send.log")).unwrap_or_default();
            let why = log
                .lines()
                .rev()
                .find(|l| l.starts_with("memfabric migrate:"));
            row.outcome = why.map_or_else(|| format!("send exited {code}"), str::to_owned);
        }
        if let Ok(s) = serde_json::from_str::<serde_json::Value>(summary.trim()) {
            row.stream_bytes = s["stream_bytes"].as_u64().unwrap_or(0);
            row.referenced = s["referenced"].as_u64().unwrap_or(0);
            row.resent = s["resent"].as_u64().unwrap_or(0);
        }
        Ok(())
    }
}

/// What the fabric would predict a migration of `src` to a host holding `donor` saves:
/// both scanned as the daemon scans (three passes, stable after two unchanged), their
/// sketches taken as the daemon keeps and publishes them (the destination's truncated to
/// the fabric's k), and the candidate figure the fabric exports.
fn predict(src: u32, donor: u32) -> anyhow::Result<u64> {
    use memfabric::{fabric::candidates, scan::Scanner, sketch::DEFAULT_K};
    let mut scanner = Scanner::new(2);
    scanner.set_sketches(true);
    for _ in 0..3 {
        scanner.pass(&[src, donor])?;
    }
    let report = scanner.report();
    let sketches = report.sketches.context("the scanner built no sketches")?;
    let (Some(vm), Some(host)) = (sketches.per_pid.get(&src), sketches.per_pid.get(&donor)) else {
        bail!("no sketch of the guest or of its twin");
    };
    let host = host.truncated(DEFAULT_K);
    let c = candidates::compute(
        &[candidates::LocalVm {
            id: "guest",
            sketch: vm,
        }],
        &[candidates::PeerHost {
            id: "destination",
            sketch: &host,
        }],
    );
    Ok(c.pairs.first().map_or(0, |p| p.shared_bytes))
}

/// Starts the migrated guest on the destination (`cont`) and checks that it runs 3 s
/// later: `completed` if so, what went wrong otherwise.
fn runs_on_destination(qmp: &Path) -> anyhow::Result<String> {
    let mut q = Qmp::connect(qmp)?;
    q.execute("cont", json!({}))?;
    thread::sleep(Duration::from_secs(3));
    let st = q.execute("query-status", json!({}))?;
    Ok(if st["status"] == "running" {
        eprintln!("  the guest runs on the destination");
        "completed".into()
    } else {
        format!("the guest does not run on the destination: {st}")
    })
}

/// Waits for the (one) child of `k` and returns its exit code and CPU seconds (user +
/// system), from `wait4`'s resource usage; it is no longer `k`'s to stop.
fn reap(k: &mut Children) -> anyhow::Result<(i32, f64)> {
    let Some(child) = k.0.pop() else {
        bail!("already reaped");
    };
    let pid = i32::try_from(child.id())?;
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; status and usage are valid out-pointers.
    if unsafe { libc::wait4(pid, &mut status, 0, &mut usage) } < 0 {
        return Err(std::io::Error::last_os_error()).context("wait4");
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    Ok((code, secs(usage.ru_utime) + secs(usage.ru_stime)))
}

/// The CPU seconds of relays run on threads of their own, or the first one's error.
fn joined(relays: Vec<thread::JoinHandle<anyhow::Result<f64>>>) -> anyhow::Result<f64> {
    let mut cpu = 0.0;
    for r in relays {
        cpu += r
            .join()
            .map_err(|_| anyhow::anyhow!("a relay thread panicked"))??;
    }
    Ok(cpu)
}

/// Copies `a` to `b` (counting into `counted`) and `b` to `a` until both directions end;
/// returns the CPU seconds its two threads used.
fn relay<A, B>(a: A, b: B, counted: Option<Arc<AtomicU64>>) -> anyhow::Result<f64>
where
    A: std::io::Read + std::io::Write + Send + Socket + 'static,
    B: std::io::Read + std::io::Write + Send + Socket + 'static,
{
    let (mut a2, mut b2) = (a.duplicate()?, b.duplicate()?);
    let back = thread::spawn(move || {
        let _ = std::io::copy(&mut b2, &mut a2);
        a2.shutdown_write();
        thread_cpu()
    });
    let (mut a, mut b) = (a, b);
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = a.read(&mut buf)?;
        if n == 0 {
            break;
        }
        b.write_all(&buf[..n])?;
        if let Some(c) = &counted {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    b.shutdown_write();
    Ok(thread_cpu() + back.join().unwrap_or(0.0))
}

/// The two socket kinds a relay joins: a second handle for the other direction, and a
/// half-close.
trait Socket: Sized {
    fn duplicate(&self) -> std::io::Result<Self>;
    fn shutdown_write(&self);
}

impl Socket for TcpStream {
    fn duplicate(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

impl Socket for UnixStream {
    fn duplicate(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

/// CSV of every migration and a Markdown table with memfabric's figures as ratios of the
/// plain migration's in the same setting.
fn write_report(dir: &Path, rows: &[Row]) -> anyhow::Result<()> {
    let mut csv = String::from(
        "profile,donors,link,way,outcome,stream_bytes,link_bytes,seconds,qemu_ms,downtime_ms,proxy_cpu_s,referenced,resent,predicted_saving_bytes\n",
    );
    for r in rows {
        writeln!(
            csv,
            "{},{},{},{},{},{},{},{:.3},{},{},{:.3},{},{},{}",
            r.profile,
            r.donors,
            r.rate,
            r.way.name(),
            r.outcome.replace(',', ";"),
            r.stream_bytes,
            r.link_bytes,
            r.seconds,
            r.qemu_ms.map_or(String::new(), |d| d.to_string()),
            r.downtime_ms.map_or(String::new(), |d| d.to_string()),
            r.proxy_cpu_s,
            r.referenced,
            r.resent,
            r.predicted_saving.map_or(String::new(), |p| p.to_string())
        )?;
    }
    fs::write(dir.join("migrations.csv"), csv)?;
    let mut md = String::from(
        "| profile | destination holds | link | way | completed | MB on the link | time s | QEMU's time s | downtime ms | proxy CPU s | pages referenced | resent | saved MB: predicted / measured |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut seen: Vec<(&str, &str, &str, Way)> = Vec::new();
    for r in rows {
        let key = (r.profile, r.donors, r.rate.as_str(), r.way);
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        let all: Vec<&Row> = rows
            .iter()
            .filter(|o| (o.profile, o.donors, o.rate.as_str(), o.way) == key)
            .collect();
        let done: Vec<&Row> = all
            .iter()
            .copied()
            .filter(|o| o.outcome == "completed")
            .collect();
        // The median of the completed migrations' `f`, with `digits` decimals.
        let med_to = |digits: usize, f: &dyn Fn(&Row) -> f64| {
            if done.is_empty() {
                "-".to_owned()
            } else {
                let mut v: Vec<f64> = done.iter().map(|o| f(o)).collect();
                format!("{:.digits$}", xtask::report::median(&mut v))
            }
        };
        let med = |f: &dyn Fn(&Row) -> f64| med_to(1, f);
        let mut completed = format!("{}/{}", done.len(), all.len());
        if let Some(failed) = all.iter().find(|o| o.outcome != "completed") {
            let _ = write!(completed, " ({})", failed.outcome);
        }
        // Saved: the plain migrations' median bytes on the link less memfabric's.
        let link_median = |way: Way| {
            let mut v: Vec<f64> = rows
                .iter()
                .filter(|o| {
                    (o.profile, o.donors, o.rate.as_str(), o.way) == (key.0, key.1, key.2, way)
                })
                .filter(|o| o.outcome == "completed")
                .map(|o| mb(o.link_bytes))
                .collect();
            (!v.is_empty()).then(|| xtask::report::median(&mut v))
        };
        let saving = match (r.way, r.predicted_saving) {
            (Way::Memfabric, Some(p)) => {
                match (link_median(Way::Plain), link_median(Way::Memfabric)) {
                    (Some(plain), Some(ours)) => format!(
                        "{:.1} / {:.1} ({:+.1} %)",
                        mb(p),
                        plain - ours,
                        100.0 * (mb(p) - (plain - ours)) / (plain - ours)
                    ),
                    _ => format!("{:.1} / -", mb(p)),
                }
            }
            _ => String::new(),
        };
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.profile,
            r.donors,
            r.rate,
            r.way.name(),
            completed,
            med(&|o| mb(o.link_bytes)),
            med(&|o| o.seconds),
            med_to(2, &|o| o.qemu_ms.unwrap_or(0) as f64 / 1e3),
            med(&|o| o.downtime_ms.unwrap_or(0) as f64),
            med(&|o| o.proxy_cpu_s),
            med(&|o| o.referenced as f64),
            med(&|o| o.resent as f64),
            saving,
        )?;
    }
    fs::write(dir.join("summary.md"), md)?;
    Ok(())
}
