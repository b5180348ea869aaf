//! Which mappings of a process hold its memory worth scanning and hinting.

use super::inventory::{self, VmKind};

/// The mappings to scan: a VM's guest RAM; for any other process, its private anonymous
/// read-write mappings of 1 MiB or more.
pub fn targets(pid: u32) -> Option<Vec<(u64, u64)>> {
    let proc_ = procfs::process::Process::new(pid as i32).ok()?;
    let exe = proc_
        .exe()
        .ok()
        .and_then(|e| e.file_name().map(|n| n.to_string_lossy().into_owned()));
    if let Some(kind) = exe.as_deref().and_then(VmKind::from_exe)
        && let Some(vm) = inventory::describe(pid, kind)
        && !vm.ram.is_empty()
    {
        return Some(vm.ram.iter().map(|m| (m.span.start, m.span.end)).collect());
    }
    use procfs::process::{MMPermissions, MMapPath};
    let maps = proc_.maps().ok()?;
    Some(
        maps.into_iter()
            .filter(|m| matches!(m.pathname, MMapPath::Anonymous))
            .filter(|m| {
                m.perms
                    .contains(MMPermissions::READ | MMPermissions::WRITE | MMPermissions::PRIVATE)
                    && !m.perms.contains(MMPermissions::EXECUTE)
            })
            .filter(|m| m.address.1 - m.address.0 >= 1 << 20)
            .map(|m| m.address)
            .collect(),
    )
}
