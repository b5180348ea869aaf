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
    if !memfabric_harness::privileged("a_taken_port_is_refused_with_exit_code_4") {
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

/// A `[fabric]` config in `dir` listening on `listen`, with a CA, a certificate for node
/// `n1` and a gossip key of `key_mode`.
fn fabric_config(dir: &std::path::Path, listen: &str, key_mode: u32) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["n1".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    std::fs::write(dir.join("n1.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("n1.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("gossip.key"), [0x5au8; 32]).unwrap();
    std::fs::set_permissions(
        dir.join("gossip.key"),
        std::fs::Permissions::from_mode(key_mode),
    )
    .unwrap();
    let cfg = dir.join("fabric.toml");
    std::fs::write(
        &cfg,
        format!(
            "[fabric]\nlisten = \"{listen}\"\nnode = \"n1\"\nca_file = \"{d}/ca.crt\"\n\
             cert_file = \"{d}/n1.crt\"\nkey_file = \"{d}/n1.key\"\n\
             gossip_key_file = \"{d}/gossip.key\"\n",
            d = dir.display()
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn a_taken_fabric_port_exits_4_like_the_http_one_and_a_readable_key_2() {
    let dir = std::env::temp_dir().join(format!("memfabric-fabricexit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // The fabric's port, taken (TCP and UDP).
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let _udp = std::net::UdpSocket::bind(("127.0.0.1", port));
    let run_on = |port: u16, key_mode: u32| {
        let cfg = fabric_config(&dir, &format!("127.0.0.1:{port}"), key_mode);
        run(&[
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
    };
    let (code, err) = run_on(port, 0o600);
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("[fabric] listening"), "{err}");
    // A gossip key others can read: bad input, the daemon says how to fix it.
    drop(tcp);
    let free = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (code, err) = run_on(free, 0o644);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
