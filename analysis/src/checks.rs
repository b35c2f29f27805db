//! Confront every bound with the quantity it controls, on random problem instances and
//! optimizer settings.
//!
//! Nonconvex bounds control an expectation: each instance is run with several noise seeds,
//! and it passes only if the one-sided 99% Student-t upper confidence bound of the empirical
//! mean is below the bound — noise cannot fake a pass (a case that is neither a confident pass
//! nor a confident violation is counted as a violation, and reported as "unresolved").
//! Regret bounds hold for every sequence: each instance is checked exactly.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::Serialize;
use statrs::distribution::{ContinuousCDF, StudentsT};

use crate::bounds::{tau_weights, total, Bound, Form, NonconvexConstants, Term};
use crate::frameworks::{
    run_nonconvex, run_regret, NonconvexRun, NonconvexSettings, OnlineLinear, RandomLinear, ReddiSequence,
    RegretSettings, SecondMoment, SignAdversary, Variant,
};
use crate::problems::{Huber, Kind, Noise, Objective};

/// How much to run.
#[derive(Clone, Copy, Debug, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Size {
    /// Instances per bound.
    pub instances: usize,
    /// Noise seeds per nonconvex instance.
    pub seeds: usize,
    /// Range of N (or T).
    pub steps: (usize, usize),
    /// Base seed: instance k of bound b uses seed base + 1000·b + k.
    pub base_seed: u64,
}

/// The verdict on one instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pass,
    /// Neither a confident pass nor a confident violation (counted as a violation).
    Unresolved,
    Violation,
    /// Outside the bound's assumptions (the run left the region where the constants hold).
    Excluded,
}

impl Status {
    /// The checks' rule: a confident violation, or an unresolved instance, counts against the
    /// bound (noise cannot fake a pass).
    pub fn counts_as_violation(self) -> bool {
        matches!(self, Status::Violation | Status::Unresolved)
    }
}

/// One row of the instance CSV.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub bound: String,
    pub instance: usize,
    pub seed: u64,
    pub problem: String,
    pub settings: String,
    pub seeds: usize,
    /// Empirical quantity (mean over seeds).
    pub empirical: f64,
    /// Its upper confidence bound (= empirical for exact checks).
    pub empirical_ucb: f64,
    /// The bound (mean over seeds for semi-explicit bounds).
    pub bound_value: f64,
    /// empirical / bound.
    pub tightness: f64,
    pub status: Status,
    pub note: String,
    /// What the bound's mutants are evaluated on (see [`crate::mutants`]).
    #[serde(skip)]
    pub data: Option<InstanceData>,
}

/// The evidence of one checked instance, kept so that changed bounds (mutants) can be judged
/// by the same rule without running the optimizer again.
#[derive(Clone, Debug)]
pub enum InstanceData {
    /// The empirical quantity per noise seed, and the bound's terms (the same for every seed).
    Nonconvex { empirical: Vec<f64>, terms: Vec<Term> },
    /// The empirical quantity and the bound's (trajectory-dependent) terms, per seed.
    Semi { empirical: Vec<f64>, terms: Vec<Vec<Term>> },
    /// The regret and the bound's terms (one deterministic run).
    Regret { regret: f64, terms: Vec<Term> },
}

impl InstanceData {
    /// The check's verdict if the bound's terms were `change`d (the real check: `change` =
    /// identity): the one-sided 99% rule for expectations, exact comparison for regret.
    pub fn status(&self, change: &dyn Fn(&[Term]) -> f64) -> Status {
        match self {
            InstanceData::Nonconvex { empirical, terms } => {
                let b = change(terms);
                if !b.is_finite() {
                    return Status::Excluded;
                }
                let (_, lcb, ucb) = confidence(empirical);
                verdict(ucb, lcb, b)
            }
            InstanceData::Semi { empirical, terms } => {
                let gaps: Vec<f64> = empirical.iter().zip(terms).map(|(e, t)| e - change(t)).collect();
                if gaps.iter().any(|g| !g.is_finite()) {
                    return Status::Excluded;
                }
                let (_, lcb, ucb) = confidence(&gaps);
                verdict(ucb, lcb, 0.0)
            }
            InstanceData::Regret { regret, terms } => {
                let b = change(terms);
                if !b.is_finite() {
                    Status::Excluded
                } else if *regret <= b * (1.0 + 1e-12) {
                    Status::Pass
                } else {
                    Status::Violation
                }
            }
        }
    }

