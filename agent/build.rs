//! Builds the eBPF object (`memfabric-ebpf`) for the BPF target with the nightly toolchain
//! and bpf-linker, via aya-build, so that a plain `cargo build` of the agent embeds fresh
//! probes. `cargo xtask setup` installs what this needs (nightly rust-src, bpf-linker).
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    // Without the `ebpf` feature (xtask's build of the library) there is nothing to build.
    if std::env::var_os("CARGO_FEATURE_EBPF").is_none() {
        return Ok(());
    }
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "memfabric-ebpf")
        .ok_or_else(|| anyhow!("memfabric-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    // Rebuild when shared types change too: they define the kernel/user ABI.
    println!(
        "cargo:rerun-if-changed={}",
        root_dir.join("../common/src").as_str()
    );
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context(
        "building the eBPF programs failed; run `cargo xtask setup` to install the nightly \
         toolchain's rust-src and bpf-linker",
    )
}
