//! `bench fabric`: the fabric's sketch, candidate and plan code on a simulated fleet.
//!
//! - Real page-hash sets: lab guests are booted and their present non-zero pages hashed
//!   as the scanner hashes them. Accuracy on them: each guest against a "host" holding
//!   the other guests, exact intersection vs the estimate, for several k.
//! - The fleet: `hosts` x `vms` VMs. Each VM is an image (one of the real guests, or a
//!   synthetic one) of which it keeps a share, plus pages of its own; VMs are placed at
//!   random (sharing-oblivious). Exact overlaps are counted with hash sets for sampled
//!   (VM, host) pairs and compared with the estimates, per k.
//! - Candidates: one host's VMs against every other host's published sketch, timed on
//!   one core. The plan: sharing-aware packing vs first-fit decreasing.
//! - Exchange: the summary's encoded size and the republish rule give the summary bytes
//!   per host per minute; gossip bytes are measured on a real chitchat cluster over the
//!   authenticated transport on loopback and scaled to the fleet (the digest grows
//!   linearly with members).

use std::{collections::HashSet, fmt::Write as _, fs, path::Path, sync::Arc, time::Instant};

use anyhow::Context as _;
use memfabric::fabric::{
    candidates::{self, LocalVm, PeerHost},
    plan::{self, PlanHost, PlanVm},
    sketch::{DEFAULT_K, MAX_K, Sketch},
    summary::{Summary, VM_K, VmSummary},
};
use xtask::lab::{self, UpOptions};
use xxhash_rust::xxh3::xxh3_64;

const MASK: u64 = (1 << 48) - 1;
const KS: [usize; 4] = [1024, 4096, 8192, 16384];

/// A tiny deterministic generator (the fleet is the same every run).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        xxh3_64(&self.0.to_le_bytes())
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A VM: `keep` pages of image `image` (its first ones, in a hash-independent order) and
/// `own` pages nobody else has.
#[derive(Clone, Copy)]
struct VmSpec {
    id: u32,
    host: u32,
    image: usize,
    keep: usize,
    own: usize,
}

impl VmSpec {
    fn hashes<'a>(&self, images: &'a [Vec<u64>]) -> impl Iterator<Item = u64> + 'a {
        let id = u64::from(self.id);
        let own = self.own as u64;
        images[self.image][..self.keep]
            .iter()
            .copied()
            .chain((0..own).map(move |j| xxh3_64(&(id << 32 | j | 1 << 63).to_le_bytes()) & MASK))
    }
    fn pages(&self) -> usize {
        self.keep + self.own
    }
    fn sketch(&self, images: &[Vec<u64>], k: usize) -> Sketch {
        Sketch::of(k, self.hashes(images))
    }
}

