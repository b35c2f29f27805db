//! Tables from run logs (read with polars): per optimizer, the final and best metric as
//! mean ± std over seeds with a Student-t 95% interval (statrs), the paired difference of each
//! optimizer minus Adam over shared seeds with its interval, and the gain ratio the paper quotes
//! (MADA's gain over Adam divided by another optimizer's gain over Adam). Written as Markdown,
//! CSV and LaTeX.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use polars::prelude::{Column, CsvReadOptions, CsvWriter, DataFrame, DataType, SerReader, SerWriter};
use serde::Serialize;
use statrs::distribution::{ContinuousCDF, StudentsT};

use outputs::write_atomically;

use crate::catalog::{Experiment, PlannedRun};
use crate::run::RunDir;

/// What one run's logs hold.
#[derive(Clone, Debug, Default)]
pub struct RunData {
    pub label: String,
    pub key: String,
    pub seed: u64,
    pub grid_point: Option<(f64, f64)>,
    pub finished: bool,
    /// (update, train_loss, eval_loss, eval_accuracy) per evaluation.
    pub evals: Vec<(f64, f64, f64, f64)>,
    /// (update, coefficients) per logged update (MADA runs; NaN otherwise).
    pub coefficients: Vec<(f64, [f64; 6])>,
    /// (update, training loss) per update.
    pub losses: Vec<(f64, f64)>,
    pub elapsed_s: f64,
    pub items_per_s: f64,
}

fn f64_column(df: &DataFrame, name: &str) -> Result<Vec<f64>> {
    let c = df.column(name).with_context(|| format!("no column {name}"))?.cast(&DataType::Float64)?;
    Ok(c.f64()?.iter().map(|v| v.unwrap_or(f64::NAN)).collect())
}

fn read_csv(path: &Path) -> Result<Option<DataFrame>> {
    if !path.exists() {
        return Ok(None);
    }
    let df = CsvReadOptions::default()
        .with_has_header(true)
        .try_into_reader_with_file_path(Some(path.to_path_buf()))?
        .finish()
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Some(df))
}

impl RunData {
    /// Read a run's folder (None if it has not started).
    pub fn read(run: &PlannedRun) -> Result<Option<Self>> {
        let rd = RunDir::new(&run.dir);
        let Some(eval) = read_csv(&rd.eval())? else { return Ok(None) };
        let mut d = RunData {
            label: run.spec.label.clone(),
            key: run.key.clone(),
            seed: run.seed,
            grid_point: run.grid_point,
            finished: rd.finished(),
            ..Default::default()
        };
        if eval.height() > 0 {
            let (s, t, e, a) = (
                f64_column(&eval, "step")?,
                f64_column(&eval, "train_loss")?,
                f64_column(&eval, "eval_loss")?,
                f64_column(&eval, "eval_accuracy")?,
            );
            d.evals = (0..s.len()).map(|i| (s[i], t[i], e[i], a[i])).collect();
        }
        if let Some(log) = read_csv(&rd.log())? {
            if log.height() > 0 {
                let step = f64_column(&log, "step")?;
                let loss = f64_column(&log, "loss")?;
                let cols: Vec<Vec<f64>> =
                    mada::Coef::ALL.iter().map(|c| f64_column(&log, c.name())).collect::<Result<_>>()?;
                d.coefficients = (0..step.len()).map(|i| (step[i], std::array::from_fn(|k| cols[k][i]))).collect();
                d.losses = step.iter().cloned().zip(loss).collect();
                let el = f64_column(&log, "elapsed_s")?;
                let ips = f64_column(&log, "items_per_s")?;
                d.elapsed_s = *el.last().unwrap_or(&0.0);
                d.items_per_s = ips.iter().sum::<f64>() / ips.len().max(1) as f64;
            }
        }
        Ok(Some(d))
    }

    /// The final value of a metric ("eval_loss", "eval_accuracy", "train_loss").
    pub fn final_metric(&self, metric: &str) -> f64 {
        self.evals.last().map_or(f64::NAN, |e| pick(e, metric))
    }

    /// The best value over the evaluations (min for losses, max for accuracy).
    pub fn best_metric(&self, metric: &str) -> f64 {
        let vals = self.evals.iter().map(|e| pick(e, metric)).filter(|v| v.is_finite());
        if higher_is_better(metric) {
            vals.fold(f64::NAN, f64::max)
        } else {
            vals.fold(f64::NAN, f64::min)
        }
    }
}

