//! The `memfabric` binary: wires the library's modules to the command line.

mod cli;

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    cli::init_logging(cli.verbose);
    match cli.run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("memfabric: error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
