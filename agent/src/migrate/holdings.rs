//! What the destination host holds: the pages of its own VMs, indexed by content, and the
//! compact membership filter of them the source fetches before it sends anything.
//!
//! A reference names a page by its BLAKE3 digest: a guest on the destination must not be
//! able to craft a page that passes for one of the migrating VM's and have its own bytes
//! loaded into another tenant's memory. What an index entry points at is read again and
//! its digest compared before it stands for a page, so a page changed or gone since the
//! index was built is a miss (the source sends it), never a wrong page.
//!
//! The filter and the index are keyed by a cheaper hash, XXH3-64 with a seed the
//! destination draws for each migration and sends only inside the mutual-TLS link: the
//! index hashes every page the host holds (BLAKE3 there was about 70 % of its build time)
//! and the source every page QEMU sends, and BLAKE3 is now computed only for the pages the
//! filter says the destination holds, and for the page an entry points at when it is
//! resolved. The key only finds a candidate; correctness rests on the digest. A guest
//! that does not know the seed cannot aim collisions at it (and one that did would only
//! cause misses, which the source bounds, see [`super::source`]).

use std::{collections::HashMap, fs::File, os::unix::fs::FileExt as _};

use xorf::{DmaSerializable as _, Filter as _, FilterRef as _};

use super::stream::PAGE;
use crate::host::{inventory::Vm, pagemap::Pagemap};

/// A page's content name: its BLAKE3 digest.
pub type Digest = [u8; 32];

pub fn digest(page: &[u8]) -> Digest {
    *blake3::hash(page).as_bytes()
}

/// A page's key in the filter and the index of one migration (`seed`: see the module
/// doc).
pub fn key(page: &[u8], seed: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(page, seed)
}

const DESCRIPTOR: usize = xorf::BinaryFuse16::DESCRIPTOR_LEN;
/// The key seed, before the descriptor.
const SEED_LEN: usize = 8;

/// The largest filter accepted from a peer: 32 Mi fingerprints (a destination with
/// 128 GiB of distinct guest pages).
pub const MAX_FILTER_BYTES: usize = SEED_LEN + DESCRIPTOR + (64 << 20);

/// A binary fuse filter (xorf's `BinaryFuse16`: 18 bits a page, about one false positive
/// in 65,536) of the pages a host holds. A false positive costs one resend.
#[derive(Debug, Clone)]
pub struct Filter {
    /// The seed of its keys ([`key`]).
    seed: u64,
    descriptor: [u8; DESCRIPTOR],
    fingerprints: Vec<u16>,
}

impl Filter {
    /// The filter of `keys` (sorted and deduplicated here), keyed with `seed`.
    pub fn build(mut keys: Vec<u64>, seed: u64) -> Filter {
        keys.sort_unstable();
        keys.dedup();
        let mut descriptor = [0u8; DESCRIPTOR];
        let empty = Filter {
            seed,
            descriptor,
            fingerprints: Vec::new(),
        };
        if keys.is_empty() {
            return empty;
        }
        match xorf::BinaryFuse16::try_from(&keys[..]) {
            Ok(f) => {
                f.dma_copy_descriptor_to(&mut descriptor);
                Filter {
                    seed,
                    descriptor,
                    fingerprints: f.fingerprints.to_vec(),
                }
            }
            // Construction fails only on duplicate keys, removed above; an empty filter
            // (every page sent) is the safe answer all the same.
            Err(_) => empty,
        }
    }

    /// The key of `page` in this filter.
    pub fn key(&self, page: &[u8]) -> u64 {
        key(page, self.seed)
    }

    /// A filter of no page (the destination holds none): nothing is in it.
    pub fn is_empty(&self) -> bool {
        self.fingerprints.is_empty()
    }

    pub fn contains(&self, key: u64) -> bool {
        if self.is_empty() {
            return false;
        }
        xorf::BinaryFuse16Ref::from_dma(&self.descriptor, bytemuck::cast_slice(&self.fingerprints))
            .contains(&key)
    }

    /// Its size on the wire.
    pub fn encoded_len(&self) -> usize {
        SEED_LEN + DESCRIPTOR + 2 * self.fingerprints.len()
    }

