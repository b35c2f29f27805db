//! Tables from the finished runs: per optimizer the final and best metric (mean ± std over
//! seeds, Student-t 95% interval), the seed-matched difference to Adam with its interval and
//! p-value, and MADA's gain over Adam divided by the optimizer's — printed only where that
//! optimizer's gain is itself distinguishable from 0. Robustness grids get per-cell values,
//! their median and worst case, and the seed noise measured at the replicate cells. MADA-family
//! runs' coefficient trajectories are written as a table too. Markdown, CSV (polars) and LaTeX.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use polars::prelude::{Column, CsvWriter, DataFrame, SerWriter};
use serde::Serialize;

use outputs::write_atomically;

use crate::catalog::{Metric, Role};
use crate::results::runs::ExperimentRuns;
use crate::results::stats::{paired, stat, Stat};

/// One optimizer's row.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub label: String,
    pub key: String,
    pub role: Role,
    pub final_metric: Stat,
    pub best_metric: Stat,
    /// This optimizer minus Adam over shared seeds (final metric); None for Adam.
    pub diff_vs_adam: Option<Stat>,
    /// MADA's gain over Adam divided by this optimizer's gain (both seed-matched means), where
    /// this optimizer's gain interval excludes 0.
    pub mada_gain_ratio: Option<f64>,
    pub finished_runs: usize,
    pub planned_runs: usize,
    pub elapsed_s: f64,
}

/// The comparison table of a training experiment.
#[derive(Clone, Debug, Serialize)]
pub struct Table {
    pub artifact: String,
    pub metric: Metric,
    pub rows: Vec<Row>,
}

/// Build the table from the finished runs (in the experiment's optimizer order).
pub fn comparison(data: &ExperimentRuns<'_>) -> Table {
    let e = data.experiment;
    let metric = e.metric;
    let adam_key = e.key_with_role(Role::Adam);
    let adam = adam_key.map(|k| data.finals(k, metric)).unwrap_or_default();
    // Gain over Adam, positive = better.
    let gain = |k: &str| -> Stat {
        let d = paired(&data.finals(k, metric), &adam);
        let g: Vec<f64> = d.iter().map(|x| metric.sign() * x).collect();
        stat(&g)
    };
    let mada_gain = e.key_with_role(Role::Mada).map(gain);
    let mut rows = Vec::new();
    for k in e.optimizer_order() {
        let planned: Vec<_> = data.runs.iter().filter(|r| r.key == k && r.grid_point.is_none()).collect();
        if planned.is_empty() {
            continue;
        }
        let done: Vec<_> = planned.iter().filter(|r| r.finished()).collect();
        let named = &e.optimizers[k];
        let diff = (Some(k) != adam_key && !adam.is_empty() && !done.is_empty())
            .then(|| stat(&paired(&data.finals(k, metric), &adam)));
        let ratio = match (&mada_gain, named.role) {
            (Some(m), Role::Other) if m.n > 0 => {
                let g = gain(k);
                (g.excludes_zero() && g.mean > 0.0).then(|| m.mean / g.mean)
            }
            _ => None,
        };
        rows.push(Row {
            label: named.label.clone(),
            key: k.to_string(),
            role: named.role,
            final_metric: stat(&done.iter().map(|r| r.final_metric(metric)).collect::<Vec<_>>()),
            best_metric: stat(&done.iter().map(|r| r.best_metric(metric)).collect::<Vec<_>>()),
            diff_vs_adam: diff,
            mada_gain_ratio: ratio,
            finished_runs: done.len(),
            planned_runs: planned.len(),
            elapsed_s: planned.iter().map(|r| r.elapsed_s()).sum(),
        });
    }
    Table { artifact: e.artifact.clone(), metric, rows }
}

/// "m ± s [lo, hi]", or "m" for one value, "–" for none.
pub fn fmt_stat(s: &Stat, digits: usize) -> String {
    if s.n == 0 {
        return "–".into();
    }
    if s.n == 1 {
        return format!("{:.*}", digits, s.mean);
    }
    format!("{:.*} ± {:.*} [{:.*}, {:.*}]", digits, s.mean, digits, s.std, digits, s.lo, digits, s.hi)
}

/// A paired difference with its interval and p-value.
pub fn fmt_diff(d: &Stat) -> String {
    match d.n {
        0 => "–".into(),
        1 => format!("{:+.4} (1 seed)", d.mean),
        n => format!("{:+.4} [{:+.4}, {:+.4}], p = {:.3} ({n} seeds)", d.mean, d.lo, d.hi, d.p_value()),
    }
}