/// A metric ("eval_loss", "eval_accuracy", "train_loss") out of one evaluation row.
pub fn pick(e: &(f64, f64, f64, f64), metric: &str) -> f64 {
    match metric {
        "train_loss" => e.1,
        "eval_accuracy" => e.3,
        _ => e.2,
    }
}

pub fn higher_is_better(metric: &str) -> bool {
    metric == "eval_accuracy"
}

/// Mean, sample standard deviation and the Student-t 95% interval of the mean.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Stat {
    pub n: usize,
    pub mean: f64,
    pub std: f64,
    pub lo: f64,
    pub hi: f64,
}

pub fn stat(xs: &[f64]) -> Stat {
    let xs: Vec<f64> = xs.iter().cloned().filter(|v| v.is_finite()).collect();
    let n = xs.len();
    if n == 0 {
        return Stat { n, mean: f64::NAN, std: f64::NAN, lo: f64::NAN, hi: f64::NAN };
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return Stat { n, mean, std: f64::NAN, lo: f64::NAN, hi: f64::NAN };
    }
    let std = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
    let t = StudentsT::new(0.0, 1.0, (n - 1) as f64).expect("valid t").inverse_cdf(0.975);
    let half = t * std / (n as f64).sqrt();
    Stat { n, mean, std, lo: mean - half, hi: mean + half }
}

/// One optimizer's row.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub label: String,
    pub key: String,
    pub final_metric: Stat,
    pub best_metric: Stat,
    /// This optimizer minus Adam over shared seeds (final metric).
    pub diff_vs_adam: Option<Stat>,
    /// MADA's gain over Adam divided by this optimizer's gain over Adam (gains: mean paired
    /// differences on shared seeds; only where this optimizer beats Adam).
    pub mada_gain_ratio: Option<f64>,
    pub finished_runs: usize,
    pub elapsed_s: f64,
}

/// The comparison table of a training experiment.
#[derive(Clone, Debug, Serialize)]
pub struct Table {
    pub artifact: String,
    pub metric: String,
    pub rows: Vec<Row>,
    /// MADA's gain over Adam divided by the mean gain of the other (non-MADA, non-Adam,
    /// non-HyperAdam) optimizers.
    pub mada_gain_vs_others: Option<f64>,
}

const ADAM: &str = "adam";
const MADA: &str = "mada";

/// Build the table from the runs' data (in the experiment's optimizer order).
pub fn comparison(e: &Experiment, runs: &[RunData]) -> Table {
    let metric = e.metric.as_str();
    let mut by_key: BTreeMap<&str, Vec<&RunData>> = BTreeMap::new();
    for r in runs.iter().filter(|r| !r.evals.is_empty()) {
        by_key.entry(r.key.as_str()).or_default().push(r);
    }
    let finals = |k: &str| -> BTreeMap<u64, f64> {
        by_key.get(k).map(|v| v.iter().map(|r| (r.seed, r.final_metric(metric))).collect()).unwrap_or_default()
    };
    let adam = finals(ADAM);
    let sign = if higher_is_better(metric) { 1.0 } else { -1.0 };
    // Differences to Adam on the seeds both ran (same initialization and data order).
    let paired = |k: &str| -> Vec<f64> { finals(k).iter().filter_map(|(s, v)| adam.get(s).map(|a| v - a)).collect() };
    // Gain over Adam, positive = better: the mean paired difference, so that the gain ratio
    // agrees with the "final − Adam" column beside it.
    let gain = |k: &str| -> Option<f64> {
        let d = paired(k);
        let g = sign * stat(&d).mean;
        (!d.is_empty() && g.is_finite()).then_some(g)
    };
    let mada_gain = gain(MADA);
    // The order the tiers list the optimizers in, then any other key with runs.
    let mut ordered: Vec<String> = Vec::new();
    for k in e.tiers.values().flat_map(|t| t.optimizers.iter()).chain(e.optimizers.keys()) {
        if by_key.contains_key(k.as_str()) && !ordered.contains(k) {
            ordered.push(k.clone());
        }
    }
    let mut rows = Vec::new();
    for k in &ordered {
        let rs = &by_key[k.as_str()];
        let f: Vec<f64> = rs.iter().map(|r| r.final_metric(metric)).collect();
        let b: Vec<f64> = rs.iter().map(|r| r.best_metric(metric)).collect();
        let diff = (k != ADAM && !adam.is_empty()).then(|| stat(&paired(k)));
        let ratio = match (mada_gain, gain(k)) {
            (Some(m), Some(g)) if k != MADA && k != ADAM && g > 0.0 => Some(m / g),
            _ => None,
        };
        rows.push(Row {
            label: e.optimizers[k].label.clone(),
            key: k.clone(),
            final_metric: stat(&f),
            best_metric: stat(&b),
            diff_vs_adam: diff,
            mada_gain_ratio: ratio,
            finished_runs: rs.iter().filter(|r| r.finished).count(),
            elapsed_s: rs.iter().map(|r| r.elapsed_s).sum(),
        });
    }
    let others: Vec<f64> =
        ordered.iter().filter(|k| ![ADAM, MADA, "hyperadam"].contains(&k.as_str())).filter_map(|k| gain(k)).collect();
    let mada_gain_vs_others = match mada_gain {
        Some(m) if !others.is_empty() => {
            let mean = others.iter().sum::<f64>() / others.len() as f64;
            (mean > 0.0).then_some(m / mean)
        }
        _ => None,
    };
    Table { artifact: e.artifact.clone(), metric: metric.to_string(), rows, mada_gain_vs_others }
}

