//! Leaves every other module may use, which use nothing of memfabric's.

pub mod clock;
pub mod convert;
pub mod counted;
pub mod pem;
pub mod random;

/// Hands memory freed since the last call back to the kernel. glibc keeps what a thread
/// frees in that thread's arena until the arena's top is free: the scan builds and drops
/// a content table and a report every round, and at 16 GiB of guests two arenas held
/// 79 MiB of the daemon's 108 MiB RSS (its page histories are 32 MiB of that). A no-op
/// where the C library is not glibc.
pub fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: no arguments to get wrong; it only walks the allocator's free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// CPU time this thread has used, in seconds (what the scan's pacing and the
/// controllers' own cost are measured in).
pub fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Bytes in a page (`memfabric_common::PAGE_SHIFT`, as the probes count them).
pub const PAGE: usize = 1 << memfabric_common::PAGE_SHIFT;