    /// The mean bound value and empirical quantity.
    pub fn means(&self, change: &dyn Fn(&[Term]) -> f64) -> (f64, f64) {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        match self {
            InstanceData::Nonconvex { empirical, terms } => (mean(empirical), change(terms)),
            InstanceData::Semi { empirical, terms } => {
                (mean(empirical), mean(&terms.iter().map(|t| change(t)).collect::<Vec<_>>()))
            }
            InstanceData::Regret { regret, terms } => (*regret, change(terms)),
        }
    }

    /// The bound's terms (of the first seed for semi-explicit bounds).
    pub fn terms(&self) -> &[Term] {
        match self {
            InstanceData::Nonconvex { terms, .. } | InstanceData::Regret { terms, .. } => terms,
            InstanceData::Semi { terms, .. } => &terms[0],
        }
    }
}

/// Mean, and one-sided 99% lower and upper confidence bounds (Student t, n − 1 degrees).
pub fn confidence(xs: &[f64]) -> (f64, f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, mean, mean);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let t = StudentsT::new(0.0, 1.0, n - 1.0).expect("valid t").inverse_cdf(0.99);
    let half = t * (var / n).sqrt();
    (mean, mean - half, mean + half)
}

fn log_uniform(rng: &mut StdRng, lo: f64, hi: f64) -> f64 {
    (rng.random_range(lo.ln()..hi.ln())).exp()
}

/// A random nonconvex-form setting of `variant` (β1 > 0 iff `momentum`).
pub fn draw_settings(
    rng: &mut StdRng,
    variant: Variant,
    momentum: bool,
    kind: Kind,
    steps: (usize, usize),
) -> NonconvexSettings {
    let beta2: f64 = rng.random_range(0.9..0.999);
    let beta1 = if momentum { rng.random_range(0.3..(beta2 - 0.01).min(0.95)) } else { 0.0 };
    let alpha = if kind == Kind::Rosenbrock { log_uniform(rng, 1e-4, 3e-3) } else { log_uniform(rng, 1e-3, 5e-2) };
    NonconvexSettings {
        variant,
        alpha,
        beta1,
        beta2,
        eps: log_uniform(rng, 1e-8, 1e-4),
        steps: rng.random_range(steps.0..=steps.1),
    }
}

/// A problem, its noise and its constants for the bounds.
pub struct Instance {
    pub objective: Box<dyn Objective>,
    pub noise: Noise,
    pub constants: NonconvexConstants,
}

impl Instance {
    pub fn new(kind: Kind, seed: u64, noise_fraction: f64, eps: f64) -> Self {
        Self::of(kind.instance(seed), noise_fraction, eps)
    }

    /// An instance of `objective`, with noise σ = `noise_fraction`·‖∇F(x0)‖∞.
    pub fn of(objective: Box<dyn Objective>, noise_fraction: f64, eps: f64) -> Self {
        let c = objective.constants();
        let x0 = objective.x0();
        let g0 = objective.grad(&x0).iter().fold(0.0f64, |a, v| a.max(v.abs()));
        let noise = Noise { sigma: noise_fraction * g0.max(1e-3) };
        let constants = NonconvexConstants {
            d: c.d as f64,
            r: c.grad_sup + noise.bound() + eps.sqrt(),
            l: c.smoothness,
            delta: objective.value(&x0) - c.inf_lower,
        };
        Self { objective, noise, constants }
    }

