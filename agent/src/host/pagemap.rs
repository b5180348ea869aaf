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
    /// In RAM now (present, not swapped out): the only pages memfabric reads (reading
    /// another would fault it in, or swap it back).
    pub fn in_ram(self) -> bool {
        self.present() && !self.swapped()
    }
    /// Mapped once only (bit 56, `PM_MMAP_EXCLUSIVE`): not a KSM page two pages share, not
    /// the zero page (no struct page behind it: never exclusive).
    pub fn exclusive(self) -> bool {
        self.0 & (1 << 56) != 0
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

    /// The kpageflags of every entry's frame into `out` (reused): one read per run of
    /// consecutive frame numbers (a huge page's 512 frames cost one system call instead of
    /// 512), none for a frame equal to the previous one (pages merged into one KSM page),
    /// and none for a lone frame mapped once only: it is neither a KSM page that saves
    /// anything nor the zero page, and a huge page's frames come in runs. A guest's
    /// unmerged small pages are such lone frames, one `pread` each: a calm pass over a
    /// 256 MiB holder (one page in eight read, the flags of every page) took 35-38 ms of
    /// CPU with them, 27-30 ms without (two runs of three interleaved rounds).
    pub fn frame_flags_of(&self, entries: &[Entry], out: &mut Vec<FrameFlags>) {
        out.clear();
        let Some(f) = &self.kpageflags else {
            out.resize(entries.len(), FrameFlags::default());
            return;
        };
        let mut raw = [0u8; 8 * 512];
        let mut i = 0;
        while i < entries.len() {
            let first = entries[i].pfn();
            if i > 0 && first != 0 && first == entries[i - 1].pfn() {
                out.push(out[i - 1]);
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < entries.len()
                && j - i < 512
                && first != 0
                && entries[j].pfn() == first + (j - i) as u64
            {
                j += 1;
            }
            let buf = &mut raw[..8 * (j - i)];
            let lone_exclusive = j == i + 1 && entries[i].exclusive();
            if first == 0 || lone_exclusive || f.read_exact_at(buf, first * 8).is_err() {
                out.extend(std::iter::repeat_n(FrameFlags::default(), j - i));
            } else {
                out.extend(buf.chunks_exact(8).map(|c| {
                    let flags = u64::from_le_bytes(c.try_into().expect("8 bytes"));
                    FrameFlags {
                        ksm: flags & KPF_KSM != 0,
                        zero_page: flags & KPF_ZERO_PAGE != 0,
                        thp: flags & KPF_THP != 0,
                    }
                }));
            }
            i = j;
        }
    }
}

/// What kpageflags says of a frame (all false when it cannot be read).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameFlags {
    /// A KSM page.
    pub ksm: bool,
    /// The kernel's shared zero page.
    pub zero_page: bool,
    /// Part of a transparent huge page.
    pub thp: bool,
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
        assert!(Entry(1 << 56).exclusive() && !Entry(1 << 63).exclusive());
    }

    /// What the kpageflags shortcut rests on, on this kernel: a page only read maps the
    /// zero page (present, not exclusive: its flags are read), a page written is a frame
    /// of its own (exclusive: taken as neither KSM nor zero without a read).
    #[test]
    fn the_zero_page_is_never_exclusive_and_a_written_page_is() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED (not root): frame numbers and kpageflags need root");
            return;
        }
        const PAGES: usize = 4;
        // SAFETY: a fresh private anonymous mapping of this test's, unmapped below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGES * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let p = base.cast::<u8>();
        // SAFETY: within the mapping; volatile so that the read and writes happen.
        unsafe {
            libc::madvise(base, PAGES * 4096, libc::MADV_NOHUGEPAGE);
            std::ptr::read_volatile(p);
            std::ptr::write_volatile(p.add(2 * 4096), 1);
        }
        let map = Pagemap::open(std::process::id()).unwrap();
        let mut entries = Vec::new();
        map.read(base as u64, PAGES, &mut entries).unwrap();
        let mut flags = Vec::new();
        map.frame_flags_of(&entries[..1], &mut flags);
        let (zero, written) = (entries[0], entries[2]);
        assert!(zero.in_ram() && !zero.exclusive(), "{zero:x?}");
        assert!(flags[0].zero_page, "the zero page's flags are read");
        assert!(written.in_ram() && written.exclusive(), "{written:x?}");
        map.frame_flags_of(&entries[2..3], &mut flags);
        assert_eq!(flags[0], FrameFlags::default());
        assert!(!entries[1].present() && !entries[3].present());
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(base, PAGES * 4096) };
    }
}
