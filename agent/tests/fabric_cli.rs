//! The fabric end to end: three `memfabric run` daemons, each in a network namespace this
//! test creates (veth pairs to a bridge in a fourth; nothing leaves the machine), each
//! tracking a child whose pages overlap the others' by known amounts. Checked: candidates
//! match the exact overlap within their bound; forged, tampered, replayed and stale gossip,
//! a certificate from another CA, no certificate, and a peer serving truncated, oversized
//! or garbage summaries are refused and counted, with no panic; a peer killed goes stale
//! while the other two keep serving.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use memfabric::fabric::gossip_auth::{GossipKey, Route, seal};
use memfabric_harness::{Children, Pki, poll_for, privileged};
use serde_json::Value;

const MEMFABRIC: &str = env!("CARGO_BIN_EXE_memfabric");
const PAGE: usize = 4096;
const PORT: u16 = 7947;

/// Network namespaces (and so their veths), deleted on drop.
struct Netns {
    names: Vec<String>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// A hub namespace with a bridge and one namespace per address, 10.77.N.x/24.
    fn new(tag: &str, hosts: &[u8]) -> Netns {
        let hub = format!("mf{tag}hub");
        let mut names = vec![hub.clone()];
        ip(&["netns", "add", &hub]);
        let ns = Netns {
            names: names.clone(),
        };
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &hub, "link", "set", "br0", "up"]);
        let mut ns = ns;
        for &h in hosts {
            let name = format!("mf{tag}h{h}");
            ip(&["netns", "add", &name]);
            names.push(name.clone());
            ns.names = names.clone();
            let (outer, inner) = (format!("v{tag}{h}"), "eth0".to_string());
            ip(&[
                "-n", &hub, "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns",
                &name,
            ]);
            ip(&["-n", &hub, "link", "set", &outer, "master", "br0", "up"]);
            ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("10.77.0.{h}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &name, "link", "set", "eth0", "up"]);
            ip(&["-n", &name, "link", "set", "lo", "up"]);
        }
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in self.names.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// Runs `f` on a thread inside network namespace `ns` (sockets it makes stay there).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = fs::File::open(&path).expect("netns file");
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

/// A forked child holding pages with content ids `ranges` (the same id is the same bytes
/// in every child), sleeping until killed.
fn child(ranges: &[(u64, usize)]) -> i32 {
    let total: usize = ranges.iter().map(|r| r.1).sum();
    // SAFETY: the child only maps, writes its memory and pauses; it never returns.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: in the forked child: raw system calls on memory it maps itself.
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                total * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            ) as *mut u64;
            let mut p = 0;
            for &(from, n) in ranges {
                for id in from..from + n as u64 {
                    for w in 0..PAGE / 8 {
                        *base.add(p * PAGE / 8 + w) = 0xfab << 52 | id << 9 | w as u64;
                    }
                    p += 1;
                }
            }
            loop {
                libc::pause();
            }
        }
    }
    pid
}

struct Kids(Vec<i32>);
impl Drop for Kids {
    fn drop(&mut self) {
        for &p in &self.0 {
            // SAFETY: our children.
            unsafe {
                libc::kill(p, libc::SIGKILL);
                libc::waitpid(p, std::ptr::null_mut(), 0);
            }
        }
    }
}

/// GET over the daemon's unix socket: (status, body).
fn get(sock: &Path, path: &str) -> Option<(u16, String)> {
    let buf = memfabric_harness::unix_get(sock, path)?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    // Chunked bodies (axum's JSON is sized, /metrics may not be): join the chunks.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((len, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16).ok()?;
            if n == 0 {
                break;
            }
            out.push_str(after.get(..n)?);
            rest = after.get(n + 2..)?;
        }
        out
    } else {
        body.to_owned()
    };
    Some((status, body))
}

fn json(sock: &Path, path: &str) -> Option<Value> {
    let (status, body) = get(sock, path)?;
    (status == 200).then(|| serde_json::from_str(&body).ok())?
}

