//! What the run folders of an experiment hold, read through the run-log schema.
//!
//! Only a run with `result.json` (written last, after its final evaluation) is *finished*; its
//! numbers enter the tables, figures and the ledger. A run with logs but no result is
//! *unfinished* and is listed as such, never as a final number; a malformed log is an error
//! naming the file and line.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::catalog::{Experiment, Metric, PlannedRun, Role, Tier};
use crate::paths::Paths;
use crate::run::log::{read_rows, EvalRow, LogRow, RunDir, RunResult};

/// How far a planned run got.
#[derive(Clone, Debug, PartialEq)]
pub enum RunStatus {
    NotStarted,
    /// Updates logged so far (it resumes from its last checkpoint).
    Unfinished {
        updates: u64,
    },
    /// Its loss, gradient or hyper-gradient went non-finite at this update.
    Diverged {
        update: u64,
    },
    Finished,
}

/// One planned run and what its folder holds.
#[derive(Clone, Debug)]
pub struct RunData {
    pub key: String,
    pub role: Role,
    pub label: String,
    pub seed: u64,
    pub grid_point: Option<(f64, f64)>,
    pub dir: PathBuf,
    pub status: RunStatus,
    pub result: Option<RunResult>,
    pub evals: Vec<EvalRow>,
    pub log: Vec<LogRow>,
}

impl RunData {
    /// Read a planned run's folder.
    pub fn read(run: &PlannedRun) -> Result<Self> {
        let rd = RunDir::new(&run.dir);
        let mut d = RunData {
            key: run.key.clone(),
            role: run.role,
            label: run.spec.label.clone(),
            seed: run.seed,
            grid_point: run.grid_point,
            dir: run.dir.clone(),
            status: RunStatus::NotStarted,
            result: None,
            evals: Vec::new(),
            log: Vec::new(),
        };
        if !rd.spec().exists() {
            return Ok(d);
        }
        let (log, eval) = (rd.log(), rd.eval());
        if log.path().exists() {
            d.log = read_rows(log.path())?;
        }
        if eval.path().exists() {
            d.evals = read_rows(eval.path())?;
        }
        if !rd.result().exists() {
            d.status = match rd.read_failure()?.and_then(|f| f.diverged_at) {
                Some(update) => RunStatus::Diverged { update },
                None => RunStatus::Unfinished { updates: d.log.last().map_or(0, |r| r.step) },
            };
            return Ok(d);
        }
        let result = rd.read_result()?;
        if result.spec_id != run.spec.id() {
            bail!("{}: result.json belongs to run {}, not {}", run.dir.display(), result.spec_id, run.spec.id());
        }
        let last = d.evals.last().map(|e| e.step);
        if last != Some(result.updates) || d.log.len() as u64 != result.updates {
            bail!(
                "{}: result.json reports {} updates, but log.csv has {} rows and eval.csv ends at update {}",
                run.dir.display(),
                result.updates,
                d.log.len(),
                last.map_or("–".into(), |s| s.to_string())
            );
        }
        d.result = Some(result);
        d.status = RunStatus::Finished;
        Ok(d)
    }

    pub fn finished(&self) -> bool {
        self.status == RunStatus::Finished
    }

    pub fn diverged(&self) -> bool {
        matches!(self.status, RunStatus::Diverged { .. })
    }

    /// The final value of `metric` (NaN unless finished).
    pub fn final_metric(&self, metric: Metric) -> f64 {
        match (self.finished(), self.evals.last()) {
            (true, Some(e)) => pick(e, metric),
            _ => f64::NAN,
        }
    }

    /// The best value over the evaluations (NaN unless finished).
    pub fn best_metric(&self, metric: Metric) -> f64 {
        if !self.finished() {
            return f64::NAN;
        }
        let vals = self.evals.iter().map(|e| pick(e, metric)).filter(|v| v.is_finite());
        if metric.higher_is_better() {
            vals.fold(f64::NAN, f64::max)
        } else {
            vals.fold(f64::NAN, f64::min)
        }
    }

    /// Training seconds logged (finished or not).
    pub fn elapsed_s(&self) -> f64 {
        self.log.last().map_or(0.0, |r| r.elapsed_s)
    }

    /// Whether the run logged coefficients (a MADA-family run).
    pub fn has_coefficients(&self) -> bool {
        self.log.iter().any(|r| r.coefficients[0].is_finite())
    }
}

/// A metric out of one evaluation row.
pub fn pick(e: &EvalRow, metric: Metric) -> f64 {
    match metric {
        Metric::TrainLoss => e.train_loss,
        Metric::EvalAccuracy => e.eval_accuracy,
        Metric::EvalLoss => e.eval_loss,
    }
}

/// Every planned run of an experiment at a tier, with what its folder holds.
pub struct ExperimentRuns<'a> {
    pub experiment: &'a Experiment,
    pub tier: Tier,
    pub runs: Vec<RunData>,
}

impl<'a> ExperimentRuns<'a> {
    /// Read every planned run of `e` at `tier` (errors name the folder and file).
    pub fn collect(e: &'a Experiment, tier: Tier, paths: &Paths) -> Result<Self> {
        let mut runs = Vec::new();
        for p in e.plan(tier, &paths.runs)? {
            runs.push(RunData::read(&p).with_context(|| format!("reading the run {}", p.dir.display()))?);
        }
        Ok(Self { experiment: e, tier, runs })
    }

    pub fn finished(&self) -> impl Iterator<Item = &RunData> {
        self.runs.iter().filter(|r| r.finished())
    }

    pub fn unfinished(&self) -> impl Iterator<Item = &RunData> {
        self.runs.iter().filter(|r| matches!(r.status, RunStatus::Unfinished { .. }))
    }

    pub fn diverged(&self) -> impl Iterator<Item = &RunData> {
        self.runs.iter().filter(|r| r.diverged())
    }

    pub fn started(&self) -> bool {
        self.runs.iter().any(|r| r.status != RunStatus::NotStarted)
    }

    /// (seed, final metric) of the finished runs of optimizer `key` (no grid point).
    pub fn finals(&self, key: &str, metric: Metric) -> Vec<(u64, f64)> {
        self.finished()
            .filter(|r| r.key == key && r.grid_point.is_none())
            .map(|r| (r.seed, r.final_metric(metric)))
            .collect()
    }

    /// Training time of every run, finished or not.
    pub fn elapsed_s(&self) -> f64 {
        self.runs.iter().map(|r| r.elapsed_s()).sum()
    }
}
