//! `analysis bounds`: run the checks, write reports/analysis/ (instance CSV, a markdown table per
//! bound, the interpolation study, figures), and print the one-line verdict.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::bounds::{read_slots, registry, total, Bound, Form};
use crate::checks::{check_all, expected_grad_norm, summarize, Instance, Row, Size, Summary};
use crate::frameworks::{NonconvexSettings, Variant};
use crate::interp::{explicit_minimized_at_adam, nonconvex_curves, regret_curves, Curve};
use crate::problems::Kind;
use crate::reddi;
use outputs::plot::{save, LineChart, Panel, Series};
use outputs::write_atomically;

/// How large the bound checks are (a tier of `experiments/bounds.toml`).
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoundsSettings {
    pub size: Size,
    /// Instances per framework of the interpolation study.
    pub curves: usize,
    /// `quick` (CI size) or `full`, for the report's wording.
    pub quick: bool,
    /// The adversarial search's budget.
    pub search: crate::search::SearchSettings,
    /// The lemma-level checks' budget.
    pub lemmas: crate::lemmas::LemmaSettings,
}

impl BoundsSettings {
    /// The settings of `tier` in the bounds experiment file (`[tiers.<tier>.bounds]`).
    pub fn read(path: &Path, tier: &str) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let table: toml::Table =
            toml::from_str(&text).with_context(|| format!("invalid TOML in {}", path.display()))?;
        let value = table
            .get("tiers")
            .and_then(|t| t.get(tier))
            .and_then(|t| t.get("bounds"))
            .with_context(|| format!("{} has no [tiers.{tier}.bounds]", path.display()))?;
        value.clone().try_into().with_context(|| format!("{}: [tiers.{tier}.bounds]", path.display()))
    }
}

/// What `bounds` found.
pub struct Outcome {
    pub instances: usize,
    pub violations: usize,
    /// Mutants the instances detect, of all mutants.
    pub mutants_detected: usize,
    pub mutants: usize,
}

/// The interpolation study of one framework, counted (THEORY.md §6).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InterpolationCounts {
    pub framework: String,
    pub instances: usize,
    /// An interior ρ gives a bound below both ends (THEORY.md's definition of the claim).
    pub interior: usize,
    /// … and the empirical quantity is also lower there than at both ends.
    pub follows: usize,
    /// Some ρ < 1 gives a bound below the Adam/AMSGrad end ρ = 1 (the weaker reading).
    pub below_rho_one: usize,
    /// The bound is smallest at ρ = 0 (AVGrad).
    pub minimized_at_zero: usize,
}

impl InterpolationCounts {
    fn of(framework: &str, curves: &[Curve]) -> Self {
        Self {
            framework: framework.into(),
            instances: curves.len(),
            interior: curves.iter().filter(|c| c.interior()).count(),
            follows: curves.iter().filter(|c| c.interior() && c.empirical_follows()).count(),
            below_rho_one: curves.iter().filter(|c| c.below_the_end()).count(),
            minimized_at_zero: curves.iter().filter(|c| c.bound_argmin() == 0.0).count(),
        }
    }
}

/// What `bounds` writes as `bounds.json`, for the report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BoundsReport {
    /// `quick` or `full`.
    pub mode: String,
    pub instances: usize,
    pub violations: usize,
    pub summaries: Vec<Summary>,
    /// Nonconvex semi-explicit (Adam ↔ AVGrad) and regret (AMSGrad ↔ AVGrad).
    pub interpolation: Vec<InterpolationCounts>,
    /// Instances where the explicit nonconvex bound is smallest at the Adam end.
    pub explicit_minimized_at_adam: usize,
    /// Mutants detected, of all mutants (`mutants.md` lists them).
    pub mutants_detected: usize,
    pub mutants: usize,
    /// Per bound, the largest empirical/bound the adversarial search found.
    pub worst_found: Vec<(String, f64)>,
    /// Instances of the regression set and the search (also in `instances`), and their violations.
    pub searched_instances: usize,
    pub searched_violations: usize,
    /// The lemma-level checks (`lemmas.md`); their violations are counted in `violations`.
    pub lemmas: Vec<crate::lemmas::LemmaReport>,
}

impl BoundsReport {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("invalid {}", path.display()))
    }
}

/// One optimizer's end of the Reddi counterexample (`reddi.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReddiRow {
    pub name: String,
    pub x: f64,
    pub avg_regret: f64,
    /// MADA-family only (None otherwise): final ρ, β3, c.
    pub rho: Option<f64>,
    pub beta3: Option<f64>,
    pub c: Option<f64>,
}

