//! Instances that press on the bounds: a local search per bound, and per mutant, over the
//! problem, its noise and the optimizer settings — always inside the bound's assumptions (the
//! settings it covers, the region where the problem's constants hold) — maximizing
//! empirical/bound (or empirical/mutant). The instances found are checked by the same rule as
//! the random ones and join them in the report; the worst ones are kept as a fixed regression
//! set (`experiments/bounds-worst.json`) that every run checks again.
//!
//! The search is a (1+1) evolution strategy with a step-size rule (grow the perturbation after
//! a success, shrink it after a failure), started from the best of: the regression set, the
//! random instances, and a few fresh draws of the problems built to press on the bounds
//! ([`crate::problems::Huber`], [`crate::frameworks::SignAdversary`]). It is deterministic
//! given its seed.

use std::path::Path;

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::bounds::{total, Bound, Form, Term};
use crate::checks::{
    evaluate_nonconvex, evaluate_regret, nonconvex_case, regret_case, HuberShape, NonconvexCase, OnlineProblem,
    RegretCase, Row, Size, Status,
};
use crate::frameworks::{NonconvexSettings, RegretSettings, Variant};
use crate::mutants::{mutants_of, Change, Mutant};
use crate::problems::Kind;

/// One instance of either framework.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "framework", rename_all = "snake_case")]
pub enum Case {
    Nonconvex(NonconvexCase),
    Regret(RegretCase),
}

/// How hard to search (`[tiers.<tier>.bounds] search` of `experiments/bounds.toml`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchSettings {
    /// Evaluations per target (each bound, and each of its mutants).
    pub evaluations: usize,
    /// The largest N the search may choose (T for regret is 4× this; 10× for the cheap
    /// one-dimensional Huber problem).
    pub max_steps: usize,
    /// Noise seeds per nonconvex evaluation during the search (the best case is checked again
    /// with the tier's full number).
    pub seeds: usize,
    pub seed: u64,
}

/// What a search target is: the bound itself or one of its mutants.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Target {
    Bound,
    Mutant(String),
}

/// A kept instance: the regression set's entries.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Kept {
    pub bound: String,
    pub target: Target,
    /// empirical / bound of the real bound on this instance when it was kept.
    pub tightness: f64,
    pub case: Case,
}

/// The regression set file: a JSON list of [`Kept`]. A missing file is an empty set.
pub fn read_kept(path: &Path) -> Result<Vec<Kept>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("invalid regression set {}", path.display()))
}

/// Check `case` against `bound` (instance id and seed are labels).
pub fn evaluate(bound: &Bound, case: &Case, instance: usize, seeds: usize) -> Option<Row> {
    match case {
        Case::Nonconvex(c) => evaluate_nonconvex(bound, instance, c.problem_seed, c, seeds),
        Case::Regret(c) => evaluate_regret(bound, instance, c.settings_seed(), c),
    }
}

impl RegretCase {
    fn settings_seed(&self) -> u64 {
        match &self.problem {
            OnlineProblem::Random { seed, .. } => *seed,
            _ => 0,
        }
    }
}

/// The objective of a target on an evaluated row: empirical/value, where value is the real
/// bound or the mutant; −∞ unless the real bound passes (a real violation is reported
/// separately by the caller).
fn score(row: &Row, mutant: Option<&Mutant>) -> f64 {
    let Some(data) = &row.data else { return f64::NEG_INFINITY };
    if row.status != Status::Pass {
        return f64::NEG_INFINITY;
    }
    let value = |t: &[Term]| mutant.map_or_else(|| total(t), |m| m.value(t));
    let (emp, v) = data.means(&value);
    if v > 0.0 && v.is_finite() {
        emp / v
    } else {
        f64::NEG_INFINITY
    }
}

fn log_step(rng: &mut StdRng, x: f64, scale: f64, lo: f64, hi: f64) -> f64 {
    let z: f64 = rng.random_range(-1.0..1.0) * scale;
    (x.ln() + z).exp().clamp(lo, hi)
}

