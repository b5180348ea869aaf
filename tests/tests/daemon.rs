//! The daemon against real processes and real KSM: discovery, the exposition and its
//! numbers against the kernel's own. The daemon runs in-process (the same `serve` that
//! `memfabric run` runs) and is scraped over loopback HTTP.

use std::{collections::BTreeMap, net::TcpListener, thread::JoinHandle, time::Duration};

use memfabric::{config::Config, daemon};
use memfabric_tests::{Workload, ksm_fast, ksm_stat, privileged, vmstat, wait_for};
use serial_test::serial;

const WORKLOAD: &str = env!("CARGO_BIN_EXE_memfabric-workload");

/// A daemon on a free loopback port, stopped on drop.
struct TestDaemon {
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), daemon::DaemonError>>>,
}

impl TestDaemon {
    fn start(pids: Vec<u32>) -> TestDaemon {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = Config {
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            pids,
            matches: Vec::new(),
            refresh: Duration::from_millis(300),
            scan_cpu: 0.05,
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(daemon::serve(cfg, async {
                let _ = rx.await;
            }))
        });
        let d = TestDaemon {
            port,
            stop: Some(tx),
            thread: Some(thread),
        };
        assert!(
            wait_for(Duration::from_secs(20), || d.get("/healthz").is_some()),
            "daemon did not come up"
        );
        d
    }

    fn get(&self, path: &str) -> Option<String> {
        let mut r = ureq::get(&format!("http://127.0.0.1:{}{path}", self.port))
            .call()
            .ok()?;
        r.body_mut().read_to_string().ok()
    }

    /// The scraped samples: `name{labels}` -> value. Panics on a malformed line.
    fn metrics(&self) -> BTreeMap<String, f64> {
        let text = self.get("/metrics").expect("scrape");
        // A real parser first (prometheus-parse), then our stricter checks.
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines)
            .expect("prometheus-parse rejected the exposition");
        let parsed = parse_exposition(&text);
        assert_eq!(
            scrape.samples.len(),
            parsed.len(),
            "parsers disagree on the sample count"
        );
        parsed
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let r = t.join().expect("daemon thread");
            if !std::thread::panicking() {
                r.expect("daemon ended with an error");
            }
        }
    }
}

/// A strict reader of the OpenMetrics text the daemon serves: every sample line is
/// `name{labels} value`, every family has HELP and TYPE, and it ends with `# EOF`.
fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let mut typed = std::collections::HashSet::new();
    assert_eq!(
        text.lines().last(),
        Some("# EOF"),
        "exposition must end with # EOF"
    );
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(rest.split(' ').next().unwrap().to_owned());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let name = key.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && name.starts_with("memfabric_"),
            "bad metric name in {line:?}"
        );
        let family = name.strip_suffix("_total").unwrap_or(name);
        assert!(
            typed.contains(family) || typed.contains(name),
            "{name} has no TYPE"
        );
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        out.insert(key.to_owned(), v);
    }
    out
}

fn vm_metric(m: &BTreeMap<String, f64>, name: &str, pid: u32) -> Option<f64> {
    m.iter()
        .find(|(k, _)| k.starts_with(&format!("{name}{{")) && k.contains(&format!("pid=\"{pid}\"")))
        .map(|(_, v)| *v)
}