    /// The seed, the descriptor, then the fingerprints, little-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&self.seed.to_le_bytes());
        out.extend_from_slice(&self.descriptor);
        for f in &self.fingerprints {
            out.extend_from_slice(&f.to_le_bytes());
        }
        out
    }

    /// A peer's filter, checked so that no lookup can index outside it.
    pub fn decode(b: &[u8]) -> Result<Filter, String> {
        if b.len() < SEED_LEN + DESCRIPTOR
            || b.len() > MAX_FILTER_BYTES
            || !(b.len() - SEED_LEN - DESCRIPTOR).is_multiple_of(2)
        {
            return Err(format!("a filter of {} bytes", b.len()));
        }
        let mut seed = [0u8; SEED_LEN];
        seed.copy_from_slice(&b[..SEED_LEN]);
        let b = &b[SEED_LEN..];
        let mut descriptor = [0u8; DESCRIPTOR];
        descriptor.copy_from_slice(&b[..DESCRIPTOR]);
        let fingerprints: Vec<u16> = b[DESCRIPTOR..]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        if !fingerprints.is_empty() {
            let word =
                |at: usize| u64::from(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]));
            // Layout of xorf's descriptor: seed (8), segment length, its mask, segment
            // count length (4 each). A lookup reads below count_length + 2 * length.
            let (len, mask, count_len) = (word(8), word(12), word(16));
            let sound = len.is_power_of_two()
                && len <= 1 << 18
                && mask == len - 1
                && count_len % len == 0
                && count_len + 2 * len <= fingerprints.len() as u64;
            if !sound {
                return Err("a filter whose layout does not fit its fingerprints".into());
            }
        }
        Ok(Filter {
            seed: u64::from_le_bytes(seed),
            descriptor,
            fingerprints,
        })
    }
}

/// Where a page was found.
#[derive(Clone, Copy, Debug)]
struct Place {
    pid: u32,
    addr: u64,
}

/// Pages of this host's VMs by content; see the module doc.
pub struct Holdings {
    /// This index's key seed (drawn when it is built).
    seed: u64,
    index: HashMap<u64, Place>,
    mems: HashMap<u32, File>,
    /// Guest RAM read while indexing, in bytes.
    pub scanned_bytes: u64,
    /// Indexing stopped at [`MAX_INDEX_PAGES`]: the guest RAM the host's VMs map beyond
    /// it (present or not: it is not read, so not known), in bytes, is not offered.
    pub skipped_bytes: u64,
}

/// Distinct pages indexed at most: 64 GiB of distinct guest pages, an index of about
/// 0.7 GiB while a migration is received. Beyond it the filter would outgrow what a
/// source accepts ([`MAX_FILTER_BYTES`], 18 bits a page) and every migration to a large
/// host would fail; the rest of the host's RAM is not read (the index and the time to
/// build it grow with the host's guest RAM, not with the incoming VM's).
pub const MAX_INDEX_PAGES: usize = 1 << 24;

/// Bytes read from a VM at once while indexing (a job for one thread).
const CHUNK: usize = 1 << 20;
/// Threads that read and hash donor pages together: reading through /proc/PID/mem is
/// most of the work (BLAKE3, 2.4 GB/s on one core here, was most of it before the keys
/// were XXH3); a short burst of the host's cores while an operator waits for the
/// migration to begin.
const MAX_THREADS: usize = 8;
/// Guest RAM handed to the threads between two looks at the bound.
const BATCH_BYTES: u64 = 1 << 30;

/// The threads an index is built by: the host's cores, at most [`MAX_THREADS`].
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(MAX_THREADS)
}

/// A piece of one donor's RAM mapping, at most [`CHUNK`] bytes.
struct Job {
    donor: usize,
    start: u64,
    end: u64,
}

impl Job {
    fn bytes(&self) -> u64 {
        self.end - self.start
    }
}

/// What one job found: its pages' keys and places, and the bytes it read.
type Found = (Vec<(u64, Place)>, u64);

