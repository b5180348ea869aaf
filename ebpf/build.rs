//! Emits `bpf_target_arch` when the crate is checked for the host (clippy), as aya-build
//! does through RUSTFLAGS when it builds the crate for the BPF target.
fn main() -> aya_build::Result<()> {
    aya_build::emit_bpf_target_arch_cfg()
}
