//! Deduplicating live migration end to end: a real QEMU lab guest migrated through the two
//! proxies (mutual TLS on loopback) into an incoming QEMU started from the source's own
//! command line, with a twin guest (same image, another seed) as the destination's donor.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use memfabric::migrate::{
    Progress,
    run::{self, ReceiveOptions, SendOptions, Tls},
};
use memfabric_tests::{TestLab, privileged};
use xtask::lab::{self, Profile, UpOptions};

/// A lab for one test: its guests (the first is the one migrated), a scratch directory
/// and the two proxies' certificates (source, destination `dst`).
struct Setup {
    _lab: TestLab,
    pki: memfabric_harness::Pki,
    dir: PathBuf,
    guests: Vec<lab::Guest>,
    src: Tls,
    dst: Tls,
}

impl Setup {
    fn new(test: &str, guests: u32, first: u32) -> Setup {
        let lab = TestLab::new(test);
        let dir = std::env::temp_dir().join(format!("memfabric-{test}-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let guests = lab::up(&UpOptions {
            guests,
            first,
            profile: Profile::Static,
            ..UpOptions::default()
        })
        .expect("booting lab guests");
        let pki = memfabric_harness::Pki::new("migration test cluster");
        let (src, dst) = memfabric_tests::proxy_tls(&pki, &dir);
        Setup {
            _lab: lab,
            pki,
            dir,
            guests,
            src,
            dst,
        }
    }

    /// The migrated guest's QMP socket.
    fn src_qmp(&self) -> PathBuf {
        lab::qemu::qmp_socket(&self.guests[0])
    }

