//! Consolidation: pack the fleet's VMs onto as few hosts as their memory allows, once
//! counting what co-located VMs share (sharing-aware) and once not (first-fit decreasing,
//! the baseline a sharing-oblivious scheduler achieves), and say which VMs move where,
//! which hosts are freed and what sharing saves.
//!
//! Sharing-aware packing is first-fit decreasing where a VM's cost on a host is its size
//! less the pages the host's VMs already hold (its containment in the host's union
//! sketch), and the host chosen is the one where that saving is largest (ties: the
//! fullest, best fit). An inverted index from sampled hashes to hosts finds the hosts a VM
//! shares anything with without comparing it to every host.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::sketch::Sketch;
use crate::util::PAGE;

/// A VM where it runs now.
#[derive(Clone, Debug)]
pub struct PlanVm {
    pub id: String,
    pub host: String,
    pub bytes: u64,
    /// A small sketch of its distinct stable pages (the published one).
    pub sketch: Sketch,
}

#[derive(Clone, Debug)]
pub struct PlanHost {
    pub id: String,
    pub capacity_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Move {
    pub vm: String,
    pub from: String,
    pub to: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Plan {
    pub hosts: usize,
    pub vms: usize,
    /// Hosts used by the sharing-aware packing, and freed by it.
    pub hosts_used: usize,
    pub hosts_freed: usize,
    /// The same for sharing-oblivious first-fit decreasing.
    pub baseline_hosts_used: usize,
    pub baseline_hosts_freed: usize,
    /// Estimated bytes the sharing-aware placement saves (pages co-located VMs share).
    pub shared_bytes: u64,
    /// VMs that could not be placed at all (larger than any host).
    pub unplaced: Vec<String>,
    pub moves: Vec<Move>,
    /// Per used host, the VMs it would run.
    pub placement: BTreeMap<String, Vec<String>>,
}

/// One bin during packing.
struct Bin {
    free: u64,
    union: Option<Sketch>,
    vms: Vec<usize>,
}

/// Hashes an estimate must rest on before the plan counts on it.
const MIN_SAMPLED: usize = 16;

/// Pages of `vm` that `union` surely holds: the lower end of the 95 % interval, and none
/// when the estimate rests on fewer than [`MIN_SAMPLED`] hashes. A plan that packs on
/// optimistic estimates overcommits hosts (the fleet bench recounts every planned host
/// exactly: with point estimates from two or three shared samples, hosts came out 180 %
/// over capacity).
fn saved_pages(vm: &Sketch, union: &Option<Sketch>) -> u64 {
    union.as_ref().map_or(0, |u| {
        let c = vm.containment(u);
        if c.sampled < MIN_SAMPLED {
            0
        } else {
            crate::util::convert::u64_of_f64((c.pages - c.bound).max(0.0).round())
        }
    })
}

/// First-fit decreasing by size alone: the number of bins.
fn first_fit_decreasing(sizes: &[u64], capacity: u64) -> usize {
    let mut order: Vec<usize> = (0..sizes.len()).filter(|&i| sizes[i] <= capacity).collect();
    order.sort_by(|a, b| sizes[*b].cmp(&sizes[*a]));
    let mut free: Vec<u64> = Vec::new();
    for i in order {
        match free.iter_mut().find(|f| **f >= sizes[i]) {
            Some(f) => *f -= sizes[i],
            None => free.push(capacity - sizes[i]),
        }
    }
    free.len()
}

/// Plans the fleet. Hosts are taken as uniform, at the smallest capacity given (a plan
/// that fits the smallest fits all); VMs larger than that stay unplaced.
pub fn plan(hosts: &[PlanHost], vms: &[PlanVm]) -> Plan {
    let capacity = hosts.iter().map(|h| h.capacity_bytes).min().unwrap_or(0);
    let sizes: Vec<u64> = vms.iter().map(|v| v.bytes).collect();
    let baseline = first_fit_decreasing(&sizes, capacity);

    let mut order: Vec<usize> = (0..vms.len()).collect();
    order.sort_by(|a, b| vms[*b].bytes.cmp(&vms[*a].bytes).then(a.cmp(b)));
    let mut bins: Vec<Bin> = Vec::new();
    // Sampled hash -> bins whose union sketch holds it.
    let mut index: HashMap<u64, Vec<usize>> = HashMap::new();
    let mut unplaced = Vec::new();
    let mut shared_bytes = 0u64;
    for i in order {
        let vm = &vms[i];
        if vm.bytes > capacity {
            unplaced.push(vm.id.clone());
            continue;
        }
        // Bins sharing anything with the VM, by the index; their saving decides.
        let mut touched: Vec<usize> = vm
            .sketch
            .hashes()
            .filter_map(|h| index.get(&h))
            .flatten()
            .copied()
            .collect();
        touched.sort_unstable();
        touched.dedup();
        let best_sharing = touched
            .iter()
            .map(|&b| {
                let saved = (saved_pages(&vm.sketch, &bins[b].union) * PAGE as u64).min(vm.bytes);
                (b, saved)
            })
            .filter(|&(b, saved)| vm.bytes - saved <= bins[b].free)
            .max_by(|x, y| x.1.cmp(&y.1).then(bins[y.0].free.cmp(&bins[x.0].free)));
        let (b, saved) = match best_sharing {
            Some(found) if found.1 > 0 => found,
            // Nothing shared anywhere it fits: plain first fit.
            _ => match bins.iter().position(|bin| bin.free >= vm.bytes) {
                Some(b) => (b, 0),
                None => {
                    bins.push(Bin {
                        free: capacity,
                        union: None,
                        vms: Vec::new(),
                    });
                    (bins.len() - 1, 0)
                }
            },
        };
        shared_bytes += saved;
        let bin = &mut bins[b];
        bin.free -= vm.bytes - saved;
        bin.vms.push(i);
        let new_union = match &bin.union {
            None => vm.sketch.clone(),
            Some(u) => u.union(&vm.sketch),
        };
        if let Some(old) = &bin.union {
            for h in old.hashes() {
                if !new_union.contains(h)
                    && let Some(v) = index.get_mut(&h)
                {
                    v.retain(|x| *x != b);
                }
            }
        }
        for h in new_union.hashes() {
            let v = index.entry(h).or_default();
            if !v.contains(&b) {
                v.push(b);
            }
        }
        bin.union = Some(new_union);
    }

    // Name each bin after the host that already runs most of its bytes, so as few VMs
    // move as possible; bins left over take the remaining hosts in order.
    let mut names: Vec<Option<String>> = vec![None; bins.len()];
    let mut taken: std::collections::HashSet<String> = Default::default();
    let mut affinity: Vec<(u64, usize, String)> = Vec::new();
    for (b, bin) in bins.iter().enumerate() {
        let mut by_host: BTreeMap<&str, u64> = BTreeMap::new();
        for &i in &bin.vms {
            *by_host.entry(&vms[i].host).or_default() += vms[i].bytes;
        }
        affinity.extend(by_host.into_iter().map(|(h, n)| (n, b, h.to_owned())));
    }
    affinity.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, b, h) in affinity {
        if names[b].is_none() && !taken.contains(&h) {
            taken.insert(h.clone());
            names[b] = Some(h);
        }
    }
    let mut spare = hosts.iter().map(|h| &h.id).filter(|h| !taken.contains(*h));
    let mut placement = BTreeMap::new();
    let mut moves = Vec::new();
    for (b, bin) in bins.iter().enumerate() {
        let name = names[b]
            .clone()
            .or_else(|| spare.next().cloned())
            .unwrap_or_else(|| format!("new-host-{b}"));
        for &i in &bin.vms {
            if vms[i].host != name {
                moves.push(Move {
                    vm: vms[i].id.clone(),
                    from: vms[i].host.clone(),
                    to: name.clone(),
                });
            }
        }
        placement.insert(name, bin.vms.iter().map(|&i| vms[i].id.clone()).collect());
    }
    Plan {
        hosts: hosts.len(),
        vms: vms.len(),
        hosts_used: bins.len(),
        hosts_freed: hosts.len().saturating_sub(bins.len()),
        baseline_hosts_used: baseline,
        baseline_hosts_freed: hosts.len().saturating_sub(baseline),
        shared_bytes,
        unplaced,
        moves,
        placement,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fabric::summary::VM_K;

    fn vm(id: &str, host: &str, pages: std::ops::Range<u64>) -> PlanVm {
        PlanVm {
            id: id.into(),
            host: host.into(),
            bytes: (pages.end - pages.start) * PAGE as u64,
            sketch: Sketch::of_ids(VM_K, pages),
        }
    }

    #[test]
    fn sharing_aware_packing_frees_hosts_first_fit_cannot() {
        // Four hosts of 10,000 pages; eight VMs of 4,000 pages in two families that share
        // 3,000 pages within the family. FFD fits two per host (4 hosts); sharing fits
        // three or more of a family per host.
        let hosts: Vec<PlanHost> = (0..4)
            .map(|h| PlanHost {
                id: format!("h{h}"),
                capacity_bytes: 10_000 * PAGE as u64,
            })
            .collect();
        let mut vms = Vec::new();
        for i in 0..8u64 {
            let family = (i % 2) * 1_000_000;
            let own = 10_000_000 + i * 10_000;
            let mut v = vm(
                &format!("vm{i}"),
                &format!("h{}", i / 2),
                family..family + 3000,
            );
            let extra = vm("", "", own..own + 1000);
            v.sketch = v.sketch.union(&extra.sketch).truncated(VM_K);
            v.bytes = 4000 * PAGE as u64;
            vms.push(v);
        }
        let p = plan(&hosts, &vms);
        assert_eq!(p.baseline_hosts_used, 4);
        assert!(p.hosts_used < 4, "{p:?}");
        assert!(p.hosts_freed > p.baseline_hosts_freed);
        assert!(p.shared_bytes > 0);
        assert_eq!(p.placement.values().map(Vec::len).sum::<usize>(), 8);
        // The families need 7,000 pages each: two hosts could hold all eight; the plan
        // counts only the sharing it is 95 % sure of, and still saves a host.
        assert!(p.hosts_used <= 3, "{p:?}");
        assert_eq!(
            p.moves.len()
                + p.placement
                    .iter()
                    .map(|(h, v)| v
                        .iter()
                        .filter(|x| x[2..].parse::<usize>().unwrap() / 2
                            == h[1..].parse::<usize>().unwrap())
                        .count())
                    .sum::<usize>(),
            8
        );
        // A VM larger than every host is reported, not dropped.
        let mut big = vms.clone();
        big.push(vm("huge", "h0", 0..20_000));
        assert_eq!(plan(&hosts, &big).unplaced, vec!["huge".to_string()]);
    }
}
