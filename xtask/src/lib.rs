//! Library half of xtask, shared with the integration tests and benchmarks: commands, KSM
//! settings that survive a crash, the QEMU VM lab, and report plots.

pub mod bench_args;
pub mod cmd;
pub mod ksm;
pub mod lab;
pub mod plot;
pub mod report;
