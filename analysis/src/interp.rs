//! The interpolation claim: bound(ρ) over a ρ grid for the derived bounds, where its minimum is
//! interior, and whether the empirical quantity follows on those instances.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::Serialize;

use crate::bounds::{interp_explicit_value, interp_semi_value, total};
use crate::checks::{draw_regret_case, draw_settings, expected_grad_norm, Instance, Size};
use crate::frameworks::{run_regret, RegretSettings, SecondMoment, Variant};
use crate::problems::Kind;

/// The ρ grid.
pub fn grid() -> Vec<f64> {
    (0..=10).map(|i| i as f64 / 10.0).collect()
}

/// One instance's curves over the grid.
#[derive(Clone, Debug, Serialize)]
pub struct Curve {
    pub framework: String,
    pub instance: usize,
    pub problem: String,
    pub rho: Vec<f64>,
    /// The derived bound at each ρ (semi-explicit: mean over seeds).
    pub bound: Vec<f64>,
    /// The explicit bound (ρ > 0 only; NaN at 0), nonconvex only.
    pub bound_explicit: Vec<f64>,
    /// The empirical quantity at each ρ (E‖∇F(x_τ)‖² or R_T).
    pub empirical: Vec<f64>,
}

fn argmin(v: &[f64]) -> usize {
    v.iter().enumerate().filter(|(_, x)| x.is_finite()).min_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0)
}

impl Curve {
    /// The bound's minimum is strictly inside (0, 1) and below both ends.
    pub fn interior(&self) -> bool {
        let i = argmin(&self.bound);
        let last = self.bound.len() - 1;
        i > 0 && i < last && self.bound[i] < self.bound[0] && self.bound[i] < self.bound[last]
    }

    /// At the bound's argmin, the empirical quantity is below its value at both ends.
    pub fn empirical_follows(&self) -> bool {
        let i = argmin(&self.bound);
        let last = self.empirical.len() - 1;
        self.empirical[i] < self.empirical[0] && self.empirical[i] < self.empirical[last]
    }

    /// Some ρ < 1 gives a bound below its value at ρ = 1.
    pub fn below_the_end(&self) -> bool {
        let last = self.bound.len() - 1;
        self.bound[..last].iter().any(|b| *b < self.bound[last])
    }

    pub fn bound_argmin(&self) -> f64 {
        self.rho[argmin(&self.bound)]
    }

    pub fn empirical_argmin(&self) -> f64 {
        self.rho[argmin(&self.empirical)]
    }
}

/// Nonconvex (Adam ↔ AVGrad) curves on `count` instances.
pub fn nonconvex_curves(count: usize, size: &Size) -> Vec<Curve> {
    (0..count)
        .into_par_iter()
        .filter_map(|k| {
            let seed = size.base_seed + 500_000 + k as u64;
            let mut rng = StdRng::seed_from_u64(seed);
            let kind = Kind::ALL[k % Kind::ALL.len()];
            let base = draw_settings(&mut rng, Variant::Adam, false, kind, size.steps);
            let noise_fraction = if rng.random_bool(0.3) { 0.0 } else { rng.random_range(0.0..0.5) };
            let inst = Instance::new(kind, seed, noise_fraction, base.eps);
            let mut curve = Curve {
                framework: "nonconvex: Adam (1) ↔ AVGrad (0)".into(),
                instance: k,
                problem: format!("{} sigma={:.2e}", inst.objective.name(), inst.noise.sigma),
                rho: grid(),
                bound: vec![],
                bound_explicit: vec![],
                empirical: vec![],
            };
            for &rho in &curve.rho.clone() {
                let s = crate::frameworks::NonconvexSettings { variant: Variant::Interp { rho }, ..base };
                let runs = inst.runs(&s, size.seeds, seed.wrapping_mul(17)).ok()?;
                let n = runs.len() as f64;
                curve.empirical.push(runs.iter().map(|r| expected_grad_norm(r, 0.0)).sum::<f64>() / n);
                curve.bound.push(runs.iter().map(|r| interp_semi_value(&inst.constants, &s, r)).sum::<f64>() / n);
                curve.bound_explicit.push(if rho > 0.0 {
                    interp_explicit_value(&inst.constants, &s)
                } else {
                    f64::NAN
                });
            }
            Some(curve)
        })
        .collect()
}

/// Regret-form (AMSGrad ↔ AVGrad) curves on `count` instances.
pub fn regret_curves(count: usize, size: &Size) -> Vec<Curve> {
    let bound = crate::bounds::registry().into_iter().find(|b| b.id == "maxmean-regret").expect("registered");
    let crate::bounds::Form::Regret { terms, .. } = &bound.form else { unreachable!() };
    (0..count)
        .map(|k| {
            let seed = size.base_seed + 700_000 + k as u64;
            let mut rng = StdRng::seed_from_u64(seed);
            // The derived interpolation bound holds for a constant β1 (THEORY.md §5).
            let case = draw_regret_case(&mut rng, SecondMoment::MaxMean { rho: 1.0 }, size, seed);
            let (base, steps) = (RegretSettings { lambda: 1.0, ..case.settings }, case.steps);
            let problem = case.problem.build();
            let (lo, hi) = problem.bounds();
            let mut curve = Curve {
                framework: "regret: AMSGrad (1) ↔ AVGrad (0)".into(),
                instance: k,
                problem: format!("online linear d={} T={steps}", problem.dim()),
                rho: grid(),
                bound: vec![],
                bound_explicit: vec![],
                empirical: vec![],
            };
            for &rho in &curve.rho.clone() {
                let s = RegretSettings { second: SecondMoment::MaxMean { rho }, ..base };
                let run = run_regret(&*problem, &s, steps);
                curve.bound.push(total(&terms(&s, &run, steps as f64, hi - lo)));
                curve.empirical.push(run.regret);
                curve.bound_explicit.push(f64::NAN);
            }
            curve
        })
        .collect()
}

/// Explicit nonconvex bound(ρ) is nondecreasing... or not: count instances where it is
/// minimized at ρ = 1 (the Adam end).
pub fn explicit_minimized_at_adam(curves: &[Curve]) -> usize {
    curves.iter().filter(|c| argmin(&c.bound_explicit) == c.rho.len() - 1).count()
}
