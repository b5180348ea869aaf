//! One page's scan history in 8 bytes: the top 48 bits of its xxh3-64, six flag bits, a
//! 2-bit count of recent changes and an 8-bit count of consecutive unchanged scans. At 8
//! bytes per page the history of a host with 1 TiB of guest RAM costs 2 GiB; a 48-bit hash
//! still puts the expected number of false "unchanged" verdicts at 2^-48 per page and
//! scan, and false duplicates among 2^25 distinct pages (128 GiB) at about two pairs
//! (birthday bound n^2 / 2^49).

/// The 48 hash bits kept.
pub const HASH_MASK: u64 = !0xffff;
const UNCHANGED_MAX: u16 = 0xff;
const CHANGES_SHIFT: u32 = 8;
const CHANGES_MAX: u8 = 3;

/// Unchanged scans after which a page's recent changes are forgotten. A page that changed
/// twice within this many scans is churning: another change is likely, even when the
/// scans in between saw it unchanged. Periodic rewrites that alternate two contents,
/// sampled in step by a near-regular scan, read as unchanged in most passes: the lab's
/// churn guests showed their rewritten ranges as changed in one pass of four to eight, and
/// ksmd merged them in between (8,000 COW breaks per guest).
pub const CHANGE_MEMORY: u16 = 8;

/// A calm page is read once in this many passes.
pub const SAMPLE_ONE_IN: usize = 8;
/// Unchanged passes after which a page that is not churning is calm: calm pages are read
/// from a rotating sample of one page in [`SAMPLE_ONE_IN`], and those of a 1 MiB chunk in
/// full when a calm page of it changed. Reading every page of a new or woken VM in every
/// busy pass was most of the hints' CPU (the timeline bench read each guest's RAM nine
/// times in its first 150 s).
pub const CALM_AFTER: u16 = 1;

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
pub const BYTES_PER_PAGE: u32 = 8;
const _: () = assert!(std::mem::size_of::<PageState>() == BYTES_PER_PAGE as usize);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct PageState(u64);

impl PageState {
    /// A page not present in the last pass (history forgotten).
    pub const ABSENT: PageState = PageState(0);

    pub fn new(hash: u64, flags: u8, unchanged: u16) -> PageState {
        PageState::with_changes(hash, flags, unchanged, 0)
    }

    fn with_changes(hash: u64, flags: u8, unchanged: u16, changes: u8) -> PageState {
        PageState(
            (hash & HASH_MASK)
                | (u64::from(flags & 0x3f) << 10)
                | (u64::from(changes.min(CHANGES_MAX)) << CHANGES_SHIFT)
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

    /// Consecutive scans the page's content stayed the same (saturates at 255).
    #[expect(
        clippy::cast_possible_truncation,
        reason = "masked to its 8 bits first"
    )]
    pub fn unchanged(self) -> u16 {
        (self.0 & u64::from(UNCHANGED_MAX)) as u16
    }

