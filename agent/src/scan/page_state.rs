//! One page's scan history in 8 bytes: the top 48 bits of its xxh3-64, six flag bits and a
//! 10-bit count of consecutive unchanged scans. At 8 bytes per page the history of a host
//! with 1 TiB of guest RAM costs 2 GiB; a 48-bit hash still puts the expected number of
//! false "unchanged" verdicts at 2^-48 per page and scan, and false duplicates among 2^25
//! distinct pages (128 GiB) at about two pairs (birthday bound n^2 / 2^49).

/// The 48 hash bits kept.
pub const HASH_MASK: u64 = !0xffff;
const UNCHANGED_MAX: u16 = 0x3ff;

/// The page was present (and read) in the last pass.
pub const F_PRESENT: u8 = 1;
/// Zero content on a frame of its own (KSM can save it).
pub const F_ZERO: u8 = 2;
/// The frame is a KSM page.
pub const F_MERGED: u8 = 4;
/// Present in the previous pass too (so "changed" is meaningful).
pub const F_SEEN: u8 = 8;
/// Mapped to the kernel's shared zero page (read, never written): costs nothing.
pub const F_ZERO_FRAME: u8 = 16;
/// Part of a transparent huge page.
pub const F_THP: u8 = 32;

/// Bytes of history per tracked page.
pub const BYTES_PER_PAGE: u32 = std::mem::size_of::<PageState>() as u32;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct PageState(u64);

impl PageState {
    /// A page not present in the last pass (history forgotten).
    pub const ABSENT: PageState = PageState(0);

    pub fn new(hash: u64, flags: u8, unchanged: u16) -> PageState {
        PageState(
            (hash & HASH_MASK)
                | (u64::from(flags & 0x3f) << 10)
                | u64::from(unchanged.min(UNCHANGED_MAX)),
        )
    }

    /// The kept 48 bits of the page's hash (low 16 bits zero).
    pub fn hash(self) -> u64 {
        self.0 & HASH_MASK
    }

    pub fn flags(self) -> u8 {
        ((self.0 >> 10) & 0x3f) as u8
    }

    pub fn has(self, flag: u8) -> bool {
        self.flags() & flag != 0
    }

    /// Consecutive scans the page's content stayed the same (saturates at 1023).
    pub fn unchanged(self) -> u16 {
        (self.0 & u64::from(UNCHANGED_MAX)) as u16
    }

    /// The state after reading the page again with full hash `hash` and frame flags
    /// `flags` (without `F_PRESENT`/`F_SEEN`, which this sets).
    pub fn rescanned(self, hash: u64, flags: u8) -> PageState {
        let was_present = self.has(F_PRESENT);
        let unchanged = if was_present && self.hash() == hash & HASH_MASK {
            self.unchanged().saturating_add(1)
        } else {
            0
        };
        let seen = if was_present { F_SEEN } else { 0 };
        PageState::new(hash, flags | F_PRESENT | seen, unchanged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_into_eight_bytes() {
        assert_eq!(BYTES_PER_PAGE, 8);
        let s = PageState::new(0xdead_beef_cafe_f00d, F_ZERO | F_THP, 7);
        assert_eq!(s.hash(), 0xdead_beef_cafe_0000);
        assert_eq!(s.flags(), F_ZERO | F_THP);
        assert_eq!(s.unchanged(), 7);
        assert_eq!(PageState::new(0, 0xff, 5000).unchanged(), 1023);
        assert_eq!(PageState::new(0, 0xff, 0).flags(), 0x3f);
    }

    #[test]
    fn rescanning_counts_unchanged_passes() {
        let first = PageState::ABSENT.rescanned(42 << 16, 0);
        assert!(first.has(F_PRESENT) && !first.has(F_SEEN));
        assert_eq!(first.unchanged(), 0);
        let second = first.rescanned(42 << 16, F_MERGED);
        assert!(second.has(F_SEEN) && second.has(F_MERGED));
        assert_eq!(second.unchanged(), 1);
        // A change in the kept bits resets the count.
        assert_eq!(second.rescanned(43 << 16, 0).unchanged(), 0);
    }
}
