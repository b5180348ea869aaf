//! Which processes are VMs: QEMU, Firecracker, Cloud Hypervisor, crosvm, or any PID or
//! command-line pattern the operator names; their name and UUID from the command line;
//! the mappings that hold guest RAM and whether KSM can merge them at all.

use std::{collections::BTreeMap, fs};

use procfs::process::{MMPermissions, MMapPath, Process, VmFlags};
use regex::Regex;
use serde::{Deserialize, Serialize};

/// Name and UUID from a QEMU-style command line (`-name N` or `-name guest=N,...`,
/// `-uuid U`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmIdentity {
    pub name: Option<String>,
    pub uuid: Option<String>,
}

/// Longest VM name kept (libvirt's own limit is far below; a name is a label, not data).
const MAX_NAME_CHARS: usize = 64;

/// A name from a command line, made safe to print and to use as a label: anyone who can
/// start a process chooses it. Control characters (terminal escapes, BEL, C1 controls)
/// and bidirectional overrides become `?`, and it is cut at [`MAX_NAME_CHARS`].
pub fn clean_name(raw: &str) -> String {
    raw.chars()
        .take(MAX_NAME_CHARS)
        .map(|c| {
            let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
            if c.is_control() || bidi { '?' } else { c }
        })
        .collect()
}

/// A UUID as QEMU takes it (hex digits and dashes), or nothing.
fn clean_uuid(raw: &str) -> Option<String> {
    (raw.len() <= 36 && !raw.is_empty() && raw.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
        .then(|| raw.to_owned())
}

/// Parses NUL-separated `/proc/PID/cmdline` bytes.
pub fn identity_from_cmdline(cmdline: &[u8]) -> VmIdentity {
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let value = |flag: &str| {
        args.windows(2)
            .find(|w| w[0] == flag || w[0] == format!("-{flag}"))
            .map(|w| w[1].clone())
    };
    let name = value("-name").map(|v| {
        // libvirt: -name guest=NAME,debug-threads=on
        clean_name(
            v.split(',')
                .find_map(|p| p.strip_prefix("guest="))
                .unwrap_or_else(|| v.split(',').next().unwrap_or(&v)),
        )
    });
    VmIdentity {
        name,
        uuid: value("-uuid").as_deref().and_then(clean_uuid),
    }
}

/// Whether a QEMU command line says its operator turned merging off: `-machine
/// ...,mem-merge=off` (libvirt's `<nosharepages/>`), or a memory backend with `merge=off`
/// (`-object memory-backend-ram,...,merge=off`, or its JSON form). memfabric leaves such a
/// guest alone: neither hints nor the fabric override an operator's explicit choice.
pub fn merge_off(args: &[String]) -> bool {
    let off = |v: &str| matches!(v, "off" | "no" | "false");
    args.windows(2).any(|w| match w[0].as_str() {
        "-machine" | "--machine" | "-M" => w[1]
            .split(',')
            .any(|p| p.strip_prefix("mem-merge=").is_some_and(off)),
        "-object" | "--object" if w[1].trim_start().starts_with('{') => {
            serde_json::from_str::<serde_json::Value>(&w[1])
                .ok()
                .and_then(|v| v.get("merge").cloned())
                .is_some_and(|m| m == serde_json::Value::Bool(false) || m.as_str().is_some_and(off))
        }
        "-object" | "--object" => w[1]
            .split(',')
            .any(|p| p.strip_prefix("merge=").is_some_and(off)),
        _ => false,
    })
}

/// The identity of a running process (empty if it exited or has no such flags).
pub fn identity(pid: u32) -> VmIdentity {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| identity_from_cmdline(&c))
        .unwrap_or_default()
}

/// The VMM a process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmKind {
    Qemu,
    Firecracker,
    CloudHypervisor,
    Crosvm,
    /// Named by `--pid` or `--match`.
    Process,
}

impl VmKind {
    pub fn as_str(self) -> &'static str {
        match self {
            VmKind::Qemu => "qemu",
            VmKind::Firecracker => "firecracker",
            VmKind::CloudHypervisor => "cloud-hypervisor",
            VmKind::Crosvm => "crosvm",
            VmKind::Process => "process",
        }
    }

    /// The VMM an executable name stands for.
    pub fn from_exe(name: &str) -> Option<VmKind> {
        match name {
            n if n.starts_with("qemu-system-") || n == "qemu-kvm" => Some(VmKind::Qemu),
            "firecracker" => Some(VmKind::Firecracker),
            "cloud-hypervisor" => Some(VmKind::CloudHypervisor),
            "crosvm" => Some(VmKind::Crosvm),
            _ => None,
        }
    }
}