impl Table {
    pub fn markdown(&self) -> String {
        let m = self.metric.name();
        let mut md = format!(
            "| optimizer | runs finished | final {m} (mean ± std [95% CI]) | best {m} | final − Adam (seed-matched) | MADA gain / its gain |\n|---|---|---|---|---|---|\n"
        );
        for r in &self.rows {
            let _ = writeln!(
                md,
                "| {} | {}/{} | {} | {} | {} | {} |",
                r.label,
                r.finished_runs,
                r.planned_runs,
                fmt_stat(&r.final_metric, 4),
                fmt_stat(&r.best_metric, 4),
                r.diff_vs_adam.as_ref().map_or("–".into(), fmt_diff),
                r.mada_gain_ratio.map_or("–".into(), |x| format!("{x:.2}"))
            );
        }
        md.push_str(
            "\nMADA gain / its gain is printed only where the optimizer's own gain over Adam has a 95% interval that \
             excludes 0 (otherwise the ratio's denominator could be 0); compare the differences instead.\n",
        );
        md
    }

    pub fn latex(&self) -> String {
        let mut s = String::from(
            "\\begin{tabular}{lrlll}\n\\hline\nOptimizer & Seeds & Final & Best & $\\Delta$ vs Adam \\\\\n\\hline\n",
        );
        for r in &self.rows {
            let cell = |x: &Stat| {
                if x.n > 1 {
                    format!("${:.4} \\pm {:.4}$", x.mean, x.std)
                } else {
                    format!("${:.4}$", x.mean)
                }
            };
            let _ = writeln!(
                s,
                "{} & {} & {} & {} & {} \\\\",
                r.label,
                r.final_metric.n,
                cell(&r.final_metric),
                cell(&r.best_metric),
                r.diff_vs_adam.as_ref().map_or("--".into(), cell)
            );
        }
        s.push_str("\\hline\n\\end{tabular}\n");
        s
    }

    pub fn dataframe(&self) -> Result<DataFrame> {
        let col = |name: &str, v: Vec<f64>| Column::new(name.into(), v);
        let f = |g: &dyn Fn(&Row) -> f64| self.rows.iter().map(g).collect::<Vec<f64>>();
        let nan = f64::NAN;
        Ok(DataFrame::new_infer_height(vec![
            Column::new("optimizer".into(), self.rows.iter().map(|r| r.label.clone()).collect::<Vec<_>>()),
            Column::new("seeds".into(), self.rows.iter().map(|r| r.final_metric.n as u32).collect::<Vec<_>>()),
            col("final_mean", f(&|r| r.final_metric.mean)),
            col("final_std", f(&|r| r.final_metric.std)),
            col("final_ci_lo", f(&|r| r.final_metric.lo)),
            col("final_ci_hi", f(&|r| r.final_metric.hi)),
            col("best_mean", f(&|r| r.best_metric.mean)),
            col("best_std", f(&|r| r.best_metric.std)),
            col("diff_vs_adam_mean", f(&|r| r.diff_vs_adam.map_or(nan, |d| d.mean))),
            col("diff_vs_adam_ci_lo", f(&|r| r.diff_vs_adam.map_or(nan, |d| d.lo))),
            col("diff_vs_adam_ci_hi", f(&|r| r.diff_vs_adam.map_or(nan, |d| d.hi))),
            col("diff_vs_adam_p", f(&|r| r.diff_vs_adam.map_or(nan, |d| d.p_value()))),
            col("mada_gain_ratio", f(&|r| r.mada_gain_ratio.unwrap_or(nan))),
        ])?)
    }

    /// Write `<dir>/<artifact>.{md,csv,tex}`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_atomically(&dir.join(format!("{}.md", self.artifact)), self.markdown().as_bytes())?;
        write_atomically(&dir.join(format!("{}.tex", self.artifact)), self.latex().as_bytes())?;
        write_csv(&dir.join(format!("{}.csv", self.artifact)), &mut self.dataframe()?)
    }
}

fn write_csv(path: &Path, df: &mut DataFrame) -> Result<()> {
    let mut buf = Vec::new();
    CsvWriter::new(&mut buf).finish(df)?;
    write_atomically(path, &buf)
}

/// One optimizer over a robustness grid: per cell the final losses of the grid's own seeds
/// (averaged), and the spread of the replicate seeds.
#[derive(Clone, Debug, Serialize)]
pub struct GridSummary {
    pub label: String,
    pub key: String,
    pub role: Role,
    /// (β1, β2) → (train loss, validation loss), mean over the cell's finished runs.
    pub cells: Vec<((f64, f64), (f64, f64))>,
    /// Cells with at least one finished run, of the planned.
    pub finished_cells: usize,
    pub planned_cells: usize,
    /// Seed-to-seed standard deviation of one run's final loss (train, val), pooled over the
    /// cells that have several seeds; NaN without replicates.
    pub noise: (f64, f64),
}

/// Median of the finite values (NaN for none).
pub fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().cloned().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Largest value, a diverged (non-finite) cell counting as +∞.
pub fn worst(v: &[f64]) -> f64 {
    v.iter().fold(f64::NEG_INFINITY, |a, &x| if x.is_finite() { a.max(x) } else { f64::INFINITY })
}

