//! Running commands: echo them, fail with the command line in the error.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{Context as _, bail};

/// Set by Ctrl-C or SIGTERM once [`catch_interrupts`] ran.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// From now on Ctrl-C and SIGTERM only set [`interrupted`]: a command that boots guests
/// or changes KSM ends at its next check and runs its own teardown, which a signal's
/// default action (the end of the process) skips. Once per process.
pub fn catch_interrupts() -> anyhow::Result<()> {
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst)).context("Ctrl-C handler")
}

/// Whether Ctrl-C or SIGTERM arrived since [`catch_interrupts`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_owned()
}

/// `cargo` as invoked for this xtask (respects `CARGO`).
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

/// `cargo` of the nightly toolchain, for the eBPF crate (`-Z build-std`). Goes through
/// rustup explicitly, as `CARGO` points at the stable toolchain's cargo itself.
pub fn nightly_cargo() -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", "nightly", "cargo"])
        .current_dir(root())
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO");
    c
}

fn describe(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `c`, streaming its output; errors if it fails.
pub fn run(c: &mut Command) -> anyhow::Result<()> {
    let line = describe(c);
    eprintln!("+ {line}");
    let status = c.status().with_context(|| format!("starting `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `c` quietly and returns its stdout, or `None` if it could not run or failed.
pub fn output(c: &mut Command) -> Option<String> {
    let out = c.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether we run as root.
/// Where `cargo xtask setup` puts promtool; the tests check the exposition with it.
pub const PROMTOOL: &str = "/usr/local/bin/promtool";

pub fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}