/// A step in log-odds: moves a probability-like parameter (β2) as freely near 0 as near 1.
fn logit_step(rng: &mut StdRng, x: f64, scale: f64, lo: f64, hi: f64) -> f64 {
    let z: f64 = rng.random_range(-1.0..1.0) * scale;
    let logit = (x / (1.0 - x)).ln() + z;
    (1.0 / (1.0 + (-logit).exp())).clamp(lo, hi)
}

/// A neighbour of `s` that the bound still covers (None if none was found).
fn perturb_nonconvex(
    c: &NonconvexCase,
    rng: &mut StdRng,
    scale: f64,
    max_steps: usize,
    covers: &dyn Fn(&NonconvexSettings) -> bool,
) -> Option<NonconvexCase> {
    for _ in 0..20 {
        let mut n = c.clone();
        let s = &mut n.settings;
        if rng.random_bool(0.1) {
            n.problem_seed = rng.random();
            if rng.random_bool(0.3) {
                n.kind = Kind::ALL[rng.random_range(0..Kind::ALL.len())];
                n.huber = None;
            }
        }
        if rng.random_bool(0.1) {
            n.noise_seed = rng.random();
        }
        if let Some(h) = &mut n.huber {
            h.delta = log_step(rng, h.delta, scale, 1e-4, 10.0);
            h.start = (h.start + rng.random_range(-0.3..0.3) * scale).clamp(0.0, 2.0);
            if rng.random_bool(0.05) {
                h.d = (h.d + 1).min(4);
            }
        }
        s.alpha = log_step(rng, s.alpha, scale, 1e-6, 10.0);
        if s.variant != Variant::Adagrad {
            s.beta2 = 1.0 - log_step(rng, 1.0 - s.beta2, scale, 1e-5, 0.5);
        }
        if s.beta1 > 0.0 {
            s.beta1 = 1.0 - log_step(rng, 1.0 - s.beta1, scale, 1e-3, 0.99);
        }
        s.eps = log_step(rng, s.eps, scale, 1e-12, 1.0);
        // The one-dimensional Huber costs a few operations per step: it may run 10× longer.
        let cap = if n.kind == Kind::Huber { 10 * max_steps } else { max_steps };
        s.steps = (log_step(rng, s.steps as f64, scale, 10.0, cap as f64)).round() as usize;
        if let Variant::Interp { rho } = s.variant {
            let r = (rho + rng.random_range(-0.2..0.2) * scale).clamp(0.0, 1.0);
            s.variant = Variant::Interp { rho: r };
        }
        n.noise_fraction = (n.noise_fraction + rng.random_range(-0.2..0.2) * scale).clamp(0.0, 1.0);
        if covers(&n.settings) && (n.settings.beta1 == 0.0 || n.settings.beta1 < n.settings.beta2) {
            return Some(n);
        }
    }
    None
}

