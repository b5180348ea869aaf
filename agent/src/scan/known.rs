//! Pages whose content the scanner knows without reading them. Two kinds of frame cannot
//! change under a process: the kernel's shared zero page (a write faults a new page in),
//! and a KSM page (write-protected; a write breaks COW onto a new frame, and KSM never
//! writes a stable page in place). So a page still mapped to the zero page is zero, and a
//! page still mapped to a KSM frame whose content was read once holds that content: in a
//! merged host most of the guest RAM is such pages, and reading them again on every pass
//! was most of the scan's cost.
//!
//! The frame is the key. A KSM frame that is freed and reused for another KSM page would
//! keep a stale entry: entries not seen for [`FORGET_AFTER_ROUNDS`] rounds (a round ends
//! when every tracked VM had a pass since it began) are dropped (a freed KSM page is not
//! seen again), and a rotating sample of one hit in
//! [`VERIFY_ONE_IN`] is read anyway and compared; a mismatch replaces the entry and is
//! counted.

use rustc_hash::FxHashMap;

use super::page_state::HASH_MASK;

/// The round an entry was last seen, in an entry's low 16 bits (below the 48 kept hash
/// bits: 16 bytes per frame instead of 24). Entries older than [`FORGET_AFTER_ROUNDS`]
/// are dropped at every round's end, so the 16-bit round never wraps onto a live entry.
const ROUND_BITS: u64 = !HASH_MASK;

/// One hit in this many is read anyway and checked (a different sample each pass).
pub const VERIFY_ONE_IN: u64 = 16;
/// KSM frames remembered at most: 2^17 frames in 2^18 buckets of 17 bytes, 4.5 MiB. The
/// cache held one entry per KSM page of the host, 17.8 MiB of the daemon's 97 MiB at
/// 16 GiB of guests (524,288 frames), and grew with the host. Frames beyond it are read
/// like any page: calm ones one pass in [`super::page_state::SAMPLE_ONE_IN`] instead of
/// one in [`VERIFY_ONE_IN`].
pub const MAX_FRAMES: usize = 1 << 17;
/// Rounds over every tracked VM after which a KSM frame not seen again is forgotten.
/// Rounds, not passes: the daemon scans a busy VM many times while a quiet one rests, and
/// counting passes forgot the quiet VM's frames between two of its own passes (its next
/// pass read them all again).
pub const FORGET_AFTER_ROUNDS: u32 = 2;

/// What the cache did, for the scan's figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KnownStats {
    /// Pages not read: on the zero page, or on a KSM frame of known content.
    pub skipped: u64,
    /// Calm pages not read (read in one pass of [`super::page_state::SAMPLE_ONE_IN`]).
    pub kept: u64,
    /// Calm pages left out of the sample and read anyway: a calm page of their chunk
    /// changed.
    pub escalated: u64,
    /// Hits read anyway to check them, and of those, the ones that differed.
    pub verified: u64,
    pub mismatched: u64,
}

/// Content hashes of KSM frames, by frame number.
#[derive(Default)]
pub struct KnownFrames {
    /// Frame -> the 48 kept bits of its content's hash | the round it was last seen
    /// (16 bits). On a merged host this holds one entry per KSM page: the agent's second
    /// largest table after the page histories.
    ksm: FxHashMap<u64, u64>,
    /// The current round.
    round: u32,
    /// Frames checked in pass `checked_pass`: a frame is read once per check, not once
    /// per page mapped to it (a KSM frame of zero-filled guest pages holds up to
    /// `max_page_sharing` of them, and checking it read them all).
    checked: rustc_hash::FxHashSet<u64>,
    checked_pass: u32,
    pub stats: KnownStats,
}

/// What to do with one present page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Its content's hash is known: no read.
    Known(u64),
    /// A calm page outside this pass's sample: taken as unchanged unless a calm page of
    /// its chunk changed.
    Kept,
    /// Read it; if `expect` is set, the read checks a known hash.
    Read { expect: Option<u64> },
}

impl KnownFrames {
    /// The page on frame `pfn` (0: unknown) with these kpageflags, in pass `pass`.
    pub fn lookup(
        &mut self,
        pfn: u64,
        ksm: bool,
        zero_page: bool,
        zero_hash: u64,
        pass: u32,
    ) -> Lookup {
        if zero_page {
            self.stats.skipped += 1;
            return Lookup::Known(zero_hash);
        }
        if !ksm || pfn == 0 {
            return Lookup::Read { expect: None };
        }
        let Some(entry) = self.ksm.get_mut(&pfn) else {
            return Lookup::Read { expect: None };
        };
        *entry = (*entry & HASH_MASK) | (u64::from(self.round) & ROUND_BITS);
        let hash = *entry & HASH_MASK;
        // A sample that moves with the pass: every frame is checked now and then.
        let mix = pfn
            .wrapping_add(u64::from(pass))
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        if (mix >> 32).is_multiple_of(VERIFY_ONE_IN) {
            if self.checked_pass != pass {
                self.checked.clear();
                self.checked_pass = pass;
            }
            if self.checked.insert(pfn) {
                return Lookup::Read { expect: Some(hash) };
            }
        }
        self.stats.skipped += 1;
        Lookup::Known(hash)
    }

