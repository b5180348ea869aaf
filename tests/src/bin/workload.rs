//! A test workload with exactly known memory behaviour, driven line by line over stdin:
//!
//! ```text
//! alloc PAGES same|unique   map PAGES fresh anonymous pages (no THP) and write each once;
//!                           replies `ok REGION`
//! mergeable REGION          madvise(MADV_MERGEABLE) the region; replies `ok`
//! touch REGION COUNT        write one word into each of the first COUNT pages; `ok`
//! alloc PAGES zero          (also) pages written with zeros: present, content zero
//! sparse PAGES              map PAGES pages and write every other one (half stay absent)
//! churn REGION              a thread rewrites every page of REGION every 20 ms
//! flip REGION MILLIS        a thread rewrites every page of REGION every MILLIS ms with
//!                           one content, then the other, in turn (the lab's churn guests)
//! fault PAGES               map PAGES fresh pages, write one byte to each (one write
//!                           fault per page), unmap; replies `ok NANOSECONDS` (the loop)
//! where REGION              replies `ok START PAGES` (START in hex, 0x...)
//! exit                      exits 0
//! ```
//! Every reply is one line; errors reply `err MESSAGE`. Starts by printing `ready PID`.

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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("heartbeat") {
        let n = |i: usize, d: usize| args.get(i).and_then(|v| v.parse().ok()).unwrap_or(d);
        heartbeat(&args[2], n(3, 1024), n(4, 1));
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
            Some("mergeable") => region(1).and_then(|r| {
                // SAFETY: a live mapping of ours.
                let rc =
                    unsafe { libc::madvise(r.ptr.cast(), r.pages * PAGE, libc::MADV_MERGEABLE) };
                if rc == 0 {
                    Ok("ok".into())
                } else {
                    Err(format!(
                        "madvise(MERGEABLE): {}",
                        io::Error::last_os_error()
                    ))
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