    /// Sending the migrated guest to the destination proxy at `to`.
    fn send_to(&self, to: std::net::SocketAddr) -> SendOptions {
        SendOptions {
            qmp: self.src_qmp(),
            to: to.to_string(),
            node: "dst".into(),
            tls: self.src.clone(),
            work_dir: self.dir.join("send"),
            bandwidth: None,
            token: None,
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn qmp(path: &Path, command: &str, args: serde_json::Value) -> serde_json::Value {
    memfabric::actuate::qmp::Qmp::connect(path)
        .and_then(|mut q| q.execute(command, args))
        .unwrap_or_else(|e| panic!("{command} on {}: {e}", path.display()))
}

/// A QEMU's `downtime-limit`, in ms.
fn downtime_limit(qmp_socket: &Path) -> u64 {
    let p = qmp(
        qmp_socket,
        "query-migrate-parameters",
        serde_json::json!({}),
    );
    p["downtime-limit"].as_u64().expect("a downtime limit")
}

/// A QEMU's guest RAM mappings, read through /proc/PID/mem: each one's size and a digest
/// of each of its pages.
fn guest_ram(pid: u32) -> Vec<(u64, Vec<[u8; 32]>)> {
    use std::os::unix::fs::FileExt as _;
    let vm = memfabric::host::inventory::describe(pid, memfabric::host::inventory::VmKind::Qemu)
        .expect("a QEMU");
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    vm.ram
        .iter()
        .map(|m| {
            let mut pages = Vec::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut at = m.span.start;
            while at < m.span.end {
                let n = mem.read_at(&mut buf, at).unwrap();
                pages.extend(buf[..n].chunks(4096).map(|p| *blake3::hash(p).as_bytes()));
                at += n as u64;
            }
            (m.span.bytes, pages)
        })
        .collect()
}

/// Asserts that two QEMUs' guest RAM is the same page for page once the incoming one
/// (QMP at `dst_qmp`) says it loaded the whole stream; if not, says where. (Compared as
/// soon as the proxies were done, the incoming QEMU was still applying the stream's last
/// pages now and then: five pages differed in one CI run, its stream verified.)
fn assert_same_ram(src: u32, dst: u32, dst_qmp: &Path) {
    memfabric::migrate::incoming_qemu::loaded(dst_qmp).expect("the incoming QEMU loaded it");
    let (a, b) = (guest_ram(src), guest_ram(dst));
    assert!(!a.is_empty());
    let sizes = |r: &[(u64, Vec<[u8; 32]>)]| r.iter().map(|m| m.0).collect::<Vec<_>>();
    assert_eq!(sizes(&a), sizes(&b), "guest RAM mappings differ");
    let differ: Vec<(usize, usize)> = a
        .iter()
        .zip(&b)
        .enumerate()
        .flat_map(|(m, ((_, x), (_, y)))| {
            x.iter()
                .zip(y)
                .enumerate()
                .filter(|(_, (p, q))| p != q)
                .map(move |(i, _)| (m, i))
        })
        .collect();
    assert!(
        differ.is_empty(),
        "guest memory differs after migration: {} pages, the first (mapping, page): {:?}",
        differ.len(),
        &differ[..differ.len().min(16)]
    );
}

#[test]
#[serial_test::serial]
fn a_guest_whose_twin_runs_on_the_destination_moves_with_a_fraction_of_the_bytes() {
    if !privileged("a_guest_whose_twin_runs_on_the_destination_moves_with_a_fraction_of_the_bytes")
    {
        return;
    }
    migrate_beside_a_twin("migrate-test", 1, false, 0);
}

/// QEMU's return path (the destination QEMU's messages to the source: its shut and pong
/// replies) through both proxies.
#[test]
#[serial_test::serial]
fn a_migration_with_qemus_return_path_on_completes_through_the_proxies() {
    if !privileged("a_migration_with_qemus_return_path_on_completes_through_the_proxies") {
        return;
    }
    migrate_beside_a_twin("migrate-rp-test", 11, true, 0);
}

/// QEMU's multifd channels (three, beside the main one), each through a link of its own;
/// their pages referenced like the main channel's.
#[test]
#[serial_test::serial]
fn a_migration_with_multifd_channels_completes_through_the_proxies() {
    if !privileged("a_migration_with_multifd_channels_completes_through_the_proxies") {
        return;
    }
    migrate_beside_a_twin("migrate-mfd-test", 13, false, 3);
}

/// Guests `first` (migrated) and `first + 1` (its twin, the destination's donor) in a lab
/// of their own; the migration through both proxies (QEMU's return path on or off, with
/// `multifd` channels or none), then the checks.
fn migrate_beside_a_twin(test: &str, first: u32, return_path: bool, multifd: u8) {
    let setup = Setup::new(test, 2, first);
    let (dir, src, donor) = (&setup.dir, &setup.guests[0], setup.guests[1].name.clone());
    let incoming = dir.join("incoming.sock");
    let mut dst = memfabric_harness::Guarded::new(
        lab::qemu::incoming_command(src.pid, dir, &incoming)
            .expect("the incoming command")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("the incoming QEMU"),
    );
    if return_path || multifd > 0 {
        let dst_qmp = dir.join("incoming.qmp");
        assert!(
            memfabric_harness::wait_for(Duration::from_secs(30), || dst_qmp.exists()),
            "the incoming QEMU's QMP socket"
        );
        let capability = if return_path {
            "return-path"
        } else {
            "multifd"
        };
        let on = serde_json::json!({
            "capabilities": [{ "capability": capability, "state": true }]
        });
        let channels = serde_json::json!({ "multifd-channels": multifd });
        for q in [&dst_qmp, &setup.src_qmp()] {
            qmp(q, "migrate-set-capabilities", on.clone());
            if multifd > 0 {
                qmp(q, "migrate-set-parameters", channels.clone());
            }
        }
    }
    // The operator's downtime limit, not QEMU's default, to tell it from a reset.
    qmp(
        &setup.src_qmp(),
        "migrate-set-parameters",
        serde_json::json!({ "downtime-limit": 250 }),
    );
    let rt = runtime();
    let (ps, pd) = (Arc::new(Progress::default()), Arc::new(Progress::default()));
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let receive = run::receive(
        ReceiveOptions {
            listen: "127.0.0.1:0".into(),
            incoming: incoming.clone(),
            uuid: Some(src.uuid.clone()),
            tls: setup.dst.clone(),
            accept_timeout: Duration::from_secs(120),
        },
        move |addr, h| {
            eprintln!("destination holds {} pages", h.pages());
            assert!(h.pages() > 1000, "the donor {donor} was not indexed");
            addr_tx.send(addr).unwrap();
        },
        pd.clone(),
    );
    let (sent, received) = rt.block_on(async {
        let recv = tokio::spawn(receive);
        let addr = tokio::task::spawn_blocking(move || addr_rx.recv().unwrap())
            .await
            .unwrap();
        // The wire capped at 64 MiB/s: QEMU's stream, mostly references, flows faster
        // than that, so its downtime limit must be corrected for the whole migration.
        let mut opts = setup.send_to(addr);
        opts.bandwidth = Some(64 << 20);
        let sent = run::send(opts, ps.clone()).await;
        (sent, recv.await.unwrap())
    });
    let sent = sent.expect("the migration");
    // QEMU's downtime limit was scaled by the wire's share of its stream while the
    // migration ran, and the operator's (250 ms, set above) put back after.
    let lowest = sent
        .downtime_limit_ms
        .expect("the downtime limit was never lowered");
    assert!(lowest < 250 * 6 / 10, "lowest limit {lowest} ms");
    assert_eq!(downtime_limit(&setup.src_qmp()), 250);
    let received = received.expect("the receiving side");
    eprintln!("source: {sent:?}\ndestination: {received:?}");
    // What QEMU wrote is what the incoming QEMU was handed (both ends checked length and
    // checksum; the socket-proxy test below checks it by SHA-256 from outside).
    assert_eq!(sent.stream_bytes, received.stream_bytes);
    assert_eq!(sent.channels, u64::from(multifd) + 1);
    assert_eq!(received.channels, sent.channels);
    assert_eq!(sent.referenced, received.referenced + received.resent);
    // The twin holds the shared part of the guest: far fewer bytes on the wire.
    assert!(
        sent.wire_bytes * 10 < sent.stream_bytes * 6,
        "{} of {} bytes sent",
        sent.wire_bytes,
        sent.stream_bytes
    );
    // Guest memory page for page, then the guest runs on the destination.
    let dst_qmp = dir.join("incoming.qmp");
    assert_same_ram(src.pid, dst.id(), &dst_qmp);
    qmp(&dst_qmp, "cont", serde_json::json!({}));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        qmp(&dst_qmp, "query-status", serde_json::json!({}))["status"],
        "running"
    );
    assert!(
        matches!(dst.try_wait(), Ok(None)),
        "the migrated guest exited"
    );
    drop(dst);
}

#[test]
#[serial_test::serial]
fn a_destination_that_dies_mid_stream_leaves_the_vm_running_on_the_source() {
    if !privileged("a_destination_that_dies_mid_stream_leaves_the_vm_running_on_the_source") {
        return;
    }
    let setup = Setup::new("migrate-fail-test", 1, 5);
    // A "destination" that completes the TLS handshake with the right certificate, sends
    // an empty filter, reads a little of the stream and then drops the connection.
    let result = runtime().block_on(async {
        let (listener, addr, tls) =
            tls_server(&setup.dst.ca, &setup.dst.cert, &setup.dst.key).await;
        let dying = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let (tcp, _) = listener.accept().await.unwrap();
            let mut s = tls.server.accept(tcp).await.unwrap();
            memfabric::migrate::link::hello(&mut s).await.unwrap();
            use memfabric::migrate::link::Frame as _;
            let empty = memfabric::migrate::holdings::Filter::build(Vec::new(), 0).encode();
            let f = memfabric::migrate::link::Up::Filter(empty).to_vec();
            s.write_all(&f).await.unwrap();
            let mut buf = vec![0u8; 8 << 20];
            s.read_exact(&mut buf).await.unwrap();
        });
        let r = run::send(setup.send_to(addr), Arc::new(Progress::default())).await;
        dying.await.unwrap();
        r
    });
    assert!(result.is_err(), "a dead destination, yet {result:?}");
    let status = qmp(&setup.src_qmp(), "query-status", serde_json::json!({}));
    assert_eq!(status["status"], "running", "{status}");
    assert!(lab::qemu::alive(&setup.guests[0]));

