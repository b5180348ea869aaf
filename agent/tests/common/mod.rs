//! Helpers shared by the CLI tests.

/// Root is required under `cargo xtask test`/CI (MEMFABRIC_REQUIRE_ROOT); by hand without
/// root the test is skipped, loudly.
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let required = std::env::var_os("MEMFABRIC_REQUIRE_ROOT").is_some();
    assert!(
        root || !required,
        "{test} needs root and this run requires it"
    );
    if !root {
        eprintln!(
            "\n!!! SKIPPED {test}: needs root (eBPF, /proc/PID/mem). Run `sudo cargo xtask test`. !!!\n"
        );
    }
    root
}

/// Resident set size of `pid` in KiB (0 when unreadable).
#[allow(dead_code, reason = "not every test binary uses it")]
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Children killed (all first, then reaped) on drop.
#[allow(dead_code, reason = "not every test binary uses it")]
pub struct Children(pub Vec<std::process::Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

/// The raw answer to `GET path` over the unix socket `sock` (None: no connection, or no
/// complete answer within 10 s).
#[allow(dead_code, reason = "not every test binary uses it")]
pub fn unix_get(sock: &std::path::Path, path: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: memfabric\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Polls `f` every 100 ms until it gives a value or `timeout` passes.
#[allow(dead_code, reason = "not every test binary uses it")]
pub fn poll_for<T>(timeout: std::time::Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
