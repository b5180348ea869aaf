//! The daemon's HTTP side against clients a root daemon must survive: thousands of idle
//! sockets, a request that never finishes, and a unix socket only root may open. All on
//! loopback, bounded in count and time.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use memfabric_harness::Daemon;

const MEMFABRIC: &str = env!("CARGO_BIN_EXE_memfabric");

/// Raises this process's open-file limit so it can hold `n` sockets.
fn allow_files(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim.rlim_cur = lim.rlim_max.min(n.max(lim.rlim_cur));
    // SAFETY: valid pointer; raising the soft limit up to the hard one.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    assert!(lim.rlim_cur >= n, "hard file limit {} < {n}", lim.rlim_max);
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Waits until the daemon answers /healthz (it tracks nothing, so it is quick).
fn up(d: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.get("/healthz").is_none() {
        assert!(Instant::now() < deadline, "daemon did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn two_thousand_idle_sockets_do_not_lock_out_a_scraper() {
    if !memfabric_harness::privileged("two_thousand_idle_sockets_do_not_lock_out_a_scraper") {
        return;
    }
    const IDLE: usize = 2000;
    allow_files(IDLE as u64 + 256);
    let d = Daemon::start(MEMFABRIC, &[]);
    up(&d);
    let addr = format!("127.0.0.1:{}", d.port());
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        match TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2)) {
            Ok(s) => idle.push(s),
            Err(e) => panic!("connect #{}: {e}", idle.len()),
        }
    }
    // Let the daemon accept (and shed) them all.
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let body = d
        .get("/metrics")
        .expect("/metrics while 2,000 sockets are open");
    let took = t.elapsed();
    let fds = open_fds(d.pid());
    eprintln!(
        "{IDLE} idle sockets held: /metrics in {:.0} ms, daemon fds {fds}, evicted {:?}",
        took.as_secs_f64() * 1e3,
        metric(&body, "memfabric_http_connections_evicted_total")
    );
    assert!(took < Duration::from_secs(1), "/metrics took {took:?}");
    assert!(fds < 400, "the daemon holds {fds} descriptors");
    assert!(
        metric(&body, "memfabric_http_connections_evicted_total").unwrap_or(0.0)
            >= (IDLE - 300) as f64,
        "{body}"
    );
    // Idle connections the cap kept are closed by the header timeout (5 s).
    std::thread::sleep(Duration::from_secs(6));
    let body = d.get("/metrics").unwrap();
    let open = metric(&body, "memfabric_http_connections").unwrap();
    assert!(
        open <= 2.0,
        "{open} connections still open after the idle timeout"
    );
    drop(idle);
    d.stop();
}

#[test]
fn a_half_sent_request_does_not_hold_up_shutdown() {
    if !memfabric_harness::privileged("a_half_sent_request_does_not_hold_up_shutdown") {
        return;
    }
    let d = Daemon::start(MEMFABRIC, &[]);
    up(&d);
    let mut s = TcpStream::connect(format!("127.0.0.1:{}", d.port())).unwrap();
    // No blank line: the request head never ends.
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // And a slow reader of a finished response alongside.
    let mut slow = TcpStream::connect(format!("127.0.0.1:{}", d.port())).unwrap();
    slow.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    d.signal(libc::SIGTERM);
    let (code, err) = d.wait();
    let took = t.elapsed();
    eprintln!("exit after SIGTERM in {:.0} ms", took.as_secs_f64() * 1e3);
    assert_eq!(code, Some(0), "{err}");
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
}

