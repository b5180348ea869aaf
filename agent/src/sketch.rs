//! Bottom-k (KMV) sketches of page-content hashes: the `k` smallest distinct hashes of a
//! set stand for all of it. From two sketches: each set's distinct count, their union's,
//! the Jaccard similarity, and so how many of one VM's pages another host already holds
//! (containment), with an error that shrinks as 1/sqrt(k).
//!
//! The wire encoding is versioned and checked before anything is believed: a hostile peer
//! can send anything. Hashes are the scanner's xxh3-64 truncated to [`HASH_BITS`] bits, a
//! protocol constant: both ends must agree on it.

use std::collections::{BTreeSet, HashMap};

use xxhash_rust::xxh3::xxh3_64;

/// Bits of each page hash in a sketch (the wire carries 6 bytes per hash).
pub const HASH_BITS: u32 = 48;
/// [`HASH_BITS`] as the wire form's header byte.
const HASH_BITS_BYTE: u8 = 48;
const _: () = assert!(HASH_BITS_BYTE as u32 == HASH_BITS);
const MASK: u64 = (1 << HASH_BITS) - 1;
/// Largest k a decoder accepts: 65,536 hashes is 384 KiB.
pub const MAX_K: usize = 65_536;
/// The default k: a host sketch of 24 KiB on the wire, about 1.6 % relative error.
pub const DEFAULT_K: usize = 4096;

const MAGIC: &[u8; 4] = b"MFSK";
/// Version 2 adds the heavy contents after the hashes; version 1 (without) still reads.
const VERSION: u8 = 2;
/// Misra-Gries counters of further copies kept per sketch: every content with more than
/// 1/`HEAVY_TRACK` of the set's copies is among them.
const HEAVY_TRACK: usize = 1024;
/// Further copies that make a content heavy (16 copies or more).
pub const HEAVY_MIN_REPEATS: u32 = 15;
/// Heavy contents a sketch publishes at most (1.5 KiB on the wire).
pub const MAX_HEAVY: usize = 256;
/// magic, version, hash bits, k (u32), count (u32), distinct (u64).
const HEADER: usize = 4 + 1 + 1 + 4 + 4 + 8;
const CHECKSUM: usize = 8;
/// The heavy contents' count (version 2).
const HEAVY_COUNT: usize = 4;
const HASH_BYTES: usize = (HASH_BITS / 8) as usize;

/// A bottom-k sketch of a set of page hashes, with the set's exact distinct count when the
/// builder knew it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sketch {
    k: usize,
    /// The k smallest distinct (truncated) hashes.
    mins: BTreeSet<u64>,
    /// Distinct hashes inserted (exact: the scanner counts them; after a union, estimated).
    distinct: u64,
    /// Local only (never on the wire): further copies within the set of each sampled hash
    /// that has any. A migration saves every copy of a content the destination holds, not
    /// one per content: a guest holds its kernel's and workload's pages several times, and
    /// counting distinct contents predicted a third of what a migration saved.
    repeats: HashMap<u64, u32>,
    /// Contents with many copies: Misra-Gries counts of their further copies (lower
    /// bounds) locally; from the wire, the heavy contents a host published (counted as
    /// [`HEAVY_MIN_REPEATS`]). A guest's copies are heavy-tailed: a lab guest held 24
    /// contents 700 times each, half its pages. A uniform sample of contents holds a few of
    /// them or none, so the copies a migration saves were estimated 14 % low in one run and
    /// could be far off either way; heavy contents are counted exactly instead.
    heavy: HashMap<u64, u32>,
}

