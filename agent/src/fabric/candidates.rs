//! Cross-host sharing candidates: for each local VM and each peer host, how many of the
//! VM's distinct stable pages the host already holds (its containment, with a 95 % bound:
//! what placement there would share), what a migration there would not need to send
//! (every copy the VM holds of those contents), and the best host per VM.

use serde::Serialize;

use crate::sketch::Sketch;
use crate::util::PAGE;
use crate::util::convert::u64_of_f64;

/// A local VM as the candidates see it.
pub struct LocalVm<'a> {
    pub id: &'a str,
    /// Its full local sketch (large k).
    pub sketch: &'a Sketch,
}

/// A peer host as the candidates see it.
pub struct PeerHost<'a> {
    pub id: &'a str,
    pub sketch: &'a Sketch,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Candidate {
    pub vm: String,
    pub host: String,
    /// Distinct stable pages of the VM.
    pub vm_pages: u64,
    /// Of those, estimated held by the host.
    pub shared_pages: u64,
    /// Half-width of the 95 % interval, in pages.
    pub bound_pages: u64,
    /// Bytes a migration of the VM to the host would not need to send: every copy the VM
    /// holds of the stable contents the host holds (a content the VM holds five times is
    /// sent as five references), so at least `shared_pages` pages.
    pub shared_bytes: u64,
    /// shared / VM pages.
    pub fraction: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Candidates {
    /// Every (VM, host) pair, best first within each VM.
    pub pairs: Vec<Candidate>,
    /// Per VM, the host that holds most of it (none when no peer holds any).
    pub best: Vec<Candidate>,
}

/// Every local VM against every peer host.
pub fn compute(vms: &[LocalVm], hosts: &[PeerHost]) -> Candidates {
    let mut out = Candidates::default();
    for vm in vms {
        let mut pairs: Vec<Candidate> = hosts
            .iter()
            .map(|h| {
                let c = vm.sketch.containment(h.sketch);
                let vm_pages = u64_of_f64(vm.sketch.distinct().round());
                let shared = u64_of_f64(c.pages.round()).min(vm_pages);
                let copies = u64_of_f64(c.instances.round()).max(shared);
                Candidate {
                    vm: vm.id.to_owned(),
                    host: h.id.to_owned(),
                    vm_pages,
                    shared_pages: shared,
                    bound_pages: u64_of_f64(c.bound.round()),
                    shared_bytes: copies * PAGE as u64,
                    fraction: if vm_pages == 0 {
                        0.0
                    } else {
                        shared as f64 / vm_pages as f64
                    },
                }
            })
            .collect();
        pairs.sort_by(|a, b| {
            b.shared_pages
                .cmp(&a.shared_pages)
                .then(a.host.cmp(&b.host))
        });
        if let Some(best) = pairs.first().filter(|c| c.shared_pages > 0) {
            out.best.push(best.clone());
        }
        out.pairs.extend(pairs);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sketch::{DEFAULT_K, MAX_K};

    #[test]
    fn the_best_host_is_the_one_holding_most_of_the_vm() {
        let vm = Sketch::of_ids(MAX_K, 0..50_000);
        let a = Sketch::of_ids(DEFAULT_K, (0..10_000).chain(1_000_000..1_100_000));
        let b = Sketch::of_ids(DEFAULT_K, (0..40_000).chain(2_000_000..2_100_000));
        let c = Sketch::of_ids(DEFAULT_K, 3_000_000..3_100_000);
        let out = compute(
            &[LocalVm {
                id: "vm1",
                sketch: &vm,
            }],
            &[
                PeerHost {
                    id: "a",
                    sketch: &a,
                },
                PeerHost {
                    id: "b",
                    sketch: &b,
                },
                PeerHost {
                    id: "c",
                    sketch: &c,
                },
            ],
        );
        assert_eq!(out.pairs.len(), 3);
        assert_eq!(out.best.len(), 1);
        let best = &out.best[0];
        assert_eq!(best.host, "b");
        assert!(
            best.shared_pages.abs_diff(40_000) <= 1_000,
            "{}",
            best.shared_pages
        );
        assert_eq!(best.shared_bytes, best.shared_pages * 4096);
        assert_eq!(out.pairs[2].host, "c");
        assert_eq!(out.pairs[2].shared_pages, 0);
    }
}
