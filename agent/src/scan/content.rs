//! Which stable pages hold the same content: the copies of one shard of contents (by
//! their 48-bit hash), sorted so that each content's copies lie together, in VM and range
//! order, and attributed group by group: whether the content has more than one copy,
//! whether KSM already merged one of them, and each copy's role when KSM merges the group.
//!
//! Sorted, not looked up: a hash table built for every report (one insert and one lookup
//! per stable page, each a cache miss in a table of megabytes) took 57 % of a report's
//! CPU at 16 GiB of guests, and the walks over the page histories, twice per shard, the
//! rest (1.2 s per report in all). The copies are 16 bytes each, a shard's worth at a time,
//! collected in one walk and sorted in place.

use super::page_state::HASH_MASK;

/// Bytes one copy takes.
pub const COPY_BYTES: usize = std::mem::size_of::<u128>();

/// How a duplicate page counts when KSM merges its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The group's first copy on the host: it stays.
    Kept,
    /// The first copy in its VM, but another VM holds the content too: saved only by
    /// merging across VMs.
    Inter,
    /// A further copy inside a VM that already holds the content: saved by merging within
    /// the VM alone.
    Intra,
}

/// What a copy is in its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attribution {
    pub role: Role,
    /// The content has at least two copies.
    pub duplicate: bool,
    /// Some copy of the content is on a KSM frame.
    pub any_merged: bool,
}

/// One stable page: its content, VM (index in PID order), range (index among its VM's
/// ranges) and whether it is on a KSM frame, packed so that sorting orders by content,
/// then VM, then merged copies first, then range. Merged first: of a VM's copies the one
/// already on a KSM frame is its first (kept or inter), the ones merging would still save
/// are intra, whatever their order in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Copy {
    pub hash: u64,
    pub vm: u32,
    pub range: u32,
    pub merged: bool,
}

/// Range indices have 31 bits (a 2 MiB range each: 4 PiB of guest RAM per VM).
const RANGE_MASK: u32 = u32::MAX >> 1;
const UNMERGED: u128 = 1 << 31;

impl Copy {
    fn packed(self) -> u128 {
        let unmerged = if self.merged { 0 } else { UNMERGED };
        (u128::from(self.hash & HASH_MASK) << 64)
            | (u128::from(self.vm) << 32)
            | unmerged
            | u128::from(self.range & RANGE_MASK)
    }

    #[expect(clippy::cast_possible_truncation, reason = "each field is masked out")]
    fn unpacked(p: u128) -> Copy {
        Copy {
            hash: (p >> 64) as u64,
            vm: (p >> 32) as u32,
            range: (p as u32) & RANGE_MASK,
            merged: p & UNMERGED == 0,
        }
    }
}

/// The copies of one shard.
#[derive(Default)]
pub struct Copies(Vec<u128>);

impl Copies {
    pub fn with_capacity(copies: usize) -> Copies {
        Copies(Vec::with_capacity(copies))
    }

    /// Empties it for the next shard, keeping its allocation.
    pub fn clear(&mut self) {
        self.0.clear();
    }

    pub fn push(&mut self, copy: Copy) {
        self.0.push(copy.packed());
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Bytes allocated.
    pub fn allocated_bytes(&self) -> usize {
        self.0.capacity() * COPY_BYTES
    }

    /// Sorts the copies and calls `f` for each, content by content, each content's copies
    /// in VM order (the first VM's first copy is the one kept, a VM's first copy of a
    /// content an earlier VM holds is inter, its further copies intra); returns the number
    /// of distinct contents.
    pub fn attribute(&mut self, mut f: impl FnMut(Copy, Attribution)) -> usize {
        self.0.sort_unstable();
        let content = |p: u128| p >> 64;
        let mut distinct = 0;
        for group in self.0.chunk_by(|a, b| content(*a) == content(*b)) {
            distinct += 1;
            let duplicate = group.len() > 1;
            let any_merged = group.iter().any(|p| p & UNMERGED == 0);
            let mut last_vm = None;
            for &p in group {
                let c = Copy::unpacked(p);
                let role = match last_vm {
                    None => Role::Kept,
                    Some(vm) if vm == c.vm => Role::Intra,
                    Some(_) => Role::Inter,
                };
                last_vm = Some(c.vm);
                f(
                    c,
                    Attribution {
                        role,
                        duplicate,
                        any_merged,
                    },
                );
            }
        }
        distinct
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u64) -> u64 {
        n << 16
    }

    fn copy(hash: u64, vm: u32, range: u32, merged: bool) -> Copy {
        Copy {
            hash,
            vm,
            range,
            merged,
        }
    }

    #[test]
    fn attributes_kept_inter_and_intra_copies() {
        let mut c = Copies::default();
        // VM 0 holds content 7 twice, VM 1 three times, VM 2 once; pushed out of order.
        for (vm, range) in [(1, 4), (0, 2), (2, 0), (1, 3), (0, 1), (1, 5)] {
            c.push(copy(h(7), vm, range, false));
        }
        c.push(copy(h(9), 0, 9, true));
        let mut seen = Vec::new();
        let distinct = c.attribute(|copy, a| seen.push((copy.hash, copy.vm, copy.range, a)));
        assert_eq!(distinct, 2);
        use Role::*;
        let roles: Vec<_> = seen
            .iter()
            .filter(|s| s.0 == h(7))
            .map(|s| (s.1, s.2, s.3.role))
            .collect();
        assert_eq!(
            roles,
            [
                (0, 1, Kept),
                (0, 2, Intra),
                (1, 3, Inter),
                (1, 4, Intra),
                (1, 5, Intra),
                (2, 0, Inter)
            ]
        );
        assert!(seen.iter().filter(|s| s.0 == h(7)).all(|s| s.3.duplicate));
        let nine = seen.iter().find(|s| s.0 == h(9)).unwrap().3;
        assert_eq!(
            (nine.duplicate, nine.any_merged, nine.role),
            (false, true, Kept)
        );
    }

    #[test]
    fn the_low_bits_are_not_the_content_and_fields_round_trip() {
        let mut c = Copies::default();
        c.push(copy(h(5) | 0xbeef, u32::MAX, RANGE_MASK, true));
        c.push(copy(h(5), 3, 7, false));
        c.push(copy(h(5), 3, 8, true));
        let mut seen = Vec::new();
        assert_eq!(c.attribute(|copy, a| seen.push((copy, a))), 1);
        // VM 3's merged copy comes first, whatever its range.
        assert_eq!(seen[0].0, copy(h(5), 3, 8, true));
        assert_eq!(seen[1].0, copy(h(5), 3, 7, false));
        assert_eq!(seen[2].0, copy(h(5), u32::MAX, RANGE_MASK, true));
        assert!(seen.iter().all(|(_, a)| a.duplicate && a.any_merged));
        let roles: Vec<Role> = seen.iter().map(|(_, a)| a.role).collect();
        assert_eq!(roles, [Role::Kept, Role::Intra, Role::Inter]);
        c.clear();
        assert!(c.is_empty());
        assert!(c.allocated_bytes() >= 2 * COPY_BYTES);
    }
}