fn perturb_regret(
    c: &RegretCase,
    rng: &mut StdRng,
    scale: f64,
    max_steps: usize,
    covers: &dyn Fn(&RegretSettings) -> bool,
) -> Option<RegretCase> {
    for _ in 0..20 {
        let mut n = c.clone();
        let s = &mut n.settings;
        s.alpha = log_step(rng, s.alpha, scale, 1e-4, 10.0);
        // β2 near 0 matters too: AMSGrad's g-term is tightest when v_t ≈ g_t² (THEORY.md, "Loose by construction").
        s.beta2 = logit_step(rng, s.beta2, scale, 1e-8, 1.0 - 1e-5);
        s.beta1 = (s.beta1 + rng.random_range(-0.2..0.2) * scale).clamp(0.0, 0.95);
        if s.lambda < 1.0 {
            s.lambda = 1.0 - log_step(rng, 1.0 - s.lambda, scale, 1e-5, 0.5);
        }
        if let crate::frameworks::SecondMoment::MaxMean { rho } = s.second {
            s.second = crate::frameworks::SecondMoment::MaxMean {
                rho: (rho + rng.random_range(-0.2..0.2) * scale).clamp(0.0, 1.0),
            };
        }
        n.steps = (log_step(rng, n.steps as f64, scale, 20.0, 4.0 * max_steps as f64)).round() as usize;
        match &mut n.problem {
            OnlineProblem::SignAdversary { g, center } => {
                *g = log_step(rng, *g, scale, 1e-2, 1e2);
                for c in center.iter_mut() {
                    *c = (*c + rng.random_range(-0.2..0.2) * scale).clamp(-0.99, 0.99);
                }
            }
            OnlineProblem::Random { drift, seed, .. } => {
                for d in drift.iter_mut() {
                    *d = (*d + rng.random_range(-0.2..0.2) * scale).clamp(-1.0, 1.0);
                }
                if rng.random_bool(0.1) {
                    *seed = rng.random();
                }
            }
            OnlineProblem::Reddi { .. } => {}
        }
        if covers(&n.settings) {
            return Some(n);
        }
    }
    None
}

fn perturb(bound: &Bound, case: &Case, rng: &mut StdRng, scale: f64, max_steps: usize) -> Option<Case> {
    match (case, &bound.form) {
        (Case::Nonconvex(c), Form::Nonconvex { covers, .. } | Form::NonconvexSemi { covers, .. }) => {
            perturb_nonconvex(c, rng, scale, max_steps, covers.as_ref()).map(Case::Nonconvex)
        }
        (Case::Regret(c), Form::Regret { covers, .. }) => {
            perturb_regret(c, rng, scale, max_steps, covers.as_ref()).map(Case::Regret)
        }
        _ => None,
    }
}

/// Fresh cases on the problems built to press on `bound`, calibrated: a one-dimensional
/// [`crate::problems::Huber`] whose start the method just reaches in N steps (‖∇F‖² stays at
/// its bound while F(x0) − F* is all spent), and a [`crate::frameworks::SignAdversary`] with
/// large steps (the regret grows like the steps' sum, which the bounds' last term charges).
fn pressing_starts(bound: &Bound, size: &Size, settings: &SearchSettings, rng: &mut StdRng) -> Vec<Case> {
    let mut out = Vec::new();
    match &bound.form {
        Form::Regret { covers, .. } => {
            // Long horizons (the mean's bound is tightest there) and short ones with β2 → 0 (the
            // max's √(1 + ln T) factor is smallest there, and v̂_t ≈ g_t²).
            let long = 4 * settings.max_steps;
            for (alpha, beta2, steps) in
                [(1.0, 0.5, long), (2.0, 0.2, long), (3.0, 0.1, long), (1.5, 0.9, long), (5.0, 1e-4, 300.min(long))]
            {
                let Some(mut c) = regret_case(bound, rng.random(), size) else { continue };
                c.problem = OnlineProblem::SignAdversary { g: 1.0, center: vec![rng.random_range(-0.1..0.1)] };
                c.settings = RegretSettings { alpha, beta1: 0.0, lambda: 1.0, beta2, ..c.settings };
                c.steps = steps;
                if covers(&c.settings) {
                    out.push(Case::Regret(c));
                }
            }
        }
        Form::Nonconvex { .. } | Form::NonconvexSemi { .. } => {
            // Travelling to the minimum (the Δ term dominates), and oscillating across the kink
            // of a sharp Huber from the start (the L terms dominate: θ = 0 starts next to the minimum).
            for (theta, one_minus_beta2, delta) in
                [(1.0, 1e-2f64, 0.03), (1.0, 3e-2, 0.03), (0.8, 3e-3, 0.1), (0.0, 1e-3, 0.5), (0.0, 1e-2, 0.5)]
            {
                let Some(mut c) = nonconvex_case(bound, 0, rng.random(), size) else { continue };
                let s = &mut c.settings;
                // Oscillating needs N(1 − β2) ≫ ln(1 + R²/((1 − β2)ε)): the longest runs.
                s.steps = if theta > 0.0 { settings.max_steps } else { 10 * settings.max_steps };
                s.eps = 1e-4;
                let n = s.steps as f64;
                // Travel per step: α(1 − β1) for Adam-type steps, α(1 − β1)/√n for Adagrad's.
                let travel = if s.variant == Variant::Adagrad { 2.0 * n.sqrt() } else { n };
                s.alpha = if theta > 0.0 { theta / (travel * (1.0 - s.beta1)) } else { 1e-3 / (1.0 - s.beta1) };
                if s.variant != Variant::Adagrad {
                    s.beta2 = (1.0 - one_minus_beta2).max(s.beta1 + 1e-3);
                }
                c.kind = Kind::Huber;
                // Oscillating: start half a step from the kink, so the iterate hops ±step/2 across it.
                let start = if theta > 0.0 { 1.0 } else { 0.5 * s.alpha * (1.0 - s.beta1) };
                // For the oscillation, δ is in units of the step α(1 − β1).
                let delta = if theta > 0.0 { delta } else { delta * s.alpha * (1.0 - s.beta1) };
                c.huber = Some(HuberShape { d: 1, delta, start });
                c.noise_fraction = 0.0;
                out.push(Case::Nonconvex(c));
            }
        }
    }
    out
}