fn fmt_stat(s: &Stat, digits: usize) -> String {
    if s.n == 0 {
        return "–".into();
    }
    if s.n == 1 {
        return format!("{:.*}", digits, s.mean);
    }
    format!("{:.*} ± {:.*} [{:.*}, {:.*}]", digits, s.mean, digits, s.std, digits, s.lo, digits, s.hi)
}

impl Table {
    pub fn markdown(&self) -> String {
        let mut md = format!(
            "| optimizer | seeds | final {m} (mean ± std [95% CI]) | best {m} | final − Adam (paired, 95% CI) | MADA gain / its gain |\n|---|---|---|---|---|---|\n",
            m = self.metric
        );
        for r in &self.rows {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                r.label,
                r.final_metric.n,
                fmt_stat(&r.final_metric, 4),
                fmt_stat(&r.best_metric, 4),
                r.diff_vs_adam.as_ref().map_or("–".into(), |d| fmt_stat(d, 4)),
                r.mada_gain_ratio.map_or("–".into(), |x| format!("{x:.2}"))
            );
        }
        if let Some(g) = self.mada_gain_vs_others {
            let _ = writeln!(md, "\nMADA's gain over Adam is {g:.2}× the mean gain of the other optimizers (Lion, Adan, AVGrad, Yogi, … present).");
        }
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
            col("mada_gain_ratio", f(&|r| r.mada_gain_ratio.unwrap_or(nan))),
        ])?)
    }

    /// Write `<dir>/<artifact>.{md,csv,tex}`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_atomically(&dir.join(format!("{}.md", self.artifact)), self.markdown().as_bytes())?;
        write_atomically(&dir.join(format!("{}.tex", self.artifact)), self.latex().as_bytes())?;
        let mut df = self.dataframe()?;
        let mut buf = Vec::new();
        CsvWriter::new(&mut buf).finish(&mut df)?;
        write_atomically(&dir.join(format!("{}.csv", self.artifact)), &buf)
    }
}

/// Summary of a robustness grid: per optimizer, the final train loss over the grid points
/// (each point averaged over its seeds).
#[derive(Clone, Debug, Serialize)]
pub struct GridSummary {
    pub label: String,
    pub key: String,
    pub points: Vec<((f64, f64), f64)>,
    pub min: f64,
    pub mean: f64,
    pub median: f64,
    pub max: f64,
    pub best_point: (f64, f64),
}

pub fn grid_summaries(e: &Experiment, runs: &[RunData]) -> Vec<GridSummary> {
    let mut out = Vec::new();
    for (key, named) in &e.optimizers {
        let mut per_point: BTreeMap<(u64, u64), Vec<f64>> = BTreeMap::new();
        for r in runs.iter().filter(|r| &r.key == key && !r.evals.is_empty()) {
            if let Some((b1, b2)) = r.grid_point {
                per_point.entry((b1.to_bits(), b2.to_bits())).or_default().push(r.final_metric("train_loss"));
            }
        }
        if per_point.is_empty() {
            continue;
        }
        let points: Vec<((f64, f64), f64)> = per_point
            .into_iter()
            .map(|((a, b), v)| ((f64::from_bits(a), f64::from_bits(b)), v.iter().sum::<f64>() / v.len() as f64))
            .collect();
        let mut vals: Vec<f64> = points.iter().map(|p| p.1).collect();
        vals.sort_by(f64::total_cmp);
        let best = points.iter().min_by(|a, b| a.1.total_cmp(&b.1)).map(|p| p.0).unwrap_or((f64::NAN, f64::NAN));
        out.push(GridSummary {
            label: named.label.clone(),
            key: key.clone(),
            min: vals[0],
            mean: vals.iter().sum::<f64>() / vals.len() as f64,
            median: vals[vals.len() / 2],
            max: vals[vals.len() - 1],
            best_point: best,
            points,
        });
    }
    out
}

