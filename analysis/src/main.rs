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
    /// Check every bound on random instances, study the interpolation claim, run the Reddi
    /// counterexample, and write reports/analysis/. Exits non-zero if a bound is violated.
    Bounds {
        /// CI size (≥ 100 instances in all, a few seconds to minutes).
        #[arg(long)]
        quick: bool,
        /// Output folder.
        #[arg(long, default_value = "reports/analysis")]
        out: PathBuf,
        /// The slot file with the paper's own bound statements.
        #[arg(long, default_value = "reports/reference/paper-bounds.toml")]
        slots: PathBuf,
    },
    /// Only the Reddi et al. counterexample (three panels, CSV, table).
    Reddi {
        #[arg(long, default_value_t = 2_000_000)]
        steps: u64,
        #[arg(long, default_value = "reports/analysis")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Trace { spec, out } => analysis::trace::command(&spec, &out),
        Command::Bounds { quick, out, slots } => match analysis::report::run(&out, quick, &slots, true) {
            Ok(o) => {
                println!("bounds: {} instances, {} violations", o.instances, o.violations);
                if o.violations > 0 {
                    return ExitCode::FAILURE;
                }
                Ok(())
            }
            Err(e) => Err(e),
        },
        Command::Reddi { steps, out } => analysis::report::reddi_outputs(&out, steps, 1_000).map(|md| print!("{md}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