/// The best instance found for one target, and any instance on which the real bound was
/// violated on the way (a finding, not a search artefact: it is checked by the same rule).
pub struct Found {
    pub target: Target,
    pub best: Option<(f64, Case, Row)>,
    pub violation: Option<Row>,
}

/// Search for the instance maximizing the target's empirical/value.
pub fn search_target(
    bound: &Bound,
    mutant: Option<&Mutant>,
    starts: &[Case],
    size: &Size,
    settings: &SearchSettings,
    seed: u64,
) -> Found {
    let mut rng = StdRng::seed_from_u64(seed);
    let target = mutant.map_or(Target::Bound, |m| Target::Mutant(m.describe()));
    let mut found = Found { target, best: None, violation: None };
    let consider = |case: Case, found: &mut Found| -> f64 {
        let Some(row) = evaluate(bound, &case, 0, settings.seeds.min(size.seeds)) else { return f64::NEG_INFINITY };
        if row.status.counts_as_violation() && found.violation.is_none() {
            found.violation = Some(row.clone());
        }
        let s = score(&row, mutant);
        if s.is_finite() && found.best.as_ref().is_none_or(|b| s > b.0) {
            found.best = Some((s, case, row));
        }
        s
    };
    let mut budget = settings.evaluations;
    for c in starts.iter().take(budget / 2) {
        consider(c.clone(), &mut found);
        budget -= 1;
    }
    let mut scale = 0.5;
    for _ in 0..budget {
        let Some((current, case, _)) = &found.best else { break };
        let current = *current;
        let Some(next) = perturb(bound, case, &mut rng, scale, settings.max_steps) else { break };
        if consider(next, &mut found) > current {
            scale = (scale * 1.5).min(2.0);
        } else {
            scale = (scale * 0.85).max(0.02);
        }
    }
    // The best case, checked again with the full number of seeds (what the report uses).
    if let Some((_, case, row)) = &mut found.best {
        if let Some(full) = evaluate(bound, case, 0, size.seeds) {
            if full.status.counts_as_violation() && found.violation.is_none() {
                found.violation = Some(full.clone());
            }
            *row = full;
        }
    }
    found
}

/// What the search of every bound found.
pub struct SearchOutcome {
    /// Re-checked rows of the kept instances (the regression set, then what the search found).
    pub rows: Vec<Row>,
    /// The new regression set.
    pub kept: Vec<Kept>,
    /// Per bound: the largest empirical/bound found.
    pub worst: Vec<(String, f64)>,
}