    /// Runs for every seed; `None` (with the reason) if a run left the assumptions.
    pub fn runs(&self, s: &NonconvexSettings, seeds: usize, base: u64) -> Result<Vec<NonconvexRun>, String> {
        let runs: Vec<NonconvexRun> = (0..seeds as u64)
            .into_par_iter()
            .map(|k| run_nonconvex(&*self.objective, self.noise, s, base + k))
            .collect();
        if runs.iter().any(|r| !r.stayed_in_region) {
            return Err("an iterate left the region where L and R hold".into());
        }
        let limit = self.constants.r - s.eps.sqrt();
        if let Some(r) = runs.iter().find(|r| r.max_abs_grad > limit * (1.0 + 1e-12)) {
            return Err(format!("a stochastic gradient reached {:.3e} > R − √ε = {limit:.3e}", r.max_abs_grad));
        }
        Ok(runs)
    }
}

/// Σ_j p_j ‖∇F(x_j)‖² for one run: E[‖∇F(x_τ)‖² | trajectory].
pub fn expected_grad_norm(run: &NonconvexRun, beta1: f64) -> f64 {
    tau_weights(beta1, run.grad_norm_sq.len()).iter().zip(&run.grad_norm_sq).map(|(p, g)| p * g).sum()
}

fn verdict(ucb: f64, lcb: f64, limit: f64) -> Status {
    if ucb <= limit {
        Status::Pass
    } else if lcb > limit {
        Status::Violation
    } else {
        Status::Unresolved
    }
}

fn variant_for(bound: &Bound, rng: &mut StdRng) -> Option<(Variant, bool)> {
    // Find a (variant, momentum) the bound covers, trying the candidates in a random order.
    let rho = rng.random_range(0.0..=1.0f64);
    let mut candidates = vec![
        (Variant::Adagrad, false),
        (Variant::Adagrad, true),
        (Variant::Adam, false),
        (Variant::Adam, true),
        (Variant::Interp { rho }, false),
        (Variant::Interp { rho: rho.max(0.05) }, false),
    ];
    let probe = |v: Variant, m: bool| NonconvexSettings {
        variant: v,
        alpha: 0.01,
        beta1: if m { 0.5 } else { 0.0 },
        beta2: 0.99,
        eps: 1e-8,
        steps: 10,
    };
    let covers: &dyn Fn(&NonconvexSettings) -> bool = match &bound.form {
        Form::Nonconvex { covers, .. } | Form::NonconvexSemi { covers, .. } => covers.as_ref(),
        Form::Regret { .. } => return None,
    };
    let start = rng.random_range(0..candidates.len());
    candidates.rotate_left(start);
    candidates.into_iter().find(|(v, m)| covers(&probe(*v, *m)))
}

/// A nonconvex instance as explicit parameters (what the random checks draw and the
/// adversarial search moves).
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct NonconvexCase {
    pub kind: Kind,
    pub problem_seed: u64,
    pub noise_fraction: f64,
    pub settings: NonconvexSettings,
    /// Noise seed s of the runs is noise_seed + s.
    pub noise_seed: u64,
    /// For `Kind::Huber`: the problem's shape, set by the adversarial search (instead of the
    /// one `problem_seed` draws).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huber: Option<HuberShape>,
}

/// A [`Huber`] problem with g = 1, centre 0, and every coordinate started at `start`.
#[derive(Clone, Copy, Debug, Serialize, serde::Deserialize)]
pub struct HuberShape {
    pub d: usize,
    pub delta: f64,
    pub start: f64,
}

impl NonconvexCase {
    pub fn objective(&self) -> Box<dyn Objective> {
        match (self.kind, self.huber) {
            (Kind::Huber, Some(h)) => {
                Box::new(Huber { g: 1.0, delta: h.delta, center: vec![0.0; h.d], start: vec![h.start; h.d] })
            }
            _ => self.kind.instance(self.problem_seed),
        }
    }
}