    // A migration command killed while QEMU had a corrected downtime limit (3 ms, the
    // operator's 250 ms written down): the next recovery puts the operator's back.
    use memfabric::migrate::limit_journal::{Journal, recover};
    let limits = setup.dir.join("limits");
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    Journal::record_as(&limits, &setup.src_qmp(), 250, dead).unwrap();
    let set = |ms: u64| {
        qmp(
            &setup.src_qmp(),
            "migrate-set-parameters",
            serde_json::json!({ "downtime-limit": ms }),
        )
    };
    set(3);
    assert_eq!(recover(&limits), vec![(setup.src_qmp(), 250)]);
    assert_eq!(downtime_limit(&setup.src_qmp()), 250);
    assert_eq!(
        std::fs::read_dir(&limits).unwrap().count(),
        0,
        "journal left"
    );
    set(300);
}

/// A listener at a fresh loopback port, its address, and the fabric's TLS configurations
/// presenting `cert` (trusting `ca`): `.server` accepts.
async fn tls_server(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> (
    tokio::net::TcpListener,
    std::net::SocketAddr,
    memfabric::fabric::tls::TlsConfigs,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (
        listener,
        addr,
        memfabric::fabric::tls::load(ca, cert, key).unwrap(),
    )
}

/// A TLS server presenting `cert` (trusting `ca`) that accepts one connection and drops
/// it: the destination proxy of an impostor.
async fn impostor(ca: &Path, cert: &Path, key: &Path) -> std::net::SocketAddr {
    let (listener, addr, tls) = tls_server(ca, cert, key).await;
    tokio::spawn(async move {
        if let Ok((tcp, _)) = listener.accept().await {
            let _ = tls.server.accept(tcp).await;
        }
    });
    addr
}

#[test]
#[serial_test::serial]
fn peers_without_a_valid_certificate_are_refused_and_the_vm_does_not_move() {
    if !privileged("peers_without_a_valid_certificate_are_refused_and_the_vm_does_not_move") {
        return;
    }
    let setup = Setup::new("migrate-cert-test", 1, 7);
    let rogue_dir = setup.dir.join("rogue");
    std::fs::create_dir_all(&rogue_dir).unwrap();
    let rogue = memfabric_harness::Pki::new("rogue cluster").write(&rogue_dir, &["dst", "src"]);
    let rogue_ca = rogue_dir.join("ca.crt");
    // A valid certificate of this cluster, but of another node than the one named.
    let (other_cert, other_key) = setup.pki.leaf(&["other"]);
    let (oc, ok) = (setup.dir.join("other.crt"), setup.dir.join("other.key"));
    std::fs::write(&oc, other_cert).unwrap();
    std::fs::write(&ok, other_key).unwrap();
    let rt = runtime();
    for (what, ca, cert, key) in [
        (
            "a destination of another CA",
            &rogue_ca,
            &rogue[0].0,
            &rogue[0].1,
        ),
        ("another node of the cluster", &setup.dst.ca, &oc, &ok),
    ] {
        let r = rt.block_on(async {
            let addr = impostor(ca, cert, key).await;
            run::send(setup.send_to(addr), Arc::new(Progress::default())).await
        });
        let e = r.expect_err(what).to_string();
        assert!(e.contains("TLS"), "{what}: {e}");
        let m = qmp(&setup.src_qmp(), "query-migrate", serde_json::json!({}));
        assert!(
            m.get("status").is_none(),
            "{what}: QEMU began migrating: {m}"
        );
        let status = qmp(&setup.src_qmp(), "query-status", serde_json::json!({}));
        assert_eq!(status["status"], "running", "{what}: {status}");
    }

    // The destination refuses a source whose certificate another CA signed, before it
    // touches its incoming QEMU.
    let incoming = setup.dir.join("never.sock");
    let r = rt.block_on(async {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let opts = ReceiveOptions {
            listen: "127.0.0.1:0".into(),
            incoming: incoming.clone(),
            uuid: None,
            tls: setup.dst.clone(),
            accept_timeout: Duration::from_secs(20),
        };
        let receiving = tokio::spawn(run::receive(
            opts,
            move |addr, _| {
                let _ = tx.send(addr);
            },
            Arc::new(Progress::default()),
        ));
        let addr = rx.await.unwrap();
        let client = memfabric::fabric::tls::load(&rogue_ca, &rogue[1].0, &rogue[1].1)
            .unwrap()
            .client;
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("dst").unwrap();
        // The handshake may seem to finish on the client's side (TLS 1.3 sends the
        // client's certificate last); the server's verdict is what counts.
        let _ = client.connect(name, tcp).await;
        receiving.await.unwrap()
    });
    let e = r.expect_err("a source of another CA").to_string();
    assert!(e.contains("TLS"), "{e}");
    assert!(!incoming.exists());
}

/// The `memfabric` binary beside this test's (`cargo test --workspace` builds it for the
/// agent's own integration tests; `cargo xtask test` runs that).
fn agent_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("memfabric"))
        .unwrap();
    assert!(
        bin.exists(),
        "{} is not built: run the suite with `cargo xtask test` (or `cargo build -p memfabric` first)",
        bin.display()
    );
    bin
}

