//! A `memfabric run` child for the CLI tests that need a live daemon. Its stderr goes to a
//! file, not a pipe: a daemon logging thousands of lines into an unread pipe would block.
#![allow(dead_code, reason = "each test binary uses part of it")]

use std::{
    fs,
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const MEMFABRIC: &str = env!("CARGO_BIN_EXE_memfabric");

pub struct Daemon {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Daemon {
    /// `memfabric run --scan-cpu 0 --listen 127.0.0.1:<free port> ARGS...`.
    pub fn start(args: &[&str]) -> Daemon {
        Self::start_with(args, "0")
    }

    /// The same with the page scanner at `scan_cpu` percent of a core.
    pub fn start_with(args: &[&str], scan_cpu: &str) -> Daemon {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::env::temp_dir().join(format!(
            "memfabric-test-daemon-{}-{port}.log",
            std::process::id()
        ));
        let child = Command::new(MEMFABRIC)
            .args(["run", "--scan-cpu", scan_cpu, "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
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
