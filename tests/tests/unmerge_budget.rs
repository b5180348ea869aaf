//! Taking a range out of KSM copies every merged page in it: memfabric first checks that
//! the host and the VM's memory cgroup can afford it, defers the unmerge when not (a hint
//! and the restore at exit alike), and says why. On a real workload with 64 MiB merged,
//! in a memory cgroup limited to 32 MiB above its usage.

use std::{fs, path::PathBuf, sync::Arc};

use memfabric::actuate::{
    StateLock,
    headroom::Deferred,
    hints::{HintControl, HintError},
};
use memfabric_tests::{Workload, ksm_fast, privileged};
use serial_test::serial;

const WORKLOAD: &str = env!("CARGO_BIN_EXE_memfabric-workload");
const PAGES: u64 = 16384;

/// A memory cgroup of its own for one process, limited; the process is moved back to its
/// old cgroup and the group removed on drop. cgroup v1 or v2, whichever the host has.
struct MemoryCgroup {
    dir: PathBuf,
    limit_file: &'static str,
    parent_procs: PathBuf,
    pid: u32,
}

impl MemoryCgroup {
    fn new(pid: u32) -> MemoryCgroup {
        let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let (root, limit_file) = if v2 {
            ("/sys/fs/cgroup", "memory.max")
        } else {
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes")
        };
        let dir = PathBuf::from(root).join(format!("memfabric-test-{}", std::process::id()));
        let _ = fs::remove_dir(&dir);
        fs::create_dir(&dir).expect("creating a memory cgroup");
        fs::write(dir.join("cgroup.procs"), pid.to_string()).expect("moving the workload");
        MemoryCgroup {
            dir,
            limit_file,
            parent_procs: PathBuf::from(root).join("cgroup.procs"),
            pid,
        }
    }

    fn limit(&self, bytes: Option<u64>) {
        let v = bytes.map_or_else(|| "max".to_owned(), |b| b.to_string());
        let v = if self.limit_file == "memory.limit_in_bytes" && bytes.is_none() {
            "-1".to_owned()
        } else {
            v
        };
        fs::write(self.dir.join(self.limit_file), v).expect("setting the limit");
    }

    fn usage(&self) -> u64 {
        let f = if self.limit_file == "memory.max" {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        };
        fs::read_to_string(self.dir.join(f))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = fs::write(&self.parent_procs, self.pid.to_string());
        let _ = fs::remove_dir(&self.dir);
    }
}

fn mergeable(pid: u32, start: u64) -> bool {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
        {
            inside = a <= start && start < b;
        } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
            return flags.split_whitespace().any(|f| f == "mg");
        }
    }
    panic!("{start:#x} is not mapped");
}

#[test]
#[serial(ksm)]
fn an_unmerge_the_cgroup_cannot_afford_is_deferred_and_kept() {
    if !privileged("an_unmerge_the_cgroup_cannot_afford_is_deferred_and_kept") {
        return;
    }
    let _ksm = ksm_fast(); // declared first: dropped after the workload
    let mut w = Workload::spawn(WORKLOAD);
    let region = w.cmd(&format!("alloc {PAGES} same"));
    let (start, end) = w.span(&region);
    let dir = std::env::temp_dir().join(format!("memfabric-budget-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let lock = Arc::new(StateLock::acquire(&dir, None, |_| {}).unwrap());

    // memfabric makes the range mergeable (journaled: it was not) and KSM merges it.
    let (mut hints, _) = HintControl::begin(lock.clone(), false).unwrap();
    hints.apply(w.pid, start, end, true).unwrap();
    w.await_merged(PAGES as i64 * 9 / 10, "the 64 MiB region");

    // Its cgroup has 32 MiB of room: unmerging would copy 64 MiB.
    let cg = MemoryCgroup::new(w.pid);
    cg.limit(Some(cg.usage() + (32 << 20)));
    let err = hints.apply(w.pid, start, end, false).unwrap_err();
    assert!(
        matches!(err, HintError::Deferred(Deferred::Cgroup { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("memfabric-test"), "{err}");
    eprintln!("hint: {err}");
    assert!(
        mergeable(w.pid, start),
        "the deferred unmerge changed the range"
    );

    // The restore at exit would unmerge it too: deferred, and kept in the journal.
    let restored = hints.restore().unwrap();
    assert_eq!(restored.deferred.len(), 1, "{restored}");
    eprintln!("restore: {restored}");
    drop(hints);
    assert!(mergeable(w.pid, start));
    let journal = fs::read_to_string(dir.join("hints.json")).expect("the deferred entry");
    assert!(
        journal.contains(&format!("\"pid\": {}", w.pid)),
        "{journal}"
    );

    // With room again, the next start puts it back.
    cg.limit(None);
    let (hints, restored) = HintControl::begin(lock.clone(), false).unwrap();
    let restored = restored.unwrap();
    assert_eq!(restored.restored, 1, "{restored}");
    assert!(!mergeable(w.pid, start));
    assert!(!dir.join("hints.json").exists());
    drop(hints);
    drop(cg);
    drop(w);
    drop(lock);
    let _ = fs::remove_dir_all(&dir);
}
