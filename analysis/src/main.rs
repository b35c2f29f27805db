use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Numerical checks of the MADA paper's convergence claims, and optimizer traces.
#[derive(Parser)]
#[command(name = "analysis", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one optimizer on a trace spec (JSON) in f64 and write its trajectory as CSV.
    Trace {
        /// The spec (format: analysis/tests/data/reference-traces/README.md).
        spec: PathBuf,
        /// Where to write the CSV.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Trace { spec, out } => analysis::trace::command(&spec, &out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
