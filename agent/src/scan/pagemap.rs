//! /proc/PID/pagemap and /proc/kpageflags: which pages are present (never read the others:
//! reading must not fault guest memory in), their frame, and whether KSM merged the frame.

use std::{fs::File, io, os::unix::fs::FileExt as _};

/// One pagemap entry (see Documentation/admin-guide/mm/pagemap.rst).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry(pub u64);

impl Entry {
    pub fn present(self) -> bool {
        self.0 & (1 << 63) != 0
    }
    pub fn swapped(self) -> bool {
        self.0 & (1 << 62) != 0
    }
    /// Page frame number (bits 0-54; 0 without CAP_SYS_ADMIN).
    pub fn pfn(self) -> u64 {
        self.0 & ((1 << 55) - 1)
    }
}

/// `KPF_KSM` in /proc/kpageflags.
const KPF_KSM: u64 = 1 << 21;
/// `KPF_ZERO_PAGE`.
const KPF_ZERO_PAGE: u64 = 1 << 24;
/// `KPF_THP`.
const KPF_THP: u64 = 1 << 22;

/// Open pagemap of one process plus the host's kpageflags.
pub struct Pagemap {
    pagemap: File,
    kpageflags: Option<File>,
}

impl Pagemap {
    pub fn open(pid: u32) -> io::Result<Pagemap> {
        Ok(Pagemap {
            pagemap: File::open(format!("/proc/{pid}/pagemap"))?,
            kpageflags: File::open("/proc/kpageflags").ok(),
        })
    }

    /// Entries for `pages` pages from virtual address `start`, into `out` (reused).
    pub fn read(&self, start: u64, pages: usize, out: &mut Vec<Entry>) -> io::Result<()> {
        let mut raw = vec![0u8; pages * 8];
        self.pagemap.read_exact_at(&mut raw, (start / 4096) * 8)?;
        out.clear();
        out.extend(
            raw.chunks_exact(8)
                .map(|c| Entry(u64::from_le_bytes(c.try_into().expect("8 bytes")))),
        );
        Ok(())
    }

    /// (KSM-merged, shared zero page, part of a THP) for a frame; all false when
    /// kpageflags is unreadable.
    pub fn frame_flags(&self, pfn: u64) -> (bool, bool, bool) {
        let Some(f) = &self.kpageflags else {
            return (false, false, false);
        };
        let mut b = [0u8; 8];
        if pfn == 0 || f.read_exact_at(&mut b, pfn * 8).is_err() {
            return (false, false, false);
        }
        let flags = u64::from_le_bytes(b);
        (
            flags & KPF_KSM != 0,
            flags & KPF_ZERO_PAGE != 0,
            flags & KPF_THP != 0,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_bits() {
        let e = Entry((1 << 63) | 0x1234);
        assert!(e.present() && !e.swapped());
        assert_eq!(e.pfn(), 0x1234);
        assert!(Entry(1 << 62).swapped());
        assert!(!Entry(0).present());
    }
}