/// Check the regression set, then search every bound and each of its mutants.
pub fn run(
    bounds: &[Bound],
    random_rows: &[Row],
    regression: &[Kept],
    size: &Size,
    settings: &SearchSettings,
) -> SearchOutcome {
    let mut rows = Vec::new();
    let mut kept = Vec::new();
    let mut worst = Vec::new();
    for (b, bound) in bounds.iter().enumerate() {
        // The regression set, checked again by the full rule.
        let old: Vec<&Kept> = regression.iter().filter(|k| k.bound == bound.id).collect();
        // Candidates for the new regression set: the old entries, re-checked, and what this
        // run's search finds.
        let mut candidates: Vec<(Target, Case, Row)> = Vec::new();
        for (k, entry) in old.iter().enumerate() {
            if let Some(mut row) = evaluate(bound, &entry.case, 100_000 + k, size.seeds) {
                row.note = format!("regression set ({})", target_label(&entry.target));
                rows.push(row.clone());
                candidates.push((entry.target.clone(), entry.case.clone(), row));
            }
        }
        let from_regression = candidates.len();
        // Start points: the regression set, the random instances by tightness, fresh pressing draws.
        let mut starts: Vec<Case> = old.iter().map(|k| k.case.clone()).collect();
        let mut mine: Vec<&Row> =
            random_rows.iter().filter(|r| r.bound == bound.id && r.status == Status::Pass).collect();
        mine.sort_by(|a, b| b.tightness.total_cmp(&a.tightness));
        let mut rng = StdRng::seed_from_u64(settings.seed.wrapping_add(b as u64));
        for r in mine.iter().take(2) {
            let case = match &bound.form {
                Form::Regret { .. } => regret_case(bound, r.seed, size).map(Case::Regret),
                _ => nonconvex_case(bound, r.instance, r.seed, size).map(Case::Nonconvex),
            };
            starts.extend(case);
        }
        starts.extend(pressing_starts(bound, size, settings, &mut rng));
        let Some(terms) = mine.first().and_then(|r| r.data.as_ref()).map(|d| d.terms().to_vec()) else { continue };
        // Per term, the ×0.5 and the dropped mutant: the others of the term (×0.1, faster rate,
        // log dropped) take away between those two, so their witnesses are searched with them.
        let every_mutant = mutants_of(&bound.id, &terms);
        let mutants: Vec<Mutant> = every_mutant
            .iter()
            .filter(|m| matches!(m.change, Change::Scale(f) if f == 0.5) || m.change == Change::Drop)
            .cloned()
            .collect();
        let targets: Vec<Option<&Mutant>> = std::iter::once(None).chain(mutants.iter().map(Some)).collect();
        let found: Vec<Found> = targets
            .par_iter()
            .enumerate()
            .map(|(t, m)| {
                search_target(bound, *m, &starts, size, settings, settings.seed ^ ((b as u64) << 32) ^ t as u64)
            })
            .collect();
        for f in found {
            if let Some(mut v) = f.violation {
                v.instance = 200_000 + rows.len();
                v.note = format!("found by the search ({})", target_label(&f.target));
                rows.push(v);
            }
            if let Some((_, case, row)) = f.best {
                candidates.push((f.target, case, row));
            }
        }
        // The new regression set: the bound's worst case, and for every mutant some instance
        // detects, the instance that presses it hardest — old or new, one entry each.
        let chosen = covering_set(&candidates, &every_mutant);
        // The covering set starts with the bound's worst passing case.
        let best_bound = chosen.first().map_or(f64::NEG_INFINITY, |&i| candidates[i].2.tightness);
        for (i, (target, case, row)) in candidates.into_iter().enumerate() {
            let new = i >= from_regression;
            // This run's finds join the instances when they are kept, or when they are the
            // bound's own search result.
            if new && (chosen.contains(&i) || target == Target::Bound) {
                let mut row = row.clone();
                row.instance = 300_000 + rows.len();
                row.note = format!("found by the search ({})", target_label(&target));
                rows.push(row);
            }
            if chosen.contains(&i) {
                kept.push(Kept { bound: bound.id.clone(), target, tightness: row.tightness, case });
            }
        }
        worst.push((bound.id.clone(), best_bound));
    }
    SearchOutcome { rows, kept, worst }
}

