//! `bench scan`: the page scanner on real guest memory. Same bytes, same run, interleaved
//! rounds: xxh3-64 over guest pages vs copying them (memcpy), as throughput and ratio
//! (goal >= 0.5); full scan passes (pagemap + kpageflags + /proc/PID/mem + hash) in MB/s;
//! state bytes per page; and hash grouping checked against an exact byte-for-byte recount.

use memfabric::actuate::knobs::Knob;
use std::{
    collections::HashMap,
    fmt::Write as _,
    fs,
    path::Path,
    time::{Duration, Instant},
};

use std::os::unix::fs::FileExt as _;

use anyhow::Context as _;
use memfabric::scan::{PAGE, Scanner};
use xtask::{
    ksm::KsmSession,
    lab::{self, UpOptions},
};
use xxhash_rust::xxh3::xxh3_64;

/// Copies the guests' present guest-RAM pages into one local buffer (a snapshot).
pub(crate) fn snapshot(pids: &[u32]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    for &pid in pids {
        let kind = memfabric::host::inventory::VmKind::Qemu;
        let vm = memfabric::host::inventory::describe(pid, kind).context("guest vanished")?;
        let map = memfabric::host::pagemap::Pagemap::open(pid)?;
        let mem = fs::File::open(format!("/proc/{pid}/mem"))?;
        let mut entries = Vec::new();
        for r in &vm.ram {
            let pages = ((r.span.end - r.span.start) as usize) / PAGE;
            for first in (0..pages).step_by(256) {
                let n = 256.min(pages - first);
                let addr = r.span.start + (first * PAGE) as u64;
                map.read(addr, n, &mut entries)?;
                for (i, e) in entries.iter().enumerate() {
                    if e.present() && !e.swapped() {
                        let mut page = vec![0u8; PAGE];
                        // /proc/PID/mem, like the scanner: it leaves shared pages shared.
                        let got = mem
                            .read_at(&mut page, addr + (i * PAGE) as u64)
                            .unwrap_or(0);
                        if got == PAGE {
                            out.extend_from_slice(&page);
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

pub(crate) fn run(out: &Path, guests: u32, rounds: usize) -> anyhow::Result<()> {
    let state = xtask::cmd::root().join("target/lab-bench");
    // SAFETY: single-threaded here; nothing else reads the environment.
    unsafe { std::env::set_var("MEMFABRIC_LAB_STATE", &state) };
    let mut ksm = KsmSession::begin()?;
    ksm.set(Knob::Run, "0")?; // nothing merges while we measure
    let result = (|| {
        let started = lab::up(&UpOptions {
            guests,
            ..UpOptions::default()
        })?;
        let pids: Vec<u32> = started.iter().map(|g| g.pid).collect();
        let snap = snapshot(&pids)?;
        let mb = snap.len() as f64 / (1024.0 * 1024.0);
        eprintln!("bench scan: {:.1} MiB of present guest pages", mb);
        let mut copy = vec![0u8; snap.len()];
        let (mut hash_mbs, mut copy_mbs, mut pass_mbs) = (Vec::new(), Vec::new(), Vec::new());
        let mut sink = 0u64;
        for round in 0..rounds {
            for step in 0..3 {
                match (round + step) % 3 {
                    0 => {
                        let t = Instant::now();
                        for p in snap.chunks_exact(PAGE) {
                            sink ^= xxh3_64(p);
                        }
                        hash_mbs.push(mb / t.elapsed().as_secs_f64());
                    }
                    1 => {
                        let t = Instant::now();
                        copy.copy_from_slice(&snap);
                        std::hint::black_box(&copy);
                        copy_mbs.push(mb / t.elapsed().as_secs_f64());
                    }
                    _ => {
                        let mut s = Scanner::new(2);
                        let t = Instant::now();
                        s.pass(&pids)?;
                        let secs = t.elapsed().as_secs_f64();
                        let r = s.report();
                        pass_mbs.push(
                            r.total.pages_present as f64 * PAGE as f64 / (1024.0 * 1024.0) / secs,
                        );
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::hint::black_box(sink);

        // Exact recount: group pages by full content, compare with grouping by hash.
        let mut by_hash: HashMap<u64, Vec<usize>> = HashMap::new();
        for (i, p) in snap.chunks_exact(PAGE).enumerate() {
            by_hash.entry(xxh3_64(p)).or_default().push(i);
        }
        let page = |i: usize| &snap[i * PAGE..(i + 1) * PAGE];
        let (mut collisions, mut exact_mergeable, mut hash_mergeable) = (0u64, 0u64, 0u64);
        for members in by_hash.values() {
            hash_mergeable += members.len() as u64 - 1;
            // Exact classes within the hash group.
            let mut classes: Vec<usize> = Vec::new();
            for &m in members {
                if !classes.iter().any(|&c| page(c) == page(m)) {
                    classes.push(m);
                }
            }
            collisions += classes.len() as u64 - 1;
            exact_mergeable += members.len() as u64 - classes.len() as u64;
        }
        // The scanner's own content copies over these guests (stable pages after 3 passes).
        let mut s = Scanner::new(2);
        for _ in 0..3 {
            s.pass(&pids)?;
        }
        let (_, table) = s.report_and_table();
        let distinct = table.distinct as f64;
        // Over all shards (one at this size): the largest shard's copies times the shards.
        let table_bytes_per_distinct =
            table.allocated_bytes as f64 * f64::from(table.shards) / distinct.max(1.0);
        anyhow::Ok((
            mb,
            hash_mbs,
            copy_mbs,
            pass_mbs,
            collisions,
            exact_mergeable,
            hash_mergeable,
            distinct,
            table_bytes_per_distinct,
            snap.len() / PAGE,
        ))
    })();
    let down = lab::down();
    let restore = ksm.restore();
    let (
        mb,
        mut hash_mbs,
        mut copy_mbs,
        mut pass_mbs,
        collisions,
        exact,
        hashed,
        distinct,
        table_b,
        pages,
    ) = result?;
    down?;
    restore?;

    let scale = content_table_at_scale(SCALE_DISTINCT);

    let med = |v: &mut Vec<f64>| xtask::report::median(v);
    let (h, c, p) = (med(&mut hash_mbs), med(&mut copy_mbs), med(&mut pass_mbs));
    let dir = xtask::report::dir(out, "scan")?;
    let mut csv = String::from("round,xxh3_mib_s,memcpy_mib_s,scan_pass_mib_s\n");
    for i in 0..hash_mbs.len().min(copy_mbs.len()).min(pass_mbs.len()) {
        writeln!(
            csv,
            "{i},{:.1},{:.1},{:.1}",
            hash_mbs[i], copy_mbs[i], pass_mbs[i]
        )?;
    }
    fs::write(dir.join("samples.csv"), csv)?;
    let md = format!(
        "# bench scan: {guests} lab guests, {mb:.1} MiB of present guest pages, {rounds} interleaved rounds\n\n\
         | figure | value |\n|---|---|\n\
         | xxh3-64 throughput (median) | {h:.0} MiB/s |\n\
         | memcpy of the same bytes (median) | {c:.0} MiB/s |\n\
         | **ratio xxh3 / memcpy** | **{ratio:.2}** (goal >= 0.5) |\n\
         | full scan pass (pagemap + kpageflags + /proc/PID/mem + xxh3, median) | {p:.0} MiB/s ({pass_ratio:.2} of memcpy) |\n\
         | per-page state | {state_b} bytes |\n\
         | content copies per distinct stable page (lab guests, allocated) | {table_b:.1} bytes ({distinct:.0} distinct of {pages} pages) |\n\
         | content copies at scale, unsharded: {scale_n} distinct pages ({scale_gib} GiB of distinct content; a report takes them in shards of 4 MiB) | {scale_b:.1} bytes per distinct page, {scale_mib:.0} MiB, {scale_ns:.1} ns per copy (collected, sorted, grouped) |\n\
         | mergeable pages by hash vs exact recount | {hashed} vs {exact} ({collisions} hash collisions) |\n",
        ratio = h / c,
        pass_ratio = p / c,
        scale_b = scale.bytes_per_entry,
        scale_mib = scale.bytes as f64 / (1024.0 * 1024.0),
        scale_ns = scale.ns_per_insert,
        state_b = memfabric::scan::page_state::BYTES_PER_PAGE,
        scale_n = SCALE_DISTINCT,
        scale_gib = (SCALE_DISTINCT * PAGE as u64) >> 30,
    );
    fs::write(dir.join("summary.md"), &md)?;
    println!("{md}");
    println!("report: {}", dir.display());
    Ok(())
}

/// Distinct contents of the sizing run: 2^25 pages = 128 GiB of pairwise different guest
/// memory, the table of a host with hundreds of GiB of VMs (duplicates add no entries).
const SCALE_DISTINCT: u64 = 1 << 25;

struct TableScale {
    bytes: usize,
    bytes_per_entry: f64,
    ns_per_insert: f64,
}

/// Attributes `n` distinct contents the way a report does (one copy each, xxh3 of a
/// counter, so they are spread like page hashes: collected, sorted, grouped) and measures
/// their memory and cost per copy.
fn content_table_at_scale(n: u64) -> TableScale {
    let live = || crate::LIVE_BYTES.load(std::sync::atomic::Ordering::Relaxed);
    let before = live();
    let mut copies = memfabric::scan::content::Copies::default();
    let t = Instant::now();
    for i in 0..n {
        copies.push(memfabric::scan::content::Copy {
            hash: xxh3_64(&i.to_le_bytes()) & memfabric::scan::page_state::HASH_MASK,
            vm: 0,
            range: u32::try_from(i >> 9).unwrap_or(0),
            merged: false,
        });
    }
    let bytes = live() - before;
    let distinct = copies.attribute(|_, _| {});
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    eprintln!(
        "content copies: {bytes} bytes allocated (their own estimate {})",
        copies.allocated_bytes()
    );
    TableScale {
        bytes,
        bytes_per_entry: bytes as f64 / distinct as f64,
        ns_per_insert: ns,
    }
}