/// The value of the unlabelled (or fully labelled) series `name` in a metrics text.
fn counter_in(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
}

/// A `memfabric run` daemon on one of the two lab hosts, its fabric on the link; its
/// HTTP API on that host's loopback, port 9977.
fn fabric_daemon(
    hosts: &xtask::lab::hosts::TwoHosts,
    side: xtask::lab::hosts::Side,
    config: &Path,
    dir: &Path,
    track: u32,
) -> memfabric_harness::Guarded {
    use xtask::lab::hosts::{DST_ADDR, SRC_ADDR, Side};
    let (me, peer, name) = match side {
        Side::Src => (SRC_ADDR, DST_ADDR, "src"),
        Side::Dst => (DST_ADDR, SRC_ADDR, "dst"),
    };
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    memfabric_harness::Guarded::new(
        hosts
            .command(side, &agent_binary())
            .args(["run", "--config"])
            .arg(config)
            .args(["--listen", "127.0.0.1:9977", "--pid", &track.to_string()])
            // Scan passes make the sketches `--to best` chooses by.
            .args(["--scan-cpu", "30"])
            .arg("--state-dir")
            .arg(dir.join(format!("state-{name}")))
            .args(["--fabric-listen", &format!("{me}:7946")])
            .args(["--peer", &format!("{peer}:7946")])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("memfabric run"),
    )
}