/// An estimate of how many of a VM's distinct stable pages a host holds.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Containment {
    /// Distinct contents held.
    pub pages: f64,
    /// Copies in the set of the contents held (= `pages` when the set's copies were not
    /// counted, as for a sketch read from the wire).
    #[serde(default)]
    pub instances: f64,
    /// Half-width of a 95 % interval, in pages.
    pub bound: f64,
    /// Hashes the estimate rests on.
    pub sampled: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("{0} bytes: shorter than a sketch header")]
    Short(usize),
    #[error("not a memfabric sketch (bad magic)")]
    Magic,
    #[error("sketch version {0}; this memfabric reads {VERSION}")]
    Version(u8),
    #[error("sketch of {0}-bit hashes; this memfabric uses {HASH_BITS}")]
    HashBits(u8),
    #[error("k = {0} outside 1..={MAX_K}")]
    K(u32),
    #[error("{count} hashes for k = {k}")]
    Count { count: u32, k: u32 },
    #[error("length {got} bytes, the header says {want}")]
    Length { got: usize, want: usize },
    #[error("checksum mismatch: damaged or tampered")]
    Checksum,
    #[error("{0} heavy contents, more than {MAX_HEAVY}")]
    Heavy(u32),
    #[error("hashes not strictly increasing at {0}")]
    Order(usize),
}

impl Default for Sketch {
    fn default() -> Sketch {
        Sketch::new(DEFAULT_K)
    }
}

impl Sketch {
    pub fn new(k: usize) -> Sketch {
        Sketch {
            k: k.clamp(1, MAX_K),
            mins: BTreeSet::new(),
            distinct: 0,
            repeats: HashMap::new(),
            heavy: HashMap::new(),
        }
    }

    /// The sketch of `hashes` (each a distinct content: the count is exact).
    pub fn of(k: usize, hashes: impl IntoIterator<Item = u64>) -> Sketch {
        let mut s = Sketch::new(k);
        for h in hashes {
            s.insert(h);
        }
        s
    }