pub fn grid_markdown(g: &[GridSummary]) -> String {
    let mut md = String::from(
        "| optimizer | grid points | min | mean | median | max | best init (β1, β2) |\n|---|---|---|---|---|---|---|\n",
    );
    for s in g {
        let _ = writeln!(
            md,
            "| {} | {} | {:.4} | {:.4} | {:.4} | {:.4} | ({}, {}) |",
            s.label,
            s.points.len(),
            s.min,
            s.mean,
            s.median,
            s.max,
            s.best_point.0,
            s.best_point.1
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(key: &str, label: &str, seed: u64, final_loss: f64) -> RunData {
        RunData {
            label: label.into(),
            key: key.into(),
            seed,
            finished: true,
            evals: vec![(10.0, 2.0, final_loss + 0.5, f64::NAN), (20.0, 1.0, final_loss, f64::NAN)],
            ..Default::default()
        }
    }

    #[test]
    fn comparison_pairs_seeds_and_computes_the_gain_ratio() {
        let toml = r#"
artifact = "t"
title = "t"
paper = "t"
kind = "training"
[optimizers.adam]
label = "Adam"
spec = { name = "adam" }
[optimizers.mada]
label = "MADA"
spec = { name = "mada" }
[optimizers.lion]
label = "Lion"
spec = { name = "lion" }
[tiers.cpu]
optimizers = ["adam", "mada", "lion"]
seeds = [1]
"#;
        let e: Experiment = toml::from_str(toml).unwrap();
        let runs = vec![
            run("adam", "Adam", 1, 3.0),
            run("adam", "Adam", 2, 3.2),
            run("adam", "Adam", 3, 3.1),
            run("mada", "MADA", 1, 2.9),
            run("mada", "MADA", 2, 3.0),
            run("mada", "MADA", 3, 2.95),
            run("lion", "Lion", 1, 2.95),
        ];
        let t = comparison(&e, &runs);
        assert_eq!(t.rows.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(), ["adam", "mada", "lion"]);
        let mada = &t.rows[1];
        assert!((mada.final_metric.mean - 2.95).abs() < 1e-12);
        // Paired differences (−0.1, −0.2, −0.15): mean −0.15, sd 0.05, t_{0.975,2} = 4.3027.
        let d = mada.diff_vs_adam.unwrap();
        assert!(
            (d.mean + 0.15).abs() < 1e-12 && (d.hi - (-0.15 + 4.302653 * 0.05 / 3f64.sqrt())).abs() < 1e-5,
            "{d:?}"
        );
        assert!((mada.best_metric.mean - 2.95).abs() < 1e-12);
        // Paired gains over Adam: MADA 0.15, Lion 3.0 − 2.95 = 0.05 (seed 1 only) → ratio 3 (against
        // Adam's mean over seeds, 3.1, Lion's gain would be 0.15).
        assert!((t.rows[2].mada_gain_ratio.unwrap() - 3.0).abs() < 1e-9);
        assert!((t.mada_gain_vs_others.unwrap() - 3.0).abs() < 1e-9);
        let md = t.markdown();
        assert!(md.contains("| MADA | 3 | 2.9500 ± 0.0500") && md.contains("3.00"), "{md}");
        assert!(t.latex().starts_with("\\begin{tabular}"));
        assert_eq!(t.dataframe().unwrap().height(), 3);
    }

    #[test]
    fn t_interval_matches_the_textbook() {
        let s = stat(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(s.mean, 3.0);
        assert!((s.std - 1.5811388).abs() < 1e-6);
        // t_{0.975, 4} = 2.776445
        assert!((s.hi - (3.0 + 2.776445 * 1.5811388 / 5f64.sqrt())).abs() < 1e-5);
        assert_eq!(stat(&[2.0]).n, 1);
        assert!(stat(&[f64::NAN]).mean.is_nan());
    }
}