#[test]
fn a_unix_socket_is_root_only_and_removed_on_exit() {
    if !memfabric_harness::privileged("a_unix_socket_is_root_only_and_removed_on_exit") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("memfabric-unix-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("memfabric.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_memfabric"))
        .args(["run", "--scan-cpu", "0", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let get = |path: &str| memfabric_harness::unix_get(&sock, path);
    let deadline = Instant::now() + Duration::from_secs(30);
    let reply = loop {
        if let Some(r) = get("/healthz").filter(|r| r.starts_with("HTTP/1.1 200")) {
            break r;
        }
        assert!(Instant::now() < deadline, "no answer on {}", sock.display());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(reply.contains("ok"), "{reply}");
    let meta = std::fs::metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");
    // A second daemon on the same socket is refused, and the first keeps it.
    let second = Command::new(env!("CARGO_BIN_EXE_memfabric"))
        .args(["run", "--scan-cpu", "0", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(4), "{second:?}");
    assert!(get("/healthz").is_some_and(|r| r.starts_with("HTTP/1.1 200")));
    // SAFETY: our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!sock.exists(), "socket left behind");
    let _ = std::fs::remove_dir_all(&dir);
}

/// One HTTPS GET trusting only `ca`; (status line, body) or the TLS/IO error.
fn https_get(port: u16, ca: &[u8], path: &str, auth: Option<&str>) -> Result<String, String> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca) {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn = rustls::ClientConnection::new(
        std::sync::Arc::new(config),
        ServerName::try_from("localhost").unwrap(),
    )
    .map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let auth = auth.map_or(String::new(), |a| {
        use base64::Engine as _;
        format!(
            "Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(a)
        )
    });
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut out = String::new();
    tls.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

#[test]
fn tls_and_basic_auth_guard_every_endpoint() {
    if !memfabric_harness::privileged("tls_and_basic_auth_guard_every_endpoint") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("memfabric-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.signing_key.serialize_pem());
    std::fs::write(dir.join("tls.crt"), &cert_pem).unwrap();
    std::fs::write(dir.join("tls.key"), &key_pem).unwrap();
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let cfg = dir.join("memfabric.toml");
    std::fs::write(
        &cfg,
        format!(
            "[web]\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n\
             basic_auth_users = {{ prometheus = \"{hash}\" }}\n",
            dir.join("tls.crt").display(),
            dir.join("tls.key").display()
        ),
    )
    .unwrap();
    let d = Daemon::start(MEMFABRIC, &["--config", cfg.to_str().unwrap()]);
    let port = d.port();
    let ca = cert_pem.as_bytes();
    let deadline = Instant::now() + Duration::from_secs(30);
    let ok = loop {
        match https_get(port, ca, "/metrics", Some("prometheus:s3cret")) {
            Ok(r) if r.starts_with("HTTP/1.1 200") => break r,
            _ => {
                assert!(Instant::now() < deadline, "no HTTPS answer");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    assert!(ok.contains("memfabric_ksm_run"), "{ok}");
    for (path, auth) in [
        ("/metrics", None),
        ("/v1/status", Some("prometheus:wrong")),
        ("/healthz", Some("nobody:s3cret")),
    ] {
        let r = https_get(port, ca, path, auth).unwrap();
        assert!(r.starts_with("HTTP/1.1 401"), "{path} {auth:?}: {r}");
        assert!(r.contains("www-authenticate: Basic"), "{r}");
    }
    // Plain HTTP gets no answer at all from a TLS listener.
    assert!(d.get("/healthz").is_none());
    // A client that does not trust the certificate is refused by the handshake.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    assert!(https_get(port, other.cert.pem().as_bytes(), "/healthz", None).is_err());
    d.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_web_config_is_refused_before_anything_starts() {
    let dir = std::env::temp_dir().join(format!("memfabric-badweb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, body, says) in [
        (
            "half.toml",
            "[web]\ntls_cert_file = \"/x.crt\"\n",
            "go together",
        ),
        (
            "plain.toml",
            "[web]\nbasic_auth_users = { a = \"plain\" }\n",
            "bcrypt",
        ),
        (
            "missing.toml",
            "[web]\ntls_cert_file = \"/nonexistent.crt\"\ntls_key_file = \"/nonexistent.key\"\n",
            "/nonexistent.crt",
        ),
    ] {
        let cfg = dir.join(name);
        std::fs::write(&cfg, body).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_memfabric"))
            .args(["run", "--listen", "127.0.0.1:0", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains(says), "{name}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Out of file descriptors (what a flood of sockets did before the connection cap), /proc
/// reads fail: that must leave the VMs as they were, not take them for exited.
#[test]
fn out_of_descriptors_the_vms_stay_tracked() {
    if !memfabric_harness::privileged("out_of_descriptors_the_vms_stay_tracked") {
        return;
    }
    let mut vm = Command::new("sleep").arg("600").spawn().unwrap();
    let pid = vm.id();
    let d = Daemon::start(
        MEMFABRIC,
        &["--pid", &pid.to_string(), "--refresh-ms", "200"],
    );
    up(&d);
    let listed = |d: &Daemon| {
        d.json("/v1/status")
            .map(|v| v["vms"].as_array().unwrap().iter().any(|x| x["pid"] == pid))
    };
    assert_eq!(listed(&d), Some(true));
    // Leave the daemon a few descriptors, then take them with idle connections.
    let fds = open_fds(d.pid()) as u64;
    let set = |soft: u64, hard: u64| {
        let lim = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: valid pointers; the daemon is our child.
        let rc = unsafe {
            libc::prlimit(
                d.pid() as i32,
                libc::RLIMIT_NOFILE,
                &lim,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    };
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe {
        libc::prlimit(
            d.pid() as i32,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut old,
        )
    };
    set(fds + 4, old.rlim_max);
    let idle: Vec<TcpStream> = (0..64)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", d.port())).ok())
        .collect();
    // Several refreshes with no descriptor to spare.
    std::thread::sleep(Duration::from_secs(2));
    drop(idle);
    set(old.rlim_cur, old.rlim_max);
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        if let Some(b) = d.get("/metrics") {
            break b;
        }
        assert!(Instant::now() < deadline, "the daemon never answered again");
        std::thread::sleep(Duration::from_millis(200));
    };
    let errors = metric(&body, "memfabric_proc_read_errors_total").unwrap_or(0.0);
    let accept_errors = metric(&body, "memfabric_http_accept_errors_total").unwrap_or(0.0);
    eprintln!("/proc read errors {errors}, accept errors {accept_errors}");
    assert!(
        errors > 0.0,
        "the daemon never ran out of descriptors: {body}"
    );
    assert_eq!(listed(&d), Some(true), "the VM was dropped");
    let log = d.stop();
    assert!(
        !log.contains(&format!("(pid {pid}) is gone")),
        "the VM was taken for gone while /proc could not be read: {log}"
    );
    let _ = vm.kill();
    let _ = vm.wait();
}

/// Slow readers of the largest document, /v1/ranges of a 16 GiB "guest" (8,192 ranges per
/// page): they never read what they asked for. The daemon's memory stays bounded (at most
/// 4 documents are held at once, the rest are told to retry), and /metrics still answers.
#[test]
fn slow_readers_of_ranges_keep_the_daemon_bounded() {
    if !memfabric_harness::privileged("slow_readers_of_ranges_keep_the_daemon_bounded") {
        return;
    }
    const SIZE: usize = 16 << 30;
    // SAFETY: the child only maps and touches memory, then sleeps; it never returns.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: in the forked child: raw system calls on memory it maps itself.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            ) as *mut u8;
            let mut at = 0;
            while at < SIZE {
                std::ptr::write_volatile(p.add(at), 1);
                at += 2 << 20;
            }
            loop {
                libc::pause();
            }
        }
    }
    struct Kill(i32);
    impl Drop for Kill {
        fn drop(&mut self) {
            // SAFETY: our child.
            unsafe {
                libc::kill(self.0, libc::SIGKILL);
                libc::waitpid(self.0, std::ptr::null_mut(), 0);
            }
        }
    }
    let _child = Kill(pid);
    let d = Daemon::start_with(MEMFABRIC, &["--pid", &pid.to_string()], "50");
    up(&d);
    let path = format!("/v1/ranges?vm={pid}&limit=8192");
    let deadline = Instant::now() + Duration::from_secs(120);
    let first = loop {
        if let Some(body) = d.get(&path) {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "no ranges for the 16 GiB process"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let v: serde_json::Value = serde_json::from_str(&first).unwrap();
    let n = v["ranges"].as_array().unwrap().len();
    assert!(n >= 4096, "{n} ranges");
    let before = memfabric_harness::rss_kib(d.pid());
    // 64 clients ask and never read.
    let slow: Vec<TcpStream> = (0..64)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", d.port())).unwrap();
            write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    let metrics = d.get("/metrics").expect("/metrics with 64 slow readers");
    let took = t.elapsed();
    let during = memfabric_harness::rss_kib(d.pid());
    let busy = metric(&metrics, "memfabric_http_busy_rejections_total").unwrap_or(0.0);
    eprintln!(
        "{n} ranges per document ({} KiB); 64 slow readers: daemon RSS {before} -> {during} kB, \
         {busy} told to retry, /metrics in {:.0} ms",
        first.len() >> 10,
        took.as_secs_f64() * 1e3
    );
    assert!(took < Duration::from_secs(1));
    // Each document is about a few MiB; 64 of them would be far more than this.
    assert!(
        during < before + 64 * 1024,
        "RSS grew from {before} to {during} kB with 64 slow readers"
    );
    drop(slow);
    d.stop();
}

/// One plain-HTTP GET with a basic-auth credential: the status code, or None.
fn get_with(port: u16, path: &str, credential: &str) -> Option<u16> {
    use base64::Engine as _;
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    let b = base64::engine::general_purpose::STANDARD.encode(credential);
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic {b}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// CPU seconds `pid` has used (utime + stime).
fn cpu_seconds(pid: u32) -> f64 {
    memfabric::host::ksm::cpu_seconds(pid).expect("the daemon's /proc/PID/stat")
}

#[test]
fn a_flood_of_wrong_credentials_costs_two_verifications_at_a_time() {
    if !memfabric_harness::privileged(
        "a_flood_of_wrong_credentials_costs_two_verifications_at_a_time",
    ) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("memfabric-authflood-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // The default cost, as an operator's htpasswd makes it.
    let hash = bcrypt::hash("s3cret", bcrypt::DEFAULT_COST).unwrap();
    let cfg = dir.join("memfabric.toml");
    std::fs::write(
        &cfg,
        format!("[web]\nbasic_auth_users = {{ prometheus = \"{hash}\" }}\n"),
    )
    .unwrap();
    let d = Daemon::start(MEMFABRIC, &["--config", cfg.to_str().unwrap()]);
    let port = d.port();
    let deadline = Instant::now() + Duration::from_secs(30);
    while get_with(port, "/healthz", "prometheus:s3cret") != Some(200) {
        assert!(Instant::now() < deadline, "no answer");
        std::thread::sleep(Duration::from_millis(200));
    }
    // 200 clients, each with guesses of its own, for 4 s; the scraper meanwhile.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cpu0 = cpu_seconds(d.pid());
    let t0 = Instant::now();
    let clients: Vec<_> = (0..200)
        .map(|c| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut codes = Vec::new();
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 50 {
                    codes.push(get_with(
                        port,
                        "/metrics",
                        &format!("prometheus:guess-{c}-{i}"),
                    ));
                    i += 1;
                }
                codes
            })
        })
        .collect();
    let mut scrapes = Vec::new();
    while t0.elapsed() < Duration::from_secs(4) {
        let t = Instant::now();
        let code = get_with(port, "/metrics", "prometheus:s3cret");
        scrapes.push((code, t.elapsed()));
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let codes: Vec<Option<u16>> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    let wall = t0.elapsed().as_secs_f64();
    let cores = (cpu_seconds(d.pid()) - cpu0) / wall;
    let denied = codes.iter().filter(|c| **c == Some(401)).count();
    let busy = codes.iter().filter(|c| **c == Some(503)).count();
    assert!(
        codes.iter().all(|c| matches!(c, Some(401 | 503) | None)),
        "a guess got in"
    );
    assert!(
        scrapes.iter().all(|(c, _)| *c == Some(200)),
        "the scraper was refused: {scrapes:?}"
    );
    let mut lat: Vec<Duration> = scrapes.iter().map(|s| s.1).collect();
    lat.sort();
    eprintln!(
        "200 clients of wrong credentials for {wall:.1} s: {denied} answered 401 ({:.0}/s), \
         {busy} 503; the daemon used {cores:.2} cores; the scraper's {} requests all 200, \
         median {:.1} ms, max {:.1} ms",
        denied as f64 / wall,
        lat.len(),
        lat[lat.len() / 2].as_secs_f64() * 1e3,
        lat[lat.len() - 1].as_secs_f64() * 1e3,
    );
    // The daemon's own count: never more than two verifications at once, and each
    // 401 paid one (503s paid none).
    let metrics = {
        use base64::Engine as _;
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let b = base64::engine::general_purpose::STANDARD.encode("prometheus:s3cret");
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {b}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics"))
    };
    let peak = value("memfabric_http_auth_verifications_peak");
    let verified = value("memfabric_http_auth_verifications_total");
    eprintln!("verifications: {verified}, at most {peak} at once");
    assert!((1.0..=2.0).contains(&peak), "{peak} verifications at once");
    assert!(
        verified >= denied as f64,
        "{verified} verifications for {denied} refusals"
    );
    d.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
