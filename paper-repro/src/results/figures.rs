//! Figures from the finished runs (SVG and PNG): evaluation curves with seed bands, MADA's
//! coefficient trajectories (beside the official GPT-2 124M ones), and robustness-grid heat maps
//! of the final train and validation losses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;

use outputs::plot::{save, HeatMap, LineChart, Panel, Series};

use crate::catalog::Metric;
use crate::results::official::OfficialRun;
use crate::results::runs::{pick, ExperimentRuns, RunData};
use crate::results::stats::stat;
use crate::results::tables::GridSummary;

const COEFFICIENT_NAMES: [&str; 6] = ["β1", "β2", "β3", "ρ", "c", "γ"];

/// Mean ± std over seeds at each evaluation step.
fn banded(runs: &[&RunData], metric: Metric) -> Series {
    let mut at: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for r in runs {
        for e in &r.evals {
            let v = pick(e, metric);
            if v.is_finite() {
                at.entry(e.step).or_default().push(v);
            }
        }
    }
    let mut points = Vec::new();
    let mut band = Vec::new();
    for (s, v) in at {
        let st = stat(&v);
        let sd = if st.n > 1 { st.std } else { 0.0 };
        points.push((s as f64, st.mean));
        band.push((s as f64, st.mean - sd, st.mean + sd));
    }
    let name = runs.first().map(|r| r.label.clone()).unwrap_or_default();
    let name = if runs.len() > 1 { format!("{name} ({} seeds)", runs.len()) } else { name };
    let s = Series::line(name, points);
    if runs.len() > 1 {
        s.with_band(band)
    } else {
        s
    }
}

/// A panel of one run's six coefficients against updates (up to `until`, if given).
pub fn coefficient_panel(title: String, rows: &[(f64, [f64; 6])]) -> Panel {
    Panel::Lines(LineChart {
        title,
        x_label: "optimizer updates".into(),
        y_label: "value".into(),
        y_range: Some((-0.05, 1.05)),
        series: (0..6)
            .map(|i| Series::line(COEFFICIENT_NAMES[i], rows.iter().map(|(s, q)| (*s, q[i])).collect()))
            .collect(),
        ..Default::default()
    })
}

/// A run's logged coefficients as (update, q).
pub fn trajectory(r: &RunData) -> Vec<(f64, [f64; 6])> {
    r.log.iter().map(|l| (l.step as f64, l.coefficients)).collect()
}

/// `<dir>/<artifact>_curves.{svg,png}` (+ `_coefficients` when MADA-family runs finished).
pub fn training_figures(data: &ExperimentRuns<'_>, dir: &Path) -> Result<Vec<PathBuf>> {
    let e = data.experiment;
    let mut by_key: BTreeMap<&str, Vec<&RunData>> = BTreeMap::new();
    for r in data.finished().filter(|r| r.grid_point.is_none()) {
        by_key.entry(&r.key).or_default().push(r);
    }
    if by_key.is_empty() {
        return Ok(Vec::new());
    }
    let order: Vec<&str> = e.optimizer_order().into_iter().filter(|k| by_key.contains_key(k)).collect();
    let mut panels = vec![Panel::Lines(LineChart {
        title: format!("{}: {}", e.title, e.metric.label()),
        x_label: "optimizer updates".into(),
        y_label: e.metric.label().into(),
        series: order.iter().map(|k| banded(&by_key[k], e.metric)).collect(),
        ..Default::default()
    })];
    if e.metric != Metric::TrainLoss {
        panels.push(Panel::Lines(LineChart {
            title: "training loss (evaluation)".into(),
            x_label: "optimizer updates".into(),
            y_label: "train loss".into(),
            series: order.iter().map(|k| banded(&by_key[k], Metric::TrainLoss)).collect(),
            ..Default::default()
        }));
    }
    let mut out = save(&dir.join(format!("{}_curves", e.artifact)), &panels, 2, (620, 420))?.to_vec();
    let coef_panels: Vec<Panel> = order
        .iter()
        .map(|k| by_key[k][0])
        .filter(|r| r.has_coefficients())
        .map(|r| coefficient_panel(format!("{} coefficients (seed {})", r.label, r.seed), &trajectory(r)))
        .collect();
    if !coef_panels.is_empty() {
        out.extend(save(&dir.join(format!("{}_coefficients", e.artifact)), &coef_panels, 2, (620, 420))?);
    }
    Ok(out)
}