fn metric(sock: &Path, name: &str, label: &str) -> f64 {
    get(sock, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(name) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(-1.0)
}

struct Node {
    sock: PathBuf,
    ip: String,
}

/// Writes a node's certificate, key and config; returns the config path.
fn node_files(dir: &Path, pki: &Pki, name: &str, ip: &str, key_file: &Path) -> PathBuf {
    let (cert, key) = pki.leaf(&[name, ip]);
    fs::write(dir.join(format!("{name}.crt")), cert).unwrap();
    fs::write(dir.join(format!("{name}.key")), key).unwrap();
    let cfg = dir.join(format!("{name}.toml"));
    fs::write(
        &cfg,
        format!(
            "[fabric]\nnode = \"{name}\"\nca_file = \"{d}/ca.crt\"\ncert_file = \"{d}/{name}.crt\"\n\
             key_file = \"{d}/{name}.key\"\ngossip_key_file = \"{k}\"\ngossip_interval_ms = 300\n\
             capacity_bytes = 1073741824\n",
            d = dir.display(),
            k = key_file.display()
        ),
    )
    .unwrap();
    cfg
}

/// `memfabric run` for host `h` (10.77.0.h, in its namespace) tracking `pid`, with the
/// config [`node_files`] wrote.
fn daemon(
    kids: &mut Children,
    dir: &Path,
    tag: &str,
    name: &str,
    h: u8,
    pid: i32,
    seed: Option<&str>,
) -> Node {
    let (ns, ip) = (format!("mf{tag}h{h}"), format!("10.77.0.{h}"));
    let cfg = dir.join(format!("{name}.toml"));
    let sock = dir.join(format!("{name}.sock"));
    let log = fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns, MEMFABRIC, "run", "--config"])
        .arg(&cfg)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .args([
            "--pid",
            &pid.to_string(),
            "--scan-cpu",
            "30",
            "--refresh-ms",
            "500",
        ])
        .arg("--state-dir")
        .arg(dir.join(format!("state-{name}")))
        .args(["--fabric-listen", &format!("{ip}:{PORT}")]);
    if let Some(s) = seed {
        cmd.args(["--peer", &format!("{s}:{PORT}")]);
    }
    kids.0.push(
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    Node { sock, ip }
}

/// The candidate pair (VM of `pid`, `host`): shared pages, bound, VM pages.
fn pair(c: &Value, pid: i32, host: &str) -> Option<(f64, f64, f64)> {
    let vm = format!("pid-{pid}");
    c["candidates"]["pairs"].as_array()?.iter().find_map(|p| {
        (p["host"] == host && p["vm"] == vm.as_str()).then(|| {
            (
                p["shared_pages"].as_f64().unwrap_or(-1.0),
                p["bound_pages"].as_f64().unwrap_or(-1.0),
                p["vm_pages"].as_f64().unwrap_or(-1.0),
            )
        })
    })
}

/// A rogue member: it has the gossip key and a cluster certificate, announces a summary,
/// and serves each client, connection after connection, a truncated one, an oversized one
/// and garbage. Runs until `stop`.
fn rogue(ns: String, dir: PathBuf, key: Vec<u8>, stop: Arc<std::sync::atomic::AtomicBool>) {
    use chitchat::{ChitchatConfig, ChitchatId, FailureDetectorConfig, spawn_chitchat};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    in_netns(&ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let addr: std::net::SocketAddr = format!("10.77.0.4:{PORT}").parse().unwrap();
            let _gossip = spawn_chitchat(
                ChitchatConfig {
                    chitchat_id: ChitchatId::new("rogue".to_string(), 1, addr),
                    cluster_id: "memfabric".into(),
                    gossip_interval: Duration::from_millis(300),
                    listen_addr: addr,
                    seed_nodes: vec![format!("10.77.0.1:{PORT}")],
                    failure_detector_config: FailureDetectorConfig::default(),
                    marked_for_deletion_grace_period: Duration::from_secs(3600),
                    catchup_callback: None,
                    extra_liveness_predicate: None,
                },
                vec![("summary_version".into(), "0bad".into())],
                &memfabric::fabric::gossip_auth::AuthTransport {
                    key: GossipKey::new(&key).unwrap(),
                    stats: Default::default(),
                    advertise: None,
                },
            )
            .await
            .unwrap();
            let tls = memfabric::fabric::tls::load(
                &dir.join("ca.crt"),
                &dir.join("rogue.crt"),
                &dir.join("rogue.key"),
            )
            .unwrap();
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            // Per client: every member fetches from the rogue, each must see all three.
            let mut served: std::collections::HashMap<std::net::IpAddr, usize> = Default::default();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(Ok((tcp, from))) =
                    tokio::time::timeout(Duration::from_millis(200), listener.accept()).await
                else {
                    continue;
                };
                let Ok(mut s) = tls.server.accept(tcp).await else {
                    continue;
                };
                let mut head = [0u8; 1024];
                let _ = s.read(&mut head).await;
                let n = served.entry(from.ip()).or_default();
                let resp: Vec<u8> = match *n % 3 {
                    0 => b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\nMFSU\x01short".to_vec(),
                    1 => {
                        let mut r = b"HTTP/1.1 200 OK\r\ncontent-length: 6000000\r\n\r\n".to_vec();
                        r.resize(r.len() + 6_000_000, b'x');
                        r
                    }
                    _ => b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\nnot-a-sketch".to_vec(),
                };
                *n += 1;
                let _ = s.write_all(&resp).await;
                let _ = s.shutdown().await;
            }
        });
    });
}

