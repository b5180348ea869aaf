//! A test workload with exactly known memory behaviour, driven line by line over stdin:
//!
//! ```text
//! alloc PAGES same|unique   map PAGES fresh anonymous pages (no THP) and write each once;
//!                           replies `ok REGION`
//! mergeable REGION          madvise(MADV_MERGEABLE) the region; replies `ok`
//! unmergeable REGION        madvise(MADV_UNMERGEABLE) the region, one call; replies `ok`
//! touch REGION COUNT        write one word into each of the first COUNT pages; `ok`
//! alloc PAGES zero          (also) pages written with zeros: present, content zero
//! sparse PAGES              map PAGES pages and write every other one (half stay absent)
//! churn REGION              a thread rewrites every page of REGION every 20 ms
//! flip REGION MILLIS        a thread rewrites every page of REGION every MILLIS ms with
//!                           one content, then the other, in turn (the lab's churn guests)
//! fault PAGES               map PAGES fresh pages, write one byte to each (one write
//!                           fault per page), unmap; replies `ok NANOSECONDS` (the loop)
//! where REGION              replies `ok START PAGES` (START in hex, 0x...)
//! stallwatch REGION         a thread faults the region's last page in again and again
//!                           (MADV_DONTNEED, then a write: the mmap lock a vCPU's fault
//!                           takes) and remembers the longest gap between two faults
//! stall                     replies `ok MICROSECONDS`: that longest gap, then resets it
//! sigwatch                  records every SIGUSR1 with its siginfo (SA_RESTART)
//! signals                   replies `ok COUNT SI_CODE SI_VALUE` of the last SIGUSR1
//! exit                      exits 0
//! ```
//! Every reply is one line; errors reply `err MESSAGE`. Starts by printing `ready PID`.
//!
//! Other modes (first argument):
//! - `seccomp trap-madvise|allow-ksm`: first installs a seccomp filter on itself, as a
//!   sandboxed VMM does (Firecracker's VMM thread): `madvise` traps (SIGSYS; the handler
//!   exits with 99) unless its advice is MADV_DONTNEED (or MADV_NOHUGEPAGE, which `alloc`
//!   uses), or, with `allow-ksm`, also MADV_MERGEABLE and MADV_UNMERGEABLE. Then reads
//!   commands as above.
//! - `inject PID START END merge|unmerge TIMEOUT_MS`: a daemon stand-in: runs memfabric's
//!   injection into PID, prints `ok` or `err MESSAGE`, exits.

use std::io::{self, BufRead, Write};

const PAGE: usize = 4096;

struct Region {
    ptr: *mut u8,
    pages: usize,
}

/// Maps `pages` fresh anonymous private pages without transparent huge pages (one fault
/// per page), nothing touched yet.
fn map_fresh(pages: usize) -> Result<*mut u8, String> {
    let len = pages * PAGE;
    // SAFETY: anonymous private mapping, no file; checked for MAP_FAILED.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(format!("mmap: {}", io::Error::last_os_error()));
    }
    // SAFETY: the range was just mapped.
    if unsafe { libc::madvise(ptr, len, libc::MADV_NOHUGEPAGE) } != 0 {
        return Err(format!(
            "madvise(NOHUGEPAGE): {}",
            io::Error::last_os_error()
        ));
    }
    Ok(ptr.cast())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fill {
    Same,
    Unique,
    Zero,
    /// Page p holds content number `from + p`, the same in every process: workloads with
    /// overlapping id ranges share exactly the overlap (the fabric tests).
    Ids(u64),
}