/// What the Reddi counterexample writes as `reddi.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReddiReport {
    pub steps: u64,
    pub lr: f64,
    pub rows: Vec<ReddiRow>,
}

impl ReddiReport {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("invalid {}", path.display()))
    }

    /// The row of optimizer `name`.
    pub fn row(&self, name: &str) -> Option<&ReddiRow> {
        self.rows.iter().find(|r| r.name == name)
    }
}

fn csv_escape(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn rows_csv(rows: &[Row]) -> String {
    let mut s = String::from(
        "bound,instance,seed,problem,settings,seeds,empirical,empirical_ucb,bound_value,tightness,status,note\n",
    );
    for r in rows {
        let status =
            serde_json::to_value(r.status).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{:e},{:e},{:e},{:e},{},{}",
            r.bound,
            r.instance,
            r.seed,
            csv_escape(&r.problem),
            csv_escape(&r.settings),
            r.seeds,
            r.empirical,
            r.empirical_ucb,
            r.bound_value,
            r.tightness,
            status,
            csv_escape(&r.note)
        );
    }
    s
}

fn bounds_markdown(
    bounds: &[Bound],
    summaries: &[Summary],
    worst: &[(String, f64)],
    size: &Size,
    mode: &str,
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Bound checks ({mode})\n");
    let _ = writeln!(
        md,
        "Each bound is confronted with the quantity it controls on random instances ({} per bound, {} noise seeds per \
         nonconvex instance, N in [{}, {}]). A nonconvex instance passes only if the one-sided 99% Student-t upper \
         confidence bound of the empirical mean is below the bound; a regret instance passes if R_T ≤ bound exactly. \
         *Unresolved* instances (neither a confident pass nor a confident violation) count as violations. Tightness = \
         empirical / bound. Derivations and sources: `analysis/THEORY.md`. None of these is the MADA paper's theorem \
         (its statements were not available); `reports/reference/paper-bounds.toml` is the slot for them.\n",
        size.instances, size.seeds, size.steps.0, size.steps.1
    );
    let _ = writeln!(
        md,
        "| bound | source | instances | checked | excluded | violations | unresolved | tightness min | median | max | max found by the search |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|");
    for (b, s) in bounds.iter().zip(summaries) {
        let found = worst.iter().find(|w| w.0 == b.id).map_or("–".to_string(), |w| format!("{:.3}", w.1));
        let _ = writeln!(
            md,
            "| `{}` | {} | {} | {} | {} | {} | {} | {:.2e} | {:.2e} | {:.2e} | {found} |",
            b.id,
            b.source.label(),
            s.instances,
            s.checked,
            s.excluded,
            s.violations,
            s.unresolved,
            s.tightness_min,
            s.tightness_median,
            s.tightness_max
        );
    }
    for b in bounds {
        let _ = writeln!(
            md,
            "\n## `{}` — {}\n\n- Bound: {}\n- Assumptions: {}\n- Source: {}",
            b.id,
            b.title,
            b.formula,
            b.assumptions,
            b.source.label()
        );
    }
    md
}

fn interp_markdown(nc: &[Curve], rg: &[Curve]) -> String {
    let mut md = String::from("# The interpolation claim\n\n");
    md.push_str(
        "For each instance the derived bound and the empirical quantity are evaluated on the grid ρ ∈ {0, 0.1, …, 1} \
         (THEORY.md §6). *Interior* = the bound's minimum lies strictly inside (0, 1) and below both ends; *follows* = \
         at that ρ the empirical quantity is also below its value at both ends.\n\n",
    );
    for (name, curves) in [
        ("Adam (ρ=1) ↔ AVGrad (ρ=0), nonconvex, semi-explicit bound", nc),
        ("AMSGrad (ρ=1) ↔ AVGrad (ρ=0), regret bound", rg),
    ] {
        let interior = curves.iter().filter(|c| c.interior()).count();
        let follows = curves.iter().filter(|c| c.interior() && c.empirical_follows()).count();
        let _ = writeln!(md, "## {name}\n\n- instances: {}\n- bound minimum interior: {interior}\n- of those, empirical quantity follows: {follows}", curves.len());
        if std::ptr::eq(curves, nc) {
            let _ = writeln!(
                md,
                "- explicit bound (ρ > 0, THEORY.md §3) minimized at the Adam end ρ = 1: {} of {}",
                explicit_minimized_at_adam(curves),
                curves.len()
            );
        }
        let _ = writeln!(md, "\n| instance | problem | bound argmin ρ | empirical argmin ρ | interior | follows | bound(0)/bound(1) |\n|---|---|---|---|---|---|---|");
        for c in curves {
            let _ = writeln!(
                md,
                "| {} | {} | {:.1} | {:.1} | {} | {} | {:.3} |",
                c.instance,
                c.problem,
                c.bound_argmin(),
                c.empirical_argmin(),
                c.interior(),
                c.interior() && c.empirical_follows(),
                c.bound[0] / c.bound[c.bound.len() - 1]
            );
        }
        md.push('\n');
    }
    md
}

