//! `cargo xtask test`: setup, then every test. The privileged integration tests run for
//! real here: MEMFABRIC_REQUIRE_ROOT turns a missing root into a failure, not a skip.
//! Ends with one summary line over every test binary (`tests: N passed, N failed`).

use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
};

use anyhow::{Context as _, bail};
use xtask::cmd;

use crate::setup;

/// `(passed, failed)` from a libtest summary line.
fn counts(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let num = |key: &str| {
        rest.split(';')
            .find_map(|p| {
                p.trim()
                    .trim_start_matches("ok. ")
                    .trim_start_matches("FAILED. ")
                    .strip_suffix(key)
            })
            .and_then(|n| n.trim().parse::<u64>().ok())
    };
    Some((num(" passed")?, num(" failed")?))
}

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!(
            "the test suite loads eBPF programs and drives KSM: run it as root \
             (e.g. `sudo -E cargo xtask test`)"
        );
    }
    setup::run()?;
    let mut c = cmd::cargo();
    c.args([
        "test",
        "--locked",
        "--workspace",
        "--exclude",
        "memfabric-ebpf",
    ])
    .args(args)
    .env("MEMFABRIC_REQUIRE_ROOT", "1")
    .stdout(Stdio::piped());
    eprintln!(
        "+ cargo test --locked --workspace --exclude memfabric-ebpf {}",
        args.join(" ")
    );
    let mut child = c.spawn().context("starting cargo test")?;
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some((p, f)) = counts(&line) {
            passed += p;
            failed += f;
        }
    }
    let status = child.wait()?;
    let ksm = |k: &str| xtask::ksm::read(k).unwrap_or_else(|| "?".into());
    println!(
        "host KSM after the suite: run={} pages_to_scan={} sleep_millisecs={}",
        ksm("run"),
        ksm("pages_to_scan"),
        ksm("sleep_millisecs")
    );
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::counts;

    #[test]
    fn reads_libtest_summaries() {
        assert_eq!(
            counts(
                "test result: ok. 13 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s"
            ),
            Some((13, 0))
        );
        assert_eq!(
            counts(
                "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out"
            ),
            Some((1, 2))
        );
        assert_eq!(counts("running 3 tests"), None);
    }
}