/// Unique pages written so far: every unique page of every region differs from every
/// other, in this process and (the PID is in each word) in any other workload.
static UNIQUE_SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn alloc(pages: usize, fill: Fill) -> Result<Region, String> {
    let base = map_fresh(pages)?;
    let pid = u64::from(std::process::id()) & 0xff_ffff;

    for p in 0..pages {
        // SAFETY: inside the mapping. The first access to each page is this write.
        let page = unsafe { std::slice::from_raw_parts_mut(base.add(p * PAGE), PAGE) };
        if fill == Fill::Zero {
            page.fill(0);
        } else if fill == Fill::Same {
            page.fill(0x5a);
        } else if let Fill::Ids(from) = fill {
            let id = from + p as u64;
            for (i, chunk) in page.chunks_exact_mut(8).enumerate() {
                let v = 0xfab << 52 | (id & ((1 << 43) - 1)) << 9 | i as u64;
                chunk.copy_from_slice(&v.to_le_bytes());
            }
        } else {
            let serial = UNIQUE_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            for (i, chunk) in page.chunks_exact_mut(8).enumerate() {
                let v = pid << 40 | (serial & 0x7fff_ffff) << 9 | i as u64;
                chunk.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    Ok(Region { ptr: base, pages })
}

/// The write-fault loop of the probe benchmark: times only the faults.
fn fault(pages: usize) -> Result<u128, String> {
    let base = map_fresh(pages)?;

    let start = std::time::Instant::now();
    for p in 0..pages {
        // SAFETY: inside the mapping; volatile so every page is really written.
        unsafe { base.add(p * PAGE).write_volatile(1) };
    }
    let ns = start.elapsed().as_nanos();
    // SAFETY: our mapping, no references into it remain.
    unsafe { libc::munmap(base.cast(), pages * PAGE) };
    Ok(ns)
}

/// Creates a KVM VM (`KVM_CREATE_VM` on /dev/kvm) and returns its file.
fn kvm_vm() -> Result<std::fs::File, String> {
    use std::os::fd::FromRawFd as _;
    use std::os::unix::io::AsRawFd as _;
    const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm: {e}"))?;
    // SAFETY: a valid fd and the documented argument (machine type 0).
    let fd = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0) };
    if fd < 0 {
        return Err(format!("KVM_CREATE_VM: {}", io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// `memfabric-workload heartbeat FILE PAGES THREADS`: maps PAGES pages (printed as
/// `ready PID ADDR PAGES`), then every thread (the main one included) sleeps in nanosleep
/// and bumps its own counter in FILE (8 bytes per thread) every 10 ms: a target whose
/// every thread is in a restartable sleep, and whose progress the test can see.
fn heartbeat(path: &str, pages: usize, threads: usize) -> ! {
    use std::os::unix::fs::FileExt as _;
    let base = map_fresh(pages).expect("mapping");
    // SAFETY: inside the fresh mapping.
    unsafe { base.write_volatile(1) };
    let file = std::sync::Arc::new(
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)
            .expect("heartbeat file"),
    );
    println!("ready {} {:#x} {pages}", std::process::id(), base as usize);
    io::stdout().flush().unwrap();
    let beat = move |slot: usize, file: std::sync::Arc<std::fs::File>| -> ! {
        let mut n = 0u64;
        loop {
            std::thread::sleep(std::time::Duration::from_millis(10));
            n += 1;
            let _ = file.write_all_at(&n.to_le_bytes(), (slot * 8) as u64);
        }
    };
    for slot in 1..threads.max(1) {
        let f = file.clone();
        std::thread::spawn(move || beat(slot, f));
    }
    beat(0, file)
}

/// `seccomp MODE`: see the module doc.
fn sandbox(mode: &str) -> Result<(), String> {
    extern "C" fn on_sigsys(_: libc::c_int) {
        // SAFETY: async-signal-safe.
        unsafe { libc::_exit(99) };
    }
    const fn insn(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
        libc::sock_filter { code, jt, jf, k }
    }
    const LD_ABS: u16 = 0x20;
    const JEQ: u16 = 0x15;
    const RET: u16 = 0x06;
    let allow_ksm = match mode {
        "trap-madvise" => false,
        "allow-ksm" => true,
        m => return Err(format!("unknown seccomp mode {m:?}")),
    };
    // The workload's own madvise calls (MADV_NOHUGEPAGE for fresh regions, DONTNEED) stay
    // allowed; KSM's advice only with allow-ksm.
    let (merge, unmerge) = if allow_ksm {
        (libc::MADV_MERGEABLE as u32, libc::MADV_UNMERGEABLE as u32)
    } else {
        (libc::MADV_DONTNEED as u32, libc::MADV_DONTNEED as u32)
    };
    let prog = [
        insn(LD_ABS, 0, 0, 0), // nr
        insn(JEQ, 0, 6, libc::SYS_madvise as u32),
        insn(LD_ABS, 0, 0, 32), // args[2]: the advice
        insn(JEQ, 4, 0, libc::MADV_DONTNEED as u32),
        insn(JEQ, 3, 0, libc::MADV_NOHUGEPAGE as u32),
        insn(JEQ, 2, 0, merge),
        insn(JEQ, 1, 0, unmerge),
        insn(RET, 0, 0, libc::SECCOMP_RET_TRAP),
        insn(RET, 0, 0, libc::SECCOMP_RET_ALLOW),
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: a handler that only calls _exit; prctl with a valid program that outlives
    // the call (the kernel copies it).
    unsafe {
        libc::signal(libc::SIGSYS, on_sigsys as *const () as libc::sighandler_t);
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                std::ptr::from_ref(&fprog),
            ) != 0
        {
            return Err(format!("seccomp: {}", io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// `inject PID START END merge|unmerge TIMEOUT_MS`: see the module doc.
fn inject(args: &[String]) -> ! {
    use memfabric::actuate::inject::{Advice, madvise};
    let num = |i: usize| -> u64 {
        let a = args.get(i).map(String::as_str).unwrap_or("");
        match a.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16),
            None => a.parse(),
        }
        .unwrap_or_else(|_| panic!("inject: argument {i}: {a:?}"))
    };
    let advice = match args.get(4).map(String::as_str) {
        Some("merge") => Advice::Mergeable,
        _ => Advice::Unmergeable,
    };
    let timeout = std::time::Duration::from_millis(num(5));
    match madvise(num(1) as u32, num(2), num(3), advice, timeout) {
        Ok(_) => println!("ok"),
        Err(e) => println!("err {e}"),
    }
    std::process::exit(0)
}

/// SIGUSR1s seen by `sigwatch`, and the last one's si_code and si_value.
static SIGNALS: [std::sync::atomic::AtomicI64; 3] =
    [const { std::sync::atomic::AtomicI64::new(0) }; 3];

extern "C" fn on_sigusr1(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    use std::sync::atomic::Ordering::Relaxed;
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let (code, value) = unsafe { ((*info).si_code, (*info).si_value().sival_ptr as i64) };
    SIGNALS[1].store(i64::from(code), Relaxed);
    SIGNALS[2].store(value, Relaxed);
    SIGNALS[0].fetch_add(1, Relaxed);
}

/// The longest gap between two faults of `stallwatch`, in microseconds.
static LONGEST_GAP_US: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("heartbeat") => {
            let n = |i: usize, d: usize| args.get(i).and_then(|v| v.parse().ok()).unwrap_or(d);
            heartbeat(&args[2], n(3, 1024), n(4, 1));
        }
        Some("seccomp") => sandbox(args.get(2).map_or("", String::as_str)).expect("sandbox"),
        Some("inject") => inject(&args[1..]),
        _ => {}
    }
    let stdin = io::stdin();
    let mut out = io::stdout().lock();
    let mut regions: Vec<Region> = Vec::new();
    let mut kvm_fds: Vec<std::fs::File> = Vec::new();
    writeln!(out, "ready {}", std::process::id()).unwrap();
    out.flush().unwrap();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> Result<usize, String> {
            words
                .get(i)
                .ok_or("missing argument")?
                .parse()
                .map_err(|e| format!("{e}"))
        };
        let region = |i: usize| -> Result<&Region, String> {
            regions
                .get(num(i)?)
                .ok_or_else(|| "no such region".to_string())
        };
        let reply: Result<String, String> = match words.first().copied() {
            Some("alloc") => num(1).and_then(|pages| {
                let fill = match words.get(2).copied() {
                    Some("same") => Fill::Same,
                    Some("unique") => Fill::Unique,
                    Some("zero") => Fill::Zero,
                    Some("ids") => Fill::Ids(num(3)? as u64),
                    _ => return Err("fill must be same|unique|zero|ids FROM".into()),
                };
                let r = alloc(pages, fill)?;
                regions.push(r);
                Ok(format!("ok {}", regions.len() - 1))
            }),
            Some(cmd @ ("mergeable" | "unmergeable")) => region(1).and_then(|r| {
                let advice = if cmd == "mergeable" {
                    libc::MADV_MERGEABLE
                } else {
                    libc::MADV_UNMERGEABLE
                };
                // SAFETY: a live mapping of ours.
                let rc = unsafe { libc::madvise(r.ptr.cast(), r.pages * PAGE, advice) };
                if rc == 0 {
                    Ok("ok".into())
                } else {
                    Err(format!("madvise({cmd}): {}", io::Error::last_os_error()))
                }
            }),
            Some("touch") => region(1).and_then(|r| {
                let count = num(2)?.min(r.pages);
                for p in 0..count {
                    // SAFETY: inside a live mapping; volatile so every write happens.
                    unsafe {
                        r.ptr
                            .add(p * PAGE)
                            .cast::<u64>()
                            .write_volatile(p as u64 + 1)
                    };
                }
                Ok("ok".into())
            }),
            Some("kvm") => {
                // A KVM VM in this process (no vCPU, no memory slot): KVM's MMU notifier now
                // sees every invalidation of this mm, as it does a VMM's.
                match kvm_vm() {
                    Ok(fd) => {
                        kvm_fds.push(fd);
                        Ok("ok".into())
                    }
                    Err(e) => Err(e),
                }
            }
            Some("memwrite") => region(1).and_then(|r| {
                // Writes through /proc/self/mem: GUP with FOLL_WRITE, no user page fault,
                // the path KVM takes for a guest's write.
                use std::os::unix::fs::FileExt as _;
                let count = num(2)?.min(r.pages);
                let mem = std::fs::OpenOptions::new()
                    .write(true)
                    .open("/proc/self/mem")
                    .map_err(|e| format!("/proc/self/mem: {e}"))?;
                for p in 0..count {
                    let addr = r.ptr as u64 + (p * PAGE) as u64;
                    mem.write_all_at(&(p as u64 + 7).to_le_bytes(), addr)
                        .map_err(|e| format!("writing /proc/self/mem: {e}"))?;
                }
                Ok("ok".into())
            }),
            Some("sparse") => num(1).and_then(|pages| {
                let base = map_fresh(pages)?;
                for p in (0..pages).step_by(2) {
                    // SAFETY: inside the fresh mapping.
                    unsafe { base.add(p * PAGE).write_volatile(p as u8 | 1) };
                }
                regions.push(Region { ptr: base, pages });
                Ok(format!("ok {}", regions.len() - 1))
            }),
            Some("churn") => region(1).map(|r| {
                let (addr, pages) = (r.ptr as usize, r.pages);
                std::thread::spawn(move || {
                    let mut round = 1u64;
                    loop {
                        for p in 0..pages {
                            // SAFETY: the region is never unmapped while the process lives.
                            unsafe { ((addr + p * PAGE) as *mut u64).write_volatile(round) };
                        }
                        round += 1;
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                });
                "ok".to_owned()
            }),
            Some("flip") => region(1).and_then(|r| {
                let (addr, pages) = (r.ptr as usize, r.pages);
                let period = std::time::Duration::from_millis(num(2)? as u64);
                std::thread::spawn(move || {
                    for round in 0u64.. {
                        std::thread::sleep(period);
                        for p in 0..pages {
                            // SAFETY: the region is never unmapped while the process lives.
                            unsafe { ((addr + p * PAGE) as *mut u64).write_volatile(round % 2) };
                        }
                    }
                });
                Ok("ok".to_owned())
            }),
            Some("fault") => num(1).and_then(fault).map(|ns| format!("ok {ns}")),
            Some("stallwatch") => region(1).map(|r| {
                let last = r.ptr as usize + (r.pages - 1) * PAGE;
                std::thread::spawn(move || {
                    let mut before = std::time::Instant::now();
                    loop {
                        // SAFETY: the region's last page, never unmapped while we live.
                        unsafe {
                            libc::madvise(last as *mut libc::c_void, PAGE, libc::MADV_DONTNEED);
                            (last as *mut u64).write_volatile(1);
                        }
                        let now = std::time::Instant::now();
                        let gap = (now - before).as_micros() as u64;
                        LONGEST_GAP_US.fetch_max(gap, std::sync::atomic::Ordering::Relaxed);
                        before = now;
                        std::thread::sleep(std::time::Duration::from_micros(200));
                        before += std::time::Instant::now() - now;
                    }
                });
                "ok".to_owned()
            }),
            Some("sigwatch") => {
                // SAFETY: an async-signal-safe handler (atomics only), a zeroed sigaction
                // filled in before use.
                let rc = unsafe {
                    let mut sa: libc::sigaction = std::mem::zeroed();
                    sa.sa_sigaction = on_sigusr1 as *const () as libc::sighandler_t;
                    sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
                    libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut())
                };
                if rc == 0 {
                    Ok("ok".into())
                } else {
                    Err(format!("sigaction: {}", io::Error::last_os_error()))
                }
            }
            Some("signals") => {
                let v = |i: usize| SIGNALS[i].load(std::sync::atomic::Ordering::Relaxed);
                Ok(format!("ok {} {} {}", v(0), v(1), v(2)))
            }
            Some("stall") => Ok(format!(
                "ok {}",
                LONGEST_GAP_US.swap(0, std::sync::atomic::Ordering::Relaxed)
            )),
            Some("where") => region(1).map(|r| format!("ok {:#x} {}", r.ptr as usize, r.pages)),
            Some("exit") => std::process::exit(0),
            _ => Err(format!("unknown command {line:?}")),
        };
        match reply {
            Ok(r) => writeln!(out, "{r}"),
            Err(e) => writeln!(out, "err {e}"),
        }
        .unwrap();
        out.flush().unwrap();
    }
}