/// Figure 1: bound vs empirical against N, for each optimizer form, on one fixed problem.
fn bound_vs_n_figure(out: &Path, seeds: usize, quick: bool) -> Result<()> {
    let ns: Vec<usize> = if quick { vec![10, 30, 100, 300] } else { vec![10, 30, 100, 300, 1000, 3000] };
    let inst = Instance::new(Kind::LogisticNoisy, 5, 0.2, 1e-8);
    let bounds = registry();
    let mut panels = Vec::new();
    let forms: [(&str, Variant, &str); 4] = [
        ("Adagrad", Variant::Adagrad, "defossez-adagrad"),
        ("Adam", Variant::Adam, "defossez-adam"),
        ("interpolation ρ = 0.5", Variant::Interp { rho: 0.5 }, "interp-semi"),
        ("AVGrad (ρ = 0)", Variant::Interp { rho: 0.0 }, "interp-semi"),
    ];
    for (title, variant, id) in forms {
        let bound = bounds.iter().find(|b| b.id == id).expect("registered");
        let (mut emp, mut bnd) = (vec![], vec![]);
        for &n in &ns {
            let s = NonconvexSettings { variant, alpha: 0.02, beta1: 0.0, beta2: 0.99, eps: 1e-8, steps: n };
            let runs = inst.runs(&s, seeds, 99).map_err(|e| anyhow::anyhow!(e))?;
            let e = runs.iter().map(|r| expected_grad_norm(r, 0.0)).sum::<f64>() / runs.len() as f64;
            let b = match &bound.form {
                Form::Nonconvex { terms, .. } => total(&terms(&inst.constants, &s)),
                Form::NonconvexSemi { terms, .. } => {
                    runs.iter().map(|r| total(&terms(&inst.constants, &s, r))).sum::<f64>() / runs.len() as f64
                }
                Form::Regret { .. } => f64::NAN,
            };
            emp.push((n as f64, e));
            bnd.push((n as f64, b));
        }
        panels.push(Panel::Lines(LineChart {
            title: format!("{title}: {}", inst.objective.name()),
            x_label: "N".into(),
            y_label: "E‖∇F(x_τ)‖²".into(),
            log_x: true,
            log_y: true,
            series: vec![
                Series::line(format!("bound `{id}`"), bnd).dashed(),
                Series::line("empirical (mean over seeds)", emp),
            ],
            ..Default::default()
        }));
    }
    save(&out.join("bound_vs_n"), &panels, 2, (560, 380))?;
    Ok(())
}

fn curves_figure(out: &Path, nc: &[Curve], rg: &[Curve]) -> Result<()> {
    let norm = |v: &[f64], rho: &[f64]| -> Vec<(f64, f64)> {
        let end = v[v.len() - 1];
        rho.iter().zip(v).map(|(r, x)| (*r, x / end)).collect()
    };
    let pick = |cs: &[Curve]| -> Vec<Curve> { cs.iter().take(6).cloned().collect() };
    let mut panels = Vec::new();
    for (title, curves) in
        [("nonconvex semi-explicit bound(ρ)/bound(1)", pick(nc)), ("regret bound(ρ)/bound(1)", pick(rg))]
    {
        panels.push(Panel::Lines(LineChart {
            title: title.into(),
            x_label: "ρ".into(),
            y_label: "relative to ρ = 1".into(),
            series: curves
                .iter()
                .map(|c| {
                    Series::line(
                        format!("#{} {}", c.instance, c.problem.split(' ').next().unwrap_or("")),
                        norm(&c.bound, &c.rho),
                    )
                })
                .collect(),
            ..Default::default()
        }));
    }
    panels.push(Panel::Lines(LineChart {
        title: "nonconvex empirical E‖∇F‖²(ρ)/value at ρ = 1".into(),
        x_label: "ρ".into(),
        y_label: "relative to ρ = 1".into(),
        series: pick(nc).iter().map(|c| Series::line(format!("#{}", c.instance), norm(&c.empirical, &c.rho))).collect(),
        ..Default::default()
    }));
    panels.push(Panel::Lines(LineChart {
        title: "nonconvex explicit bound(ρ)/bound(1), ρ > 0".into(),
        x_label: "ρ".into(),
        y_label: "relative to ρ = 1".into(),
        log_y: true,
        series: pick(nc)
            .iter()
            .map(|c| {
                Series::line(
                    format!("#{}", c.instance),
                    norm(&c.bound_explicit, &c.rho).into_iter().filter(|p| p.0 > 0.0).collect(),
                )
            })
            .collect(),
        ..Default::default()
    }));
    save(&out.join("bound_of_rho"), &panels, 2, (560, 380))?;
    Ok(())
}

