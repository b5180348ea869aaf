//! Kernel struct member offsets from the running kernel's BTF (`/sys/kernel/btf/vmlinux`).
//! aya has no CO-RE for Rust programs, so the agent resolves the few members the probes
//! read and hands their offsets to the programs at load time.

use std::path::Path;

use btf_rs::{Btf, Type};

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "kernel BTF is not available at {VMLINUX_BTF}: {0}; the kernel needs \
         CONFIG_DEBUG_INFO_BTF=y"
    )]
    Unavailable(String),
    #[error("reading kernel BTF: {0}")]
    Parse(String),
}

/// Byte offset of `member` in `struct struct_name`, looking through anonymous nested
/// structs and unions. `Ok(None)` when the struct or member does not exist.
pub fn member_offset(btf: &Btf, struct_name: &str, member: &str) -> Result<Option<u32>, BtfError> {
    let types = btf
        .resolve_types_by_name(struct_name)
        .map_err(|e| BtfError::Parse(e.to_string()))?;
    for ty in types {
        if let Type::Struct(s) = ty
            && let Some(bits) = find_member(btf, &s, member, 0)?
        {
            return Ok(Some(bits / 8));
        }
    }
    Ok(None)
}

fn find_member(
    btf: &Btf,
    s: &btf_rs::Struct,
    member: &str,
    base_bits: u32,
) -> Result<Option<u32>, BtfError> {
    let perr = |e: btf_rs::Error| BtfError::Parse(e.to_string());
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        let bits = base_bits + m.bit_offset();
        if name == member {
            return Ok(Some(bits));
        }
        if !name.is_empty() {
            continue;
        }
        // Anonymous member: descend through modifiers into the nested struct/union.
        let mut ty = btf.resolve_chained_type(m).map_err(perr)?;
        loop {
            match ty {
                Type::Struct(inner) | Type::Union(inner) => {
                    if let Some(found) = find_member(btf, &inner, member, bits)? {
                        return Ok(Some(found));
                    }
                    break;
                }
                Type::Typedef(_) | Type::Const(_) | Type::Volatile(_) | Type::TypeTag(_) => {
                    let next = ty.as_btf_type().expect("modifier types chain");
                    ty = btf.resolve_chained_type(next).map_err(perr)?;
                }
                _ => break,
            }
        }
    }
    Ok(None)
}

/// The kernel struct members the probes read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `task_struct.mm`: lets a fault probe learn its process's `mm`.
    pub task_mm: Option<u32>,
    /// `ksm_rmap_item.address`: which page ksmd merged, for exact COW-break attribution.
    pub rmap_address: Option<u32>,
}

/// Reads the offsets from the running kernel's BTF.
pub fn kernel_offsets() -> Result<KernelOffsets, BtfError> {
    if !Path::new(VMLINUX_BTF).exists() {
        return Err(BtfError::Unavailable("no such file".into()));
    }
    let btf = Btf::from_file(VMLINUX_BTF).map_err(|e| BtfError::Unavailable(e.to_string()))?;
    Ok(KernelOffsets {
        task_mm: member_offset(&btf, "task_struct", "mm")?,
        rmap_address: member_offset(&btf, "ksm_rmap_item", "address")?,
    })
}
