//! The guest initramfs: busybox (from Debian's busybox-static) plus our /init. One image
//! serves every profile (the kernel command line selects the workload); it is rebuilt only
//! when /init or busybox change.

use std::{
    fs,
    hash::{DefaultHasher, Hash as _, Hasher as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::cmd;

/// The guest's /init.
pub const INIT: &str = include_str!("init.sh");
pub const BUSYBOX: &str = "/bin/busybox";

/// Builds (or reuses) the initramfs in `cache`; returns its path.
pub fn build(cache: &Path) -> anyhow::Result<PathBuf> {
    let busybox = fs::read(BUSYBOX)
        .with_context(|| format!("{BUSYBOX} missing: run `cargo xtask setup` (busybox-static)"))?;
    let mut h = DefaultHasher::new();
    INIT.hash(&mut h);
    busybox.hash(&mut h);
    let out = cache.join(format!("initramfs-{:016x}.cpio.gz", h.finish()));
    if out.is_file() {
        return Ok(out);
    }
    fs::create_dir_all(cache)?;
    let tree = cache.join(".initramfs.tree");
    let _ = fs::remove_dir_all(&tree);
    for d in ["bin", "proc", "sys", "dev", "data"] {
        fs::create_dir_all(tree.join(d))?;
    }
    fs::write(tree.join("bin/busybox"), &busybox)?;
    fs::write(tree.join("init"), INIT)?;
    for f in ["bin/busybox", "init"] {
        cmd::run(Command::new("chmod").arg("0755").arg(tree.join(f)))?;
    }
    let tmp = out.with_extension("tmp");
    let script = format!(
        "find . | cpio --quiet -o -H newc | gzip -1 > '{}'",
        tmp.display()
    );
    cmd::run(Command::new("sh").arg("-c").arg(&script).current_dir(&tree))
        .context("building the initramfs (cpio and gzip are needed: cargo xtask setup)")?;
    fs::rename(&tmp, &out)?;
    fs::remove_dir_all(&tree)?;
    Ok(out)
}

/// Lists the files in an initramfs (for checks and tests).
pub fn list(image: &Path) -> anyhow::Result<Vec<String>> {
    let script = format!("gzip -dc '{}' | cpio --quiet -t", image.display());
    let out = cmd::output(Command::new("sh").arg("-c").arg(script))
        .with_context(|| format!("listing {}", image.display()))?;
    let files: Vec<String> = out.lines().map(str::to_owned).collect();
    if files.is_empty() {
        bail!("{} is empty", image.display());
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_script_is_valid_shell() {
        let tmp = std::env::temp_dir().join(format!("memfabric-init-{}.sh", std::process::id()));
        fs::write(&tmp, INIT).unwrap();
        let ok = Command::new(BUSYBOX)
            .args(["sh", "-n"])
            .arg(&tmp)
            .status()
            .expect("busybox (cargo xtask setup installs busybox-static)")
            .success();
        fs::remove_file(&tmp).unwrap();
        assert!(ok, "busybox sh -n rejected init.sh");
    }

    #[test]
    fn image_holds_init_and_busybox_and_is_reused() {
        let cache =
            std::env::temp_dir().join(format!("memfabric-initramfs-{}", std::process::id()));
        let image = build(&cache).unwrap();
        let files = list(&image).unwrap();
        for f in ["init", "bin/busybox", "proc", "data"] {
            assert!(files.iter().any(|x| x == f), "{f} missing from {files:?}");
        }
        let modified = fs::metadata(&image).unwrap().modified().unwrap();
        assert_eq!(build(&cache).unwrap(), image);
        assert_eq!(fs::metadata(&image).unwrap().modified().unwrap(), modified);
        fs::remove_dir_all(&cache).unwrap();
    }
}