/// The keys and places of `jobs`' pages (zero pages left out) and the bytes read, per
/// job in `jobs`' order, hashed by up to `threads` threads. Only pages in RAM are read
/// (reading a page the guest never touched would fault it in, a swapped one back); a job
/// whose memory went away ends early.
fn hash_in_parallel(
    jobs: &[Job],
    donors: &[(&Vm, File, Pagemap)],
    threads: usize,
    seed: u64,
) -> Vec<Found> {
    let taken = std::sync::atomic::AtomicUsize::new(0);
    let work = || {
        let mut buf = vec![0u8; CHUNK];
        let mut entries = Vec::with_capacity(CHUNK / PAGE);
        let mut done = Vec::new();
        loop {
            let j = taken.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(job) = jobs.get(j) else {
                return done;
            };
            let (vm, mem, pagemap) = &donors[job.donor];
            let mut found = Vec::new();
            let mut read = 0u64;
            let pages = usize::try_from(job.bytes()).unwrap_or(CHUNK) / PAGE;
            if pages > 0 && pagemap.read(job.start, pages, &mut entries).is_ok() {
                let mut i = 0;
                while i < pages {
                    if !entries[i].in_ram() {
                        i += 1;
                        continue;
                    }
                    let run = entries[i..].iter().take_while(|e| e.in_ram()).count();
                    let from = job.start + (i * PAGE) as u64;
                    let Ok(n) = mem.read_at(&mut buf[..run * PAGE], from) else {
                        break;
                    };
                    read += n as u64;
                    for (k, page) in buf[..n].chunks_exact(PAGE).enumerate() {
                        if page.iter().all(|&b| b == 0) {
                            continue;
                        }
                        let addr = from + (k * PAGE) as u64;
                        found.push((key(page, seed), Place { pid: vm.pid, addr }));
                    }
                    i += run;
                }
            }
            done.push((j, (found, read)));
        }
    };
    let mut results: Vec<(usize, Found)> = if threads <= 1 || jobs.len() < 2 {
        work()
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads.min(jobs.len()))
                .map(|_| s.spawn(work))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        })
    };
    results.sort_unstable_by_key(|(j, _)| *j);
    results.into_iter().map(|(_, r)| r).collect()
}

impl Holdings {
    /// Indexes the RAM of `vms`, except those whose UUID is `exclude_uuid` (the migrating
    /// VM itself, and its incoming QEMU), up to [`MAX_INDEX_PAGES`] distinct pages. Zero
    /// pages are left out: QEMU sends those as a flag already. A VM that exits meanwhile
    /// is skipped.
    pub fn scan(vms: &[Vm], exclude_uuid: Option<&str>) -> Holdings {
        Holdings::scan_with(vms, exclude_uuid, default_threads())
    }

    /// [`Holdings::scan`] by `threads` threads (`bench index` compares one with the
    /// default).
    pub fn scan_with(vms: &[Vm], exclude_uuid: Option<&str>, threads: usize) -> Holdings {
        Holdings::scan_at_most(vms, exclude_uuid, MAX_INDEX_PAGES, threads)
    }

    fn scan_at_most(
        vms: &[Vm],
        exclude_uuid: Option<&str>,
        max_pages: usize,
        threads: usize,
    ) -> Holdings {
        let mut h = Holdings {
            // A guessed seed (the generator's clock fallback) only lets a guest aim
            // misses, which the source bounds; the digest still decides.
            seed: crate::util::random::u64_or_clock(),
            index: HashMap::new(),
            mems: HashMap::new(),
            scanned_bytes: 0,
            skipped_bytes: 0,
        };
        // The donors, opened once; a VM that exited is skipped.
        let mut donors = Vec::new();
        for vm in vms {
            if exclude_uuid.is_some() && vm.uuid.as_deref() == exclude_uuid {
                continue;
            }
            if let (Ok(mem), Ok(pagemap)) = (
                File::open(format!("/proc/{}/mem", vm.pid)),
                Pagemap::open(vm.pid),
            ) {
                donors.push((vm, mem, pagemap));
            }
        }
        let jobs: Vec<Job> = donors
            .iter()
            .enumerate()
            .flat_map(|(donor, (vm, _, _))| {
                vm.ram.iter().flat_map(move |m| {
                    (m.span.start..m.span.end)
                        .step_by(CHUNK)
                        .map(move |start| Job {
                            donor,
                            start,
                            end: (start + CHUNK as u64).min(m.span.end),
                        })
                })
            })
            .collect();
        let mut next = 0;
        while next < jobs.len() {
            let room = max_pages.saturating_sub(h.index.len());
            if room == 0 {
                h.skipped_bytes += jobs[next..].iter().map(Job::bytes).sum::<u64>();
                break;
            }
            // A batch never holds more pages than the bound has room for (each page adds
            // at most one), so that it cannot read past the bound; one job at least.
            let limit = (room as u64 * PAGE as u64).min(BATCH_BYTES);
            let mut end = next + 1;
            let mut bytes = jobs[next].bytes();
            while end < jobs.len() && bytes + jobs[end].bytes() <= limit {
                bytes += jobs[end].bytes();
                end += 1;
            }
            let batch = &jobs[next..end];
            for (found, read) in hash_in_parallel(batch, &donors, threads, h.seed) {
                h.scanned_bytes += read;
                for (k, place) in found {
                    if h.index.len() >= max_pages {
                        break;
                    }
                    h.index.entry(k).or_insert(place);
                }
            }
            next = end;
        }
        h.mems = donors
            .into_iter()
            .map(|(vm, mem, _)| (vm.pid, mem))
            .collect();
        h
    }

