//! Whether the host (and the VM's memory cgroup) can afford to take a range out of KSM.
//!
//! `MADV_UNMERGEABLE` gives every merged page of the range a private copy again: a range
//! of 1 GiB that KSM had folded into a few pages needs 1 GiB at once. Done blindly (a
//! volatile verdict, a domain that must not share, the restore at exit) it can push the
//! host into reclaim or the OOM killer, or the VM past its cgroup's limit. So before each
//! unmerge memfabric counts the KSM pages it would copy (pagemap + kpageflags) and goes
//! ahead only when that leaves a reserve of `MemAvailable` (and of the cgroup's room);
//! otherwise the range is deferred, and the reason said.

use std::path::{Path, PathBuf};

/// Kept available after an unmerge: the larger of this and [`RESERVE_FRACTION`] of RAM.
const RESERVE_MIN_BYTES: u64 = 256 << 20;
const RESERVE_FRACTION: f64 = 0.05;

/// Why an unmerge waits.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Deferred {
    #[error(
        "taking it out of KSM would copy {need_mib} MiB, and the host has {available_mib} MiB \
         available with {reserve_mib} MiB kept in reserve: deferred"
    )]
    Host {
        need_mib: u64,
        available_mib: u64,
        reserve_mib: u64,
    },
    #[error(
        "taking it out of KSM would copy {need_mib} MiB, and its memory cgroup {cgroup} has \
         {room_mib} MiB left below its limit: deferred"
    )]
    Cgroup {
        need_mib: u64,
        room_mib: u64,
        cgroup: String,
    },
    #[error("counting its merged pages failed ({0}): deferred")]
    Unknown(String),
}

fn meminfo_kb(key: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix(key)?
                .strip_prefix(':')?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
}

/// The memory kept in reserve (bytes).
pub fn reserve() -> u64 {
    let total = meminfo_kb("MemTotal").unwrap_or(0) * 1024;
    RESERVE_MIN_BYTES.max(crate::util::convert::u64_of_f64(
        total as f64 * RESERVE_FRACTION,
    ))
}

/// The memory cgroup directory of `pid` with the names of its limit and usage files:
/// cgroup v2 (`0::/path`, `memory.max`, `memory.current`) or v1 (`N:memory:/path`,
/// `memory.limit_in_bytes`, `memory.usage_in_bytes`).
fn cgroup_dir(pid: u32) -> Option<(PathBuf, PathBuf, &'static str, &'static str)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let (root, rel, max, current) = text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        if controllers.split(',').any(|c| c == "memory") {
            Some((
                "/sys/fs/cgroup/memory",
                path,
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            ))
        } else if controllers.is_empty() && Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
        {
            Some(("/sys/fs/cgroup", path, "memory.max", "memory.current"))
        } else {
            None
        }
    })?;
    let rel = rel.trim().trim_start_matches('/');
    // A path that climbs out of the hierarchy is not one to follow.
    if rel.split('/').any(|c| c == "..") {
        return None;
    }
    let root = PathBuf::from(root);
    Some((root.join(rel), root, max, current))
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// The least room below the memory limit over the cgroup of `pid` and its ancestors, with
/// the cgroup that has it; None when no limit applies ("max", or v1's huge number).
pub fn cgroup_room(pid: u32) -> Option<(u64, String)> {
    let (mut dir, root, max_file, current_file) = cgroup_dir(pid)?;
    let mut least: Option<(u64, String)> = None;
    loop {
        if let (Some(max), Some(current)) = (
            read_u64(&dir.join(max_file)).filter(|&m| m < 1 << 60),
            read_u64(&dir.join(current_file)),
        ) {
            let room = max.saturating_sub(current);
            if least.as_ref().is_none_or(|(r, _)| room < *r) {
                let name = dir.strip_prefix(&root).map_or_else(
                    |_| dir.display().to_string(),
                    |p| format!("/{}", p.display()),
                );
                least = Some((room, name));
            }
        }
        if dir == root || !dir.pop() {
            return least;
        }
    }
}

/// Whether `need` more bytes fit: the host keeps `reserve` available, the cgroup (if
/// limited) keeps a sixteenth of the need as slack.
pub fn judge(
    need: u64,
    available: u64,
    reserve: u64,
    cgroup: Option<(u64, String)>,
) -> Result<(), Deferred> {
    let mib = |b: u64| b >> 20;
    if need == 0 {
        return Ok(());
    }
    if available < need.saturating_add(reserve) {
        return Err(Deferred::Host {
            need_mib: mib(need),
            available_mib: mib(available),
            reserve_mib: mib(reserve),
        });
    }
    if let Some((room, name)) = cgroup
        && room < need + need / 16
    {
        return Err(Deferred::Cgroup {
            need_mib: mib(need),
            room_mib: mib(room),
            cgroup: name,
        });
    }
    Ok(())
}

/// Whether `[start, end)` of `pid` may be taken out of KSM now; Ok carries the bytes it
/// will copy.
pub fn check_unmerge(pid: u32, start: u64, end: u64) -> Result<u64, Deferred> {
    let pages = crate::host::merged::count_in(pid, start, end)
        .map_err(|e| Deferred::Unknown(e.to_string()))?;
    let need = pages * 4096;
    let available = meminfo_kb("MemAvailable").unwrap_or(0) * 1024;
    judge(need, available, reserve(), cgroup_room(pid)).map(|()| need)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unmerge_waits_for_the_reserve_and_the_cgroup() {
        const GIB: u64 = 1 << 30;
        assert_eq!(judge(0, 0, GIB, None), Ok(()));
        assert_eq!(judge(GIB, 3 * GIB, GIB, None), Ok(()));
        let e = judge(2 * GIB, 3 * GIB - 1, GIB, None).unwrap_err();
        assert!(matches!(e, Deferred::Host { need_mib: 2048, .. }), "{e}");
        assert!(e.to_string().contains("2048 MiB"), "{e}");
        let e = judge(GIB, 8 * GIB, GIB, Some((GIB, "/machine/vm1".into()))).unwrap_err();
        assert!(e.to_string().contains("/machine/vm1"), "{e}");
        assert_eq!(
            judge(GIB, 8 * GIB, GIB, Some((2 * GIB, "/x".into()))),
            Ok(())
        );
    }

    #[test]
    fn the_reserve_is_at_least_256_mib() {
        assert!(reserve() >= RESERVE_MIN_BYTES);
    }

    #[test]
    fn this_process_has_a_cgroup_or_none_but_never_a_path_outside() {
        if let Some((d, root, _, _)) = cgroup_dir(std::process::id()) {
            assert!(d.starts_with(&root), "{}", d.display());
            assert!(root.starts_with("/sys/fs/cgroup"), "{}", root.display());
        }
    }
}
