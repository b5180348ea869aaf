//! `memfabric run` and `memfabric status` as an operator meets them: bad input gets a
//! clear message and a distinct exit code.

use std::{net::TcpListener, process::Command};

const MEMFABRIC: &str = env!("CARGO_BIN_EXE_memfabric");

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(MEMFABRIC).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_malformed_config_is_refused_with_exit_code_2() {
    let dir = std::env::temp_dir().join(format!("memfabric-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:9977\"\nbogus_key = 1\n").unwrap();
    let (code, err) = run(&["run", "--config", cfg.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("bogus_key") && err.contains("bad.toml"),
        "{err}"
    );
}

#[test]
fn an_unknown_pid_is_refused_with_exit_code_2() {
    let (code, err) = run(&["run", "--pid", "99999999", "--listen", "127.0.0.1:0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no process with PID 99999999"), "{err}");
}

#[test]
fn a_taken_port_is_refused_with_exit_code_4() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var_os("MEMFABRIC_REQUIRE_ROOT").is_none(),
            "needs root"
        );
        eprintln!(
            "\n!!! SKIPPED a_taken_port_is_refused_with_exit_code_4: needs root (eBPF) !!!\n"
        );
        return;
    }
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, err) = run(&["run", "--listen", &addr]);
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("address is taken"), "{err}");
}

#[test]
fn status_works_without_a_daemon() {
    let (code, err) = run(&["status", "--endpoint", "http://127.0.0.1:1"]);
    assert_eq!(code, Some(0), "{err}");
    let out = Command::new(MEMFABRIC)
        .args(["status", "--endpoint", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("one-shot"), "{stdout}");
    assert!(stdout.contains("KSM: run="), "{stdout}");
}