/// Indices of a small regression set among `candidates`: the largest empirical/bound, and for
/// each mutant that some candidate detects, the candidate with the largest empirical/mutant
/// among those detecting it.
fn covering_set(candidates: &[(Target, Case, Row)], mutants: &[Mutant]) -> Vec<usize> {
    let passed = |row: &Row| row.status == Status::Pass && row.data.is_some();
    let mut chosen = Vec::new();
    let worst = candidates
        .iter()
        .enumerate()
        .filter(|(_, (_, _, r))| passed(r))
        .max_by(|a, b| a.1 .2.tightness.total_cmp(&b.1 .2.tightness));
    chosen.extend(worst.map(|(i, _)| i));
    for m in mutants {
        let witness = candidates
            .iter()
            .enumerate()
            .filter(|(_, (_, _, r))| passed(r))
            .filter_map(|(i, (_, _, r))| {
                let data = r.data.as_ref()?;
                let detected = m.status_on(data).counts_as_violation();
                let (emp, value) = data.means(&|t| m.value(t));
                detected.then_some((i, emp / value))
            })
            .max_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((i, _)) = witness {
            if !chosen.contains(&i) {
                chosen.push(i);
            }
        }
    }
    chosen
}

fn target_label(t: &Target) -> String {
    match t {
        Target::Bound => "worst case of the bound".into(),
        Target::Mutant(m) => format!("witness for mutant {m}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::regret_row;
    use crate::frameworks::SecondMoment;

    fn candidate(regret: f64, big: f64, small: f64) -> (Target, Case, Row) {
        let row = regret_row(regret, vec![Term::new("big", big, 0.0, 1.0), Term::new("small", small, 0.0, 1.0)]);
        let case = Case::Regret(RegretCase {
            problem: OnlineProblem::SignAdversary { g: 1.0, center: vec![0.0] },
            settings: RegretSettings { second: SecondMoment::Mean, alpha: 1.0, beta1: 0.0, lambda: 1.0, beta2: 0.5 },
            steps: 10,
        });
        (Target::Bound, case, row)
    }

    #[test]
    fn the_regression_set_keeps_the_worst_case_and_one_witness_per_detected_mutant() {
        let mutants = mutants_of("b", &[Term::new("big", 1.0, 0.0, 1.0), Term::new("small", 1.0, 0.0, 1.0)]);
        let candidates = vec![
            candidate(0.50, 0.9, 0.1), // 0: detects "big ×0.5" (0.45 + 0.1 < 0.5), tightness 0.5
            candidate(0.52, 0.9, 0.1), // 1: the same mutants, pressed harder: supersedes 0
            candidate(0.60, 0.5, 0.5), // 2: the worst case (0.6); detects "small dropped" too
            candidate(0.10, 0.5, 0.5), // 3: shows nothing
            candidate(2.00, 0.5, 0.5), // 4: a real violation: never kept as a witness
        ];
        let chosen = covering_set(&candidates, &mutants);
        assert_eq!(chosen[0], 2, "the bound's worst passing case comes first");
        assert!(chosen.contains(&1));
        assert!(!chosen.contains(&0) && !chosen.contains(&3) && !chosen.contains(&4), "{chosen:?}");
        // Every mutant some passing candidate detects keeps a witness.
        for m in &mutants {
            let detected_by = |c: &(Target, Case, Row)| {
                let data = c.2.data.as_ref().unwrap();
                c.2.status == Status::Pass && m.status_on(data) != Status::Pass
            };
            if candidates.iter().any(detected_by) {
                assert!(chosen.iter().any(|&i| detected_by(&candidates[i])), "{}", m.describe());
            }
        }
    }
}
