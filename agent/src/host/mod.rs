//! The read-only observers of the host: which processes are VMs and where their guest RAM
//! is ([`inventory`], [`maps`]), KSM's counters and knobs as sysfs shows them ([`ksm`]),
//! what pagemap and kpageflags say of a page ([`pagemap`], [`merged`]), when a VM is
//! described again ([`redescribe`]), and the kernel's
//! tracepoints and types ([`tracefs`], [`btf`]). Nothing here writes: changes to the host
//! go through `actuate`.

pub mod btf;
pub mod inventory;
pub mod ksm;
pub mod maps;
pub mod merged;
pub mod pagemap;
pub mod redescribe;
pub mod tracefs;