    /// Changes seen since the page was last unchanged for [`CHANGE_MEMORY`] scans
    /// (saturates at 3).
    #[expect(
        clippy::cast_possible_truncation,
        reason = "masked to its 2 bits first"
    )]
    pub fn changes(self) -> u8 {
        ((self.0 >> CHANGES_SHIFT) & u64::from(CHANGES_MAX)) as u8
    }

    /// Read in the scan before the last one too, and different now.
    pub fn changed(self) -> bool {
        self.has(F_SEEN) && self.unchanged() == 0
    }

    /// Changed in the last scan, or twice within [`CHANGE_MEMORY`] scans: the ranking
    /// gives a range of such pages no calm verdict.
    pub fn churning(self) -> bool {
        self.changed() || self.changes() >= 2
    }

    /// Present, unchanged for [`CALM_AFTER`] passes and not churning: at most one
    /// change within [`CHANGE_MEMORY`] passes. One change is a page filled once (a
    /// guest's first write after zeroing, a one-off load); requiring none had every
    /// page a booting or loading guest wrote read in eight more passes (the timeline
    /// bench's agent in its first 120 s: 2.7 s of CPU before, 2.0 s after, one run each).
    pub fn calm(self) -> bool {
        self.has(F_PRESENT) && self.unchanged() >= CALM_AFTER && self.changes() <= 1
    }

    /// What a report sees of the page when pages count as stable after `stable_after`
    /// unchanged passes: two states with the same key count the same in every figure of
    /// [`super::account`] (present, zero, merged, churning, changed, stable, and a stable
    /// page's content), so a pass that changed no key leaves the report as it was.
    pub fn accounted(self, stable_after: u8) -> u64 {
        if !self.has(F_PRESENT) {
            return 0;
        }
        let flags = self.flags() & (F_PRESENT | F_ZERO | F_MERGED | F_ZERO_FRAME | F_THP);
        let stable = !self.has(F_ZERO)
            && !self.has(F_ZERO_FRAME)
            && self.unchanged() >= u16::from(stable_after);
        let key =
            u64::from(flags) | (u64::from(self.churning()) << 8) | (u64::from(self.changed()) << 9);
        if stable {
            key | (1 << 10) | self.hash()
        } else {
            key
        }
    }

    /// The state after a pass that did not read this calm page: as if read unchanged
    /// (one more unchanged pass; a change forgotten after [`CHANGE_MEMORY`] of them),
    /// with the frame's current `flags` (its zero content kept, which only a read tells).
    pub fn kept(self, flags: u8) -> PageState {
        self.rescanned(self.hash(), flags | (self.flags() & F_ZERO))
    }

    /// The state after reading the page again with full hash `hash` and frame flags
    /// `flags` (without `F_PRESENT`/`F_SEEN`, which this sets).
    pub fn rescanned(self, hash: u64, flags: u8) -> PageState {
        let was_present = self.has(F_PRESENT);
        let (unchanged, changes) = if !was_present {
            (0, 0)
        } else if self.hash() == hash & HASH_MASK {
            let unchanged = self.unchanged().saturating_add(1);
            let changes = if unchanged >= CHANGE_MEMORY {
                0
            } else {
                self.changes()
            };
            (unchanged, changes)
        } else {
            (0, self.changes().saturating_add(1))
        };
        let seen = if was_present { F_SEEN } else { 0 };
        PageState::with_changes(hash, flags | F_PRESENT | seen, unchanged, changes)
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
        assert_eq!(PageState::new(0, 0xff, 5000).unchanged(), 255);
        assert_eq!(PageState::new(0, 0xff, 5000).changes(), 0);
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

    #[test]
    fn calm_pages_are_kept_with_their_content_flags() {
        let mut s = PageState::ABSENT.rescanned(5 << 16, F_ZERO);
        for _ in 0..CALM_AFTER {
            assert!(!s.calm());
            s = s.rescanned(5 << 16, F_ZERO);
        }
        assert!(s.calm());
        let k = s.kept(F_THP);
        assert_eq!(k.hash(), s.hash());
        assert_eq!(k.flags(), F_ZERO | F_THP | F_PRESENT | F_SEEN);
        assert_eq!(k.unchanged(), s.unchanged() + 1);
        // A change read in a sampled pass ends its calm until the page is read
        // unchanged again; a second change within CHANGE_MEMORY passes (churn) ends it
        // until CHANGE_MEMORY unchanged passes forget the changes, whether read or kept.
        let c = k.rescanned(6 << 16, 0);
        assert!(!c.calm());
        let c = c.rescanned(6 << 16, 0);
        assert!(c.calm() && c.changes() == 1);
        let mut c = c.kept(0).rescanned(7 << 16, 0);
        for i in 0..CHANGE_MEMORY {
            assert!(!c.calm());
            c = if i % 2 == 0 {
                c.rescanned(7 << 16, 0)
            } else {
                c.kept(0)
            };
        }
        assert!(c.calm() && c.changes() == 0);
    }

    #[test]
    fn repeated_changes_are_churn_until_forgotten() {
        let mut s = PageState::ABSENT.rescanned(1 << 16, 0);
        assert!(!s.churning(), "a new page has no history");
        // One change (a one-off load) is churn only in the pass that saw it.
        s = s.rescanned(2 << 16, 0);
        assert!(s.churning() && s.changes() == 1);
        s = s.rescanned(2 << 16, 0);
        assert!(!s.churning());
        // A second change within the memory: churn through the unchanged passes after it
        // (a/b rewrites sampled in step), until CHANGE_MEMORY calm passes forget it.
        s = s.rescanned(1 << 16, 0);
        for _ in 1..CHANGE_MEMORY {
            s = s.rescanned(1 << 16, F_MERGED);
            assert!(s.churning(), "forgotten after {} passes", s.unchanged());
            assert!(s.has(F_MERGED));
        }
        s = s.rescanned(1 << 16, 0);
        assert_eq!((s.changes(), s.churning()), (0, false));
        // Changes saturate and do not spill into the flags or the hash.
        for h in 3..10u64 {
            s = s.rescanned(h << 16, F_THP);
        }
        assert_eq!((s.changes(), s.flags()), (3, F_THP | F_PRESENT | F_SEEN));
        assert_eq!(s.hash(), 9 << 16);
        // Absence forgets everything.
        let back = PageState::ABSENT.rescanned(9 << 16, 0);
        assert_eq!(back.changes(), 0);
    }
}