/// Present non-zero page hashes of each lab guest, distinct, in a hash-independent order.
fn lab_images(guests: u32) -> anyhow::Result<Vec<Vec<u64>>> {
    let state = xtask::cmd::root().join("target/lab-fabric");
    // SAFETY: single-threaded here; nothing else reads the environment.
    unsafe { std::env::set_var("MEMFABRIC_LAB_STATE", &state) };
    let started = lab::up(&UpOptions {
        guests,
        ..UpOptions::default()
    })?;
    // Let the guests settle into their steady contents.
    std::thread::sleep(std::time::Duration::from_secs(20));
    let zero = xxh3_64(&[0u8; 4096]);
    let mut out = Vec::new();
    for g in &started {
        let snap = super::scan::snapshot(&[g.pid])?;
        let mut set: HashSet<u64> = HashSet::new();
        for p in snap.chunks_exact(4096) {
            let h = xxh3_64(p);
            if h != zero {
                set.insert(h & MASK);
            }
        }
        let mut v: Vec<u64> = set.into_iter().collect();
        v.sort_by_key(|h| xxh3_64(&(h ^ 0x5eed).to_le_bytes()));
        eprintln!(
            "bench fabric: lab guest pid {}: {} distinct pages",
            g.pid,
            v.len()
        );
        out.push(v);
    }
    lab::down()?;
    Ok(out)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

/// Gossip bytes per member per minute, measured on `n` chitchat members over the
/// authenticated transport on loopback for `secs`.
fn gossip_bytes_per_member_minute(n: usize, secs: u64) -> anyhow::Result<f64> {
    use chitchat::{ChitchatConfig, ChitchatId, FailureDetectorConfig, spawn_chitchat};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let key = memfabric::fabric::gossip_auth::GossipKey::new(&[9u8; 32]).unwrap();
        let base = std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut handles = Vec::new();
        let mut stats = Vec::new();
        for i in 0..n {
            let addr: std::net::SocketAddr =
                format!("127.0.0.1:{}", base as usize + 1 + i).parse()?;
            let st = Arc::new(memfabric::fabric::stats::FabricStats::default());
            let h = spawn_chitchat(
                ChitchatConfig {
                    chitchat_id: ChitchatId::new(format!("host-{i:04}"), 1, addr),
                    cluster_id: "memfabric".into(),
                    gossip_interval: std::time::Duration::from_secs(1),
                    listen_addr: addr,
                    seed_nodes: vec![format!("127.0.0.1:{}", base as usize + 1)],
                    failure_detector_config: FailureDetectorConfig::default(),
                    marked_for_deletion_grace_period: std::time::Duration::from_secs(3600),
                    catchup_callback: None,
                    extra_liveness_predicate: None,
                },
                vec![
                    ("capacity_bytes".into(), "274877906944".into()),
                    ("summary_version".into(), format!("{:016x}", i * 7919)),
                    ("used_bytes".into(), "137438953472".into()),
                ],
                &memfabric::fabric::gossip_auth::AuthTransport {
                    key: key.clone(),
                    stats: st.clone(),
                    advertise: None,
                },
            )
            .await
            .context("a gossip member")?;
            handles.push(h);
            stats.push(st);
        }
        // Converge first, then measure the steady state.
        tokio::time::sleep(std::time::Duration::from_secs(10)).await;
        let out0: u64 = stats
            .iter()
            .map(|s| {
                s.gossip_bytes_out
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .sum();
        tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
        let out1: u64 = stats
            .iter()
            .map(|s| {
                s.gossip_bytes_out
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .sum();
        for h in handles {
            let _ = h.shutdown().await;
        }
        Ok((out1 - out0) as f64 / n as f64 * 60.0 / secs as f64)
    })
}

pub(crate) fn run(
    out: &Path,
    hosts: usize,
    per_host: usize,
    guests: u32,
    gossip_s: f64,
) -> anyhow::Result<()> {
    let dir = out.join(format!(
        "fabric-{}",
        memfabric::util::clock::unix_ms() / 1000
    ));
    fs::create_dir_all(&dir)?;
    let mut md = String::new();
    let mut rng = Rng(42);

    // 1. Real guests.
    let mut images = if guests > 0 {
        lab_images(guests)?
    } else {
        Vec::new()
    };
    let real = images.len();
    writeln!(md, "# bench fabric: {hosts} hosts x {per_host} VMs\n")?;
    if real > 0 {
        writeln!(
            md,
            "## Lab guests ({real}): each against a host holding the others\n"
        )?;
        writeln!(
            md,
            "| guest | pages | exact overlap | k | estimate | error (% of guest) | bound |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|---|")?;
        for g in 0..real {
            let host: HashSet<u64> = (0..real)
                .filter(|o| *o != g)
                .flat_map(|o| images[o].iter().copied())
                .collect();
            let exact = images[g].iter().filter(|h| host.contains(h)).count();
            let local = Sketch::of(MAX_K, images[g].iter().copied());
            for k in KS {
                let c = local.containment(&Sketch::of(k, host.iter().copied()));
                let err = (c.pages - exact as f64).abs() / images[g].len() as f64 * 100.0;
                writeln!(
                    md,
                    "| {g} | {} | {exact} | {k} | {:.0} | {err:.2} | {:.0} |",
                    images[g].len(),
                    c.pages,
                    c.bound
                )?;
            }
        }
        writeln!(md)?;
    }

    // 2. The fleet: 12 images (the real ones first), VMs of 8k-60k pages.
    while images.len() < 12 {
        let f = images.len() as u64;
        let n = 20_000 + rng.below(40_000) as usize;
        images.push(
            (0..n as u64)
                .map(|i| xxh3_64(&(f << 40 | i).to_le_bytes()) & MASK)
                .collect(),
        );
    }
    let mut vms = Vec::new();
    for id in 0..(hosts * per_host) as u32 {
        // Popular images first (a few OS images dominate a fleet).
        let image = ((rng.unit().powi(2)) * images.len() as f64) as usize;
        let keep = ((0.4 + 0.5 * rng.unit()) * images[image].len() as f64) as usize;
        let own = 3_000 + rng.below(25_000) as usize;
        vms.push(VmSpec {
            id,
            host: rng.below(hosts as u64) as u32,
            image,
            keep: keep.min(images[image].len()),
            own,
        });
    }
    let mut by_host: Vec<Vec<VmSpec>> = vec![Vec::new(); hosts];
    for v in &vms {
        by_host[v.host as usize].push(*v);
    }

    // Published sketches: per VM (VM_K) and per host (DEFAULT_K), built as the agent
    // builds them (the host's is the union of its VMs').
    let t = Instant::now();
    let mut vm_sketches: Vec<Sketch> = Vec::with_capacity(vms.len());
    let mut host_sketches: Vec<Sketch> = Vec::with_capacity(hosts);
    let mut host_pages: Vec<u64> = Vec::with_capacity(hosts);
    let mut vm_index = vec![0usize; vms.len()];
    for (h, list) in by_host.iter().enumerate() {
        let mut host = Sketch::new(DEFAULT_K);
        let mut pages = 0u64;
        for v in list {
            let s = v.sketch(&images, DEFAULT_K);
            host = host.union(&s).truncated(DEFAULT_K);
            vm_index[v.id as usize] = vm_sketches.len();
            vm_sketches.push(s.truncated(VM_K));
            pages += v.pages() as u64;
        }
        host_sketches.push(host);
        host_pages.push(pages);
        if h % 100 == 99 {
            eprintln!(
                "bench fabric: sketches of {} hosts ({:.0} s)",
                h + 1,
                t.elapsed().as_secs_f64()
            );
        }
    }
    let build_s = t.elapsed().as_secs_f64();

    // 3. Accuracy on sampled (VM, other host) pairs, per k.
    writeln!(
        md,
        "## Containment accuracy on the fleet (sampled pairs, error in % of the VM)\n"
    )?;
    writeln!(
        md,
        "| k | host sketch on the wire | pairs | median error | p95 error | max error | within bound x1.5 |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    let samples = 60;
    let mut pairs = Vec::new();
    while pairs.len() < samples {
        let v = vms[rng.below(vms.len() as u64) as usize];
        // Half of the samples on a host that runs the VM's image (overlap), half anywhere.
        let h = if pairs.len() % 2 == 0 {
            let same: Vec<usize> = (0..hosts)
                .filter(|&h| h != v.host as usize && by_host[h].iter().any(|o| o.image == v.image))
                .collect();
            match same.get(rng.below(same.len() as u64) as usize) {
                Some(&h) => h,
                None => continue,
            }
        } else {
            let h = rng.below(hosts as u64) as usize;
            if h == v.host as usize {
                continue;
            }
            h
        };
        pairs.push((v, h));
    }
    let mut exact_pairs = Vec::new();
    for &(v, h) in &pairs {
        let host: HashSet<u64> = by_host[h].iter().flat_map(|o| o.hashes(&images)).collect();
        let vm: HashSet<u64> = v.hashes(&images).collect();
        let exact = vm.iter().filter(|x| host.contains(x)).count();
        let local = v.sketch(&images, MAX_K);
        let mut per_k = Vec::new();
        for k in KS {
            let mut hs = Sketch::new(k);
            for o in &by_host[h] {
                hs = hs.union(&o.sketch(&images, k)).truncated(k);
            }
            let c = local.containment(&hs);
            per_k.push((k, c.pages, c.bound, hs.encode().len()));
        }
        exact_pairs.push((vm.len(), exact, per_k));
    }
    for (i, k) in KS.iter().enumerate() {
        let mut errs: Vec<f64> = exact_pairs
            .iter()
            .map(|(n, e, pk)| (pk[i].1 - *e as f64).abs() / *n as f64 * 100.0)
            .collect();
        let within = exact_pairs
            .iter()
            .filter(|(_, e, pk)| (pk[i].1 - *e as f64).abs() <= 1.5 * pk[i].2 + 1.0)
            .count();
        let wire = exact_pairs.iter().map(|p| p.2[i].3).max().unwrap_or(0);
        writeln!(
            md,
            "| {k} | {:.1} KiB | {} | {:.2} % | {:.2} % | {:.2} % | {within} |",
            wire as f64 / 1024.0,
            errs.len(),
            median(&mut errs.clone()),
            pct(&mut errs.clone(), 0.95),
            pct(&mut errs, 1.0),
        )?;
    }
    writeln!(md)?;

    // 4. Candidates for one host against all others, on one core.
    let mut times = Vec::new();
    for round in 0..5 {
        let h = (round * 197) % hosts;
        let locals: Vec<(String, Sketch)> = by_host[h]
            .iter()
            .map(|v| (format!("vm-{}", v.id), v.sketch(&images, MAX_K)))
            .collect();
        let names: Vec<String> = (0..hosts).map(|i| format!("host-{i}")).collect();
        let peers: Vec<PeerHost> = (0..hosts)
            .filter(|&i| i != h)
            .map(|i| PeerHost {
                id: &names[i],
                sketch: &host_sketches[i],
            })
            .collect();
        let lv: Vec<LocalVm> = locals
            .iter()
            .map(|(id, s)| LocalVm { id, sketch: s })
            .collect();
        let t = Instant::now();
        let c = candidates::compute(&lv, &peers);
        times.push(t.elapsed().as_secs_f64());
        assert_eq!(c.pairs.len(), lv.len() * (hosts - 1));
    }
    let cand_s = median(&mut times);

    // 5. The plan.
    let capacity = host_pages.iter().copied().max().unwrap_or(0) * 4096 * 105 / 100;
    let plan_hosts: Vec<PlanHost> = (0..hosts)
        .map(|i| PlanHost {
            id: format!("host-{i}"),
            capacity_bytes: capacity,
        })
        .collect();
    let plan_vms: Vec<PlanVm> = vms
        .iter()
        .map(|v| PlanVm {
            id: format!("vm-{}", v.id),
            host: format!("host-{}", v.host),
            bytes: v.pages() as u64 * 4096,
            sketch: vm_sketches[vm_index[v.id as usize]].clone(),
        })
        .collect();
    let t = Instant::now();
    let p = plan::plan(&plan_hosts, &plan_vms);
    let plan_s = t.elapsed().as_secs_f64();
    // The plan rests on small sketches: recount each planned host exactly and see whether
    // it really fits.
    let mut over = 0usize;
    let mut worst = 0.0f64;
    for ids in p.placement.values() {
        let mut set: HashSet<u64> = HashSet::new();
        for id in ids {
            let n: usize = id[3..].parse().unwrap_or(0);
            set.extend(vms[n].hashes(&images));
        }
        let used = set.len() as u64 * 4096;
        if used > capacity {
            over += 1;
            worst = worst.max(used as f64 / capacity as f64 - 1.0);
        }
    }

    // 6. Exchange.
    let typical = &by_host[0];
    let summary = Summary {
        host: "host-0000".into(),
        capacity_bytes: capacity,
        used_bytes: host_pages[0] * 4096,
        sketch: host_sketches[0].clone(),
        vms: typical
            .iter()
            .map(|v| VmSummary {
                id: format!("{:08x}-0000-0000-0000-000000000000", v.id),
                bytes: v.pages() as u64 * 4096,
                sketch: vm_sketches[vm_index[v.id as usize]].clone(),
            })
            .collect(),
    };
    let summary_bytes = summary.encode().len() as f64;
    let republish_min = memfabric::fabric::node::REPUBLISH_AFTER.as_secs_f64() / 60.0;
    let summaries_per_min = (hosts - 1) as f64 * summary_bytes / republish_min;
    let members = 40;
    let gossip_n = gossip_bytes_per_member_minute(members, 20)?;
    // Per member and round the digest lists every member: bytes grow with the fleet and
    // shrink with the interval.
    let gossip_fleet = gossip_n * hosts as f64 / members as f64 / gossip_s;
    let mib = |b: f64| b / (1 << 20) as f64;

    writeln!(md, "## Candidates, plan, exchange\n")?;
    writeln!(
        md,
        "- Sketches of {} VMs built in {build_s:.1} s.",
        vms.len()
    )?;
    writeln!(
        md,
        "- Candidates of one host ({per_host} VMs) against {} peers: median {:.3} s on one core (goal <= 1 s: {}).",
        hosts - 1,
        cand_s,
        if cand_s <= 1.0 { "met" } else { "NOT met" }
    )?;
    writeln!(
        md,
        "- Plan over {} hosts and {} VMs in {plan_s:.1} s: sharing-aware packing uses {} hosts (frees {}), first-fit decreasing uses {} (frees {}); {} more hosts freed ({:+.1} %), {:.0} GiB shared by co-location, {} moves. Recounted exactly, {over} planned hosts exceed their capacity (worst by {:.1} %).",
        p.hosts,
        p.vms,
        p.hosts_used,
        p.hosts_freed,
        p.baseline_hosts_used,
        p.baseline_hosts_freed,
        p.hosts_freed as i64 - p.baseline_hosts_freed as i64,
        (p.hosts_freed as f64 / p.baseline_hosts_freed.max(1) as f64 - 1.0) * 100.0,
        p.shared_bytes as f64 / (1u64 << 30) as f64,
        p.moves.len(),
        worst * 100.0
    )?;
    writeln!(
        md,
        "- Exchange per host per minute: summaries {:.2} MiB (a {:.1} KiB summary, fetched by each of {} peers once per {republish_min:.0} min when it changes; as much again out) + gossip {:.2} MiB ({:.3} MiB measured per member at {members} members and a 1 s interval, scaled linearly to {hosts} members and a {gossip_s:.0} s interval) = {:.2} MiB (goal <= 1 MiB: {}).",
        mib(summaries_per_min),
        summary_bytes / 1024.0,
        hosts - 1,
        mib(gossip_fleet),
        mib(gossip_n),
        mib(summaries_per_min + gossip_fleet),
        if mib(summaries_per_min + gossip_fleet) <= 1.0 {
            "met"
        } else {
            "NOT met"
        }
    )?;
    fs::write(dir.join("summary.md"), &md)?;
    println!("{md}");
    println!("report: {}", dir.display());
    Ok(())
}