    /// Tests' sketch of the page "contents" `ids`, hashed as the scanner hashes pages.
    #[cfg(test)]
    pub(crate) fn of_ids(k: usize, ids: impl IntoIterator<Item = u64>) -> Sketch {
        Sketch::of(k, ids.into_iter().map(|i| xxh3_64(&i.to_le_bytes())))
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Adds one page hash (call once per distinct content: the caller's content table
    /// knows which are new; a repeat does not change the sketch, only the count).
    pub fn insert(&mut self, hash: u64) {
        self.distinct += 1;
        let h = hash & MASK;
        if self.mins.len() < self.k {
            self.mins.insert(h);
        } else if let Some(&max) = self.mins.last()
            && h < max
            && self.mins.insert(h)
            && let Some(out) = self.mins.pop_last()
        {
            self.repeats.remove(&out);
        }
    }

    /// Another copy of a content already [`insert`](Sketch::insert)ed: counted when it is
    /// sampled (see [`Containment::instances`]).
    pub fn repeat(&mut self, hash: u64) {
        let h = hash & MASK;
        if self.mins.contains(&h) {
            *self.repeats.entry(h).or_default() += 1;
        }
        if let Some(n) = self.heavy.get_mut(&h) {
            *n += 1;
        } else if self.heavy.len() < HEAVY_TRACK {
            self.heavy.insert(h, 1);
        } else {
            // Misra-Gries: one less for every counted content, the ones at zero dropped.
            self.heavy.retain(|_, n| {
                *n -= 1;
                *n > 0
            });
        }
    }

    /// The heavy contents (see [`Sketch::heavy`]), most copies first, at most
    /// [`MAX_HEAVY`], with their further copies: exact when sampled, else a lower bound.
    fn heavy_contents(&self) -> Vec<(u64, u32)> {
        let mut v: Vec<(u64, u32)> = self
            .heavy
            .iter()
            .map(|(h, n)| (*h, (*n).max(self.repeats.get(h).copied().unwrap_or(0))))
            .filter(|(_, n)| *n >= HEAVY_MIN_REPEATS)
            .collect();
        v.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(MAX_HEAVY);
        v
    }

    /// Distinct hashes: exact when counted, else the KMV estimate (k-1) / max.
    pub fn distinct(&self) -> f64 {
        if self.distinct > 0 {
            return self.distinct as f64;
        }
        self.estimate()
    }

    fn estimate(&self) -> f64 {
        match self.mins.last() {
            None => 0.0,
            Some(_) if self.mins.len() < self.k => self.mins.len() as f64,
            Some(&max) => (self.k as f64 - 1.0) / ((max as f64 + 1.0) / (MASK as f64 + 1.0)),
        }
    }

    /// The sketch of the union (the smaller k of the two).
    pub fn union(&self, other: &Sketch) -> Sketch {
        let k = self.k.min(other.k);
        Sketch {
            k,
            mins: self.mins.union(&other.mins).copied().take(k).collect(),
            distinct: 0,
            repeats: HashMap::new(),
            heavy: self
                .heavy_contents()
                .into_iter()
                .chain(other.heavy_contents())
                .fold(HashMap::new(), |mut m, (h, n)| {
                    *m.entry(h).or_default() += n;
                    m
                }),
        }
    }

    /// Jaccard similarity |A ∩ B| / |A ∪ B|, estimated from the union's bottom k.
    pub fn jaccard(&self, other: &Sketch) -> f64 {
        let u = self.union(other);
        if u.mins.is_empty() {
            return 0.0;
        }
        let both = u
            .mins
            .iter()
            .filter(|h| self.mins.contains(h) && other.mins.contains(h))
            .count();
        both as f64 / u.mins.len() as f64
    }

    /// Estimated distinct hashes of `self` that `other` holds too, and a 95 % error bound
    /// on it (both in pages).
    pub fn overlap(&self, other: &Sketch) -> (f64, f64) {
        let u = self.union(other);
        let j = self.jaccard(other);
        // |A ∪ B| from the counts when both are exact (|A| + |B| - |A ∩ B| = J |A ∪ B|).
        let union_size = if self.distinct > 0 && other.distinct > 0 {
            (self.distinct + other.distinct) as f64 / (1.0 + j)
        } else {
            u.estimate()
        };
        let inter = (j * union_size).min(self.distinct().min(other.distinct()));
        let n = u.mins.len().max(1) as f64;
        let bound = 1.96 * (j * (1.0 - j) / n).sqrt() * union_size;
        (inter, bound)
    }

    /// The sampled hashes, smallest first.
    pub fn hashes(&self) -> impl Iterator<Item = u64> + '_ {
        self.mins.iter().copied()
    }

    pub fn contains(&self, hash: u64) -> bool {
        self.mins.contains(&hash)
    }

    /// Sets the exact distinct count (a caller that knows it, e.g. a union of disjoint sets).
    pub fn set_distinct(&mut self, distinct: u64) {
        self.distinct = distinct;
    }

    /// The largest hash this sketch is complete below: every hash of the set under it is
    /// in the sketch (all of them while the sketch is not full).
    fn threshold(&self) -> u64 {
        match self.mins.last() {
            Some(&max) if self.mins.len() >= self.k => max,
            _ => u64::MAX,
        }
    }

    /// The same set's sketch with a smaller k (what a host publishes per VM).
    pub fn truncated(&self, k: usize) -> Sketch {
        let k = k.clamp(1, self.k);
        let mins: BTreeSet<u64> = self.mins.iter().copied().take(k).collect();
        let repeats = self
            .repeats
            .iter()
            .filter(|(h, _)| mins.contains(h))
            .map(|(h, n)| (*h, *n))
            .collect();
        Sketch {
            k,
            mins,
            distinct: self.distinct,
            repeats,
            heavy: self.heavy.clone(),
        }
    }

    /// How many of this set's distinct hashes `host` holds: a ratio estimator over the
    /// hashes both sketches are complete below. Below that threshold each of our sampled
    /// hashes is known exactly to be in `host` or not, so the error depends on how many of
    /// *ours* fall there, not on how large the host is (the Jaccard route of
    /// [`Sketch::overlap`] degrades as 1/sqrt(k) of the host's size: useless for one VM
    /// against a host of twenty). Keep a larger k for local VMs than the host's.
    pub fn containment(&self, host: &Sketch) -> Containment {
        // Heavy contents are looked up one by one (the host's sample or its own heavy
        // list); the sample estimates the rest.
        let heavy = self.heavy_contents();
        let heavy_set: std::collections::HashSet<u64> = heavy.iter().map(|(h, _)| *h).collect();
        let holds = |h: &u64| host.mins.contains(h) || host.heavy.contains_key(h);
        let (mut heavy_pages, mut heavy_copies) = (0.0, 0.0);
        for (h, n) in &heavy {
            if holds(h) {
                heavy_pages += 1.0;
                heavy_copies += 1.0 + f64::from(*n);
            }
        }
        let tau = self.threshold().min(host.threshold());
        let sampled: Vec<u64> = self
            .mins
            .iter()
            .copied()
            .take_while(|h| *h <= tau)
            .filter(|h| !heavy_set.contains(h))
            .collect();
        let n = sampled.len();
        let size = (self.distinct() - heavy.len() as f64).max(0.0);
        if n == 0 {
            return Containment {
                pages: heavy_pages,
                instances: heavy_copies,
                bound: size,
                sampled: 0,
            };
        }
        let held: Vec<u64> = sampled
            .iter()
            .copied()
            .filter(|h| host.mins.contains(h))
            .collect();
        let copies: u64 = held
            .iter()
            .map(|h| 1 + u64::from(self.repeats.get(h).copied().unwrap_or(0)))
            .sum();
        let held = held.len();
        let p = held as f64 / n as f64;
        // Sampling without replacement from `size` hashes: finite-population correction.
        let fpc = if size > 1.0 {
            ((size - n as f64).max(0.0) / (size - 1.0)).sqrt()
        } else {
            0.0
        };
        Containment {
            pages: p * size + heavy_pages,
            // The sampled contents are a uniform sample of the distinct ones that are not
            // heavy: their copies scale by the same factor.
            instances: copies as f64 / n as f64 * size + heavy_copies,
            bound: 1.96 * (p * (1.0 - p) / n as f64).sqrt() * fpc * size,
            sampled: n,
        }
    }

    /// The wire form: header, the sorted hashes in 6 bytes each, an xxh3 checksum.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.mins.len() * HASH_BYTES + CHECKSUM);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(HASH_BITS_BYTE);
        // k and the hashes kept are at most MAX_K (65,536).
        out.extend_from_slice(&crate::util::convert::u32_saturating(self.k).to_le_bytes());
        out.extend_from_slice(&crate::util::convert::u32_saturating(self.mins.len()).to_le_bytes());
        out.extend_from_slice(&self.distinct.to_le_bytes());
        for h in &self.mins {
            out.extend_from_slice(&h.to_le_bytes()[..HASH_BYTES]);
        }
        // Version 2: the heavy contents, ascending (their counts stay local).
        let mut heavy: Vec<u64> = self.heavy_contents().into_iter().map(|(h, _)| h).collect();
        heavy.sort_unstable();
        out.extend_from_slice(&crate::util::convert::u32_saturating(heavy.len()).to_le_bytes());
        for h in &heavy {
            out.extend_from_slice(&h.to_le_bytes()[..HASH_BYTES]);
        }
        let sum = xxh3_64(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Reads a sketch a peer sent: every field checked, nothing allocated beyond what the
    /// (bounded) header announces and the length confirms.
    pub fn decode(bytes: &[u8]) -> Result<Sketch, DecodeError> {
        if bytes.len() < HEADER + CHECKSUM {
            return Err(DecodeError::Short(bytes.len()));
        }
        if &bytes[..4] != MAGIC {
            return Err(DecodeError::Magic);
        }
        let version = bytes[4];
        if version != 1 && version != VERSION {
            return Err(DecodeError::Version(version));
        }
        if u32::from(bytes[5]) != HASH_BITS {
            return Err(DecodeError::HashBits(bytes[5]));
        }
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let (k, count) = (u32_at(6), u32_at(10));
        if k == 0 || k as usize > MAX_K {
            return Err(DecodeError::K(k));
        }
        if count > k {
            return Err(DecodeError::Count { count, k });
        }
        let hashes_end = HEADER + count as usize * HASH_BYTES;
        let heavy_count = if version == 1 {
            0
        } else {
            let Some(c) = bytes.get(hashes_end..hashes_end + HEAVY_COUNT) else {
                return Err(DecodeError::Short(bytes.len()));
            };
            let c = u32::from_le_bytes(c.try_into().expect("4 bytes"));
            if c as usize > MAX_HEAVY {
                return Err(DecodeError::Heavy(c));
            }
            c as usize
        };
        let heavy_start = hashes_end + if version == 1 { 0 } else { HEAVY_COUNT };
        let want = heavy_start + heavy_count * HASH_BYTES + CHECKSUM;
        if bytes.len() != want {
            return Err(DecodeError::Length {
                got: bytes.len(),
                want,
            });
        }
        let body = &bytes[..want - CHECKSUM];
        let sum = u64::from_le_bytes(bytes[want - CHECKSUM..].try_into().expect("8 bytes"));
        if xxh3_64(body) != sum {
            return Err(DecodeError::Checksum);
        }
        let distinct = u64::from_le_bytes(bytes[14..22].try_into().expect("8 bytes"));
        let mins = increasing_hashes(&body[HEADER..hashes_end], 0)?
            .into_iter()
            .collect();
        let heavy = increasing_hashes(&body[heavy_start..], count as usize)?
            .into_iter()
            .map(|h| (h, HEAVY_MIN_REPEATS))
            .collect();
        Ok(Sketch {
            k: k as usize,
            mins,
            distinct,
            repeats: HashMap::new(),
            heavy,
        })
    }
}

/// The hashes of a wire list (6 bytes each), refused unless strictly increasing; `at`: the
/// list's first index among the sketch's hashes, for the error.
fn increasing_hashes(list: &[u8], at: usize) -> Result<Vec<u64>, DecodeError> {
    let mut out: Vec<u64> = Vec::with_capacity(list.len() / HASH_BYTES);
    for (i, c) in list.chunks_exact(HASH_BYTES).enumerate() {
        let mut b = [0u8; 8];
        b[..HASH_BYTES].copy_from_slice(c);
        let h = u64::from_le_bytes(b);
        if out.last().is_some_and(|p| h <= *p) {
            return Err(DecodeError::Order(at + i));
        }
        out.push(h);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn containment_counts_every_copy_of_the_held_contents() {
        // 20,000 distinct contents; the first 5,000 held three times each, the rest once;
        // the host holds contents 0..10,000 (half the distinct ones).
        let mut vm = Sketch::new(MAX_K / 8);
        for i in 0..20_000u64 {
            let h = xxh3_64(&i.to_le_bytes());
            vm.insert(h);
            if i < 5_000 {
                vm.repeat(h);
                vm.repeat(h);
            }
        }
        let host = Sketch::of_ids(MAX_K / 8, (0..10_000).chain(1_000_000..1_010_000));
        let c = vm.containment(&host);
        let near = |got: f64, want: f64| (got - want).abs() <= 0.05 * want;
        assert!(near(c.pages, 10_000.0), "{c:?}");
        // 5,000 x 3 + 5,000 x 1 copies.
        assert!(near(c.instances, 20_000.0), "{c:?}");
        // Read from the wire, copies are not known: as many as the contents.
        let wire = Sketch::decode(&vm.encode()).unwrap();
        let w = wire.containment(&host);
        assert!((w.instances - w.pages).abs() < 1e-6, "{w:?}");
        // Truncating keeps the counts of the hashes it keeps.
        let t = vm.truncated(4096).containment(&host);
        assert!(
            near(t.instances, 20_000.0) || (t.instances - 20_000.0).abs() < 2_000.0,
            "{t:?}"
        );
    }

    #[test]
    fn containment_is_within_two_percent_of_the_vm_at_the_default_k() {
        // A VM of 200,000 distinct stable pages; hosts holding 0 %, 10 %, 35 %, 80 % and
        // all of them among 500,000 pages of their own.
        let vm = Sketch::of_ids(DEFAULT_K, 0..200_000);
        for share in [0.0, 0.1, 0.35, 0.8, 1.0] {
            let held = crate::util::convert::u64_of_f64(200_000.0 * share);
            let host = Sketch::of_ids(DEFAULT_K, (0..held).chain(1_000_000..1_500_000));
            let (est, bound) = vm.overlap(&host);
            let err = (est - held as f64).abs() / 200_000.0;
            eprintln!(
                "share {share}: {est:.0} of {held} pages (error {:.2} % of the VM, bound {bound:.0})",
                err * 100.0
            );
            assert!(
                err <= 0.02,
                "share {share}: estimated {est:.0} of {held} (error {:.2} % of the VM)",
                err * 100.0
            );
            assert!(bound >= 0.0 && bound / 200_000.0 < 0.05, "bound {bound}");
        }
    }

    #[test]
    fn containment_is_within_its_bound_and_two_percent_on_a_host_of_a_few_vms() {
        // The local VM keeps a large sketch; the host publishes the default k. What the
        // estimate rests on is our hashes under the host's threshold: about
        // k x |VM| / |host|. A host of three such VMs gives ~1,000 (within 2 % of the VM);
        // a host of twenty gives ~200 (within its wider bound: the sketch's limit).
        let vm = Sketch::of_ids(MAX_K, 0..200_000);
        for (host_pages, limit) in [(400_000u64, 0.02), (4_000_000, 0.08)] {
            for share in [0.0, 0.05, 0.5, 0.95, 1.0] {
                let held = crate::util::convert::u64_of_f64(200_000.0 * share);
                let host = Sketch::of_ids(
                    DEFAULT_K,
                    (0..held).chain(10_000_000..10_000_000 + host_pages),
                );
                let c = vm.containment(&host);
                let err = (c.pages - held as f64).abs() / 200_000.0;
                eprintln!(
                    "host {host_pages}, share {share}: {:.0} of {held} (error {:.2} %, bound {:.2} %, {} sampled)",
                    c.pages,
                    err * 100.0,
                    c.bound / 2e3,
                    c.sampled
                );
                assert!(err <= limit, "share {share}: {:.0} of {held}", c.pages);
                assert!(
                    err * 200_000.0 <= c.bound.max(1.0) * 1.5,
                    "outside its bound"
                );
            }
        }
        // Both complete (small sets): exact, bound 0.
        let a = Sketch::of_ids(DEFAULT_K, 0..100);
        let c = a.containment(&Sketch::of_ids(DEFAULT_K, 40..1000));
        assert_eq!((c.pages, c.bound), (60.0, 0.0));
        // A published VM sketch is the prefix of the local one.
        assert_eq!(
            vm.truncated(256).encode().len(),
            HEADER + 256 * HASH_BYTES + HEAVY_COUNT + CHECKSUM
        );
    }

    #[test]
    fn small_sets_are_exact_and_the_wire_size_is_bounded() {
        let a = Sketch::of_ids(DEFAULT_K, 0..100);
        let b = Sketch::of_ids(DEFAULT_K, 50..300);
        assert_eq!(a.overlap(&b).0.round(), 50.0);
        assert_eq!(a.distinct(), 100.0);
        let full = Sketch::of_ids(DEFAULT_K, 0..1_000_000);
        let wire = full.encode();
        assert!(wire.len() <= 64 * 1024, "{} bytes", wire.len());
        assert_eq!(
            wire.len(),
            HEADER + DEFAULT_K * HASH_BYTES + HEAVY_COUNT + CHECKSUM
        );
        // The union's estimate of a million distinct pages.
        let est = full.union(&Sketch::of_ids(DEFAULT_K, 0..10)).distinct();
        assert!((est - 1e6).abs() / 1e6 < 0.05, "{est}");
    }

    #[test]
    fn tampered_truncated_and_oversized_sketches_are_refused() {
        let s = Sketch::of_ids(64, 0..1000);
        let wire = s.encode();
        assert_eq!(Sketch::decode(&wire).unwrap(), s);
        let mut flipped = wire.clone();
        flipped[HEADER + 3] ^= 1;
        assert_eq!(Sketch::decode(&flipped), Err(DecodeError::Checksum));
        assert!(matches!(
            Sketch::decode(&wire[..wire.len() - 1]),
            Err(DecodeError::Length { .. })
        ));
        let mut big = wire.clone();
        let over = u32::try_from(MAX_K).unwrap() + 1;
        big[6..10].copy_from_slice(&over.to_le_bytes());
        assert_eq!(Sketch::decode(&big), Err(DecodeError::K(over)));
        let mut v3 = wire.clone();
        v3[4] = 3;
        assert_eq!(Sketch::decode(&v3), Err(DecodeError::Version(3)));
        assert_eq!(Sketch::decode(b"MFSK"), Err(DecodeError::Short(4)));
        // More heavy contents than a sketch may carry (checksum made right).
        let at = wire.len() - CHECKSUM - HEAVY_COUNT;
        let mut heavy = wire[..wire.len() - CHECKSUM].to_vec();
        let over = u32::try_from(MAX_HEAVY).unwrap() + 1;
        heavy[at..].copy_from_slice(&over.to_le_bytes());
        let sum = xxh3_64(&heavy);
        heavy.extend_from_slice(&sum.to_le_bytes());
        assert_eq!(Sketch::decode(&heavy), Err(DecodeError::Heavy(over)));
        // A version-1 sketch (no heavy contents) still reads.
        let mut v1 = wire[..at].to_vec();
        v1[4] = 1;
        let sum = xxh3_64(&v1);
        v1.extend_from_slice(&sum.to_le_bytes());
        assert_eq!(Sketch::decode(&v1).unwrap(), s);
    }

    /// A guest's copies are heavy-tailed (a lab guest: 24 contents held 700 times each,
    /// half its pages, beside 19,000 held once or twice). The copies a host holds are
    /// counted within 5 % at the default k, and the heavy contents cross the wire.
    #[test]
    fn heavy_contents_are_counted_exactly() {
        let mut vm = Sketch::new(MAX_K);
        let mut host = Sketch::new(MAX_K);
        for i in 0..19_000u64 {
            let h = xxh3_64(&i.to_le_bytes());
            vm.insert(h);
            // The host holds half the light contents and every heavy one (below).
            if i % 2 == 0 {
                host.insert(h);
            }
            if i < 24 {
                for _ in 0..699 {
                    vm.repeat(h);
                }
                if i % 2 == 1 {
                    host.insert(h);
                }
                for _ in 0..99 {
                    host.repeat(h);
                }
            }
        }
        for i in 1_000_000..1_040_000u64 {
            host.insert(xxh3_64(&i.to_le_bytes()));
        }
        // 24 x 700 heavy copies + half of the 18,976 light contents.
        let want = 24.0 * 700.0 + 9_488.0;
        let published = Sketch::decode(&host.truncated(DEFAULT_K).encode()).unwrap();
        let c = vm.containment(&published);
        assert!(
            (c.instances - want).abs() <= 0.05 * want,
            "{:.0} copies of {want}",
            c.instances
        );
        // Without its heavy list the host's sample holds a few heavy contents or none.
        let mut bare = published.clone();
        bare.heavy.clear();
        let b = vm.containment(&bare);
        eprintln!(
            "with heavy: {:.0}, without: {:.0}, want {want}",
            c.instances, b.instances
        );
    }

    proptest! {
        #[test]
        fn encoding_round_trips(ids in prop::collection::vec(any::<u64>(), 0..2000), k in 1usize..300) {
            let s = Sketch::of_ids(k, ids.into_iter());
            prop_assert_eq!(Sketch::decode(&s.encode()).unwrap(), s);
        }

        #[test]
        fn the_decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            let _ = Sketch::decode(&bytes);
            for version in [1u8, 2] {
                let mut framed = b"MFSK".to_vec();
                framed.extend_from_slice(&[version, 0x30]);
                framed.extend_from_slice(&bytes);
                let _ = Sketch::decode(&framed);
            }
        }
    }
}
