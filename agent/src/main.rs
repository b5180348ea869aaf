//! The `memfabric` binary: wires the library's modules to the command line.

mod cli;

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    cli::init_logging(cli.verbose, cli.log_format);
    match cli.run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("memfabric: error: {e:#}");
            std::process::ExitCode::from(exit_code(&e))
        }
    }
}

/// Exit codes an operator can script on: 2 bad input (config, flags, unknown PID, a corrupt
/// journal), 3 the host lacks something (root, BPF, tracefs, KSM, a writable state
/// directory), 4 the listen address or the state directory is taken by another memfabric,
/// 1 otherwise.
fn exit_code(e: &anyhow::Error) -> u8 {
    use memfabric::{
        config::ConfigError, daemon::DaemonError, probes::ProbeError, scan::ScanError,
    };
    for cause in e.chain() {
        if let Some(d) = cause.downcast_ref::<DaemonError>() {
            return match d {
                DaemonError::Listen { .. } => 4,
                DaemonError::UnknownPid(_) | DaemonError::KernelThread(_) | DaemonError::Web(_) => {
                    2
                }
                DaemonError::Probes(p) => probe_code(p),
                DaemonError::Fabric(f) => {
                    use memfabric::fabric::node::FabricError;
                    match f {
                        // Like the HTTP listener: the address is taken.
                        FabricError::Listen { .. } => 4,
                        // Its key or certificate files are bad input.
                        FabricError::Key { .. } | FabricError::Tls(_) => 2,
                        FabricError::Gossip(_) => 1,
                    }
                }
                DaemonError::Actuate(a) => actuate_code(a),
                _ => 1,
            };
        }
        if let Some(p) = cause.downcast_ref::<ProbeError>() {
            return probe_code(p);
        }
        if cause.downcast_ref::<ConfigError>().is_some() {
            return 2;
        }
        if let Some(s) = cause.downcast_ref::<ScanError>() {
            return match s {
                ScanError::UnknownPid(_) => 2,
                ScanError::Pagemap { source, .. } | ScanError::Mem { source, .. }
                    if source.kind() == std::io::ErrorKind::PermissionDenied =>
                {
                    3
                }
                _ => 1,
            };
        }
    }
    1
}

fn actuate_code(a: &memfabric::actuate::ActuateError) -> u8 {
    use memfabric::actuate::ActuateError;
    match a {
        ActuateError::Locked { .. } => 4,
        ActuateError::CorruptJournal { .. } | ActuateError::BadValue { .. } => 2,
        a if a.is_host_problem() => 3,
        _ => 1,
    }
}

fn probe_code(p: &memfabric::probes::ProbeError) -> u8 {
    use memfabric::probes::ProbeError;
    match p {
        ProbeError::NotRoot | ProbeError::Tracefs(_) | ProbeError::Load(_) => 3,
        ProbeError::UnknownPid(_)
        | ProbeError::BadTracepoint(_)
        | ProbeError::UnknownProgram(..) => 2,
        _ => 1,
    }
}