/// The random nonconvex case of instance `instance` of `bound` (None: the bound covers no
/// nonconvex setting).
pub fn nonconvex_case(bound: &Bound, instance: usize, seed: u64, size: &Size) -> Option<NonconvexCase> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (variant, momentum) = variant_for(bound, &mut rng)?;
    let kind = Kind::ALL[instance % Kind::ALL.len()];
    let settings = draw_settings(&mut rng, variant, momentum, kind, size.steps);
    let noise_fraction = if rng.random_bool(0.3) { 0.0 } else { rng.random_range(0.0..0.5) };
    Some(NonconvexCase {
        kind,
        problem_seed: seed,
        noise_fraction,
        settings,
        noise_seed: seed.wrapping_mul(31),
        huber: None,
    })
}

/// Run `case` with `seeds` noise seeds and confront `bound` with it.
pub fn evaluate_nonconvex(
    bound: &Bound,
    instance: usize,
    seed: u64,
    case: &NonconvexCase,
    seeds: usize,
) -> Option<Row> {
    let s = case.settings;
    let inst = Instance::of(case.objective(), case.noise_fraction, s.eps);
    let mut row = Row {
        bound: bound.id.clone(),
        instance,
        seed,
        problem: format!("{} sigma={:.3e}", inst.objective.name(), inst.noise.sigma),
        settings: serde_json::to_string(&s).unwrap_or_default(),
        seeds,
        empirical: f64::NAN,
        empirical_ucb: f64::NAN,
        bound_value: f64::NAN,
        tightness: f64::NAN,
        status: Status::Excluded,
        note: String::new(),
        data: None,
    };
    let runs = match inst.runs(&s, seeds, case.noise_seed) {
        Ok(r) => r,
        Err(why) => {
            row.note = why;
            return Some(row);
        }
    };
    let empirical: Vec<f64> = runs.iter().map(|r| expected_grad_norm(r, s.beta1)).collect();
    let (mean, _, ucb) = confidence(&empirical);
    row.empirical = mean;
    row.empirical_ucb = ucb;
    let data = match &bound.form {
        Form::Nonconvex { terms, .. } => InstanceData::Nonconvex { empirical, terms: terms(&inst.constants, &s) },
        Form::NonconvexSemi { terms, .. } => {
            InstanceData::Semi { empirical, terms: runs.iter().map(|r| terms(&inst.constants, &s, r)).collect() }
        }
        Form::Regret { .. } => return None,
    };
    row.status = data.status(&total);
    row.bound_value = data.means(&total).1;
    if !row.bound_value.is_finite() {
        row.status = Status::Excluded;
        row.note = "bound not finite for these settings".into();
    }
    row.tightness = row.empirical / row.bound_value;
    row.data = Some(data);
    Some(row)
}

/// Check one random nonconvex instance of `bound`.
pub fn check_nonconvex(bound: &Bound, instance: usize, seed: u64, size: &Size) -> Option<Row> {
    let case = nonconvex_case(bound, instance, seed, size)?;
    evaluate_nonconvex(bound, instance, seed, &case, size.seeds)
}

/// An online problem as data.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub enum OnlineProblem {
    Reddi { period: usize, big: f64, small: f64 },
    Random { d: usize, g_inf: f64, drift: Vec<f64>, seed: u64 },
    SignAdversary { g: f64, center: Vec<f64> },
}

impl OnlineProblem {
    pub fn build(&self) -> Box<dyn OnlineLinear + Send + Sync> {
        match self {
            OnlineProblem::Reddi { period, big, small } => {
                Box::new(ReddiSequence { period: *period, big: *big, small: *small })
            }
            OnlineProblem::Random { d, g_inf, drift, seed } => {
                Box::new(RandomLinear { d: *d, g_inf: *g_inf, drift: drift.clone(), seed: *seed })
            }
            OnlineProblem::SignAdversary { g, center } => Box::new(SignAdversary { g: *g, center: center.clone() }),
        }
    }
}

/// A regret instance as explicit parameters.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct RegretCase {
    pub problem: OnlineProblem,
    pub settings: RegretSettings,
    pub steps: usize,
}