/// Whether KSM can merge a guest's RAM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mergeability {
    /// Private anonymous memory marked MADV_MERGEABLE, all or part of it (or the process
    /// merges all).
    Mergeable,
    /// Private anonymous memory KSM could merge, but it is not marked mergeable.
    NotMarked,
    /// Shared (memfd, vhost-user) or hugetlbfs memory: KSM never merges it.
    Impossible(String),
    /// No guest-RAM mapping found.
    Unknown,
}

/// One mapping that holds guest RAM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamMapping {
    /// Virtual addresses in the VMM: hidden from every document unless the daemon runs
    /// with `--expose-addresses` (`bytes` is always served).
    #[serde(flatten)]
    pub span: crate::addresses::GuestSpan,
    pub backing: String,
    pub mergeable: bool,
}

/// A VM process found on the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub pid: u32,
    pub kind: VmKind,
    /// From `-name` or similar, else `pid-N`.
    pub name: String,
    pub uuid: Option<String>,
    pub guest_memory_bytes: u64,
    pub ram: Vec<RamMapping>,
    pub mergeability: Mergeability,
    /// Its command line turns merging off (QEMU `mem-merge=off` or a backend's
    /// `merge=off`): the operator's choice, which memfabric never overrides.
    #[serde(default)]
    pub merge_off: bool,
}

impl Vm {
    /// The guest RAM's address ranges.
    pub fn ram_spans(&self) -> Vec<(u64, u64)> {
        self.ram
            .iter()
            .map(|m| (m.span.start, m.span.end))
            .collect()
    }
}

#[cfg(test)]
impl Vm {
    /// The tests' VM: a mergeable 1 GiB QEMU guest named `guest`, no RAM described; a
    /// test sets the fields it is about with `Vm { .., ..Vm::guest(pid) }`.
    pub(crate) fn guest(pid: u32) -> Vm {
        Vm {
            pid,
            kind: VmKind::Qemu,
            name: "guest".into(),
            uuid: None,
            guest_memory_bytes: 1 << 30,
            ram: vec![],
            mergeability: Mergeability::Mergeable,
            merge_off: false,
        }
    }
}

/// What to look for besides the known VMMs.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    pub pids: Vec<u32>,
    /// Start times of `pids` when they were given: a PID whose process exited and whose
    /// number was reused by another process no longer matches.
    pub pid_starts: std::collections::HashMap<u32, u64>,
    pub patterns: Vec<Regex>,
    /// Take a process named like a VMM for one even when its executable is not
    /// root-owned or is writable by others (anyone can copy `sleep` to `qemu-system-x`).
    pub untrusted_vmm_executables: bool,
    /// The users a VMM may run as (root and the configured `vmm_users`); empty: root.
    pub vmm_uids: Vec<u32>,
}

impl Selector {
    /// Whether `pid` is one given with `--pid`, still the same process.
    pub fn given(&self, pid: u32) -> bool {
        self.pids.contains(&pid)
            && match self.pid_starts.get(&pid) {
                Some(&t) => start_time(pid) == Some(t),
                None => true,
            }
    }
}

