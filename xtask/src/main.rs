//! `cargo xtask`: memfabric's developer and operator tasks. One module per subcommand.
//!
//! xtask deliberately does not depend on the agent crate: building the agent needs the
//! eBPF toolchain that `setup` installs, and `setup` must run on a machine without it.

mod bench;
mod build;
mod demo;
mod lab_cli;
mod lint;
mod load;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "memfabric tasks")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Install what the project needs (Debian packages, nightly rust-src, bpf-linker) and
    /// mount tracefs. Idempotent: skips what is there.
    Setup,
    /// Build the eBPF object alone (target/bpfel-unknown-none/release/memfabric).
    BuildEbpf,
    /// Build the agent (release), eBPF object included.
    Build,
    /// Setup, build, then load and attach every probe, print verifier instruction counts
    /// and attach status, detach. Extra arguments go to `memfabric check`.
    Load {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, then every test: unit tests and the privileged integration tests.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Formatting and clippy (-D warnings) over every crate, the eBPF one included.
    Lint,
    /// The VM lab: QEMU TCG guests running workload profiles.
    Lab {
        #[command(subcommand)]
        cmd: lab_cli::LabCmd,
    },
    /// See memfabric work: boot 3 lab guests, KSM on, the agent watching them, numbers on
    /// screen until Ctrl-C or --seconds; then everything back as it was.
    Demo(demo::DemoArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: bench::Bench,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Commands::Setup => setup::run(),
        Commands::BuildEbpf => build::ebpf().map(|_| ()),
        Commands::Build => build::agent().map(|_| ()),
        Commands::Load { args } => load::run(&args),
        Commands::Test { args } => test::run(&args),
        Commands::Lint => lint::run(),
        Commands::Bench { which } => bench::run(which),
        Commands::Lab { cmd } => lab_cli::run(cmd),
        Commands::Demo(args) => demo::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