    /// Distinct pages indexed.
    pub fn pages(&self) -> usize {
        self.index.len()
    }

    /// What the index holds, for the operator: its pages, the guest RAM read, and what
    /// the bound left out.
    pub fn summary(&self) -> String {
        let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
        let mut s = format!(
            "{} distinct pages ({:.0} MiB of guest RAM read)",
            self.pages(),
            mib(self.scanned_bytes)
        );
        if self.skipped_bytes > 0 {
            s += &format!(
                "; {:.0} MiB more not offered (the index holds at most {MAX_INDEX_PAGES} pages)",
                mib(self.skipped_bytes)
            );
        }
        s
    }

    pub fn filter(&self) -> Filter {
        Filter::build(self.index.keys().copied().collect(), self.seed)
    }

    /// The page of key `k` (see the module doc) named `d`, read now from the VM that held
    /// it and checked against `d`.
    pub fn resolve(&self, k: u64, d: &Digest, out: &mut [u8; PAGE]) -> bool {
        let Some(place) = self.index.get(&k) else {
            return false;
        };
        let Some(mem) = self.mems.get(&place.pid) else {
            return false;
        };
        matches!(mem.read_at(out, place.addr), Ok(PAGE)) && digest(out) == *d
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::host::inventory::{Mergeability, RamMapping};

    /// `pages` in this process's heap (page-aligned), standing in for a donor VM's RAM:
    /// the buffer (keep it alive) and the VM.
    pub(crate) fn donor(pages: &[[u8; PAGE]]) -> (Vec<u8>, Vm) {
        let mut ram = vec![0u8; (pages.len() + 1) * PAGE];
        let off = ram.as_ptr().align_offset(PAGE);
        for (i, p) in pages.iter().enumerate() {
            ram[off + i * PAGE..off + (i + 1) * PAGE].copy_from_slice(p);
        }
        let base = ram.as_ptr() as u64 + off as u64;
        let len = (pages.len() * PAGE) as u64;
        let vm = Vm {
            name: "donor".into(),
            guest_memory_bytes: len,
            ram: vec![RamMapping {
                span: crate::addresses::GuestSpan::new(base, base + len),
                backing: "anon".into(),
                mergeable: false,
            }],
            mergeability: Mergeability::Unknown,
            ..Vm::guest(std::process::id())
        };
        (ram, vm)
    }

    #[test]
    fn a_filter_holds_its_keys_and_few_others() {
        let keys: Vec<u64> = (0..100_000u64).map(|i| key(&i.to_le_bytes(), 7)).collect();
        let f = Filter::decode(&Filter::build(keys.clone(), 7).encode()).unwrap();
        assert!(keys.iter().all(|&k| f.contains(k)));
        assert_eq!(
            f.key(&5u64.to_le_bytes()),
            keys[5],
            "the seed travels with it"
        );
        let others = (100_000..200_000u64)
            .filter(|i| f.contains(f.key(&i.to_le_bytes())))
            .count();
        assert!(others < 20, "{others} false positives in 100,000");
        assert!(f.encoded_len() < 100_000 * 5 / 2, "{}", f.encoded_len());
        let empty = Filter::decode(&Filter::build(Vec::new(), 7).encode()).unwrap();
        assert!(!empty.contains(keys[0]));
    }

    #[test]
    fn a_forged_filter_is_refused_or_harmless() {
        let good = Filter::build((0..1000u64).collect(), 7).encode();
        for i in SEED_LEN..SEED_LEN + DESCRIPTOR {
            for v in [0u8, 1, 0x7f, 0xff] {
                let mut b = good.clone();
                b[i] = v;
                if let Ok(f) = Filter::decode(&b) {
                    for k in 0..10_000u64 {
                        f.contains(k.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                    }
                }
            }
        }
        assert!(Filter::decode(&good[..good.len() - 1]).is_err());
        assert!(Filter::decode(&good[..SEED_LEN + DESCRIPTOR + 2]).is_err());
        assert!(Filter::decode(&[0u8; 3]).is_err());
    }

    #[test]
    fn a_page_is_resolved_only_while_it_is_what_was_named() {
        let (mut ram, vm) = donor(&[[1u8; PAGE], [2u8; PAGE], [3u8; PAGE], [4u8; PAGE]]);
        let h = Holdings::scan(std::slice::from_ref(&vm), None);
        assert_eq!(h.pages(), 4);
        let named = digest(&[3u8; PAGE]);
        let f = h.filter();
        let k = f.key(&[3u8; PAGE]);
        let mut out = [0u8; PAGE];
        assert!(f.contains(k));
        assert!(h.resolve(k, &named, &mut out));
        assert_eq!(out, [3u8; PAGE]);
        // A key that finds a page whose digest is not the one named: a miss (a collision,
        // or a forged reference).
        assert!(!h.resolve(k, &digest(&[4u8; PAGE]), &mut out));
        // Another migration's index draws another seed: its keys are not these.
        let again = Holdings::scan(std::slice::from_ref(&vm), None);
        assert_ne!(again.filter().key(&[3u8; PAGE]), k);
        // The page changes: a miss, not a wrong page.
        let off = ram.as_ptr().align_offset(PAGE);
        ram[off + 2 * PAGE] = 9;
        assert!(!h.resolve(k, &named, &mut out));
        assert!(!h.resolve(f.key(&[7u8; PAGE]), &digest(&[7u8; PAGE]), &mut out));
        // The migrating VM's own UUID is left out.
        let mine = Vm {
            uuid: Some("u".into()),
            ..vm
        };
        assert_eq!(Holdings::scan(&[mine], Some("u")).pages(), 0);
    }

    #[test]
    fn only_pages_in_ram_are_read_and_untouched_memory_stays_untouched() {
        const PAGES: usize = 64;
        // SAFETY: a fresh private anonymous mapping, unmapped below; nothing else uses it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGES * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        // Pages 0..3 and 40 written, the rest never touched.
        for (fill, p) in [(1u8, 0usize), (2, 1), (3, 2), (4, 40)] {
            // SAFETY: inside the mapping (p < PAGES), which is writable.
            unsafe { base.cast::<u8>().add(p * PAGE).write_bytes(fill, PAGE) };
        }
        let start = base as u64;
        let (_, vm) = donor(&[]);
        let vm = Vm {
            ram: vec![RamMapping {
                span: crate::addresses::GuestSpan::new(start, start + (PAGES * PAGE) as u64),
                backing: "anon".into(),
                mergeable: false,
            }],
            ..vm
        };
        let h = Holdings::scan(std::slice::from_ref(&vm), None);
        assert_eq!(h.pages(), 4);
        assert_eq!(
            h.scanned_bytes,
            4 * PAGE as u64,
            "only the pages in RAM are read"
        );
        let mut entries = Vec::new();
        Pagemap::open(std::process::id())
            .unwrap()
            .read(start, PAGES, &mut entries)
            .unwrap();
        let present: Vec<usize> = (0..PAGES).filter(|&i| entries[i].present()).collect();
        assert_eq!(present, [0, 1, 2, 40], "indexing faulted pages in");
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(base, PAGES * PAGE) };
    }

    #[test]
    fn indexing_stops_at_its_bound_and_counts_what_it_left_out() {
        let pages: Vec<[u8; PAGE]> = (1..=8u8).map(|b| [b; PAGE]).collect();
        let (_ram, vm) = donor(&pages);
        let other = Vm {
            pid: vm.pid,
            uuid: Some("other".into()),
            ..vm.clone()
        };
        let h = Holdings::scan_at_most(&[vm, other], None, 5, 2);
        assert_eq!(h.pages(), 5);
        // The first VM's chunk was read whole (its last 3 pages not indexed), the second
        // VM not at all.
        assert_eq!(h.scanned_bytes, 8 * PAGE as u64);
        assert_eq!(h.skipped_bytes, 8 * PAGE as u64);
        let f = Filter::decode(&h.filter().encode()).expect("a filter a source accepts");
        assert!(f.contains(f.key(&[1u8; PAGE])));
    }

    #[test]
    fn the_largest_index_makes_a_filter_a_source_accepts() {
        // 18 bits a page (BinaryFuse16's 1.125 fingerprints a key, plus segment rounding).
        // The filter mixes its keys itself: consecutive ones are as good as any (and are
        // sorted already, which keeps this test quick).
        let keys: Vec<u64> = (0..MAX_INDEX_PAGES as u64).collect();
        let f = Filter::build(keys, 7);
        assert!(
            f.encoded_len() <= MAX_FILTER_BYTES,
            "{} bytes",
            f.encoded_len()
        );
        assert!(!f.fingerprints.is_empty());
    }
}