    /// A page read with hash `hash` (its 48 kept bits count): remembered when its frame
    /// is a KSM page and the cache has room ([`MAX_FRAMES`]); a check (`expect`) that
    /// failed is counted.
    pub fn read(&mut self, pfn: u64, ksm: bool, hash: u64, expect: Option<u64>) {
        let hash = hash & HASH_MASK;
        if let Some(e) = expect {
            self.stats.verified += 1;
            if e != hash {
                self.stats.mismatched += 1;
            }
        }
        if ksm && pfn != 0 {
            let entry = hash | (u64::from(self.round) & ROUND_BITS);
            let room = self.ksm.len() < MAX_FRAMES;
            match self.ksm.entry(pfn) {
                std::collections::hash_map::Entry::Occupied(mut e) => *e.get_mut() = entry,
                std::collections::hash_map::Entry::Vacant(e) if room => {
                    e.insert(entry);
                }
                std::collections::hash_map::Entry::Vacant(_) => {}
            }
        }
    }

    /// Ends a round (every tracked VM had a pass since the last one ended): drops frames
    /// not seen in the last [`FORGET_AFTER_ROUNDS`] rounds.
    pub fn round_done(&mut self) {
        self.round = self.round.wrapping_add(1);
        let round = u64::from(self.round);
        self.ksm.retain(|_, e| {
            round.wrapping_sub(*e & ROUND_BITS) & ROUND_BITS <= u64::from(FORGET_AFTER_ROUNDS)
        });
    }

    /// KSM frames remembered.
    pub fn len(&self) -> usize {
        self.ksm.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ksm.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checked_frame_is_read_once_per_pass_whatever_maps_it() {
        let mut k = KnownFrames::default();
        k.read(10, true, 0xabc_0000, None);
        let pass = (1..1000)
            .find(|&p| {
                let mut probe = KnownFrames::default();
                probe.read(10, true, 0xabc_0000, None);
                matches!(probe.lookup(10, true, false, 0, p), Lookup::Read { .. })
            })
            .expect("a pass that checks frame 10");
        // 256 pages merged onto frame 10 (KSM's max_page_sharing): one read checks it.
        let reads = (0..256)
            .filter(|_| matches!(k.lookup(10, true, false, 0, pass), Lookup::Read { .. }))
            .count();
        assert_eq!(reads, 1);
        assert_eq!(k.stats.skipped, 255);
    }

    #[test]
    fn zero_and_remembered_ksm_frames_are_not_read_and_a_sample_is_checked() {
        let mut k = KnownFrames::default();
        // The zero page: known, whatever its frame.
        assert_eq!(k.lookup(7, false, true, 42, 1), Lookup::Known(42));
        // A plain page: read; a KSM frame seen for the first time: read, then remembered.
        assert_eq!(
            k.lookup(9, false, false, 42, 1),
            Lookup::Read { expect: None }
        );
        assert_eq!(
            k.lookup(10, true, false, 42, 1),
            Lookup::Read { expect: None }
        );
        k.read(10, true, 0xabc_0000, None);
        // Frame number 0 (no CAP_SYS_ADMIN) is never a key.
        k.read(0, true, 0xdef_0000, None);
        assert_eq!(k.len(), 1);
        // Seen again over many passes: known, except a sample of about 1 in 16.
        let (mut known, mut checked) = (0, 0);
        for pass in 2..2002 {
            match k.lookup(10, true, false, 42, pass) {
                Lookup::Known(h) => {
                    assert_eq!(h, 0xabc_0000);
                    known += 1;
                }
                Lookup::Read { expect } => {
                    assert_eq!(expect, Some(0xabc_0000));
                    k.read(10, true, 0xabc_0000, expect);
                    checked += 1;
                }
                Lookup::Kept => unreachable!("the cache never keeps: the scanner does"),
            }
        }
        assert!((60..200).contains(&checked), "{checked} of 2000 checked");
        assert_eq!(known + checked, 2000);
        assert_eq!(k.stats.mismatched, 0);
        // A check that finds other content replaces the entry and is counted.
        k.read(10, true, 0x123_0000, Some(0xabc_0000));
        assert_eq!(k.stats.mismatched, 1);
        // Not seen for FORGET_AFTER_ROUNDS rounds: kept; one more: forgotten.
        for _ in 0..FORGET_AFTER_ROUNDS {
            k.round_done();
        }
        assert_eq!(k.len(), 1);
        k.round_done();
        assert!(k.is_empty());
    }

    #[test]
    fn the_cache_is_bounded_and_makes_room_as_frames_are_forgotten() {
        let mut k = KnownFrames::default();
        let frames = MAX_FRAMES as u64 + 1000;
        for pfn in 1..=frames {
            k.read(pfn, true, pfn << 16, None);
        }
        assert_eq!(k.len(), MAX_FRAMES);
        assert!(k.ksm.capacity() < 2 * MAX_FRAMES, "{}", k.ksm.capacity());
        // A remembered frame is updated in place; one beyond the bound is read each time.
        k.read(1, true, 0xabc_0000, None);
        assert_eq!(k.ksm[&1] & HASH_MASK, 0xabc_0000);
        assert_eq!(
            k.lookup(frames, true, false, 42, 1),
            Lookup::Read { expect: None }
        );
        // Once the old frames are forgotten, new ones are remembered.
        for _ in 0..=FORGET_AFTER_ROUNDS {
            k.round_done();
        }
        assert!(k.is_empty());
        k.read(frames, true, 0xdef_0000, None);
        assert_eq!(k.len(), 1);
    }

    #[test]
    fn a_frame_seen_every_round_survives_the_round_counter_wrapping() {
        let mut k = KnownFrames::default();
        k.read(10, true, 0xabc_0000, None);
        for pass in 0..70_000 {
            k.read(11, true, 0xdef_0000, None);
            assert_ne!(
                k.lookup(10, true, false, 42, pass),
                Lookup::Read { expect: None },
                "forgotten in round {pass}"
            );
            k.round_done();
        }
        // Last seen one round ago; then two.
        k.round_done();
        assert_eq!(k.len(), 2);
        k.round_done();
        assert!(k.is_empty());
    }
}
