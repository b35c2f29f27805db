//! Figures from run logs (plotters, SVG and PNG): evaluation curves with seed bands, MADA's
//! coefficient trajectories, and robustness-grid heat maps.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;

use outputs::plot::{save, HeatMap, LineChart, Panel, Series};

use crate::catalog::Experiment;
use crate::results::tables::{pick, stat, GridSummary, RunData};

fn metric_name(m: &str) -> &str {
    match m {
        "eval_accuracy" => "test accuracy",
        "train_loss" => "train loss",
        _ => "validation loss",
    }
}

/// Mean ± std over seeds at each evaluation step.
fn banded(runs: &[&RunData], metric: &str) -> Series {
    let mut at: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for r in runs {
        for e in &r.evals {
            let v = pick(e, metric);
            if v.is_finite() {
                at.entry(e.0 as u64).or_default().push(v);
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

/// `<dir>/<artifact>_curves.{svg,png}` (+ `_coefficients` when MADA-family runs exist).
pub fn training_figures(e: &Experiment, runs: &[RunData], dir: &Path) -> Result<Vec<PathBuf>> {
    let mut by_key: BTreeMap<&str, Vec<&RunData>> = BTreeMap::new();
    for r in runs.iter().filter(|r| !r.evals.is_empty()) {
        by_key.entry(&r.key).or_default().push(r);
    }
    if by_key.is_empty() {
        return Ok(Vec::new());
    }
    let order: Vec<&str> = e.optimizers.keys().map(String::as_str).filter(|k| by_key.contains_key(k)).collect();
    let mut panels = vec![Panel::Lines(LineChart {
        title: format!("{}: {}", e.title, metric_name(&e.metric)),
        x_label: "optimizer updates".into(),
        y_label: metric_name(&e.metric).into(),
        series: order.iter().map(|k| banded(&by_key[k], &e.metric)).collect(),
        ..Default::default()
    })];
    if e.metric != "train_loss" {
        panels.push(Panel::Lines(LineChart {
            title: "training loss (evaluation)".into(),
            x_label: "optimizer updates".into(),
            y_label: "train loss".into(),
            series: order.iter().map(|k| banded(&by_key[k], "train_loss")).collect(),
            ..Default::default()
        }));
    }
    let mut out = save(&dir.join(format!("{}_curves", e.artifact)), &panels, 2, (620, 420))?.to_vec();
    // Coefficient trajectories of every learned-coefficient run (first seed of each optimizer).
    let mut coef_panels = Vec::new();
    for k in &order {
        let r = by_key[k][0];
        if r.coefficients.iter().all(|(_, q)| q[0].is_nan()) {
            continue;
        }
        let names = ["β1", "β2", "β3", "ρ", "c", "γ"];
        coef_panels.push(Panel::Lines(LineChart {
            title: format!("{} coefficients (seed {})", r.label, r.seed),
            x_label: "optimizer updates".into(),
            y_label: "value".into(),
            y_range: Some((-0.05, 1.05)),
            series: (0..6)
                .map(|i| Series::line(names[i], r.coefficients.iter().map(|(s, q)| (*s, q[i])).collect()))
                .collect(),
            ..Default::default()
        }));
    }
    if !coef_panels.is_empty() {
        out.extend(save(&dir.join(format!("{}_coefficients", e.artifact)), &coef_panels, 2, (620, 420))?);
    }
    Ok(out)
}

/// `<dir>/<artifact>_grid.{svg,png}`: one heat map per optimizer of the final train loss over
/// the initial (β1, β2), on a shared colour range clipped at the 90th percentile of all cells.
pub fn grid_figure(e: &Experiment, grids: &[GridSummary], dir: &Path) -> Result<Vec<PathBuf>> {
    if grids.is_empty() {
        return Ok(Vec::new());
    }
    // Like the official plot (values above 0.8 drawn at 0.8), the colour scale stops at a
    // high quantile so that one diverged point does not flatten the rest; cells print values.
    let mut all: Vec<f64> = grids.iter().flat_map(|g| g.points.iter().map(|p| p.1)).filter(|v| v.is_finite()).collect();
    all.sort_by(f64::total_cmp);
    let lo = all.first().copied().unwrap_or(0.0);
    let hi = all.get((all.len() * 9) / 10).copied().unwrap_or(1.0).max(lo + 1e-9);
    let panels: Vec<Panel> = grids
        .iter()
        .map(|g| {
            let mut xs: Vec<f64> = g.points.iter().map(|p| p.0 .0).collect();
            let mut ys: Vec<f64> = g.points.iter().map(|p| p.0 .1).collect();
            xs.sort_by(f64::total_cmp);
            xs.dedup();
            ys.sort_by(f64::total_cmp);
            ys.dedup();
            let values = ys
                .iter()
                .map(|y| {
                    xs.iter().map(|x| g.points.iter().find(|p| p.0 == (*x, *y)).map_or(f64::NAN, |p| p.1)).collect()
                })
                .collect();
            Panel::Heat(HeatMap {
                title: format!("{}: final train loss", g.label),
                x_label: "initial β1".into(),
                y_label: "initial β2".into(),
                xs,
                ys,
                values,
                range: (lo, hi),
            })
        })
        .collect();
    Ok(save(&dir.join(format!("{}_grid", e.artifact)), &panels, 3, (480, 420))?.to_vec())
}