/// Why a process named like a VMM was not taken for one.
pub fn untrusted_reason(meta: &fs::Metadata) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    if meta.uid() != 0 {
        return Some(format!(
            "its executable is owned by uid {}, not root",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Some(format!(
            "its executable is writable by others (mode {:o})",
            meta.mode() & 0o7777
        ));
    }
    None
}

/// Longest /proc/PID/environ looked at (the kernel caps the argument and environment
/// area; a VMM's is a few KiB).
const MAX_ENVIRON: u64 = 256 << 10;

/// Why a process running a trusted VMM executable is still not taken for a VM, if it is
/// not: it runs as a user other than root and `uids` (any user can run the real QEMU with
/// another VM's `-name` and `-uuid`), or it preloads a library (`LD_PRELOAD`) that such a
/// user could have written.
pub fn untrusted_process_reason(pid: u32, uids: &[u32]) -> Option<String> {
    use std::{io::Read as _, os::unix::fs::MetadataExt as _};
    let trusted = |uid: u32| uid == 0 || uids.contains(&uid);
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let ids: Vec<u32> = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .map(|v| {
            v.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if ids.len() != 4 {
        return Some("its user cannot be read".into());
    }
    if let Some(uid) = ids.iter().find(|u| !trusted(**u)) {
        return Some(format!(
            "it runs as uid {uid}, not root or a user of vmm_users"
        ));
    }
    let mut environ = Vec::new();
    let readable = fs::File::open(format!("/proc/{pid}/environ"))
        .and_then(|f| f.take(MAX_ENVIRON).read_to_end(&mut environ));
    if readable.is_err() {
        return Some("its environment cannot be read".into());
    }
    for var in environ.split(|b| *b == 0) {
        let Some(list) = var.strip_prefix(b"LD_PRELOAD=") else {
            continue;
        };
        let list = String::from_utf8_lossy(list);
        for lib in list.split([':', ' ']).filter(|l| !l.is_empty()) {
            match fs::metadata(lib) {
                Ok(m) if trusted(m.uid()) && m.mode() & 0o022 == 0 => {}
                Ok(m) => {
                    return Some(format!(
                        "it preloads {} (LD_PRELOAD), owned by uid {} or writable by others",
                        clean_name(lib),
                        m.uid()
                    ));
                }
                Err(_) => {
                    return Some(format!(
                        "it preloads {} (LD_PRELOAD), which cannot be inspected",
                        clean_name(lib)
                    ));
                }
            }
        }
    }
    None
}

/// The file name of an executable link target, without the ` (deleted)` the kernel adds
/// once the file was replaced (a package upgrade under a running QEMU).
pub fn exe_file_name(target: &std::path::Path) -> Option<String> {
    let name = target.file_name()?.to_string_lossy().into_owned();
    Some(match name.strip_suffix(" (deleted)") {
        Some(n) => n.to_owned(),
        None => name,
    })
}

/// Mappings at least this large are guest-RAM candidates.
const MIN_RAM_MAPPING: u64 = 32 << 20;

/// Parses QEMU's `-m` (`-m 256`, `-m 2G`, `-m size=4G,slots=...`) into bytes.
pub fn qemu_memory(cmdline: &[String]) -> Option<u64> {
    let v = cmdline.windows(2).find(|w| w[0] == "-m")?[1].clone();
    let size = v
        .split(',')
        .find_map(|p| p.strip_prefix("size="))
        .unwrap_or_else(|| v.split(',').next().unwrap_or(&v))
        .to_owned();
    let (num, mult) = match size.chars().last()? {
        'G' | 'g' => (&size[..size.len() - 1], 1u64 << 30),
        'M' | 'm' => (&size[..size.len() - 1], 1 << 20),
        'T' | 't' => (&size[..size.len() - 1], 1 << 40),
        _ => (size.as_str(), 1 << 20),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// The guest-RAM mappings of a process: read-write anonymous, memfd or hugetlbfs
/// mappings in address-contiguous runs of at least [`MIN_RAM_MAPPING`]. The size counts
/// per run, not per mapping: `madvise` splits guest RAM at the edges of the ranges it
/// marks or unmarks, and the merge hints leave pieces of 2 MiB. Filtered one by one,
/// those pieces (the ranges the hints took out, and a lab guest's 18 MiB before one)
/// dropped out of the VM: the scan stopped reading them, so a range taken out could never
/// be seen calm again. A run holds only pieces whose VMA flags agree but for `mg` (the
/// one flag a merge hint changes): mmap places a VMM's thread stacks and malloc arenas
/// right beside its guest RAM, and they differ from it (QEMU's RAM is `dc hg`, a stack
/// is neither), so they stay out.
fn ram_mappings(proc_: &Process) -> Vec<RamMapping> {
    let Ok(maps) = proc_.smaps() else {
        return Vec::new();
    };
    let candidates = maps
        .into_iter()
        // Guest RAM is read-write and not executable: this skips address-space
        // reservations (---p) and TCG's translation buffer (rwxp).
        .filter(|m| {
            m.perms.contains(MMPermissions::READ | MMPermissions::WRITE)
                && !m.perms.contains(MMPermissions::EXECUTE)
        })
        .filter_map(|m| {
            let flags = m.extension.vm_flags;
            let shared = m.perms.contains(MMPermissions::SHARED);
            let backing = match &m.pathname {
                MMapPath::Anonymous if !shared => "private-anonymous".to_owned(),
                MMapPath::Anonymous => "shared-anonymous".to_owned(),
                MMapPath::Path(p) if flags.contains(VmFlags::HT) => {
                    format!("hugetlbfs:{}", p.display())
                }
                MMapPath::Path(p) if p.to_string_lossy().starts_with("/memfd:") => {
                    format!("memfd:{}", p.display())
                }
                MMapPath::Other(o) if o.starts_with("anon:") => "private-anonymous".to_owned(),
                // File-backed mappings (the VMM binary, disk images) are not guest RAM.
                _ => return None,
            };
            let mapping = RamMapping {
                span: crate::addresses::GuestSpan::new(m.address.0, m.address.1),
                backing,
                mergeable: flags.contains(VmFlags::MG),
            };
            Some((mapping, (flags - VmFlags::MG).bits()))
        });
    large_runs(candidates)
}

/// The mappings (in address order) that belong to address-contiguous runs of one backing
/// and one set of VMA flags but `mg` (`kind`), spanning at least [`MIN_RAM_MAPPING`].
fn large_runs(mappings: impl IntoIterator<Item = (RamMapping, u32)>) -> Vec<RamMapping> {
    let mut out = Vec::new();
    let mut run: Vec<RamMapping> = Vec::new();
    let mut run_kind = 0;
    let flush = |run: &mut Vec<RamMapping>, out: &mut Vec<RamMapping>| {
        let (Some(first), Some(last)) = (run.first(), run.last()) else {
            return;
        };
        if last.span.end - first.span.start >= MIN_RAM_MAPPING {
            out.append(run);
        }
        run.clear();
    };
    for (m, kind) in mappings {
        let joins = run.last().is_some_and(|l| {
            l.span.end == m.span.start && l.backing == m.backing && run_kind == kind
        });
        if !joins {
            flush(&mut run, &mut out);
            run_kind = kind;
        }
        run.push(m);
    }
    flush(&mut run, &mut out);
    out
}

fn mergeability(ram: &[RamMapping]) -> Mergeability {
    if ram.is_empty() {
        return Mergeability::Unknown;
    }
    if let Some(m) = ram.iter().find(|m| m.backing != "private-anonymous") {
        return Mergeability::Impossible(format!(
            "guest RAM is {} memory, which KSM never merges (only private anonymous memory)",
            m.backing
        ));
    }
    // Partly marked (the hints took ranges out) is still merged by KSM.
    if ram.iter().any(|m| m.mergeable) {
        Mergeability::Mergeable
    } else {
        Mergeability::NotMarked
    }
}

/// Describes one process as a VM of `kind`.
pub fn describe(pid: u32, kind: VmKind) -> Option<Vm> {
    let proc_ = Process::new(pid as i32).ok()?;
    let cmdline = proc_.cmdline().unwrap_or_default();
    let id = identity_from_cmdline(cmdline.join("\0").as_bytes());
    let ram = ram_mappings(&proc_);
    let mapped: u64 = ram.iter().map(|m| m.span.bytes).sum();
    let guest_memory_bytes = match kind {
        VmKind::Qemu => qemu_memory(&cmdline).unwrap_or(mapped),
        _ => mapped,
    };
    Some(Vm {
        pid,
        kind,
        name: id.name.unwrap_or_else(|| format!("pid-{pid}")),
        uuid: id.uuid,
        guest_memory_bytes,
        mergeability: mergeability(&ram),
        merge_off: kind == VmKind::Qemu && merge_off(&cmdline),
        ram,
    })
}

/// Bytes of `/proc/PID/maps` hashed at most (a VMM split into a million mappings reads
/// as changed, and is described again, rather than read without end).
const LAYOUT_MAX_BYTES: u64 = 16 << 20;

/// A cheap fingerprint of what [`describe`] depends on besides the command line: the
/// mappings that are or may become guest RAM (in `/proc/PID/maps`, the list of VMAs: each
/// of at least [`MIN_RAM_MAPPING`], and any other overlapping or touching `ram`, the RAM
/// last described, where `madvise` splits it) and whether KSM merges the whole address
/// space (`ksm_stat`'s `ksm_merge_any`, `ksm_mergeable`). `describe` reads smaps, which
/// walks every page table of the guest's RAM (`smaps_account`); `maps` lists mappings
/// without touching pages. Small mappings elsewhere (thread stacks of a VMM's I/O pool,
/// which come and go) are left out, so they do not read as a move. Merging switched over
/// a whole mapping without a split leaves this unchanged: callers describe again now and
/// then anyway. `None` when the process is gone.
pub fn layout_fingerprint(pid: u32, ram: &[(u64, u64)]) -> Option<u64> {
    use std::io::Read as _;
    let maps = fs::File::open(format!("/proc/{pid}/maps")).ok()?;
    let mut h = layout_hash(std::io::BufReader::new(maps.take(LAYOUT_MAX_BYTES)), ram)?;
    // Absent before Linux 6.1 (and then only the maps count).
    if let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/ksm_stat")) {
        for line in stat.lines().take(32) {
            if line.starts_with("ksm_merge_any") || line.starts_with("ksm_mergeable") {
                h.update(line.as_bytes());
            }
        }
    }
    Some(h.digest())
}

/// The hash of the lines of a maps listing that [`layout_fingerprint`] looks at.
fn layout_hash(
    mut maps: impl std::io::BufRead,
    ram: &[(u64, u64)],
) -> Option<xxhash_rust::xxh3::Xxh3> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        match maps.read_until(b'\n', &mut line) {
            Ok(0) => return Some(h),
            Ok(_) => {}
            Err(_) => return None,
        }
        let Some((start, end)) = maps_line_span(&line) else {
            continue;
        };
        let near_ram = ram.iter().any(|(s, e)| start <= *e && end >= *s);
        if end.saturating_sub(start) >= MIN_RAM_MAPPING || near_ram {
            h.update(&line);
        }
    }
}

/// The address range at the start of a `/proc/PID/maps` line (`start-end perms ...`).
fn maps_line_span(line: &[u8]) -> Option<(u64, u64)> {
    let range = line.split(|b| *b == b' ').next()?;
    let range = std::str::from_utf8(range).ok()?;
    let (start, end) = range.split_once('-')?;
    Some((
        u64::from_str_radix(start, 16).ok()?,
        u64::from_str_radix(end, 16).ok()?,
    ))
}

/// The VMM an executable's `comm` (at most 15 bytes, so `qemu-system-x86_64` reads as
/// `qemu-system-x86`) may stand for.
fn kind_from_comm(comm: &str) -> Option<VmKind> {
    match comm {
        c if c.starts_with("qemu-system-") || c == "qemu-kvm" => Some(VmKind::Qemu),
        "firecracker" => Some(VmKind::Firecracker),
        c if "cloud-hypervisor".starts_with(c) && c.len() >= 15 => Some(VmKind::CloudHypervisor),
        "crosvm" => Some(VmKind::Crosvm),
        _ => None,
    }
}

/// /proc/PID/stat, parsed by procfs (the command name may hold spaces and ')').
fn stat(pid: u32) -> Option<procfs::process::Stat> {
    procfs::process::Process::new(i32::try_from(pid).ok()?)
        .ok()?
        .stat()
        .ok()
}

/// When the process started (clock ticks after boot): with the PID, a process's identity,
/// since PIDs are reused.
pub fn start_time(pid: u32) -> Option<u64> {
    stat(pid).map(|s| s.starttime)
}

/// A process's parent.
pub fn parent_pid(pid: u32) -> Option<u32> {
    stat(pid).and_then(|s| u32::try_from(s.ppid).ok())
}

/// A process's state letter and `flags` (PF_*).
pub fn state_and_flags(pid: u32) -> Option<(String, u64)> {
    stat(pid).map(|s| (s.state.to_string(), u64::from(s.flags)))
}

/// Whether `pid` is a kernel thread (`PF_KTHREAD`): no user memory to track.
pub fn is_kernel_thread(pid: u32) -> bool {
    const PF_KTHREAD: u64 = 0x0020_0000;
    state_and_flags(pid).is_some_and(|(_, flags)| flags & PF_KTHREAD != 0)
}

/// What one [`Scanner::scan`] found.
#[derive(Debug, Default)]
pub struct Found {
    /// The VM processes, by PID.
    pub vms: BTreeMap<u32, VmKind>,
    /// Processes whose /proc files could not be read for another reason than their exit
    /// (EMFILE, EAGAIN): whether they are VMs is unknown this time.
    pub unknown: std::collections::BTreeSet<u32>,
}

/// Whether a /proc read failed because the process is gone (rather than because the
/// reader could not read).
pub fn gone(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
}

/// Finds VM processes cheaply enough to run every few seconds: one read of
/// /proc/PID/comm per process, and more only for candidates and new processes. Processes
/// found not to be VMs are remembered with their `comm` (exec changes it), so a PID is
/// looked at again only when it is new or has exec'd.
#[derive(Debug, Default)]
pub struct Scanner {
    selector: Selector,
    not_vms: std::collections::HashMap<u32, String>,
    /// Processes named like a VMM whose executable is not trusted, last scan.
    untrusted: usize,
}

impl Scanner {
    pub fn new(selector: Selector) -> Scanner {
        Scanner {
            selector,
            not_vms: Default::default(),
            untrusted: 0,
        }
    }

    /// How many processes named like a VMM were refused (untrusted executable) when they
    /// were first seen, since the start.
    pub fn untrusted(&self) -> usize {
        self.untrusted
    }

    /// The VM processes now, by PID, with their kind. `/proc` failing to answer (out of
    /// file descriptors, say) is not the VMs' exit: an unreadable `/proc` is an error,
    /// and a process whose files fail with anything but "no such process" is listed in
    /// [`Found::unknown`], to be kept as it was.
    pub fn scan(&mut self) -> std::io::Result<Found> {
        let mut found = Found::default();
        let mut not_vms = std::collections::HashMap::with_capacity(self.not_vms.len());
        let dir = fs::read_dir("/proc")?;
        let me = std::process::id();
        for entry in dir {
            let entry = entry?;
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let comm = match fs::read_to_string(format!("/proc/{pid}/comm")) {
                Ok(c) => c,
                Err(e) if gone(&e) => continue, // exited meanwhile
                Err(_) => {
                    found.unknown.insert(pid);
                    if let Some(c) = self.not_vms.get(&pid) {
                        not_vms.insert(pid, c.clone());
                    }
                    continue;
                }
            };
            let comm = comm.trim_end().to_owned();
            if pid == me || self.not_vms.get(&pid) == Some(&comm) && !self.selector.given(pid) {
                not_vms.insert(pid, comm);
                continue;
            }
            match self.kind(pid, &comm) {
                Some(kind) => {
                    found.vms.insert(pid, kind);
                }
                None => {
                    not_vms.insert(pid, comm);
                }
            }
        }
        self.not_vms = not_vms;
        Ok(found)
    }

    fn kind(&mut self, pid: u32, comm: &str) -> Option<VmKind> {
        if kind_from_comm(comm).is_some() {
            // Confirm with the executable's full name where it can be read.
            let exe = fs::read_link(format!("/proc/{pid}/exe")).ok();
            let kind = match exe.as_deref().and_then(exe_file_name) {
                Some(name) => VmKind::from_exe(&name),
                None => kind_from_comm(comm),
            };
            if let Some(k) = kind {
                // The link's target file, even when it was deleted or replaced.
                let exe_untrusted = match fs::metadata(format!("/proc/{pid}/exe")) {
                    Ok(meta) => untrusted_reason(&meta),
                    Err(_) => Some("its executable cannot be inspected".to_owned()),
                }
                .filter(|_| !self.selector.untrusted_vmm_executables)
                .map(|why| (why, "untrusted_vmm_executables = true trusts them"));
                // Who runs it counts whatever the executable: root, or a vmm_users user.
                let untrusted = exe_untrusted.or_else(|| {
                    untrusted_process_reason(pid, &self.selector.vmm_uids)
                        .map(|why| (why, "vmm_users names the users VMMs run as"))
                });
                match untrusted {
                    Some((why, remedy)) => {
                        self.untrusted += 1;
                        if self.untrusted == 1 {
                            tracing::warn!(
                                "pid {pid} is named like a VMM but {why}: not taken for a VM \
                                 (further ones are counted in memfabric_untrusted_vmm_processes; \
                                 {remedy})"
                            );
                        }
                    }
                    None => return Some(k),
                }
            }
        }
        if self.selector.given(pid) {
            return Some(VmKind::Process);
        }
        if !self.selector.patterns.is_empty()
            && let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline"))
        {
            let line = String::from_utf8_lossy(&raw).replace('\0', " ");
            if !line.trim().is_empty()
                && self
                    .selector
                    .patterns
                    .iter()
                    .any(|r| r.is_match(line.trim()))
            {
                return Some(VmKind::Process);
            }
        }
        None
    }
}

/// Finds and describes the host's VMs at once (for one-shot use; the daemon keeps a
/// [`Scanner`] and describes only new VMs).
pub fn discover(sel: &Selector) -> BTreeMap<u32, Vm> {
    Scanner::new(sel.clone())
        .scan()
        .map(|f| f.vms)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(pid, kind)| Some((pid, describe(pid, kind)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn mem_merge_off_is_seen() {
        assert!(merge_off(&args("qemu -machine pc,accel=kvm,mem-merge=off")));
        assert!(merge_off(&args("qemu -M q35,mem-merge=off")));
        assert!(!merge_off(&args("qemu -machine pc,mem-merge=on")));
        assert!(!merge_off(&args("qemu -m 1G")));
        // A backend of its own with merging off, in either syntax.
        assert!(merge_off(&args(
            "qemu -object memory-backend-ram,id=m0,size=1G,merge=off -machine memory-backend=m0"
        )));
        assert!(merge_off(&args(
            r#"qemu -object {"qom-type":"memory-backend-ram","id":"m0","size":1073741824,"merge":false}"#
        )));
        assert!(!merge_off(&args(
            "qemu -object memory-backend-ram,id=m0,size=1G,merge=on"
        )));
        // Only as an option's value: a guest named so is not taken for it.
        assert!(!merge_off(&args("qemu -name mem-merge=off")));
    }

    #[test]
    fn vmm_kinds_from_executable_names() {
        assert_eq!(VmKind::from_exe("qemu-system-x86_64"), Some(VmKind::Qemu));
        assert_eq!(VmKind::from_exe("qemu-kvm"), Some(VmKind::Qemu));
        assert_eq!(
            VmKind::from_exe("cloud-hypervisor"),
            Some(VmKind::CloudHypervisor)
        );
        assert_eq!(VmKind::from_exe("bash"), None);
        assert_eq!(kind_from_comm("qemu-system-x86"), Some(VmKind::Qemu));
        assert_eq!(
            kind_from_comm("cloud-hyperviso"),
            Some(VmKind::CloudHypervisor)
        );
        assert_eq!(kind_from_comm("cloud"), None);
    }

    #[test]
    fn a_replaced_executable_is_still_its_vmm() {
        let p = std::path::Path::new;
        assert_eq!(
            exe_file_name(p("/usr/bin/qemu-kvm (deleted)")).as_deref(),
            Some("qemu-kvm")
        );
        assert_eq!(
            VmKind::from_exe(&exe_file_name(p("/usr/bin/qemu-system-x86_64 (deleted)")).unwrap()),
            Some(VmKind::Qemu)
        );
        assert_eq!(exe_file_name(p("/bin/sleep")).as_deref(), Some("sleep"));
    }

    #[test]
    fn only_root_owned_unwritable_executables_are_trusted() {
        let dir = std::env::temp_dir().join(format!("memfabric-trust-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("qemu-system-x");
        fs::write(&f, "").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&f, fs::Permissions::from_mode(0o755)).unwrap();
        let meta = fs::metadata(&f).unwrap();
        // SAFETY: no preconditions.
        let me = unsafe { libc::geteuid() };
        if me == 0 {
            assert_eq!(untrusted_reason(&meta), None);
            fs::set_permissions(&f, fs::Permissions::from_mode(0o777)).unwrap();
            let why = untrusted_reason(&fs::metadata(&f).unwrap()).unwrap();
            assert!(why.contains("writable by others"), "{why}");
        } else {
            let why = untrusted_reason(&meta).unwrap();
            assert!(why.contains(&format!("uid {me}")), "{why}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn qemu_memory_sizes() {
        let c = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        assert_eq!(qemu_memory(&c("qemu -m 256")), Some(256 << 20));
        assert_eq!(qemu_memory(&c("qemu -m 2G")), Some(2 << 30));
        assert_eq!(
            qemu_memory(&c("qemu -m size=4G,slots=2,maxmem=8G")),
            Some(4 << 30)
        );
        assert_eq!(qemu_memory(&c("qemu -smp 2")), None);
    }

    #[test]
    fn shared_guest_ram_is_reported_unmergeable() {
        let m = |backing: &str, mergeable| RamMapping {
            span: crate::addresses::GuestSpan::new(0, 1 << 30),
            backing: backing.into(),
            mergeable,
        };
        assert_eq!(
            mergeability(&[m("private-anonymous", true)]),
            Mergeability::Mergeable
        );
        assert_eq!(
            mergeability(&[m("private-anonymous", false)]),
            Mergeability::NotMarked
        );
        assert!(matches!(
            mergeability(&[m("memfd:/memfd:guest-ram (deleted)", false)]),
            Mergeability::Impossible(r) if r.contains("memfd")
        ));
        assert_eq!(mergeability(&[]), Mergeability::Unknown);
        // The hints took a range out: KSM still merges the rest.
        let piece = |start: u64, end: u64, mergeable| RamMapping {
            span: crate::addresses::GuestSpan::new(start, end),
            backing: "private-anonymous".into(),
            mergeable,
        };
        assert_eq!(
            mergeability(&[piece(0, 2 << 20, false), piece(2 << 20, 1 << 30, true)]),
            Mergeability::Mergeable
        );
    }

    #[test]
    fn a_layout_moves_with_guest_ram_not_with_small_mappings_elsewhere() {
        assert_eq!(
            maps_line_span(b"7f9857e00000-7f9867e00000 rw-p 00000000 00:00 0 \n"),
            Some((0x7f98_57e0_0000, 0x7f98_67e0_0000))
        );
        assert_eq!(maps_line_span(b"garbage\n"), None);
        let ram = [(0x7f98_57e0_0000, 0x7f98_67e0_0000)];
        let hash = |text: &str| layout_hash(text.as_bytes(), &ram).map(|h| h.digest());
        const RAM: &str = "7f9857e00000-7f9867e00000 rw-p 00000000 00:00 0 \n";
        let base = hash(RAM);
        // A thread stack (8 MiB) and its guard elsewhere come and go: no move.
        let stack = "7f98b433b000-7f98b4b3b000 rw-p 00000000 00:00 0 \n\
                     7f98b4b3b000-7f98b4b3c000 ---p 00000000 00:00 0 \n";
        assert_eq!(hash(&format!("{RAM}{stack}")), base);
        // The RAM split by the hints (18 + 2 + 236 MiB) moved.
        let split = "7f9857e00000-7f9859000000 rw-p 00000000 00:00 0 \n\
                     7f9859000000-7f9859200000 rw-p 00000000 00:00 0 \n\
                     7f9859200000-7f9867e00000 rw-p 00000000 00:00 0 \n";
        assert_ne!(hash(split), base);
        // A mapping growing the RAM's run, and a large new one (hot-plugged RAM), too.
        assert_ne!(
            hash(&format!("{RAM}7f9867e00000-7f9868000000 rw-p 0 00:00 0 \n")),
            base
        );
        assert_ne!(
            hash(&format!("{RAM}7fa000000000-7fa040000000 rw-p 0 00:00 0 \n")),
            base
        );
        // A live process has one; a PID that is not there has none.
        assert!(layout_fingerprint(std::process::id(), &[]).is_some());
        assert_eq!(layout_fingerprint(u32::MAX, &[]), None);
    }

    /// The real smaps path on this very process: 64 MiB of "guest RAM" (`dc`, as QEMU
    /// marks its RAM with `MADV_DONTFORK`) with a mapping of other flags right below it
    /// (the thread stack mmap places there), then split by a merge hint.
    #[test]
    fn a_mapping_touching_guest_ram_stays_out_of_it() {
        const MIB: usize = 1 << 20;
        let len = 72 * MIB;
        // SAFETY: a fresh private anonymous mapping, advised and unmapped only here.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let at = |off: usize| (base as usize + off) as *mut libc::c_void;
        // SAFETY: all three ranges lie inside the mapping above.
        unsafe {
            assert_eq!(libc::madvise(at(0), 8 * MIB, libc::MADV_DONTDUMP), 0);
            assert_eq!(libc::madvise(at(8 * MIB), 64 * MIB, libc::MADV_DONTFORK), 0);
            assert_eq!(
                libc::madvise(at(20 * MIB), 2 * MIB, libc::MADV_MERGEABLE),
                0
            );
        }
        let found = ram_mappings(&Process::myself().unwrap());
        // SAFETY: the mapping made above, no longer referenced.
        unsafe { libc::munmap(base, len) };
        let (lo, hi) = (base as u64, (base as usize + len) as u64);
        let ours: Vec<(u64, u64, bool)> = found
            .iter()
            .filter(|m| m.span.start < hi && m.span.end > lo)
            .map(|m| {
                (
                    (m.span.start - lo) >> 20,
                    (m.span.end - lo) >> 20,
                    m.mergeable,
                )
            })
            .collect();
        assert_eq!(ours, [(8, 20, false), (20, 22, true), (22, 72, false)]);
    }

    #[test]
    fn guest_ram_split_into_small_pieces_stays_guest_ram() {
        // QEMU's guest RAM (`dc hg`, merged or not) and a thread stack (neither).
        let ram = (VmFlags::DC | VmFlags::HG).bits();
        let stack = 0;
        let m = |start: u64, end: u64, backing: &str, kind: u32| {
            let mapping = RamMapping {
                span: crate::addresses::GuestSpan::new(start, end),
                backing: backing.into(),
                mergeable: true,
            };
            (mapping, kind)
        };
        const MIB: u64 = 1 << 20;
        let anon = "private-anonymous";
        let found = large_runs([
            // A thread stack: small and alone.
            m(0, 8 * MIB, anon, stack),
            // 256 MiB of guest RAM split by the hints into 18 + 2 + 236 MiB.
            m(10 * MIB, 28 * MIB, anon, ram),
            m(28 * MIB, 30 * MIB, anon, ram),
            m(30 * MIB, 266 * MIB, anon, ram),
            // Adjacent, but another backing: a run of its own, too small.
            m(266 * MIB, 270 * MIB, "memfd:/memfd:x", ram),
            // A gap, then another 8 MiB alone.
            m(300 * MIB, 308 * MIB, anon, stack),
            // A thread stack and an arena mmap placed right below guest RAM: touching
            // it, but not of it.
            m(400 * MIB, 408 * MIB, anon, stack),
            m(408 * MIB, 422 * MIB, anon, (VmFlags::NH).bits()),
            m(422 * MIB, 678 * MIB, anon, ram),
        ]);
        let spans: Vec<(u64, u64)> = found
            .iter()
            .map(|m| (m.span.start / MIB, m.span.end / MIB))
            .collect();
        assert_eq!(spans, [(10, 28), (28, 30), (30, 266), (422, 678)]);
    }

    #[test]
    fn plain_and_libvirt_names() {
        let plain = b"qemu-system-x86_64\0-name\0lab-1\0-uuid\0a-b\0";
        assert_eq!(
            identity_from_cmdline(plain),
            VmIdentity {
                name: Some("lab-1".into()),
                uuid: Some("a-b".into())
            }
        );
        let libvirt = b"/usr/bin/qemu-system-x86_64\0-name\0guest=web01,debug-threads=on\0";
        assert_eq!(
            identity_from_cmdline(libvirt).name.as_deref(),
            Some("web01")
        );
        assert_eq!(
            identity_from_cmdline(b"sleep\x0010\0"),
            VmIdentity::default()
        );
    }

    #[test]
    fn hostile_names_are_made_printable() {
        let evil = b"qemu-system-x86_64\0-name\0\x1b[2J\x1b]0;pwned\x07vm\xe2\x80\xaeexe\0-uuid\0$(reboot)\0";
        let id = identity_from_cmdline(evil);
        let name = id.name.unwrap();
        assert!(!name.chars().any(|c| c.is_control()), "{name:?}");
        assert_eq!(name, "?[2J?]0;pwned?vm?exe");
        assert_eq!(id.uuid, None, "not a UUID");
        let long = format!("qemu\0-name\0{}\0", "a".repeat(10_000));
        assert_eq!(
            identity_from_cmdline(long.as_bytes()).name.unwrap().len(),
            MAX_NAME_CHARS
        );
        let ok = b"qemu\0-uuid\0A1B2C3D4-0000-4000-8000-000000000001\0";
        assert_eq!(
            identity_from_cmdline(ok).uuid.as_deref(),
            Some("A1B2C3D4-0000-4000-8000-000000000001")
        );
    }
}