/// The Reddi figure's three panels (R_t/t, x_t, ρ_t), CSV and a markdown summary.
pub fn reddi_outputs(out: &Path, settings: &reddi::Settings, steps: u64, every: u64) -> Result<String> {
    let trs = reddi::run_all(settings, steps, every)?;
    let mut csv = String::from("optimizer,t,avg_regret,x,rho,beta3,c\n");
    for tr in &trs {
        for i in 0..tr.t.len() {
            let _ = writeln!(
                csv,
                "{},{},{:e},{:e},{:e},{:e},{:e}",
                tr.name, tr.t[i], tr.avg_regret[i], tr.x[i], tr.rho[i], tr.beta3[i], tr.c[i]
            );
        }
    }
    write_atomically(&out.join("reddi.csv"), csv.as_bytes())?;
    let series = |f: &dyn Fn(&reddi::Trajectory) -> Vec<f64>| -> Vec<Series> {
        trs.iter()
            .map(|t| Series::line(t.name.clone(), t.t.iter().zip(f(t)).map(|(a, b)| (*a as f64, b)).collect()))
            .collect()
    };
    let t_max = steps as f64;
    let panels = vec![
        Panel::Lines(LineChart {
            title: "Average regret R_t/t (lr = 0.001)".into(),
            x_label: "iterations".into(),
            y_label: "R_t / t".into(),
            x_range: Some((0.0, t_max)),
            y_range: Some((0.0, 1.0)),
            series: series(&|t| t.avg_regret.clone()),
            ..Default::default()
        }),
        Panel::Lines(LineChart {
            title: "Iterate x_t".into(),
            x_label: "iterations".into(),
            y_label: "x_t".into(),
            x_range: Some((0.0, t_max)),
            y_range: Some((-1.1, 1.1)),
            series: series(&|t| t.x.clone()),
            ..Default::default()
        }),
        Panel::Lines(LineChart {
            title: "MADA coefficients".into(),
            x_label: "iterations".into(),
            y_label: "value".into(),
            x_range: Some((0.0, t_max)),
            y_range: Some((-0.1, 1.1)),
            series: trs
                .iter()
                .filter(|t| t.rho.iter().any(|r| r.is_finite()))
                .flat_map(|t| {
                    let pts = |v: &[f64]| t.t.iter().zip(v).map(|(a, b)| (*a as f64, *b)).collect::<Vec<_>>();
                    [
                        Series::line(format!("{} ρ", t.name), pts(&t.rho)),
                        Series::line(format!("{} β3", t.name), pts(&t.beta3)),
                        Series::line(format!("{} c", t.name), pts(&t.c)),
                    ]
                })
                .collect(),
            ..Default::default()
        }),
    ];
    save(&out.join("reddi"), &panels, 3, (520, 380))?;
    let mut md = format!("# Reddi et al. counterexample ({steps} steps, lr 1e-3)\n\n| optimizer | final x_T | final R_T/T | final ρ | final β3 | final c |\n|---|---|---|---|---|---|\n");
    let cell = |v: f64| if v.is_finite() { format!("{v:.4}") } else { "–".into() };
    for t in &trs {
        let i = t.t.len() - 1;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            t.name,
            cell(t.x[i]),
            cell(t.avg_regret[i]),
            cell(t.rho[i]),
            cell(t.beta3[i]),
            cell(t.c[i])
        );
    }
    write_atomically(&out.join("reddi.md"), md.as_bytes())?;
    let finite = |v: f64| v.is_finite().then_some(v);
    let rows = trs
        .iter()
        .map(|t| {
            let i = t.t.len() - 1;
            ReddiRow {
                name: t.name.clone(),
                x: t.x[i],
                avg_regret: t.avg_regret[i],
                rho: finite(t.rho[i]),
                beta3: finite(t.beta3[i]),
                c: finite(t.c[i]),
            }
        })
        .collect();
    let report = ReddiReport { steps, lr: settings.lr, rows };
    write_atomically(&out.join("reddi.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    Ok(md)
}

/// The bound checks and the interpolation study, written to `out`. `regression` is the fixed
/// set of worst instances (checked again, and the search's start points); the new set is
/// written to `out/worst-instances.json`.
pub fn run(out: &Path, settings: &BoundsSettings, slots: &Path, regression: &Path) -> Result<Outcome> {
    let (size, quick) = (settings.size, settings.quick);
    let mut bounds = registry();
    for slot in read_slots(slots)? {
        bounds.push(slot.into_bound()?);
    }
    let curves_n = settings.curves;
    let total = (bounds.len() * size.instances) as u64;
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("bounds {bar:40} {pos}/{len} instances [{elapsed_precise}<{eta_precise}]")
            .expect("template"),
    );
    let rows = check_all(&bounds, &size, &|| bar.inc(1));
    bar.finish_and_clear();
    let summaries: Vec<Summary> = bounds.iter().map(|b| summarize(&b.id, &rows)).collect();
    let kept = crate::search::read_kept(regression)?;
    eprintln!(
        "bounds: adversarial search ({} evaluations per bound and per mutant, {} kept instances)…",
        settings.search.evaluations,
        kept.len()
    );
    let found = crate::search::run(&bounds, &rows, &kept, &size, &settings.search);
    write_atomically(&out.join("worst-instances.json"), serde_json::to_string_pretty(&found.kept)?.as_bytes())?;
    let searched = &found.rows;
    let searched_checked = searched.iter().filter(|r| r.status != crate::checks::Status::Excluded).count();
    let searched_violations = searched.iter().filter(|r| r.status.counts_as_violation()).count();
    let rows: Vec<Row> = rows.into_iter().chain(found.rows.iter().cloned()).collect();
    eprintln!("bounds: lemma-level checks…");
    let lemmas = crate::lemmas::run(&settings.lemmas);
    write_atomically(&out.join("lemmas.md"), crate::lemmas::markdown(&lemmas).as_bytes())?;
    let lemma_violations: usize = lemmas.iter().map(|l| l.violations).sum();
    let mode = if quick { "quick" } else { "full" };
    write_atomically(&out.join("instances.csv"), rows_csv(&rows).as_bytes())?;
    write_atomically(
        &out.join("bounds.md"),
        bounds_markdown(&bounds, &summaries, &found.worst, &size, mode).as_bytes(),
    )?;
    let mutants = crate::mutants::evaluate(&rows);
    let mutants_detected = mutants.iter().filter(|m| m.detected()).count();
    write_atomically(&out.join("mutants.md"), crate::mutants::markdown(&mutants).as_bytes())?;

    eprintln!("bounds: interpolation curves ({curves_n} instances per framework)…");
    let nc = nonconvex_curves(curves_n, &size);
    let rg = regret_curves(curves_n, &size);
    write_atomically(&out.join("interpolation.md"), interp_markdown(&nc, &rg).as_bytes())?;
    write_atomically(&out.join("interpolation.json"), serde_json::to_string_pretty(&[&nc, &rg])?.as_bytes())?;
    curves_figure(out, &nc, &rg)?;
    bound_vs_n_figure(out, size.seeds, quick)?;

    let checked: usize = summaries.iter().map(|s| s.checked).sum::<usize>() + searched_checked;
    let violations: usize =
        summaries.iter().map(|s| s.violations).sum::<usize>() + searched_violations + lemma_violations;
    let report = BoundsReport {
        mode: mode.into(),
        instances: checked,
        violations,
        summaries,
        interpolation: vec![
            InterpolationCounts::of("nonconvex, semi-explicit bound (Adam ρ = 1 ↔ AVGrad ρ = 0)", &nc),
            InterpolationCounts::of("regret bound (AMSGrad ρ = 1 ↔ AVGrad ρ = 0)", &rg),
        ],
        explicit_minimized_at_adam: explicit_minimized_at_adam(&nc),
        mutants_detected,
        mutants: mutants.len(),
        worst_found: found.worst.clone(),
        searched_instances: searched_checked,
        searched_violations,
        lemmas,
    };
    write_atomically(&out.join("bounds.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    Ok(Outcome { instances: checked, violations, mutants_detected, mutants: mutants.len() })
}
