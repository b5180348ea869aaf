//! The host's content table: one entry per distinct stable page content (by its 48-bit
//! hash) saying whether the content has more than one copy, whether KSM already merged
//! one of them, and which VM last visited the group while pages are attributed. Each entry
//! is one `u64` (the hash's 48 bits and 16 bits of state) plus hashbrown's control byte:
//! 9 bytes per bucket. The table is built for every report and holds one entry per distinct
//! page, so it is the largest thing the agent allocates after the page histories: the
//! earlier layout (hash, copy count and VM index in 16 bytes, 17 per bucket) put the
//! daemon at 114 MiB tracking 16 GiB of guests.

use hashbrown::HashTable;

use super::page_state::HASH_MASK;

/// Bytes of one bucket: the entry and hashbrown's control byte.
pub const BUCKET_BYTES: usize = std::mem::size_of::<u64>() + 1;

/// Some copy of the content is a KSM page.
const ANY_MERGED: u64 = 1 << 15;
/// The content has at least two copies on the host.
const DUPLICATE: u64 = 1 << 14;
/// 1 + index of the last VM whose copy was attributed (0: none yet); [`VM_OVERFLOW`]:
/// the index did not fit and is kept in the table's overflow map.
const LAST_VM: u64 = DUPLICATE - 1;
const VM_OVERFLOW: u64 = LAST_VM;

/// The bucket hash of an entry: its 48 hash bits spread over all 64 (hashbrown takes the
/// bucket from the low bits and the control byte from the top 7, and the low 16 bits of a
/// kept hash are zero).
fn bucket_hash(entry: u64) -> u64 {
    (entry >> 16).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

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
    /// The host holds at least two copies of this content.
    pub duplicate: bool,
    /// Some copy is already a KSM page (so even the kept copy can still merge into it).
    pub any_merged: bool,
}

/// hash -> group, built from every VM's stable pages, then walked VM by VM in the same order
/// to attribute each copy.
#[derive(Default)]
pub struct ContentTable {
    groups: HashTable<u64>,
    /// Last VM (index + 1) of groups visited by a VM whose index + 1 does not fit in
    /// [`LAST_VM`] (more than 16,382 VMs on one host).
    overflow: std::collections::HashMap<u64, u32>,
}

impl ContentTable {
    pub fn new() -> ContentTable {
        ContentTable::default()
    }

    /// A table with room for `distinct` contents without growing (a growing table holds
    /// its old and new buckets at once: half again the memory at the moment it peaks).
    pub fn with_capacity(distinct: usize) -> ContentTable {
        ContentTable {
            groups: HashTable::with_capacity(distinct),
            overflow: Default::default(),
        }
    }

    /// Counts one stable page with content `hash` (its low 16 bits are ignored).
    pub fn add(&mut self, hash: u64, merged: bool) {
        let key = hash & HASH_MASK;
        let merged = if merged { ANY_MERGED } else { 0 };
        match self.groups.entry(
            bucket_hash(key),
            |e| e & HASH_MASK == key,
            |e| bucket_hash(*e),
        ) {
            hashbrown::hash_table::Entry::Occupied(mut e) => *e.get_mut() |= DUPLICATE | merged,
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert(key | merged);
            }
        }
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
        buckets * BUCKET_BYTES
    }

    /// Attributes one copy of `hash` in the VM with index `vm`. VMs must be walked in the
    /// order of increasing index, each VM's pages together, so "first copy in its VM" and
    /// "first copy on the host" (the lowest-index VM holding the content) are known
    /// without a per-VM table. `None` for contents never added.
    pub fn attribute(&mut self, hash: u64, vm: u32) -> Option<Attribution> {
        let key = hash & HASH_MASK;
        let e = self
            .groups
            .find_mut(bucket_hash(key), |e| e & HASH_MASK == key)?;
        let this = u64::from(vm) + 1;
        let last = match *e & LAST_VM {
            VM_OVERFLOW => u64::from(self.overflow.get(&key).copied().unwrap_or(0)),
            l => l,
        };
        let role = if last == this {
            Role::Intra
        } else if last == 0 {
            Role::Kept
        } else {
            Role::Inter
        };
        let stored = if this < VM_OVERFLOW {
            this
        } else {
            self.overflow.insert(key, vm.saturating_add(1));
            VM_OVERFLOW
        };
        *e = (*e & !LAST_VM) | stored;
        Some(Attribution {
            role,
            duplicate: *e & DUPLICATE != 0,
            any_merged: *e & ANY_MERGED != 0,
        })
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// A kept 48-bit hash.
    fn h(n: u64) -> u64 {
        n << 16
    }

    #[test]
    fn attributes_kept_inter_and_intra_copies() {
        let mut t = ContentTable::new();
        // VM 0 holds the content twice, VM 1 three times, VM 2 once.
        for _ in 0..6 {
            t.add(h(7), false);
        }
        t.add(h(9), true);
        assert_eq!(t.len(), 2);
        let roles: Vec<Role> = [0, 0, 1, 1, 1, 2]
            .iter()
            .map(|&vm| t.attribute(h(7), vm).unwrap().role)
            .collect();
        use Role::*;
        assert_eq!(roles, [Kept, Intra, Inter, Intra, Intra, Inter]);
        assert!(t.attribute(h(7), 3).unwrap().duplicate);
        let a = t.attribute(h(9), 0).unwrap();
        assert_eq!((a.duplicate, a.any_merged, a.role), (false, true, Kept));
        assert_eq!(t.attribute(h(8), 0), None);
        // The low 16 bits are not part of the content's identity.
        assert_eq!(t.attribute(h(9) | 0xbeef, 0).unwrap().role, Intra);
    }

    #[test]
    fn vm_indices_beyond_the_entry_bits_still_attribute() {
        let mut t = ContentTable::new();
        for _ in 0..4 {
            t.add(h(5), false);
        }
        let big = u32::try_from(VM_OVERFLOW).unwrap() + 10;
        let roles: Vec<Role> = [3, big, big, big + 1]
            .iter()
            .map(|&vm| t.attribute(h(5), vm).unwrap().role)
            .collect();
        use Role::*;
        assert_eq!(roles, [Kept, Inter, Intra, Inter]);
    }

    #[test]
    fn allocated_bytes_follow_the_load_factor() {
        // hashbrown keeps at most 7/8 of its buckets full and doubles: per distinct content
        // the table holds between one bucket (entry + control byte) * 8/7 and twice that.
        let bucket = 9.0;
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
        // Reserved up front, it does not grow past the reservation.
        let mut t = ContentTable::with_capacity(100_000);
        let before = t.allocated_bytes();
        for n in 0..100_000u64 {
            t.add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15), false);
        }
        assert_eq!(t.allocated_bytes(), before);
    }
}
