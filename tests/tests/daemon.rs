//! The daemon against real processes and real KSM: discovery, the exposition and its
//! numbers against the kernel's own. The daemon runs in-process (the same `serve` that
//! `memfabric run` runs) and is scraped over loopback HTTP.

use memfabric::actuate::knobs::Knob;
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
        Self::start_with(pids, false)
    }

    /// `expose_addresses`: serve guest-RAM addresses (`--expose-addresses`).
    fn start_with(pids: Vec<u32>, expose_addresses: bool) -> TestDaemon {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = Config {
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            expose_addresses,
            pids,
            matches: Vec::new(),
            refresh: Duration::from_millis(300),
            scan_cpu: 0.05,
            scan_quiet_cpu: 0.005,
            // Observe only: these tests never change KSM through the daemon.
            act: Vec::new(),
            ksmd_cpu: 0.1,
            state_dir: std::env::temp_dir().join(format!("memfabric-test-{port}")),
            untrusted_vmm_executables: false,
            vmm_uids: vec![0],
            web: Default::default(),
            domains: Vec::new(),
            keep_hints: false,
            fabric: None,
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
        self.get_accepting(path, "*/*").map(|(_, body)| body)
    }

    /// A GET with an `Accept` header: (content type, body).
    fn get_accepting(&self, path: &str, accept: &str) -> Option<(String, String)> {
        let mut r = ureq::get(&format!("http://127.0.0.1:{}{path}", self.port))
            .header("accept", accept)
            .call()
            .ok()?;
        let ct = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        Some((ct, r.body_mut().read_to_string().ok()?))
    }

    /// Status code and body, whatever the status.
    fn get_any(&self, path: &str) -> (u16, String) {
        let mut r = ureq::get(&format!("http://127.0.0.1:{}{path}", self.port))
            .config()
            .http_status_as_error(false)
            .build()
            .call()
            .expect("request");
        let code = r.status().as_u16();
        (code, r.body_mut().read_to_string().unwrap_or_default())
    }

    /// `/v1/ranges?vm=PID` as JSON, once it has ranges.
    fn ranges(&self, pid: u32) -> Option<serde_json::Value> {
        let (code, body) = self.get_any(&format!("/v1/ranges?vm={pid}"));
        (code == 200).then(|| serde_json::from_str(&body).expect("ranges JSON"))
    }

    /// The scraped samples: `name{labels}` -> value. Panics on a malformed line.
    fn metrics(&self) -> BTreeMap<String, f64> {
        let (ct, text) = self
            .get_accepting("/metrics", "application/openmetrics-text;version=1.0.0")
            .expect("scrape");
        assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
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
    let region = w.alloc_mergeable(N);
    w.await_merged(N, "the workload");

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
    // The N pages were first written after the daemon tracked the process.
    let writes = m
        .iter()
        .find(|(k, _)| {
            k.starts_with("memfabric_vm_page_faults_total{")
                && k.contains(&format!("pid=\"{}\"", w.pid))
                && k.contains("access=\"write\"")
        })
        .map(|(_, v)| *v)
        .expect("write faults series");
    assert!(
        writes >= N as f64,
        "{writes} write faults < the {N} pages written"
    );

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
    let mut child = memfabric_harness::spawn_fresh(&mut cmd);
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

/// The 2 MiB ranges of `ranges` (a `/v1/ranges` answer) lying wholly in [start, end).
fn ranges_in(ranges: &serde_json::Value, (start, end): (u64, u64)) -> Vec<serde_json::Value> {
    ranges["ranges"]
        .as_array()
        .expect("ranges array")
        .iter()
        .filter(|r| {
            let s = r["start"].as_u64().unwrap();
            s >= start && s + (2 << 20) <= end
        })
        .cloned()
        .collect()
}

fn classes(ranges: &[serde_json::Value]) -> Vec<String> {
    ranges
        .iter()
        .map(|r| r["class"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
#[serial(ksm)]
fn ranges_are_ranked_from_scan_history_and_cow_heat() {
    if !privileged("ranges_are_ranked_from_scan_history_and_cow_heat") {
        return;
    }
    let _ksm = ksm_fast(); // declared first: dropped after the workload died
    let mut w = Workload::spawn(WORKLOAD);
    let d = TestDaemon::start_with(vec![w.pid], true);

    // Bad queries get clear answers.
    let (code, body) = d.get_any("/v1/ranges");
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("?vm=") && body.contains(&w.pid.to_string()),
        "{body}"
    );
    let (code, body) = d.get_any("/v1/ranges?vm=no-such-vm");
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("no-such-vm"), "{body}");

    let dup = w.cmd("alloc 2048 same");
    w.cmd(&format!("mergeable {dup}"));
    let uni = w.cmd("alloc 2048 unique");
    let churn = w.cmd("alloc 2048 unique");
    w.cmd(&format!("churn {churn}"));
    let (dup_span, uni_span, churn_span) = (w.span(&dup), w.span(&uni), w.span(&churn));
    assert!(
        wait_for(Duration::from_secs(90), || ksm_stat(
            w.pid,
            "ksm_merging_pages"
        ) >= 2048),
        "KSM did not merge the duplicate region"
    );

    // After a few passes each region's whole ranges carry its class.
    let mut last = None;
    let settled = wait_for(Duration::from_secs(60), || {
        let Some(r) = d.ranges(w.pid) else {
            return false;
        };
        let ok = [
            (dup_span, "stable-duplicate"),
            (uni_span, "stable-unique"),
            (churn_span, "volatile"),
        ]
        .iter()
        .all(|(span, want)| {
            let inside = classes(&ranges_in(&r, *span));
            !inside.is_empty() && inside.iter().all(|c| c == want)
        });
        // ... and a pass has seen KSM's merges.
        let merged = ranges_in(&r, dup_span)
            .iter()
            .all(|x| x["merged_pages"] == 512);
        last = Some(r);
        ok && merged
    });
    assert!(settled, "classes never settled: {last:#?}");
    let r = last.unwrap();
    assert!(r["passes"].as_u64().unwrap() >= 3);
    for range in ranges_in(&r, dup_span) {
        assert_eq!(range["merged_pages"], 512, "{range}");
        assert_eq!(range["potential_intra_pages"], 0, "all merged: {range}");
    }

    // Writing the first 2 MiB of merged pages breaks 512 merges: a ranking shows their COW
    // heat, and the range turns volatile (by the heat, or by the pass that reads the pages
    // changed: one write to memory that was calm counts once, see RankPolicy::classify).
    w.cmd(&format!("touch {dup} 512"));
    let first_whole = ranges_in(&r, dup_span)[0]["start"].as_u64().unwrap();
    // The touched pages cover the first whole range from its start up to 2 MiB into the
    // region: all of it when the region is 2 MiB aligned. A range is volatile from a
    // quarter of its pages changed on.
    let touched_in_first = (dup_span.0 + (2 << 20)).saturating_sub(first_whole) / 4096;
    let (mut breaks, mut class) = (0, None);
    let done = wait_for(Duration::from_secs(30), || {
        let Some(r) = d.ranges(w.pid) else {
            return false;
        };
        let now: u64 = ranges_in(&r, (dup_span.0 & !((2 << 20) - 1), dup_span.1 + (2 << 20)))
            .iter()
            .map(|x| x["cow_breaks"].as_u64().unwrap())
            .sum();
        breaks = breaks.max(now);
        class = r["ranges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["start"].as_u64() == Some(first_whole))
            .map(|x| x["class"].as_str().unwrap().to_owned());
        breaks > 0 && (class.as_deref() == Some("volatile") || touched_in_first < 128)
    });
    eprintln!("COW breaks in one ranking window, at most: {breaks}; first range: {class:?}");
    assert!(breaks > 0, "no COW heat ever reached /v1/ranges");
    assert!(
        done,
        "range {first_whole:#x} with {touched_in_first} broken merges ranked {class:?}"
    );

    // The list comes in pages: the second range alone, then the rest.
    let total = r["total"].as_u64().unwrap();
    assert!(total >= 3, "{r}");
    let (code, body) = d.get_any(&format!("/v1/ranges?vm={}&offset=1&limit=1", w.pid));
    assert_eq!(code, 200, "{body}");
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["ranges"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["next_offset"], 2, "{page}");
    let (_, body) = d.get_any(&format!("/v1/ranges?vm={}&offset={}", w.pid, total - 1));
    let last: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(last["next_offset"].is_null(), "{last}");

    // The class counts reach the metrics.
    let m = d.metrics();
    let volatile = m
        .iter()
        .find(|(k, _)| {
            k.starts_with("memfabric_vm_ranges{")
                && k.contains(&format!("pid=\"{}\"", w.pid))
                && k.contains("class=\"volatile\"")
        })
        .map(|(_, v)| *v);
    assert!(volatile.is_some_and(|v| v >= 1.0), "{m:?}");
    assert!(
        m.keys()
            .any(|k| k.starts_with("memfabric_vm_potential_savings_bytes{")
                && k.contains("scope=\"inter\"")),
        "{m:?}"
    );
    // Each VM's last full pass is reported as a duration.
    let pass = vm_metric(&m, "memfabric_vm_scan_pass_seconds", w.pid);
    assert!(pass.is_some_and(|t| t > 0.0), "no pass duration: {m:?}");
    // How the scan took pages in without reading them is exported.
    for how in ["known", "sampled-out", "escalated"] {
        let series = format!("memfabric_scan_pages_total{{how=\"{how}\"}}");
        assert!(m.contains_key(&series), "no {series}: {m:?}");
    }
}

/// Writes `m` pages of the workload's merged `region` and returns (kernel `cow_ksm`
/// delta, the daemon's `memfabric_vm_cow_breaks_total` delta once it stops growing).
fn cow_breaks_of_writes(d: &TestDaemon, w: &mut Workload, region: &str, m: u64) -> (u64, f64) {
    let pid = w.pid;
    let series = |d: &TestDaemon| {
        vm_metric(&d.metrics(), "memfabric_vm_cow_breaks_total", pid).expect("COW breaks series")
    };
    let before = series(d);
    let cow_before = vmstat("cow_ksm");
    w.cmd(&format!("touch {region} {m}"));
    let cow_delta = vmstat("cow_ksm") - cow_before;
    let mut got = 0.0;
    wait_for(Duration::from_secs(5), || {
        got = series(d) - before;
        got >= cow_delta as f64
    });
    (cow_delta, got)
}

/// Both cases where the probes cannot see the merge happen with the owner known: a
/// tracked process that sleeps while ksmd merges it (its `mm` is learnt only when it next
/// runs), and pages merged before the daemon started (a restarted daemon). Every write
/// to a merged page must still count: >= 99 % of the kernel's `cow_ksm`.
#[test]
#[serial(ksm)]
fn cow_breaks_of_sleeping_and_premerged_processes_are_counted() {
    if !privileged("cow_breaks_of_sleeping_and_premerged_processes_are_counted") {
        return;
    }
    const N: i64 = 4000;
    const M: u64 = 1000;
    let mut ksm; // declared first: dropped after the workloads died

    // Merged before the daemon starts.
    let mut early = Workload::spawn(WORKLOAD);
    let early_region = early.alloc_mergeable(N);
    ksm = ksm_fast();
    early.await_merged(N, "the early workload");

    // Joins KSM before it is tracked, then sleeps in read(2) while ksmd merges it.
    let mut sleeper = Workload::spawn(WORKLOAD);
    let sleeper_region = sleeper.cmd(&format!("alloc {N} same"));
    // Let ksmd go past it until the daemon is up: pause KSM (the session restores it).
    ksm.set(Knob::Run, "0").expect("pausing KSM");
    sleeper.cmd(&format!("mergeable {sleeper_region}"));
    let d = TestDaemon::start(vec![early.pid, sleeper.pid]);
    assert!(
        wait_for(Duration::from_secs(10), || {
            let s = d.get("/v1/status").unwrap_or_default();
            s.contains(&format!("\"pid\":{}", sleeper.pid))
                && s.contains(&format!("\"pid\":{}", early.pid))
        }),
        "daemon did not track both workloads"
    );
    let merged_before = ksm_stat(sleeper.pid, "ksm_merging_pages");
    ksm.set(Knob::Run, "1").expect("resuming KSM");
    sleeper.await_merged(N, "the sleeping workload");
    let m = d.metrics();
    let seeded = m["memfabric_probe_merged_pages_seeded_total"];
    assert!(
        seeded >= N as f64,
        "the early workload's {N} merged pages were not found at tracking: {seeded}"
    );
    eprintln!(
        "sleeper: {merged_before} pages merged before the daemon, unowned merges remembered: {}",
        m["memfabric_probe_ksm_merges_unowned_total"]
    );

    for (what, w, region) in [
        (
            "merged before the daemon started",
            &mut early,
            &early_region,
        ),
        ("merged while it slept", &mut sleeper, &sleeper_region),
    ] {
        let (kernel, counted) = cow_breaks_of_writes(&d, w, region, M);
        eprintln!("{what}: cow_ksm +{kernel}, memfabric +{counted}");
        assert!(kernel >= M * 99 / 100, "{what}: only {kernel} COW breaks");
        assert!(
            counted >= 0.99 * kernel as f64 && counted <= kernel as f64 + 3.0,
            "{what}: memfabric counted {counted} COW breaks, the kernel {kernel}"
        );
    }
}

/// Scrapers that do not ask for OpenMetrics get the Prometheus text format 0.0.4, which
/// promtool (Debian's, unpacked by `cargo xtask setup`) accepts without a single lint;
/// OpenMetrics when asked. Guest-RAM addresses stay out of /v1/status and /v1/ranges
/// unless the daemon runs with `--expose-addresses`.
#[test]
#[serial(ksm)]
fn the_exposition_passes_promtool_and_addresses_stay_private() {
    if !privileged("the_exposition_passes_promtool_and_addresses_stay_private") {
        return;
    }
    let mut w = Workload::spawn(WORKLOAD);
    w.cmd("alloc 9000 unique"); // 35 MiB: large enough to be taken for guest RAM
    let d = TestDaemon::start(vec![w.pid]);
    let (ct, text) = d.get_accepting("/metrics", "*/*").expect("scrape");
    assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
    assert!(!text.contains("# EOF"));
    let promtool = xtask::cmd::PROMTOOL;
    assert!(
        std::path::Path::new(promtool).exists(),
        "{promtool} missing: run `cargo xtask setup`"
    );
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}"
    );
    let (ct, om) = d
        .get_accepting("/metrics", "application/openmetrics-text;version=1.0.0")
        .unwrap();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    assert!(om.ends_with("# EOF\n"));

    let status = d.get("/v1/status").unwrap();
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    let vm = v["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["pid"] == w.pid)
        .expect("workload in status");
    let ram = vm["ram"].as_array().expect("ram mappings");
    assert!(!ram.is_empty(), "{vm}");
    for m in ram {
        assert!(m.get("start").is_none() && m.get("end").is_none(), "{m}");
        assert!(m["bytes"].as_u64().unwrap() > 0, "{m}");
    }
}

/// A VMM seen before it mapped its guest RAM is described again until it has: its RAM
/// and mergeability appear without a restart of the daemon.
#[test]
fn a_vm_seen_before_its_ram_is_described_again() {
    if !privileged("a_vm_seen_before_its_ram_is_described_again") {
        return;
    }
    let mut w = Workload::spawn(WORKLOAD);
    let d = TestDaemon::start(vec![w.pid]);
    let pid = w.pid;
    let ram = |d: &TestDaemon| -> Option<usize> {
        let v: serde_json::Value = serde_json::from_str(&d.get("/v1/status")?).ok()?;
        let vm = v["vms"]
            .as_array()?
            .iter()
            .find(|x| x["pid"] == pid)?
            .clone();
        Some(vm["ram"].as_array()?.len())
    };
    assert!(
        wait_for(Duration::from_secs(10), || ram(&d) == Some(0)),
        "the fresh workload should have no guest RAM yet"
    );
    w.cmd("alloc 9000 unique"); // 35 MiB: guest-RAM sized
    assert!(
        wait_for(Duration::from_secs(10), || ram(&d).is_some_and(|n| n >= 1)),
        "the VM's RAM never appeared: {}",
        d.get("/v1/status").unwrap_or_default()
    );
}