/// A random online problem and regret-form settings.
pub fn draw_regret_case(rng: &mut StdRng, second: SecondMoment, size: &Size, seed: u64) -> RegretCase {
    let u: f64 = rng.random_range(0.0..1.0);
    let problem = if u < 0.25 {
        let (period, big) = [(3, 2.0), (3, 3.0), (101, 1010.0)][rng.random_range(0..3)];
        OnlineProblem::Reddi { period, big, small: if period == 101 { -10.0 } else { -1.0 } }
    } else if u < 0.4 {
        let d = rng.random_range(1..=3);
        OnlineProblem::SignAdversary {
            g: rng.random_range(0.5..2.0),
            center: (0..d).map(|_| rng.random_range(-0.5..0.5)).collect(),
        }
    } else {
        let d = rng.random_range(1..=5);
        OnlineProblem::Random { d, g_inf: 1.5, drift: (0..d).map(|_| rng.random_range(-0.5..0.5)).collect(), seed }
    };
    let beta2 = rng.random_range(0.9..0.999);
    let settings = RegretSettings {
        second,
        alpha: log_uniform(rng, 1e-3, 1.0),
        beta1: rng.random_range(0.0..0.9),
        lambda: if rng.random_bool(0.5) { 1.0 } else { rng.random_range(0.9..0.999) },
        beta2,
    };
    RegretCase { problem, settings, steps: rng.random_range(size.steps.0..=size.steps.1.max(size.steps.0)) * 4 }
}

/// The random regret case of `bound` for `seed` (None: the bound covers no regret setting). A
/// decaying β1t is drawn for half the cases of the bounds that allow it.
pub fn regret_case(bound: &Bound, seed: u64, size: &Size) -> Option<RegretCase> {
    let Form::Regret { covers, .. } = &bound.form else { return None };
    let mut rng = StdRng::seed_from_u64(seed);
    let rho = rng.random_range(0.0..=1.0);
    let second = [SecondMoment::Max, SecondMoment::Mean, SecondMoment::MaxMean { rho }]
        .into_iter()
        .find(|m| covers(&RegretSettings { second: *m, alpha: 0.1, beta1: 0.5, lambda: 1.0, beta2: 0.99 }))?;
    let mut case = draw_regret_case(&mut rng, second, size, seed);
    if !covers(&case.settings) {
        case.settings.lambda = 1.0;
    }
    covers(&case.settings).then_some(case)
}

/// Run a regret case and confront `bound` with it.
pub fn evaluate_regret(bound: &Bound, instance: usize, seed: u64, case: &RegretCase) -> Option<Row> {
    let Form::Regret { terms, .. } = &bound.form else { return None };
    let problem = case.problem.build();
    let run = run_regret(&*problem, &case.settings, case.steps);
    let (lo, hi) = problem.bounds();
    let data =
        InstanceData::Regret { regret: run.regret, terms: terms(&case.settings, &run, case.steps as f64, hi - lo) };
    let b = data.means(&total).1;
    Some(Row {
        bound: bound.id.clone(),
        instance,
        seed,
        problem: format!("online linear d={} T={}", problem.dim(), case.steps),
        settings: serde_json::to_string(&case.settings).unwrap_or_default(),
        seeds: 1,
        empirical: run.regret,
        empirical_ucb: run.regret,
        bound_value: b,
        tightness: run.regret / b,
        status: data.status(&total),
        note: String::new(),
        data: Some(data),
    })
}

/// Check one random regret instance of `bound`.
pub fn check_regret(bound: &Bound, instance: usize, seed: u64, size: &Size) -> Option<Row> {
    let case = regret_case(bound, seed, size)?;
    evaluate_regret(bound, instance, seed, &case)
}