/// A run's coefficient trajectory with its title: (label, (update, q) rows).
pub type Trajectory = (String, Vec<(f64, [f64; 6])>);

/// `<dir>/coefficients_vs_official.{svg,png}`: the official GPT-2 124M MADA runs over their first
/// `horizon` updates beside this tier's MADA runs over theirs, so that the speed of the
/// coefficients can be compared update for update.
pub fn coefficients_vs_official(
    ours: &[Trajectory],
    official: &[OfficialRun],
    horizon: u64,
    dir: &Path,
) -> Result<Vec<PathBuf>> {
    let mut panels: Vec<Panel> = official
        .iter()
        .filter(|r| r.name.starts_with("MADA"))
        .map(|r| {
            let rows: Vec<(f64, [f64; 6])> =
                r.rows.iter().filter(|x| x.0 <= horizon).map(|x| (x.0 as f64, x.1)).collect();
            coefficient_panel(format!("official GPT-2 124M {}", r.name), &rows)
        })
        .collect();
    panels.extend(ours.iter().map(|(label, rows)| coefficient_panel(label.clone(), rows)));
    if panels.is_empty() {
        return Ok(Vec::new());
    }
    Ok(save(&dir.join("coefficients_vs_official"), &panels, 3, (520, 380))?.to_vec())
}

/// `<dir>/<artifact>_grid.{svg,png}`: heat maps of the final train loss (top row) and
/// validation loss (bottom row) per optimizer over the initial (β1, β2); each row shares one
/// colour range clipped at its 90th percentile, like the official plot's clip at 0.8.
pub fn grid_figure(artifact: &str, grids: &[GridSummary], dir: &Path) -> Result<Vec<PathBuf>> {
    if grids.is_empty() {
        return Ok(Vec::new());
    }
    let mut panels = Vec::new();
    for (what, val) in [("final train loss", false), ("final validation loss", true)] {
        let value = |c: &((f64, f64), (f64, f64))| if val { c.1 .1 } else { c.1 .0 };
        let mut all: Vec<f64> =
            grids.iter().flat_map(|g| g.cells.iter().map(value)).filter(|v| v.is_finite()).collect();
        all.sort_by(f64::total_cmp);
        let lo = all.first().copied().unwrap_or(0.0);
        let hi = all.get((all.len() * 9) / 10).copied().unwrap_or(1.0).max(lo + 1e-9);
        for g in grids {
            let mut xs: Vec<f64> = g.cells.iter().map(|p| p.0 .0).collect();
            let mut ys: Vec<f64> = g.cells.iter().map(|p| p.0 .1).collect();
            xs.sort_by(f64::total_cmp);
            xs.dedup();
            ys.sort_by(f64::total_cmp);
            ys.dedup();
            let values = ys
                .iter()
                .map(|y| xs.iter().map(|x| g.cells.iter().find(|p| p.0 == (*x, *y)).map_or(f64::NAN, value)).collect())
                .collect();
            panels.push(Panel::Heat(HeatMap {
                title: format!("{}: {what}", g.label),
                x_label: "initial β1".into(),
                y_label: "initial β2".into(),
                xs,
                ys,
                values,
                range: (lo, hi),
            }));
        }
    }
    Ok(save(&dir.join(format!("{artifact}_grid")), &panels, grids.len(), (480, 420))?.to_vec())
}