/// `memfabric ARGS` run on the source host: exit code, stdout, stderr.
fn on_source(hosts: &xtask::lab::hosts::TwoHosts, args: &[&str]) -> (i32, String, String) {
    let out = hosts
        .command(xtask::lab::hosts::Side::Src, &agent_binary())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The QEMU a destination's agent started for a migration of `uuid` (none yet).
fn migrated_qemu(uuid: &str, not: u32) -> Option<u32> {
    memfabric::host::inventory::discover(&Default::default())
        .into_values()
        .find(|v| v.uuid.as_deref() == Some(uuid) && v.pid != not)
        .map(|v| v.pid)
}

/// Kills a process of the test's when it ends (it may be gone already).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if std::fs::read(format!("/proc/{}/cmdline", self.0)).is_ok_and(|c| c.starts_with(b"qemu"))
        {
            // SAFETY: plain kill(2) of a QEMU this test started.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
}

/// Stops the migrated guest when the test ends, whatever happened.
struct Migrated(String, u32);

impl Drop for Migrated {
    fn drop(&mut self) {
        if let Some(pid) = migrated_qemu(&self.0, self.1) {
            // SAFETY: plain kill(2) of the QEMU this test had migrated.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// `memfabric migrate --vm --to` as an operator runs it: two agents on two lab hosts
/// (network namespaces joined by a veth), the destination's agent starting the incoming
/// QEMU itself. First the destination, named, refuses (its config names no QEMU): the VM
/// keeps running on the source. Then it accepts, and `--to best` picks it from the
/// source's candidates (that migration is interrupted by the operator). The consolidation
/// plan moves the guest to the destination, which runs two guests of the same image, and
/// `plan --apply` carries it out: the guest moves with a fraction of the bytes, runs
/// there, the source QEMU is gone, and the destination's metrics count it.
#[test]
#[serial_test::serial]
fn a_guest_moves_to_the_peer_holding_most_of_it_whose_agent_runs_it() {
    use xtask::lab::hosts::{DST_ADDR, SRC_ADDR, Side, TwoHosts};
    if !privileged("a_guest_moves_to_the_peer_holding_most_of_it_whose_agent_runs_it") {
        return;
    }
    let setup = Setup::new("migrate-peer-test", 3, 15);
    let (dir, src, twin, third) = (
        &setup.dir,
        &setup.guests[0],
        &setup.guests[1],
        &setup.guests[2],
    );
    let _migrated = Migrated(src.uuid.clone(), src.pid);
    let hosts = TwoHosts::up().expect("the two lab hosts");
    let key = dir.join("gossip.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // Both agents see every QEMU of the machine (the lab's hosts are network namespaces,
    // not PID namespaces): each keeps the other host's guests out of what it publishes
    // with a domain that does not share, so that the fabric sees each guest on its host.
    let config = |name: &str, ip: std::net::Ipv4Addr, incoming: bool| {
        let elsewhere = if name == "src" {
            format!("\"{}\", \"{}\"", twin.uuid, third.uuid)
        } else {
            format!("\"{}\"", src.uuid)
        };
        let (cert, k) = setup.pki.leaf(&[name, &ip.to_string()]);
        std::fs::write(dir.join(format!("{name}-fabric.crt")), cert).unwrap();
        std::fs::write(dir.join(format!("{name}-fabric.key")), k).unwrap();
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "state_dir = \"{d}/state-{name}\"\n\n\
                 [[domain]]\nname = \"elsewhere\"\nuuids = [{elsewhere}]\nshare = false\n\n\
                 [fabric]\nnode = \"{name}\"\nca_file = \"{d}/ca.crt\"\n\
                 cert_file = \"{d}/{name}-fabric.crt\"\nkey_file = \"{d}/{name}-fabric.key\"\n\
                 gossip_key_file = \"{k}\"\ngossip_interval_ms = 300\n{q}",
                d = dir.display(),
                k = key.display(),
                q = if incoming {
                    "incoming_qemu = \"/usr/bin/qemu-system-x86_64\"\n"
                } else {
                    ""
                }
            ),
        )
        .unwrap();
        path
    };
    let src_cfg = config("src", SRC_ADDR, false);
    let _src_agent = fabric_daemon(&hosts, Side::Src, &src_cfg, dir, src.pid);
    let peer_live = || {
        memfabric_harness::wait_for(Duration::from_secs(60), || {
            let (_, out, _) = on_source(
                &hosts,
                &["peers", "--json", "--endpoint", "http://127.0.0.1:9977"],
            );
            // Joining will do: gossip gave its address (its summary needs a scan pass,
            // which a migration to a named peer does not).
            out.contains("\"dst\"") && !out.contains("\"stale\"")
        })
    };
    let migrate = |to: &'static str| {
        on_source(
            &hosts,
            &[
                "migrate",
                "--vm",
                &src.name,
                "--to",
                to,
                "--config",
                src_cfg.to_str().unwrap(),
                "--endpoint",
                "http://127.0.0.1:9977",
                "--json",
            ],
        )
    };

    // A destination that does not accept incoming migrations.
    let refusing_cfg = config("dst", DST_ADDR, false);
    let refusing = fabric_daemon(&hosts, Side::Dst, &refusing_cfg, dir, twin.pid);
    let logs = || {
        ["src", "dst"]
            .map(|n| std::fs::read_to_string(dir.join(format!("{n}.log"))).unwrap_or_default())
            .join("\n---\n")
    };
    assert!(
        peer_live(),
        "the destination's agent never became a live peer: {}\n{}",
        on_source(
            &hosts,
            &["peers", "--json", "--endpoint", "http://127.0.0.1:9977"]
        )
        .1,
        logs()
    );
    let (code, out, err) = migrate("dst");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("does not accept incoming migrations"), "{err}");
    // `--json` reads as JSON on failure too: the outcome, the error, what had moved.
    let failed: serde_json::Value = serde_json::from_str(out.trim()).expect(&out);
    assert_eq!(failed["outcome"], "failed", "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("does not accept incoming migrations")),
        "{failed}"
    );
    assert!(
        failed["stream_bytes"].is_u64() && failed["wire_bytes"].is_u64(),
        "{failed}"
    );
    let status = qmp(&setup.src_qmp(), "query-status", serde_json::json!({}));
    assert_eq!(status["status"], "running", "{status}");
    assert!(migrated_qemu(&src.uuid, src.pid).is_none());
    drop(refusing);

    // One that does, running two guests of the image.
    let accepting_cfg = config("dst", DST_ADDR, true);
    let _dst_agent = fabric_daemon(&hosts, Side::Dst, &accepting_cfg, dir, twin.pid);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        peer_live(),
        "the destination's agent never became a live peer again: {}",
        logs()
    );

    // `best`: the peer the source's candidates say holds most of the guest.
    let best = memfabric_harness::wait_for(Duration::from_secs(120), || {
        let (_, out, _) = on_source(
            &hosts,
            &[
                "candidates",
                "--json",
                "--endpoint",
                "http://127.0.0.1:9977",
            ],
        );
        serde_json::from_str::<serde_json::Value>(&out).is_ok_and(|c| {
            c["candidates"]["best"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|b| b["vm"] == src.uuid.as_str() && b["host"] == "dst")
        })
    });
    assert!(best, "no candidate for {} on dst: {}", src.name, logs());

    // An operator's Ctrl-C during a migration to `best` (the link capped so that the
    // stream takes a while), twice: as soon as the destination started its QEMU (while it
    // indexes its pages before answering, in the debug build at least) and once the
    // stream flows. Either way the guest runs on the source, the destination drops its
    // QEMU and the command says it was interrupted.
    for mid_stream in [false, true] {
        let answered = || logs().matches("proxy on port").count();
        let answered_before = answered();
        let interrupted = hosts
            .command(Side::Src, &agent_binary())
            .args(["migrate", "--vm", &src.name, "--to", "best", "--config"])
            .arg(&src_cfg)
            .args(["--endpoint", "http://127.0.0.1:9977", "--bandwidth", "20M"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        assert!(
            memfabric_harness::wait_for(Duration::from_secs(60), || migrated_qemu(
                &src.uuid, src.pid
            )
            .is_some()),
            "the destination never started its QEMU: {}",
            logs()
        );
        if mid_stream {
            assert!(
                memfabric_harness::wait_for(Duration::from_secs(120), || answered()
                    > answered_before),
                "the destination never answered: {}",
                logs()
            );
            std::thread::sleep(Duration::from_secs(3));
        }
        // SAFETY: plain kill(2) of the migrate command this test started.
        unsafe { libc::kill(interrupted.id() as i32, libc::SIGINT) };
        let out = interrupted.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        eprintln!("interrupted (mid-stream: {mid_stream}): {err}");
        assert!(err.contains("to dst at"), "`best` is not dst: {err}");
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("interrupted"), "{err}");
        let status = qmp(&setup.src_qmp(), "query-status", serde_json::json!({}));
        assert_eq!(status["status"], "running", "{status}");
        assert!(
            memfabric_harness::wait_for(Duration::from_secs(30), || migrated_qemu(
                &src.uuid, src.pid
            )
            .is_none()),
            "the destination kept its QEMU after the source gave up: {}",
            logs()
        );
    }

    // The consolidation plan: the three guests share most of their pages, so they fit on
    // one host, the destination, which runs two of them: the source's guest moves there.
    // Without --apply nothing moves.
    let planned = memfabric_harness::wait_for(Duration::from_secs(120), || {
        let (_, out, _) = on_source(
            &hosts,
            &["plan", "--json", "--endpoint", "http://127.0.0.1:9977"],
        );
        serde_json::from_str::<serde_json::Value>(&out).is_ok_and(|p| {
            p["moves"].as_array().is_some_and(|m| {
                m.len() == 1
                    && m[0]["vm"] == src.uuid.as_str()
                    && m[0]["from"] == "src"
                    && m[0]["to"] == "dst"
            })
        })
    });
    let (_, plan, _) = on_source(&hosts, &["plan", "--endpoint", "http://127.0.0.1:9977"]);
    assert!(
        planned,
        "no plan moving {} to dst: {plan}\n{}",
        src.uuid,
        logs()
    );
    assert!(
        plan.contains(&format!("move {} from src to dst", src.uuid)),
        "{plan}"
    );
    let status = qmp(&setup.src_qmp(), "query-status", serde_json::json!({}));
    assert_eq!(
        status["status"], "running",
        "a dry run moved the guest: {status}"
    );
    assert!(migrated_qemu(&src.uuid, src.pid).is_none());
    // --apply carries the move out through the proxies, here with QEMU's multifd (two
    // channels beside the main one): the destination's agent gives its incoming QEMU the
    // same.
    qmp(
        &setup.src_qmp(),
        "migrate-set-capabilities",
        serde_json::json!({ "capabilities": [{ "capability": "multifd", "state": true }] }),
    );
    qmp(
        &setup.src_qmp(),
        "migrate-set-parameters",
        serde_json::json!({ "multifd-channels": 2 }),
    );
    let (code, out, err) = on_source(
        &hosts,
        &[
            "plan",
            "--apply",
            "--config",
            src_cfg.to_str().unwrap(),
            "--endpoint",
            "http://127.0.0.1:9977",
            "--json",
        ],
    );
    eprintln!("{err}");
    assert_eq!(code, 0, "{err}\n{}", logs());
    assert!(
        err.contains(&format!("move 1 of 1: {} from src to dst", src.uuid)),
        "{err}"
    );
    assert!(
        err.contains("to dst at") && err.contains("1 move done"),
        "{err}"
    );
    let summary: serde_json::Value = serde_json::from_str(out.trim()).expect(&out);
    eprintln!("migrated through the agents: {summary}");
    let (wire, stream) = (
        summary["wire_bytes"].as_u64().unwrap(),
        summary["stream_bytes"].as_u64().unwrap(),
    );
    assert!(
        wire * 10 < stream * 6,
        "{wire} of {stream} bytes sent though the twin runs on the destination"
    );
    assert!(summary["referenced"].as_u64().unwrap() > 1000, "{summary}");
    assert_eq!(summary["channels"], 3, "{summary}");
    // The guest runs on the destination; the source QEMU quit.
    assert!(
        memfabric_harness::wait_for(Duration::from_secs(10), || !lab::qemu::alive(src)),
        "the source QEMU still runs"
    );
    let pid = migrated_qemu(&src.uuid, src.pid).expect("the migrated guest's QEMU");
    let qmp_sock = std::fs::read_dir(dir.join("state-dst/incoming"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path().join("qmp.sock"))
        .find(|p| p.exists())
        .expect("the migrated guest's QMP socket");
    std::thread::sleep(Duration::from_secs(2));
    let status = qmp(&qmp_sock, "query-status", serde_json::json!({}));
    assert_eq!(status["status"], "running", "{status}");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    // The destination's agent counts it.
    let metrics_of = |side: Side| {
        let entry = hosts.entry(side);
        std::thread::spawn(move || {
            entry.enter().unwrap();
            ureq::get("http://127.0.0.1:9977/metrics")
                .call()
                .unwrap()
                .body_mut()
                .read_to_string()
                .unwrap()
        })
        .join()
        .unwrap()
    };
    let metrics = metrics_of(Side::Dst);
    for line in [
        "memfabric_migrations_incoming_total{outcome=\"running\"} 1",
        // The two interrupted migrations.
        "memfabric_migrations_incoming_total{outcome=\"failed\"} 2",
        "memfabric_migrations_incoming_open 0",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    let counter = |name: &str| counter_in(&metrics, name);
    assert_eq!(
        counter("memfabric_migrations_incoming_stream_bytes_total"),
        summary["stream_bytes"].as_u64().unwrap()
    );
    assert_eq!(
        counter("memfabric_migrations_incoming_link_bytes_total"),
        summary["wire_bytes"].as_u64().unwrap(),
        "the destination took on the link what the source put on it"
    );
    // The source's agent counts what its commands sent: the refused and the interrupted
    // migrations (their guest ran on here) and the applied one.
    let metrics = metrics_of(Side::Src);
    for line in [
        "memfabric_migrations_outgoing_total{outcome=\"completed\"} 1",
        "memfabric_migrations_outgoing_total{outcome=\"failed\"} 3",
        "memfabric_migrations_outgoing_total{outcome=\"abandoned\"} 0",
        "memfabric_migrations_outgoing_open 0",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    let counter = |name: &str| counter_in(&metrics, name);
    let pages = "memfabric_migrations_outgoing_pages_total{way=\"referenced\"}";
    assert!(counter(pages) >= summary["referenced"].as_u64().unwrap());
    assert!(
        counter("memfabric_migrations_outgoing_stream_bytes_total")
            > summary["stream_bytes"].as_u64().unwrap(),
        "the applied migration's stream and some of the interrupted one's"
    );

    // An agent that died between the stream and the source's start left its incoming QEMU
    // paused: the next agent stops it, and leaves the guest that runs here alone.
    let leftover = dir.join("state-dst/incoming/leftover");
    std::fs::create_dir_all(&leftover).unwrap();
    let started = std::process::Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "32",
            "-S",
        ])
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            leftover.join("qmp.sock").display()
        ))
        .arg("-pidfile")
        .arg(leftover.join("qemu.pid"))
        .arg("-daemonize")
        .status()
        .unwrap();
    assert!(started.success());
    let paused: u32 = std::fs::read_to_string(leftover.join("qemu.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _paused_guard = KillOnDrop(paused);
    drop(_dst_agent);
    let _dst_agent = fabric_daemon(&hosts, Side::Dst, &accepting_cfg, dir, twin.pid);
    assert!(
        memfabric_harness::wait_for(Duration::from_secs(30), || !std::path::Path::new(&format!(
            "/proc/{paused}"
        ))
        .exists()),
        "the paused leftover QEMU {paused} still runs: {}",
        logs()
    );
    assert!(!leftover.exists());
    std::thread::sleep(Duration::from_secs(1));
    let status = qmp(&qmp_sock, "query-status", serde_json::json!({}));
    assert_eq!(status["status"], "running", "{status}");
}

/// A relay between two unix sockets that counts and SHA-256s what passes one way, as an
/// observer independent of the proxies: it listens on `listen`, takes `channels`
/// connections (QEMU's main channel and its multifd ones), connects each to `to` in the
/// order taken and copies both ways (the other way: QEMU's return path, unhashed).
/// Returns, per channel in that order, the length and SHA-256 of what went from
/// `listen`'s client to `to`.
fn tap(
    listen: &Path,
    to: PathBuf,
    channels: usize,
) -> std::thread::JoinHandle<Vec<(u64, Vec<u8>)>> {
    use std::{
        io::{Read as _, Write as _},
        os::unix::net::{UnixListener, UnixStream},
    };
    let listener = UnixListener::bind(listen).expect("the tap's socket");
    std::thread::spawn(move || {
        let relays: Vec<_> = (0..channels)
            .map(|_| {
                let (mut from, _) = listener.accept().expect("the tap's client");
                let mut onward = UnixStream::connect(&to).expect("the tap's onward socket");
                let (mut back_from, mut back_to) =
                    (onward.try_clone().unwrap(), from.try_clone().unwrap());
                std::thread::spawn(move || std::io::copy(&mut back_from, &mut back_to));
                std::thread::spawn(move || {
                    let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
                    let (mut buf, mut bytes) = (vec![0u8; 256 << 10], 0u64);
                    loop {
                        let n = from.read(&mut buf).expect("reading the tapped stream");
                        if n == 0 {
                            break;
                        }
                        sha.update(&buf[..n]);
                        bytes += n as u64;
                        onward
                            .write_all(&buf[..n])
                            .expect("relaying the tapped stream");
                    }
                    let _ = onward.shutdown(std::net::Shutdown::Write);
                    (bytes, sha.finish().as_ref().to_vec())
                })
            })
            .collect();
        relays.into_iter().map(|r| r.join().unwrap()).collect()
    })
}

/// A QEMU driven by someone else (libvirt holds its QMP socket): `send --qemu-socket`
/// only listens, the driver (here the test, as libvirt's `--migrateuri unix://PATH
/// --parallel --parallel-connections 2` would) starts QEMU's migration to that socket,
/// with two multifd channels, and each channel arrives byte for byte with a fraction of
/// the bytes on the link.
#[test]
#[serial_test::serial]
fn a_migration_driven_by_libvirt_goes_through_the_socket_proxy() {
    if !privileged("a_migration_driven_by_libvirt_goes_through_the_socket_proxy") {
        return;
    }
    let setup = Setup::new("migrate-socket-test", 2, 21);
    let (dir, src) = (&setup.dir, &setup.guests[0]);
    let incoming = dir.join("incoming.sock");
    // Observers on both sides, outside the proxies: QEMU -> tap -> source proxy, and
    // destination proxy -> tap -> the incoming QEMU.
    let (qemu_out, proxy_in) = (dir.join("libvirt.sock"), dir.join("proxy.sock"));
    let (proxy_out, qemu_in) = (dir.join("tap-in.sock"), incoming.clone());
    let _dst = memfabric_harness::Guarded::new(
        lab::qemu::incoming_command(src.pid, dir, &incoming)
            .expect("the incoming command")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("the incoming QEMU"),
    );
    let multifd = 2u8;
    let dst_qmp = dir.join("incoming.qmp");
    assert!(
        memfabric_harness::wait_for(Duration::from_secs(30), || dst_qmp.exists()),
        "the incoming QEMU's QMP socket"
    );
    for q in [&dst_qmp, &setup.src_qmp()] {
        qmp(
            q,
            "migrate-set-capabilities",
            serde_json::json!({ "capabilities": [{ "capability": "multifd", "state": true }] }),
        );
        qmp(
            q,
            "migrate-set-parameters",
            serde_json::json!({ "multifd-channels": multifd }),
        );
    }
    let channels = usize::from(multifd) + 1;
    let rt = runtime();
    let socket = proxy_in.clone();
    let delivered = tap(&proxy_out, qemu_in, channels);
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let receive = run::receive(
        ReceiveOptions {
            listen: "127.0.0.1:0".into(),
            incoming: proxy_out,
            uuid: Some(src.uuid.clone()),
            tls: setup.dst.clone(),
            accept_timeout: Duration::from_secs(120),
        },
        move |addr, _| addr_tx.send(addr).unwrap(),
        Arc::new(Progress::default()),
    );
    let src_qmp = setup.src_qmp();
    let ((sent, received), (written, delivered)) = rt.block_on(async {
        let recv = tokio::spawn(receive);
        let addr = tokio::task::spawn_blocking(move || addr_rx.recv().unwrap())
            .await
            .unwrap();
        let send = tokio::spawn(run::send_via_socket(
            run::SocketSendOptions {
                socket: socket.clone(),
                to: addr.to_string(),
                node: "dst".into(),
                tls: setup.src.clone(),
                bandwidth: None,
                multifd,
                accept_timeout: Duration::from_secs(60),
            },
            Arc::new(Progress::default()),
        ));
        // The driver: once the proxy listens, QEMU is told to migrate there (through
        // the tap).
        let uri = format!("unix:{}", qemu_out.display());
        let written = tokio::task::spawn_blocking(move || {
            assert!(memfabric_harness::wait_for(Duration::from_secs(30), || {
                socket.exists()
            }));
            let written = tap(&qemu_out, socket, channels);
            qmp(&src_qmp, "migrate", serde_json::json!({ "uri": uri }));
            written
        })
        .await
        .unwrap();
        (
            (send.await.unwrap(), recv.await.unwrap()),
            (written, delivered),
        )
    });
    let sent = sent.expect("the migration through the socket proxy");
    let received = received.expect("the receiving side");
    assert_eq!(sent.stream_bytes, received.stream_bytes);
    assert_eq!(sent.channels, channels as u64);
    assert_eq!(received.channels, sent.channels);
    // Joined only once both proxies succeeded (a tap never connected to would wait).
    let (written, delivered) = (written.join().unwrap(), delivered.join().unwrap());
    // By SHA-256, outside the proxies: what QEMU wrote on each channel is what the
    // incoming QEMU got on it.
    assert_eq!(written.iter().map(|w| w.0).sum::<u64>(), sent.stream_bytes);
    assert_eq!(
        written, delivered,
        "the streams QEMU wrote (length, SHA-256 per channel) differ"
    );
    assert!(
        written[1..].iter().all(|w| w.0 > 1 << 20),
        "the multifd channels carried the pages: {written:?}"
    );
    assert!(
        sent.wire_bytes * 10 < sent.stream_bytes * 6,
        "{} of {} bytes sent",
        sent.wire_bytes,
        sent.stream_bytes
    );
    let (status, _) = memfabric::actuate::qmp::Qmp::connect(&setup.src_qmp())
        .and_then(|mut q| run::await_status(&mut q, Duration::from_secs(30)))
        .unwrap();
    assert_eq!(status, "completed");
    assert_same_ram(src.pid, _dst.id(), &dir.join("incoming.qmp"));
}