/// Check every bound on `size.instances` instances each (in parallel over instances).
pub fn check_all(bounds: &[Bound], size: &Size, progress: &(dyn Fn() + Sync)) -> Vec<Row> {
    let mut rows = Vec::new();
    for (b, bound) in bounds.iter().enumerate() {
        let mut part: Vec<Row> = (0..size.instances)
            .into_par_iter()
            .filter_map(|k| {
                let seed = size.base_seed + 1000 * b as u64 + k as u64;
                let row = match bound.form {
                    Form::Regret { .. } => check_regret(bound, k, seed, size),
                    _ => check_nonconvex(bound, k, seed, size),
                };
                progress();
                row
            })
            .collect();
        part.sort_by_key(|r| r.instance);
        rows.extend(part);
    }
    rows
}

/// Per-bound summary.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Summary {
    pub bound: String,
    pub instances: usize,
    pub checked: usize,
    pub excluded: usize,
    pub violations: usize,
    pub unresolved: usize,
    pub tightness_min: f64,
    pub tightness_median: f64,
    pub tightness_max: f64,
}

pub fn summarize(bound: &str, rows: &[Row]) -> Summary {
    let mine: Vec<&Row> = rows.iter().filter(|r| r.bound == bound).collect();
    let checked: Vec<&&Row> = mine.iter().filter(|r| r.status != Status::Excluded).collect();
    let mut t: Vec<f64> = checked.iter().map(|r| r.tightness).filter(|v| v.is_finite()).collect();
    t.sort_by(f64::total_cmp);
    let q = |f: f64| if t.is_empty() { f64::NAN } else { t[((t.len() - 1) as f64 * f).round() as usize] };
    Summary {
        bound: bound.to_string(),
        instances: mine.len(),
        checked: checked.len(),
        excluded: mine.len() - checked.len(),
        violations: checked.iter().filter(|r| r.status != Status::Pass).count(),
        unresolved: checked.iter().filter(|r| r.status == Status::Unresolved).count(),
        tightness_min: q(0.0),
        tightness_median: q(0.5),
        tightness_max: q(1.0),
    }
}

/// A regret row checked by the exact rule, for the tests of what consumes rows (mutants, the
/// regression set).
#[cfg(test)]
pub(crate) fn regret_row(regret: f64, terms: Vec<Term>) -> Row {
    let data = InstanceData::Regret { regret, terms };
    let bound_value = data.means(&total).1;
    Row {
        bound: "b".into(),
        instance: 0,
        seed: 0,
        problem: String::new(),
        settings: String::new(),
        seeds: 1,
        empirical: regret,
        empirical_ucb: regret,
        bound_value,
        tightness: regret / bound_value,
        status: data.status(&total),
        note: String::new(),
        data: Some(data),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confidence_bounds_bracket_the_mean() {
        let (m, lo, hi) = confidence(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        assert!(lo < m && m < hi);
        // t_{0.99, 3} ≈ 4.541, sd = 1.291, se = 0.6455
        assert!((hi - m - 4.5407 * 0.6455).abs() < 1e-2, "{hi}");
        assert_eq!(confidence(&[5.0, 5.0]), (5.0, 5.0, 5.0));
    }

    const SMALL: Size = Size { instances: 16, seeds: 8, steps: (40, 250), base_seed: 20_240_117 };

    #[test]
    fn a_false_bound_is_caught() {
        // A "bound" of 1e-12 on ‖∇F‖² must be reported violated, not passed.
        let fake = Bound {
            id: "fake".into(),
            title: "".into(),
            formula: "".into(),
            assumptions: "".into(),
            source: crate::bounds::Source::Derived("test"),
            form: Form::Nonconvex {
                covers: Box::new(|s| s.variant == Variant::Adam && s.beta1 == 0.0),
                terms: Box::new(|_, s| {
                    vec![Term { name: "tiny", value: 1e-12, n_power: 0.0, n: s.steps as f64, log: None }]
                }),
            },
        };
        let rows: Vec<Row> = (0..6).filter_map(|k| check_nonconvex(&fake, k, 7 + k as u64, &SMALL)).collect();
        assert!(rows.iter().any(|r| r.status == Status::Violation), "{rows:?}");
        assert!(rows.iter().all(|r| r.status != Status::Pass));
    }
}
