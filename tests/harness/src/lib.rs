//! What every memfabric test and bench shares, in one place: the root check (a test that
//! needs root skips loudly by hand and fails under CI), waiting for a condition, a
//! `memfabric run` child with its own port and log, process figures read from /proc, and a
//! test cluster's certificates.
//! No dependency on memfabric itself: the agent's own tests use it too.

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// True when the test may use root-only kernel facilities. Run by hand without root, a
/// test skips loudly; under CI or `cargo xtask test` (which set `MEMFABRIC_REQUIRE_ROOT`)
/// a missing root fails the test instead.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("MEMFABRIC_REQUIRE_ROOT").is_some() || std::env::var_os("CI").is_some() {
        panic!(
            "{test} needs root (eBPF, KSM, /proc/PID/mem), and this run requires privileged tests"
        );
    }
    eprintln!(
        "\n!!! SKIPPED {test}: needs root (eBPF, KSM, /proc/PID/mem). Run `sudo cargo xtask test`. !!!\n"
    );
    false
}

/// Polls `f` every 50 ms until it gives a value or `timeout` passes.
pub fn poll_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    poll_for(timeout, || cond().then_some(())).is_some()
}

/// Resident set size of the live process `pid`, in KiB (VmRSS). Panics when it cannot be
/// read: a memory bound checked against 0 would pass for the wrong reason.
pub fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"))
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// `cmd` spawned, for an executable a test has just written. A child forked meanwhile by
/// another test thread holds the copy's write descriptor until it execs, and exec fails
/// with ETXTBSY until then: retry for up to five seconds.
pub fn spawn_fresh(cmd: &mut Command) -> Child {
    for _ in 0..250 {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            r => return r.unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}")),
        }
    }
    panic!("{cmd:?} stayed busy (ETXTBSY)")
}

/// Children stopped on drop, also when the test panics: SIGTERM to all (a memfabric
/// daemon then puts back what it changed on the host), [`STOP_GRACE`] for each to exit,
/// then SIGKILL for what still runs.
pub struct Children(pub Vec<Child>);

/// How long a child has to exit after SIGTERM before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(20);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            if let Ok(None) = c.try_wait() {
                // SAFETY: a child of ours, not yet reaped (its PID cannot be reused).
                unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        for c in &mut self.0 {
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One child stopped as [`Children`] stops theirs; otherwise used as the child itself.
pub struct Guarded(Children);

impl Guarded {
    pub fn new(child: Child) -> Guarded {
        Guarded(Children(vec![child]))
    }
}

impl std::ops::Deref for Guarded {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0.0[0]
    }
}

impl std::ops::DerefMut for Guarded {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0.0[0]
    }
}

/// The raw answer to `GET path` over the unix socket `sock` (None: no connection, or no
/// complete answer within 10 s).
pub fn unix_get(sock: &Path, path: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: memfabric\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// A `memfabric run` child. Its stderr goes to a file, not a pipe: a daemon logging
/// thousands of lines into an unread pipe would block. SIGTERM and reaped on drop.
pub struct Daemon {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Daemon {
    /// `EXE run --scan-cpu 0 --listen 127.0.0.1:<free port> ARGS...` (`exe`: the
    /// memfabric binary, `env!("CARGO_BIN_EXE_memfabric")` in the agent's tests).
    pub fn start(exe: &str, args: &[&str]) -> Daemon {
        Self::start_with(exe, args, "0")
    }

    /// The same with the page scanner at `scan_cpu` percent of a core.
    pub fn start_with(exe: &str, args: &[&str], scan_cpu: &str) -> Daemon {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::env::temp_dir().join(format!(
            "memfabric-test-daemon-{}-{port}.log",
            std::process::id()
        ));
        let mut cmd = Command::new(exe);
        cmd.args(["run", "--scan-cpu", scan_cpu, "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap());
        // A test or bench killed by a signal runs no destructor: the daemon goes with it
        // (SIGTERM, so it still puts back what it changed) instead of running on.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt as _;
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        Daemon { child, port, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn get(&self, path: &str) -> Option<String> {
        let mut r = ureq::get(&format!("http://127.0.0.1:{}{path}", self.port))
            .call()
            .ok()?;
        r.body_mut().read_to_string().ok()
    }

    pub fn json(&self, path: &str) -> Option<serde_json::Value> {
        serde_json::from_str(&self.get(path)?).ok()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    /// Waits for the exit (20 s at most); returns the exit code and stderr.
    pub fn wait(mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "memfabric did not exit");
            std::thread::sleep(Duration::from_millis(50));
        };
        (
            status.code(),
            fs::read_to_string(&self.log).unwrap_or_default(),
        )
    }

    /// SIGTERM, then a clean exit; returns stderr.
    pub fn stop(self) -> String {
        self.signal(libc::SIGTERM);
        let (code, err) = self.wait();
        assert_eq!(code, Some(0), "memfabric run on SIGTERM: {err}");
        err
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGTERM);
            let _ = self.child.wait();
        }
        let _ = fs::remove_file(&self.log);
    }
}

/// A test cluster's certificate authority: the CA and leaf certificates the fabric and
/// the migration proxies authenticate with, as PEM.
pub struct Pki {
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub ca_pem: String,
}

impl Pki {
    /// A new CA whose certificate is named `name`.
    pub fn new(name: &str) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Pki {
            ca_pem: cert.pem(),
            ca: rcgen::Issuer::new(params, key),
        }
    }

    /// (certificate PEM, key PEM) of a leaf with these subject alternative names.
    pub fn leaf(&self, names: &[&str]) -> (String, String) {
        let sans = names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
        let params = rcgen::CertificateParams::new(sans).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// `ca.crt`, and `NAME.crt` + `NAME.key` for each of `names` (its only name), written
    /// in `dir`: (certificate, key) paths per name.
    pub fn write(&self, dir: &Path, names: &[&str]) -> Vec<(PathBuf, PathBuf)> {
        fs::write(dir.join("ca.crt"), &self.ca_pem).unwrap();
        names
            .iter()
            .map(|n| {
                let (cert, key) = self.leaf(&[n]);
                let (c, k) = (dir.join(format!("{n}.crt")), dir.join(format!("{n}.key")));
                fs::write(&c, cert).unwrap();
                fs::write(&k, key).unwrap();
                (c, k)
            })
            .collect()
    }
}
