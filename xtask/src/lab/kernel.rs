//! Guest kernels: Debian's cloud kernel packages, resolved against what the archive offers
//! today (exact versions rotate out within weeks), downloaded with `apt-get download` and
//! cached under target/lab/cache.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::cmd;

const META: &str = "linux-image-cloud-amd64";

/// A guest kernel ready to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// Package name, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub package: String,
    pub vmlinuz: PathBuf,
}

impl Kernel {
    /// The kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub fn release(&self) -> &str {
        self.package.trim_start_matches("linux-image-")
    }
}

pub fn cache_dir() -> PathBuf {
    cmd::root().join("target/lab/cache")
}

/// `6.1.0-50`, `6.1.0-50-cloud-amd64` or a full package name -> the package name.
pub fn package_name(spec: &str) -> String {
    let s = spec.trim().trim_start_matches("linux-image-");
    if s.ends_with("-cloud-amd64") {
        format!("linux-image-{s}")
    } else {
        format!("linux-image-{s}-cloud-amd64")
    }
}

fn apt_cache(args: &[&str]) -> Option<String> {
    cmd::output(Command::new("apt-cache").args(args)).filter(|s| !s.trim().is_empty())
}

/// Runs `f`; if it finds nothing, refreshes the package lists once and tries again.
fn with_fresh_lists<T>(f: impl Fn() -> Option<T>) -> anyhow::Result<Option<T>> {
    if let Some(v) = f() {
        return Ok(Some(v));
    }
    eprintln!("lab: refreshing package lists (apt-get update)");
    cmd::run(Command::new("apt-get").arg("update"))?;
    Ok(f())
}

/// The package the cloud kernel meta-package points at today.
pub fn current_package() -> anyhow::Result<String> {
    let found = with_fresh_lists(|| {
        apt_cache(&["depends", META])?
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|d| d.starts_with("linux-image-") && d.ends_with("-cloud-amd64"))
            .map(str::to_owned)
    })?;
    if let Some(p) = found {
        return Ok(p);
    }
    // Offline: fall back to the newest kernel already cached.
    cached_packages()
        .pop()
        .context("cannot resolve the current Debian cloud kernel (apt-cache depends linux-image-cloud-amd64 found nothing) and none is cached")
}

/// `6.1.0-NN` cloud kernels the archive offers, oldest first (for guests that differ).
pub fn available_6_1() -> anyhow::Result<Vec<String>> {
    let list = with_fresh_lists(|| {
        apt_cache(&[
            "search",
            "--names-only",
            "^linux-image-6.1.0-[0-9]+-cloud-amd64$",
        ])
    })?
    .unwrap_or_default();
    let mut pkgs: Vec<(u32, String)> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|p| {
            let n = p
                .strip_prefix("linux-image-6.1.0-")?
                .strip_suffix("-cloud-amd64")?;
            Some((n.parse().ok()?, p.to_owned()))
        })
        .collect();
    pkgs.sort();
    Ok(pkgs.into_iter().map(|(_, p)| p).collect())
}

fn cached_packages() -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(cache_dir())
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.path().join("vmlinuz").is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("linux-image-"))
        .collect();
    v.sort();
    v
}

/// Downloads and unpacks `package` unless it is cached; returns its kernel image.
pub fn fetch(package: &str) -> anyhow::Result<Kernel> {
    let dir = cache_dir().join(package);
    let vmlinuz = dir.join("vmlinuz");
    if vmlinuz.is_file() {
        return Ok(Kernel {
            package: package.to_owned(),
            vmlinuz,
        });
    }
    let tmp = cache_dir().join(format!(".{package}.tmp"));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    eprintln!("lab: downloading {package}");
    cmd::run(Command::new("apt-get").args(["download", package]).current_dir(&tmp))
        .with_context(|| format!("apt-get download {package} (is it still in the archive? try `apt-cache search linux-image-6.1.0`)"))?;
    let deb = fs::read_dir(&tmp)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    let x = tmp.join("x");
    cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x))?;
    let image = find_vmlinuz(&x.join("boot"))?;
    fs::create_dir_all(&dir)?;
    fs::rename(&image, &vmlinuz)?;
    fs::remove_dir_all(&tmp)?;
    Ok(Kernel {
        package: package.to_owned(),
        vmlinuz,
    })
}

fn find_vmlinuz(boot: &Path) -> anyhow::Result<PathBuf> {
    for e in
        fs::read_dir(boot).with_context(|| format!("{} missing in the package", boot.display()))?
    {
        let p = e?.path();
        if p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("vmlinuz-"))
        {
            return Ok(p);
        }
    }
    bail!("no vmlinuz-* in {}", boot.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_from_versions() {
        assert_eq!(package_name("6.1.0-50"), "linux-image-6.1.0-50-cloud-amd64");
        assert_eq!(
            package_name("6.1.0-50-cloud-amd64"),
            "linux-image-6.1.0-50-cloud-amd64"
        );
        assert_eq!(
            package_name("linux-image-6.1.0-50-cloud-amd64"),
            "linux-image-6.1.0-50-cloud-amd64"
        );
    }
}
