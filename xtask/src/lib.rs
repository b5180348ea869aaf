//! Library half of xtask, shared with the integration tests: commands, KSM settings that
//! survive a crash, and the QEMU VM lab.

pub mod cmd;
pub mod ksm;
pub mod lab;
