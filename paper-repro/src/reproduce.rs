//! `just reproduce [tier]`: run every experiment of the tier that has no finished run yet
//! (interrupted runs resume from their checkpoint), then regenerate tables, figures and the
//! report. `just tables`, `just figures` and `just report` regenerate from existing runs only.

use anyhow::{bail, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::catalog::{self, Experiment, Kind};
use crate::data::embedded::ensure_embedded_data;
use crate::paths::Paths;
use crate::results::report;
use crate::run::train;

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).expect("valid template").progress_chars("=> ")
}

/// What `reproduce` did.
pub struct Outcome {
    pub runs_total: usize,
    pub runs_finished: usize,
    pub failures: Vec<String>,
}

/// Run the tier, then regenerate everything.
pub fn reproduce(paths: &Paths, tier: &str, only: Option<&str>) -> Result<Outcome> {
    if !catalog::TIERS.contains(&tier) {
        bail!("unknown tier `{tier}` (smoke, cpu, paper)");
    }
    ensure_embedded_data()?;
    let experiments: Vec<Experiment> =
        catalog::load(&paths.experiments)?.into_iter().filter(|e| only.is_none_or(|o| o == e.artifact)).collect();
    if experiments.is_empty() {
        bail!("no experiment in {} matches", paths.experiments.display());
    }
    // Plan everything first, so a catalog error stops before any work.
    let plans: Vec<(Experiment, Vec<catalog::PlannedRun>)> =
        experiments.into_iter().map(|e| e.plan(tier, &paths.runs).map(|p| (e, p))).collect::<Result<_>>()?;
    let multi = MultiProgress::new();
    let overall =
        multi.add(ProgressBar::new(plans.len() as u64).with_style(style("experiments {bar:30} {pos}/{len} {msg}")));
    let mut failures = Vec::new();
    let mut runs_total = 0;
    let mut runs_finished = 0;
    for (e, runs) in &plans {
        overall.set_message(e.artifact.clone());
        match e.kind {
            Kind::Training | Kind::Grid => {
                for (i, run) in runs.iter().enumerate() {
                    runs_total += 1;
                    let bar =
                        multi.add(ProgressBar::new(run.spec.updates).with_style(style(
                            "  {prefix} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
                        )));
                    bar.set_prefix(format!("{} {}/{} {} s{}", e.artifact, i + 1, runs.len(), run.spec.label, run.seed));
                    match train(&run.spec, &run.dir, &bar, None) {
                        Ok(_) => runs_finished += 1,
                        Err(err) => {
                            failures.push(format!("{} ({}, seed {}): {err:#}", e.artifact, run.spec.label, run.seed))
                        }
                    }
                    bar.finish_and_clear();
                    multi.remove(&bar);
                }
            }
            Kind::Reddi => {
                let steps = e.tiers.get(tier).and_then(|t| t.steps).unwrap_or(2_000_000);
                if let Err(err) = analysis::report::reddi_outputs(&paths.analysis(), steps, (steps / 2000).max(1)) {
                    failures.push(format!("{}: {err:#}", e.artifact));
                }
            }
            Kind::Bounds => {
                let quick = e.tiers.get(tier).and_then(|t| t.quick).unwrap_or(tier == "smoke");
                let slots = paths.reports.join("reference/paper-bounds.toml");
                match multi.suspend(|| analysis::report::run(&paths.analysis(), quick, &slots, false)) {
                    Ok(o) if o.violations > 0 => {
                        failures.push(format!("{}: {} bound violations", e.artifact, o.violations))
                    }
                    Ok(_) => {}
                    Err(err) => failures.push(format!("{}: {err:#}", e.artifact)),
                }
            }
        }
        overall.inc(1);
    }
    overall.finish_and_clear();
    report::regenerate(paths, tier, &failures)?;
    Ok(Outcome { runs_total, runs_finished, failures })
}