#[test]
fn three_agents_find_known_overlaps_refuse_forgeries_and_survive_a_lost_peer() {
    if !privileged("three_agents_find_known_overlaps_refuse_forgeries_and_survive_a_lost_peer") {
        return;
    }
    let tag = format!("{}", std::process::id() % 10_000);
    let dir = std::env::temp_dir().join(format!("memfabric-fabric-{tag}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let net = Netns::new(&tag, &[1, 2, 3, 4]);
    let ns = |h: u8| format!("mf{tag}h{h}");

    let pki = Pki::new("memfabric test cluster");
    fs::write(dir.join("ca.crt"), &pki.ca_pem).unwrap();
    let secret: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37) ^ 0x5c).collect();
    let key_file = dir.join("gossip.key");
    fs::write(&key_file, &secret).unwrap();
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).unwrap();

    // A: ids 0..12,000; B: 6,000..18,000 (6,000 shared with A); C: 0..3,000 (shared
    // with A) and 200,000..205,000 (its own).
    let kids = Kids(vec![
        child(&[(0, 12_000)]),
        child(&[(6_000, 12_000)]),
        child(&[(0, 3_000), (200_000, 5_000)]),
    ]);
    let mut daemons = Children(Vec::new());
    for (n, h) in ["a", "b", "c"].iter().zip(1..) {
        node_files(&dir, &pki, n, &format!("10.77.0.{h}"), &key_file);
    }
    let a = daemon(&mut daemons, &dir, &tag, "a", 1, kids.0[0], None);
    let b = daemon(
        &mut daemons,
        &dir,
        &tag,
        "b",
        2,
        kids.0[1],
        Some("10.77.0.1"),
    );
    let c = daemon(
        &mut daemons,
        &dir,
        &tag,
        "c",
        3,
        kids.0[2],
        Some("10.77.0.1"),
    );

    // Candidates of A's VM on B and C, within their bound (and 2 % of the VM).
    let close = |p: (f64, f64, f64), exact: f64| (p.0 - exact).abs() <= (1.5 * p.1).max(0.02 * p.2);
    let found = poll_for(Duration::from_secs(90), || {
        let v = json(&a.sock, "/v1/candidates")?;
        let on_b = pair(&v, kids.0[0], "b")?;
        let on_c = pair(&v, kids.0[0], "c")?;
        (on_b.2 >= 11_900.0 && close(on_b, 6_000.0) && close(on_c, 3_000.0)).then_some((on_b, on_c))
    });
    let log = |n: &str| fs::read_to_string(dir.join(format!("{n}.log"))).unwrap_or_default();
    let Some((on_b, on_c)) = found else {
        panic!(
            "no candidates on a: {:?}\n--- a ---\n{}\n--- b ---\n{}",
            get(&a.sock, "/v1/peers"),
            log("a"),
            log("b")
        );
    };
    for ((est, bound, vm), exact, host) in [(on_b, 6_000.0, "b"), (on_c, 3_000.0, "c")] {
        let err = (est - exact).abs();
        eprintln!("a's VM on {host}: {est} of {exact} pages (bound {bound}, VM {vm} pages)");
        assert!(
            err <= (1.5 * bound).max(0.02 * vm),
            "{host}: {est} vs {exact} (bound {bound})"
        );
    }
    // B converges to the same overlap seen from its side (its first summaries may
    // predate a full pass over A's VM).
    let mut last = None;
    let from_b = poll_for(Duration::from_secs(60), || {
        let p = pair(&json(&b.sock, "/v1/candidates")?, kids.0[1], "a")?;
        last = Some(p);
        ((p.0 - 6_000.0).abs() <= (1.5 * p.1).max(240.0)).then_some(p)
    });
    assert!(from_b.is_some(), "b's candidate on a: {last:?}");
    assert_eq!(
        metric(&a.sock, "memfabric_fabric_peers", "state=\"live\""),
        2.0
    );
    assert!(
        metric(
            &a.sock,
            "memfabric_fabric_exchange_bytes_total",
            "direction=\"in\""
        ) > 0.0
    );
    let plan = json(&a.sock, "/v1/plan").expect("plan");
    assert_eq!(plan["hosts"], 3, "{plan}");
    assert!(plan["vms"].as_u64() >= Some(3), "{plan}");

    // Forged gossip, sent from the fourth namespace to A.
    let target: std::net::SocketAddr = format!("{}:{PORT}", a.ip).parse().unwrap();
    let b_addr: std::net::SocketAddr = format!("{}:{PORT}", b.ip).parse().unwrap();
    let good = GossipKey::new(&secret).unwrap();
    in_netns(&ns(4), move || {
        let s = std::net::UdpSocket::bind("10.77.0.4:0").unwrap();
        let me = s.local_addr().unwrap();
        let now = memfabric::util::clock::unix_ms();
        let to_a = Route {
            from: me,
            to: target,
        };
        let sealed = seal(&good, now, 0xdead_beef, to_a, b"not chitchat");
        let mut tampered = seal(&good, now, 0xdead_bef0, to_a, b"not chitchat");
        tampered[25] ^= 1;
        let foreign = seal(&GossipKey::new(&[7u8; 32]).unwrap(), now, 1, to_a, b"x");
        let old = seal(&good, now - 120_000, 2, to_a, b"x");
        // Valid MACs, wrong route: claiming to be B, or captured on its way to B.
        let as_b = seal(
            &good,
            now,
            3,
            Route {
                from: b_addr,
                to: target,
            },
            b"x",
        );
        let for_b = seal(
            &good,
            now,
            4,
            Route {
                from: me,
                to: b_addr,
            },
            b"x",
        );
        for d in [
            sealed.clone(),
            sealed,
            tampered,
            foreign,
            old,
            b"junk".to_vec(),
            as_b,
            for_b,
        ] {
            s.send_to(&d, target).unwrap();
        }
    });
    let rejected = |r: &str| {
        metric(
            &a.sock,
            "memfabric_fabric_rejected_total",
            &format!("reason=\"{r}\""),
        )
    };
    assert!(
        poll_for(Duration::from_secs(10), || (rejected("replay") >= 1.0
            && rejected("bad_mac") >= 2.0
            && rejected("stale") >= 1.0
            && rejected("malformed") >= 2.0
            && rejected("misaddressed") >= 2.0)
            .then_some(()))
        .is_some(),
        "replay {} bad_mac {} stale {} malformed {} misaddressed {}",
        rejected("replay"),
        rejected("bad_mac"),
        rejected("stale"),
        rejected("malformed"),
        rejected("misaddressed")
    );

    // A certificate from another CA, and no certificate at all: refused.
    let other = Pki::new("another cluster");
    let (ocert, okey) = other.leaf(&["rogue", "10.77.0.4"]);
    fs::write(dir.join("other.crt"), ocert).unwrap();
    fs::write(dir.join("other.key"), okey).unwrap();
    fs::write(dir.join("other-ca.crt"), &other.ca_pem).unwrap();
    let tls_before = rejected("tls");
    let (d2, ip_a) = (dir.clone(), a.ip.clone());
    let outcomes = in_netns(&ns(4), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut out = Vec::new();
            // Trusting A's CA but presenting another CA's certificate.
            let rogue = memfabric::fabric::tls::load(
                &d2.join("ca.crt"),
                &d2.join("other.crt"),
                &d2.join("other.key"),
            )
            .unwrap();
            let tcp = tokio::net::TcpStream::connect(format!("{ip_a}:{PORT}"))
                .await
                .unwrap();
            let name = rustls::pki_types::ServerName::IpAddress(
                ip_a.parse::<std::net::IpAddr>().unwrap().into(),
            );
            let mut r = rogue.client.connect(name.clone(), tcp).await;
            // TLS 1.3: the server's refusal of the client certificate arrives on first read.
            if let Ok(s) = &mut r {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let _ = s
                    .write_all(b"GET /v1/fabric/summary HTTP/1.1\r\n\r\n")
                    .await;
                let mut b = [0u8; 16];
                out.push(matches!(s.read(&mut b).await, Ok(0) | Err(_)));
            } else {
                out.push(true);
            }
            // Trusting A's CA, and presenting no certificate at all.
            use rustls::pki_types::pem::PemObject as _;
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls::pki_types::CertificateDer::pem_file_iter(d2.join("ca.crt")).unwrap() {
                roots.add(c.unwrap()).unwrap();
            }
            let anonymous = tokio_rustls::TlsConnector::from(std::sync::Arc::new(
                rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
            ));
            let tcp = tokio::net::TcpStream::connect(format!("{ip_a}:{PORT}"))
                .await
                .unwrap();
            let a_name = rustls::pki_types::ServerName::try_from("a").unwrap();
            match anonymous.connect(a_name, tcp).await {
                Ok(mut s) => {
                    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                    let _ = s
                        .write_all(b"GET /v1/fabric/summary HTTP/1.1\r\n\r\n")
                        .await;
                    let mut b = [0u8; 16];
                    out.push(matches!(s.read(&mut b).await, Ok(0) | Err(_)));
                }
                Err(_) => out.push(true),
            }
            out
        })
    });
    assert_eq!(outcomes.len(), 2, "both refusals ran");
    assert!(outcomes.iter().all(|refused| *refused), "{outcomes:?}");
    assert!(
        poll_for(Duration::from_secs(5), || (rejected("tls") > tls_before)
            .then_some(()))
        .is_some(),
        "tls refusals {tls_before} -> {}",
        rejected("tls")
    );

    // A member (valid key and certificate) serving broken summaries.
    let (rc, rk) = pki.leaf(&["rogue", "10.77.0.4"]);
    fs::write(dir.join("rogue.crt"), rc).unwrap();
    fs::write(dir.join("rogue.key"), rk).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rogue_thread = {
        let (ns4, d, k, s) = (ns(4), dir.clone(), secret.clone(), stop.clone());
        std::thread::spawn(move || rogue(ns4, d, k, s))
    };
    let refused = poll_for(Duration::from_secs(90), || {
        (rejected("bad_summary") >= 2.0 && rejected("oversize") >= 1.0).then_some(())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = rogue_thread.join();
    assert!(
        refused.is_some(),
        "bad_summary {} oversize {}; peers {:?}",
        rejected("bad_summary"),
        rejected("oversize"),
        get(&a.sock, "/v1/peers")
    );
    let peers = json(&a.sock, "/v1/peers").unwrap();
    let rogue_peer = peers["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == "rogue")
        .cloned()
        .expect("the rogue is a known peer");
    assert_ne!(rogue_peer["state"], "live", "{rogue_peer}");

    // C is killed: A sees it stale, B stays live and its candidate is still served.
    let c_daemon = daemons.0.remove(2);
    drop(Children(vec![c_daemon]));
    let stale = poll_for(Duration::from_secs(60), || {
        let v = json(&a.sock, "/v1/peers")?;
        let state = |n: &str| {
            v["peers"]
                .as_array()?
                .iter()
                .find(|p| p["node"] == n)
                .map(|p| p["state"].as_str().unwrap_or("").to_owned())
        };
        (state("c").as_deref() == Some("stale") && state("b").as_deref() == Some("live"))
            .then_some(())
    });
    assert!(stale.is_some(), "{:?}", get(&a.sock, "/v1/peers"));
    let after = json(&a.sock, "/v1/candidates").unwrap();
    assert!(pair(&after, kids.0[0], "b").is_some(), "{after}");
    assert!(
        pair(&after, kids.0[0], "c").is_none(),
        "a stale peer is no candidate: {after}"
    );
    assert!(json(&b.sock, "/v1/candidates").is_some());
    let _ = c;
    drop(daemons);
    for n in ["a", "b"] {
        assert!(!log(n).contains("panicked"), "{n} panicked:\n{}", log(n));
    }
    drop(net);
    let _ = fs::remove_dir_all(&dir);
}