#[test]
#[serial(ksm)]
fn scraped_counters_follow_the_kernel() {
    if !privileged("scraped_counters_follow_the_kernel") {
        return;
    }
    const N: i64 = 1024;
    const M: u64 = 200;
    let _ksm = ksm_fast(); // declared first: dropped after the workload died
    let mut w = Workload::spawn(WORKLOAD);
    let d = TestDaemon::start(vec![w.pid]);
    let region = w.cmd(&format!("alloc {N} same"));
    w.cmd(&format!("mergeable {region}"));
    assert!(
        wait_for(Duration::from_secs(90), || ksm_stat(
            w.pid,
            "ksm_merging_pages"
        ) >= N),
        "KSM did not merge the workload"
    );

    // The daemon's view catches up within a few refreshes.
    assert!(
        wait_for(Duration::from_secs(10), || {
            let m = d.metrics();
            vm_metric(&m, "memfabric_vm_ksm_merging_pages", w.pid)
                == Some(ksm_stat(w.pid, "ksm_merging_pages") as f64)
                && vm_metric(&m, "memfabric_vm_ksm_merges_total", w.pid).unwrap_or(0.0) >= N as f64
        }),
        "merging pages / merges never matched ksm_stat: {:?}",
        d.metrics()
    );
    let m = d.metrics();
    for name in [
        "memfabric_ksm_pages_shared",
        "memfabric_ksm_pages_sharing",
        "memfabric_ksm_full_scans_total",
        "memfabric_ksm_general_profit_bytes",
        "memfabric_ksm_cow_breaks_total",
        "memfabric_ksmd_cpu_seconds_total",
        "memfabric_probe_events_dropped_total",
    ] {
        assert!(m.contains_key(name), "{name} missing");
    }
    let writes_before =
        vm_metric(&m, "memfabric_vm_page_faults_total", w.pid).expect("page faults series");
    assert!(writes_before >= 0.0);

    let cow_before = vmstat("cow_ksm");
    let breaks_before = vm_metric(&m, "memfabric_vm_cow_breaks_total", w.pid).unwrap();
    w.cmd(&format!("touch {region} {M}"));
    let cow_delta = vmstat("cow_ksm") - cow_before;
    let mut probe_delta = 0.0;
    assert!(
        wait_for(Duration::from_secs(10), || {
            probe_delta = vm_metric(&d.metrics(), "memfabric_vm_cow_breaks_total", w.pid).unwrap()
                - breaks_before;
            probe_delta >= M as f64
        }),
        "scraped COW breaks grew by {probe_delta} < {M}"
    );
    eprintln!("cow_ksm delta {cow_delta}, scraped COW breaks delta {probe_delta}");
    assert!(
        (probe_delta - cow_delta as f64).abs() <= 3.0,
        "scraped {probe_delta} vs kernel {cow_delta}"
    );

    // The background scan (5 % of a core) finds the pages still identical (the M touched
    // ones became unique) as duplicates.
    let dups = (N as u64 - M) as f64;
    assert!(
        wait_for(Duration::from_secs(20), || {
            vm_metric(&d.metrics(), "memfabric_vm_duplicate_pages", w.pid) == Some(dups)
        }),
        "scan never reported the {dups} duplicate pages: {}",
        d.get("/v1/status").unwrap_or_default()
    );

    // The JSON status agrees.
    let status = d.get("/v1/status").unwrap();
    assert!(status.contains(&format!("\"pid\":{}", w.pid)), "{status}");

    // The process exits: its series go.
    let pid = w.pid;
    w.exit();
    assert!(
        wait_for(Duration::from_secs(10), || vm_metric(
            &d.metrics(),
            "memfabric_vm_ksm_merging_pages",
            pid
        )
        .is_none()),
        "series of exited pid {pid} still exported"
    );
}

#[test]
fn a_vm_process_is_discovered_by_name_and_uuid() {
    if !privileged("a_vm_process_is_discovered_by_name_and_uuid") {
        return;
    }
    // A process whose executable is called qemu-system-x86_64, with QEMU's flags.
    let dir = std::env::temp_dir().join(format!("memfabric-fakevm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("qemu-system-x86_64");
    std::fs::copy(WORKLOAD, &exe).unwrap();
    let uuid = "5f1c2a3e-0000-4000-8000-00000000abcd";
    let mut cmd = std::process::Command::new(&exe);
    cmd.args([
        "-name",
        "guest=testvm,debug-threads=on",
        "-uuid",
        uuid,
        "-m",
        "64",
    ])
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::piped());
    // A thread of the other test may fork while the copy's write descriptor is open,
    // and exec then fails with ETXTBSY until that child has exec'd too: retry briefly.
    let mut tries = 0;
    let mut child = loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => break other.unwrap(),
        }
    };
    let pid = child.id();
    let d = TestDaemon::start(vec![]);
    let series =
        format!("memfabric_vm_guest_memory_bytes{{vm=\"testvm\",pid=\"{pid}\",kind=\"qemu\"}}");
    let found = wait_for(Duration::from_secs(10), || {
        d.metrics().get(&series) == Some(&(64.0 * 1048576.0))
    });
    let status = d.get("/v1/status").unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        found,
        "{series} not exported: {:?}",
        d.metrics().keys().collect::<Vec<_>>()
    );
    assert!(
        status.contains(uuid),
        "uuid missing from /v1/status: {status}"
    );
    assert!(
        wait_for(Duration::from_secs(10), || !d
            .metrics()
            .contains_key(&series)),
        "series stayed after the process was killed"
    );
}
