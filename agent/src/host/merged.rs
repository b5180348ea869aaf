//! Finds the pages of a process that KSM has already merged (pagemap + kpageflags
//! `KPF_KSM`), without reading their contents: what the probes cannot have seen merge
//! because it happened before memfabric started, or before it tracked the process.

use std::io;

use procfs::process::{MMPermissions, Process};

use super::pagemap::{Entry, FrameFlags, Pagemap};

/// Pages per pagemap read (32 KiB of entries).
const CHUNK: usize = 4096;

/// How many pages of `[start, end)` of `pid` are mapped to KSM pages: what taking the range
/// out of KSM would copy (every merged page gets a private copy again).
pub fn count_in(pid: u32, start: u64, end: u64) -> io::Result<u64> {
    let pagemap = Pagemap::open(pid)?;
    let (mut entries, mut flags): (Vec<Entry>, Vec<FrameFlags>) = (Vec::new(), Vec::new());
    let mut n = 0;
    let mut at = start;
    while at < end {
        let pages = (((end - at) / 4096) as usize).min(CHUNK);
        pagemap.read(at, pages, &mut entries)?;
        pagemap.frame_flags_of(&entries, &mut flags);
        n += flags
            .iter()
            .zip(&entries)
            .filter(|(f, e)| f.ksm && e.present())
            .count() as u64;
        at += pages as u64 * 4096;
    }
    Ok(n)
}

/// Page-aligned addresses of the pages of `pid` that are KSM pages, at most `limit`, and
/// no more than the `expected` the kernel counts for the process (`ksm_merging_pages`):
/// the walk stops as soon as it has them all. KSM only merges private writable memory,
/// so only those mappings are walked.
pub fn find(pid: u32, expected: usize, limit: usize) -> io::Result<Vec<u64>> {
    let want = expected.min(limit);
    let mut found = Vec::new();
    if want == 0 {
        return Ok(found);
    }
    let proc_ = Process::new(pid as i32).map_err(io::Error::other)?;
    let maps = proc_.maps().map_err(io::Error::other)?;
    let pagemap = Pagemap::open(pid)?;
    let (mut entries, mut flags): (Vec<Entry>, Vec<FrameFlags>) = (Vec::new(), Vec::new());
    for m in maps.into_iter().filter(|m| {
        m.perms
            .contains(MMPermissions::WRITE | MMPermissions::PRIVATE)
            && !m.perms.contains(MMPermissions::SHARED)
    }) {
        let (start, end) = m.address;
        let mut at = start;
        while at < end {
            let pages = (((end - at) / 4096) as usize).min(CHUNK);
            if pagemap.read(at, pages, &mut entries).is_err() {
                break; // unmapped meanwhile
            }
            pagemap.frame_flags_of(&entries, &mut flags);
            for (i, f) in flags.iter().enumerate() {
                if f.ksm && entries[i].present() {
                    found.push(at + i as u64 * 4096);
                    if found.len() >= want {
                        return Ok(found);
                    }
                }
            }
            at += pages as u64 * 4096;
        }
    }
    Ok(found)
}
