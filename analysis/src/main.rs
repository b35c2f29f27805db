use std::path::{Path, PathBuf};
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
    /// counterexample, and write the tier's analysis reports. Exits non-zero if a bound is
    /// violated.
    Bounds {
        /// The smoke tier's size (CI), instead of the cpu tier's.
        #[arg(long)]
        quick: bool,
        /// Output folder (default: reports/smoke/analysis with --quick, reports/cpu/analysis).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The experiment catalog (bounds.toml and reddi.toml hold the settings).
        #[arg(long, default_value = "experiments")]
        experiments: PathBuf,
        /// The slot file with the paper's own bound statements.
        #[arg(long, default_value = "reports/reference/paper-bounds.toml")]
        slots: PathBuf,
        /// Replace the regression set (experiments/bounds-worst.json) with the worst instances
        /// this run found.
        #[arg(long)]
        keep_worst: bool,
    },
    /// Only the Reddi et al. counterexample (three panels, CSV, table).
    Reddi {
        #[arg(long, default_value_t = 2_000_000)]
        steps: u64,
        #[arg(long, default_value = "reports/cpu/analysis")]
        out: PathBuf,
        /// The experiment file with the `[reddi]` settings.
        #[arg(long, default_value = "experiments/reddi.toml")]
        experiment: PathBuf,
    },
}

fn bounds(
    quick: bool,
    out: Option<PathBuf>,
    experiments: &Path,
    slots: &Path,
    keep_worst: bool,
) -> anyhow::Result<bool> {
    let tier = if quick { "smoke" } else { "cpu" };
    let out = out.unwrap_or_else(|| PathBuf::from(format!("reports/{tier}/analysis")));
    let settings = analysis::report::BoundsSettings::read(&experiments.join("bounds.toml"), tier)?;
    let regression = experiments.join("bounds-worst.json");
    let o = analysis::report::run(&out, &settings, slots, &regression)?;
    if keep_worst {
        std::fs::copy(out.join("worst-instances.json"), &regression)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", regression.display()))?;
        eprintln!("bounds: regression set written to {}", regression.display());
    }
    println!("bounds: {} instances, {} violations", o.instances, o.violations);
    println!("mutants: {} of {} detected", o.mutants_detected, o.mutants);
    let reddi_file = experiments.join("reddi.toml");
    let steps = reddi_steps(&reddi_file, tier)?;
    eprintln!("bounds: Reddi counterexample ({steps} steps)…");
    analysis::report::reddi_outputs(&out, &analysis::reddi::Settings::read(&reddi_file)?, steps, 1_000)?;
    Ok(o.violations == 0)
}

/// `[tiers.<tier>] steps` of the Reddi experiment file.
fn reddi_steps(path: &Path, tier: &str) -> anyhow::Result<u64> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let table: toml::Table = toml::from_str(&text).with_context(|| format!("invalid TOML in {}", path.display()))?;
    table
        .get("tiers")
        .and_then(|t| t.get(tier))
        .and_then(|t| t.get("steps"))
        .and_then(|s| s.as_integer())
        .and_then(|s| u64::try_from(s).ok())
        .with_context(|| format!("{}: [tiers.{tier}] has no steps", path.display()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Trace { spec, out } => analysis::trace::command(&spec, &out),
        Command::Bounds { quick, out, experiments, slots, keep_worst } => {
            match bounds(quick, out, &experiments, &slots, keep_worst) {
                Ok(true) => Ok(()),
                Ok(false) => return ExitCode::FAILURE,
                Err(e) => Err(e),
            }
        }
        Command::Reddi { steps, out, experiment } => analysis::reddi::Settings::read(&experiment)
            .and_then(|s| analysis::report::reddi_outputs(&out, &s, steps, 1_000))
            .map(|md| print!("{md}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
