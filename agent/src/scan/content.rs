//! The host's content table: one entry per distinct stable page content (by its 48-bit
//! hash) with the number of copies, whether KSM already merged one of them, and which VM
//! last visited the group while pages are attributed. 16 bytes per entry plus hashbrown's
//! control byte and spare buckets (`cargo xtask bench scan` measures the real figure).

use std::collections::HashMap;

use rustc_hash::FxBuildHasher;

/// Copies of one content across every scanned VM.
#[derive(Clone, Copy, Debug, Default)]
struct Group {
    /// Pages with this content; bit 31: at least one of them is a KSM page.
    pages: u32,
    /// 1 + index of the last VM whose page was attributed (0: none yet).
    last_vm: u32,
}

const ANY_MERGED: u32 = 1 << 31;

/// How a duplicate page counts when KSM merges its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The group's first copy on the host: it stays.
    Kept,
    /// The first copy in its VM, but another VM holds the content too: saved only by
    /// merging across VMs.
    Inter,
    /// A further copy inside the same VM: saved by merging within the VM alone.
    Intra,
}

/// Attribution of one page of a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attribution {
    pub role: Role,
    /// Pages with this content on the host.
    pub copies: u32,
    /// Some copy is already a KSM page (so even the kept copy can still merge into it).
    pub any_merged: bool,
}

/// hash -> group, built from every VM's stable pages, then walked VM by VM in the same order
/// to attribute each copy.
#[derive(Default)]
pub struct ContentTable {
    groups: HashMap<u64, Group, FxBuildHasher>,
}

impl ContentTable {
    pub fn new() -> ContentTable {
        ContentTable::default()
    }

    /// Counts one stable page with content `hash`.
    pub fn add(&mut self, hash: u64, merged: bool) {
        let g = self.groups.entry(hash).or_default();
        // The count saturates below the flag bit (2^31 copies: 8 TiB of one page).
        let count = ((g.pages & !ANY_MERGED) + 1).min(!ANY_MERGED);
        g.pages = count | (g.pages & ANY_MERGED) | if merged { ANY_MERGED } else { 0 };
    }

    /// Distinct contents.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Bytes the table holds in buckets (entries, control bytes and spare capacity).
    pub fn allocated_bytes(&self) -> usize {
        let buckets = (self.groups.capacity() * 8 / 7).next_power_of_two();
        buckets * (std::mem::size_of::<(u64, Group)>() + 1)
    }

    /// Attributes one copy of `hash` in the VM with index `vm`. VMs must be walked in the
    /// order of increasing index, each VM's pages together, so "first copy in its VM" and
    /// "first copy on the host" (the lowest-index VM holding the content) are known
    /// without a per-VM table. `None` for contents never added.
    pub fn attribute(&mut self, hash: u64, vm: u32) -> Option<Attribution> {
        let g = self.groups.get_mut(&hash)?;
        let role = if g.last_vm == vm + 1 {
            Role::Intra
        } else if g.last_vm == 0 {
            Role::Kept
        } else {
            Role::Inter
        };
        g.last_vm = vm + 1;
        Some(Attribution {
            role,
            copies: g.pages & !ANY_MERGED,
            any_merged: g.pages & ANY_MERGED != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_kept_inter_and_intra_copies() {
        let mut t = ContentTable::new();
        // VM 0 holds the content twice, VM 1 three times, VM 2 once.
        for _ in 0..6 {
            t.add(7, false);
        }
        t.add(9, true);
        assert_eq!(t.len(), 2);
        let roles: Vec<Role> = [0, 0, 1, 1, 1, 2]
            .iter()
            .map(|&vm| t.attribute(7, vm).unwrap().role)
            .collect();
        use Role::*;
        assert_eq!(roles, [Kept, Intra, Inter, Intra, Intra, Inter]);
        let a = t.attribute(9, 0).unwrap();
        assert_eq!((a.copies, a.any_merged, a.role), (1, true, Kept));
        assert_eq!(t.attribute(8, 0), None);
    }

    #[test]
    fn allocated_bytes_follow_the_load_factor() {
        // hashbrown keeps at most 7/8 of its buckets full and doubles: per distinct content
        // the table holds between one bucket (entry + control byte) * 8/7 and twice that.
        let bucket = (std::mem::size_of::<(u64, Group)>() + 1) as f64;
        let mut t = ContentTable::new();
        for n in [1_000u64, 10_000, 100_000] {
            while (t.len() as u64) < n {
                t.add((t.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15), false);
            }
            let per = t.allocated_bytes() as f64 / n as f64;
            assert!(
                (bucket * 8.0 / 7.0 - 0.01..=bucket * 16.0 / 7.0 + 0.01).contains(&per),
                "{per} bytes per content at {n} (bucket {bucket})"
            );
        }
    }
}