impl GridSummary {
    pub fn train(&self) -> Vec<f64> {
        self.cells.iter().map(|c| c.1 .0).collect()
    }
    pub fn val(&self) -> Vec<f64> {
        self.cells.iter().map(|c| c.1 .1).collect()
    }
    pub fn cell(&self, at: (f64, f64)) -> Option<(f64, f64)> {
        self.cells.iter().find(|c| c.0 == at).map(|c| c.1)
    }
}

/// Pooled within-cell standard deviation of groups of replicate values.
fn pooled_sd(groups: &[Vec<f64>]) -> f64 {
    let (mut ss, mut dof) = (0.0, 0usize);
    for g in groups.iter().filter(|g| g.len() > 1) {
        let m = g.iter().sum::<f64>() / g.len() as f64;
        ss += g.iter().map(|x| (x - m).powi(2)).sum::<f64>();
        dof += g.len() - 1;
    }
    if dof == 0 {
        f64::NAN
    } else {
        (ss / dof as f64).sqrt()
    }
}

pub fn grid_summaries(data: &ExperimentRuns<'_>) -> Vec<GridSummary> {
    let e = data.experiment;
    let tier_seeds = e.tiers.get(&data.tier).map(|t| t.seeds.clone()).unwrap_or_default();
    let mut out = Vec::new();
    for key in e.optimizer_order() {
        let named = &e.optimizers[key];
        let mine: Vec<_> = data.runs.iter().filter(|r| r.key == key && r.grid_point.is_some()).collect();
        if mine.is_empty() {
            continue;
        }
        let cell_of = |r: &crate::results::runs::RunData| {
            let (b1, b2) = r.grid_point.expect("grid run");
            (b1.to_bits(), b2.to_bits())
        };
        let mut main: BTreeMap<(u64, u64), Vec<(f64, f64)>> = BTreeMap::new();
        let mut all: BTreeMap<(u64, u64), Vec<(f64, f64)>> = BTreeMap::new();
        let mut planned = std::collections::BTreeSet::new();
        for r in &mine {
            planned.insert(cell_of(r));
            // A diverged run is that cell's result: an infinite loss (its worst case).
            let v = if r.diverged() {
                (f64::INFINITY, f64::INFINITY)
            } else if r.finished() {
                (r.final_metric(Metric::TrainLoss), r.final_metric(Metric::EvalLoss))
            } else {
                continue;
            };
            all.entry(cell_of(r)).or_default().push(v);
            if tier_seeds.contains(&r.seed) {
                main.entry(cell_of(r)).or_default().push(v);
            }
        }
        let mean = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| v.iter().map(f).sum::<f64>() / v.len() as f64;
        let cells: Vec<((f64, f64), (f64, f64))> = main
            .iter()
            .map(|(&(a, b), v)| ((f64::from_bits(a), f64::from_bits(b)), (mean(v, |x| x.0), mean(v, |x| x.1))))
            .collect();
        let groups =
            |f: fn(&(f64, f64)) -> f64| all.values().map(|v| v.iter().map(f).collect()).collect::<Vec<Vec<f64>>>();
        out.push(GridSummary {
            label: named.label.clone(),
            key: key.to_string(),
            role: named.role,
            finished_cells: cells.len(),
            planned_cells: planned.len(),
            cells,
            noise: (pooled_sd(&groups(|x| x.0)), pooled_sd(&groups(|x| x.1))),
        });
    }
    out
}

pub fn grid_markdown(g: &[GridSummary]) -> String {
    let mut md = String::from(
        "| optimizer | cells finished | train loss: median | worst | val loss: median | worst | seed noise (sd, train / val) |\n|---|---|---|---|---|---|---|\n",
    );
    for s in g {
        let _ = writeln!(
            md,
            "| {} | {}/{} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} / {:.4} |",
            s.label,
            s.finished_cells,
            s.planned_cells,
            median(&s.train()),
            worst(&s.train()),
            median(&s.val()),
            worst(&s.val()),
            s.noise.0,
            s.noise.1
        );
    }
    md
}

/// `<dir>/<artifact>_coefficients.csv`: run, seed, update and the six coefficients of every
/// finished MADA-family run (grid runs included, with their cell in the run label).
pub fn write_coefficients(data: &ExperimentRuns<'_>, dir: &Path) -> Result<bool> {
    let mut csv = String::from("run,seed,update,beta1,beta2,beta3,rho,c,gamma\n");
    let mut any = false;
    for r in data.finished().filter(|r| r.role.is_mada_family() && r.has_coefficients()) {
        any = true;
        for row in &r.log {
            let q = row.coefficients;
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{},{},{},{}",
                r.label, r.seed, row.step, q[0], q[1], q[2], q[3], q[4], q[5]
            );
        }
    }
    if any {
        write_atomically(&dir.join(format!("{}_coefficients.csv", data.experiment.artifact)), csv.as_bytes())?;
    }
    Ok(any)
}
