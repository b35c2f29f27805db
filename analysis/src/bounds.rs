//! The bound registry. Each entry: the formula (as code and as text), its assumptions, its
//! source label ("published" with the citation, or "derived here" with the THEORY.md section),
//! and the algorithm of [`crate::frameworks`] it covers. Derivations: `analysis/THEORY.md`.
//!
//! None of these is the MADA paper's theorem: its statements were not available to this project.
//! [`PaperSlot`] lets them be added as data when they are.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::frameworks::{s_n, NonconvexRun, NonconvexSettings, RegretRun, RegretSettings, SecondMoment, Variant};

/// Where a bound comes from.
#[derive(Clone, Debug, Serialize)]
pub enum Source {
    /// A published statement, with its citation, re-derived in THEORY.md with the same constants.
    Published(&'static str),
    /// A published statement checked as stated (THEORY.md follows its proof but derives no
    /// constants of its own for it).
    AsStated(&'static str),
    /// A published statement whose constants were transcribed but not re-derived here.
    Transcribed(&'static str),
    /// Derived in this project (THEORY.md section).
    Derived(&'static str),
    /// Added as data from the paper-slot file.
    Slot(String),
}

impl Source {
    pub fn label(&self) -> String {
        match self {
            Source::Published(c) => format!("published: {c} (re-derived in THEORY.md, same constants)"),
            Source::AsStated(c) => format!("published: {c} (checked as stated)"),
            Source::Transcribed(c) => format!("published: {c} (constants transcribed, not re-derived)"),
            Source::Derived(s) => format!("derived here: THEORY.md {s}"),
            Source::Slot(s) => format!("paper slot: {s}"),
        }
    }
}

/// Problem constants a nonconvex bound uses.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct NonconvexConstants {
    pub d: f64,
    /// ‖G‖∞ ≤ R − √ε almost surely.
    pub r: f64,
    pub l: f64,
    /// An upper bound on F(x0) − F*.
    pub delta: f64,
}

/// One additive term of a bound, with what its mutants need (see [`crate::mutants`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Term {
    pub name: &'static str,
    pub value: f64,
    /// The power of N (or T) the term scales with as written (−0.5 for 1/√N; 0 for none).
    pub n_power: f64,
    /// N (or T), for the mutants that change that power.
    pub n: f64,
    /// The value of the logarithmic factor the term carries, if any (√(1 + ln T) included).
    pub log: Option<f64>,
}

impl Term {
    pub fn new(name: &'static str, value: f64, n_power: f64, n: f64) -> Self {
        Self { name, value, n_power, n, log: None }
    }

    fn with_log(mut self, log: f64) -> Self {
        self.log = Some(log);
        self
    }
}

/// A bound's value: the sum of its terms.
pub fn total(terms: &[Term]) -> f64 {
    terms.iter().map(|t| t.value).sum()
}

/// Which quantity a bound controls, and its terms.
pub enum Form {
    /// E‖∇F(x_τ)‖² ≤ Σ terms(constants, settings), τ drawn by `tau_weights`.
    Nonconvex { covers: Covers<NonconvexSettings>, terms: NonconvexTerms },
    /// E‖∇F(x_τ)‖² ≤ E[Σ terms(constants, settings, run)] (τ uniform): a bound with a
    /// trajectory-dependent term whose expectation is estimated from the same runs.
    NonconvexSemi {
        covers: Covers<NonconvexSettings>,
        terms: fn(&NonconvexConstants, &NonconvexSettings, &NonconvexRun) -> Vec<Term>,
    },
    /// R_T ≤ Σ terms(settings, run, T, D∞) for every sequence (deterministic).
    Regret { covers: Covers<RegretSettings>, terms: RegretTerms },
}

/// A nonconvex bound's terms from the problem constants and the settings.
pub type NonconvexTerms = Box<dyn Fn(&NonconvexConstants, &NonconvexSettings) -> Vec<Term> + Send + Sync>;

/// A regret bound's terms from the settings, the run, T and D∞.
pub type RegretTerms = Box<dyn Fn(&RegretSettings, &RegretRun, f64, f64) -> Vec<Term> + Send + Sync>;

/// Which settings (algorithm and parameters) a bound covers.
pub type Covers<S> = Box<dyn Fn(&S) -> bool + Send + Sync>;

/// A registered bound.
pub struct Bound {
    pub id: String,
    pub title: String,
    pub formula: String,
    pub assumptions: String,
    pub source: Source,
    pub form: Form,
}

/// The distribution of τ: uniform over {0..N−1} without momentum; P[τ = j] ∝ 1 − β1^{N−j}
/// with momentum (Défossez et al., eq. (9)–(10)).
pub fn tau_weights(beta1: f64, n: usize) -> Vec<f64> {
    let raw: Vec<f64> = (0..n).map(|j| if beta1 == 0.0 { 1.0 } else { 1.0 - beta1.powi((n - j) as i32) }).collect();
    let z: f64 = raw.iter().sum();
    raw.into_iter().map(|w| w / z).collect()
}

/// w_n = 2·√c_n·R·α_n + L·α_n²/2: the weight of ‖U_n‖² in the derived descent sum (THEORY §2).
pub fn descent_weight(k: &NonconvexConstants, s: &NonconvexSettings, n: usize) -> f64 {
    let a = s.step(n);
    2.0 * s.c(n).sqrt() * k.r * a + k.l * a * a / 2.0
}

fn defossez_adagrad(k: &NonconvexConstants, s: &NonconvexSettings) -> Vec<Term> {
    let n = s.steps as f64;
    let (d, r, l, a) = (k.d, k.r, k.l, s.alpha);
    let ln = (1.0 + n * r * r / s.eps).ln();
    vec![
        Term::new("2RΔ/(α√N)", 2.0 * r * k.delta / (a * n.sqrt()), -0.5, n),
        Term::new("4dR²·ln(1 + NR²/ε)/√N", 4.0 * d * r * r * ln / n.sqrt(), -0.5, n).with_log(ln),
        Term::new("αdRL·ln(1 + NR²/ε)/√N", a * d * r * l * ln / n.sqrt(), -0.5, n).with_log(ln),
    ]
}

fn defossez_adam(k: &NonconvexConstants, s: &NonconvexSettings) -> Vec<Term> {
    let n = s.steps as f64;
    let (d, r, l, a, b2) = (k.d, k.r, k.l, s.alpha, s.beta2);
    let ln = (1.0 + r * r / ((1.0 - b2) * s.eps)).ln();
    let (e1, e2) = (4.0 * d * r * r / (1.0 - b2).sqrt(), a * d * r * l / (1.0 - b2));
    vec![
        Term::new("2RΔ/(αN)", 2.0 * r * k.delta / (a * n), -1.0, n),
        Term::new("4dR²/√(1−β2)·ln(1 + R²/((1−β2)ε))/N", e1 * ln / n, -1.0, n).with_log(ln),
        Term::new("4dR²/√(1−β2)·(−ln β2)", -e1 * b2.ln(), 0.0, n),
        Term::new("αdRL/(1−β2)·ln(1 + R²/((1−β2)ε))/N", e2 * ln / n, -1.0, n).with_log(ln),
        Term::new("αdRL/(1−β2)·(−ln β2)", -e2 * b2.ln(), 0.0, n),
    ]
}

fn n_tilde(s: &NonconvexSettings) -> f64 {
    s.steps as f64 - s.beta1 / (1.0 - s.beta1)
}

/// A bound that is infinite (Ñ ≤ 0: the momentum bounds say nothing yet).
fn infinite(n: f64) -> Vec<Term> {
    vec![Term::new("∞ (Ñ ≤ 0)", f64::INFINITY, 0.0, n)]
}

fn defossez_adagrad_momentum(k: &NonconvexConstants, s: &NonconvexSettings) -> Vec<Term> {
    let (n, nt) = (s.steps as f64, n_tilde(s));
    if nt <= 0.0 {
        return infinite(n);
    }
    let (d, r, l, a, b1) = (k.d, k.r, k.l, s.alpha, s.beta1);
    let ln = (1.0 + n * r * r / s.eps).ln();
    let f = n.sqrt() / nt * ln;
    vec![
        Term::new("2R√N·Δ/(αÑ)", 2.0 * r * n.sqrt() * k.delta / (a * nt), -0.5, n),
        Term::new("αdRL·(√N/Ñ)·ln(1 + NR²/ε)", a * d * r * l * f, -0.5, n).with_log(ln),
        Term::new("12dR²/(1−β1)·(√N/Ñ)·ln(1 + NR²/ε)", 12.0 * d * r * r / (1.0 - b1) * f, -0.5, n).with_log(ln),
        Term::new("2α²dL²β1/(1−β1)·(√N/Ñ)·ln(1 + NR²/ε)", 2.0 * a * a * d * l * l * b1 / (1.0 - b1) * f, -0.5, n)
            .with_log(ln),
    ]
}

fn defossez_adam_momentum(k: &NonconvexConstants, s: &NonconvexSettings) -> Vec<Term> {
    let (n, nt) = (s.steps as f64, n_tilde(s));
    if nt <= 0.0 {
        return infinite(n);
    }
    let (d, r, l, a, b1, b2) = (k.d, k.r, k.l, s.alpha, s.beta1, s.beta2);
    let q = 1.0 - b1 / b2;
    let ln = (1.0 + r * r / ((1.0 - b2) * s.eps)).ln();
    let parts = [
        (
            "αdRL(1−β1)/((1−β1/β2)(1−β2))·ln(…)/Ñ",
            "αdRL(1−β1)/((1−β1/β2)(1−β2))·(−(N/Ñ)·ln β2)",
            a * d * r * l * (1.0 - b1) / (q * (1.0 - b2)),
        ),
        (
            "12dR²√(1−β1)/((1−β1/β2)^{3/2}√(1−β2))·ln(…)/Ñ",
            "12dR²√(1−β1)/((1−β1/β2)^{3/2}√(1−β2))·(−(N/Ñ)·ln β2)",
            12.0 * d * r * r * (1.0 - b1).sqrt() / (q.powf(1.5) * (1.0 - b2).sqrt()),
        ),
        (
            "2α²dL²β1/((1−β1/β2)(1−β2)^{3/2})·ln(…)/Ñ",
            "2α²dL²β1/((1−β1/β2)(1−β2)^{3/2})·(−(N/Ñ)·ln β2)",
            2.0 * a * a * d * l * l * b1 / (q * (1.0 - b2).powf(1.5)),
        ),
    ];
    let mut terms = vec![Term::new("2RΔ/(αÑ)", 2.0 * r * k.delta / (a * nt), -1.0, n)];
    for (with_log, with_beta, e) in parts {
        terms.push(Term::new(with_log, e * ln / nt, -1.0, n).with_log(ln));
        terms.push(Term::new(with_beta, -e * n / nt * b2.ln(), 0.0, n));
    }
    terms
}

/// Derived, semi-explicit (THEORY §2): 2RΔ/(αN) + (2R/(αN)) Σ_n w_n ‖U_n‖², the sum split
/// into w_n's two parts.
pub fn interp_semi(k: &NonconvexConstants, s: &NonconvexSettings, run: &NonconvexRun) -> Vec<Term> {
    let n = s.steps as f64;
    let (mut lemma, mut smooth) = (0.0, 0.0);
    for (i, u) in run.u_norm_sq.iter().enumerate() {
        let a = s.step(i + 1);
        lemma += 2.0 * s.c(i + 1).sqrt() * k.r * a * u;
        smooth += k.l * a * a / 2.0 * u;
    }
    let f = 2.0 * k.r / (s.alpha * n);
    vec![
        Term::new("2RΔ/(αN)", 2.0 * k.r * k.delta / (s.alpha * n), -1.0, n),
        Term::new("(2R/(αN))·Σ 2√c_n·R·α_n·‖U_n‖²", f * lemma, 0.0, n),
        Term::new("(2R/(αN))·Σ Lα_n²/2·‖U_n‖²", f * smooth, 0.0, n),
    ]
}

/// The semi-explicit bound's value.
pub fn interp_semi_value(k: &NonconvexConstants, s: &NonconvexSettings, run: &NonconvexRun) -> f64 {
    total(&interp_semi(k, s, run))
}

/// Derived, explicit for ρ ∈ (0, 1] (THEORY §3): the U-sum bounded through D_n ≥ ρ·v_n and the
/// weighted (Abel-summed) log lemma.
pub fn interp_explicit(k: &NonconvexConstants, s: &NonconvexSettings) -> Vec<Term> {
    let nf = s.steps as f64;
    let rho = match s.variant {
        Variant::Interp { rho } => rho,
        Variant::Adam => 1.0,
        Variant::Adagrad => return infinite(nf),
    };
    if rho <= 0.0 {
        return infinite(nf);
    }
    let big_n = s.steps;
    let w: Vec<f64> = (1..=big_n).map(|n| descent_weight(k, s, n)).collect();
    let ell_max = |n: usize| (1.0 + k.r * k.r * s_n(s.beta2, n) / s.eps).ln();
    let mut logs = w[big_n - 1] * ell_max(big_n);
    for n in 1..big_n {
        logs += (w[n - 1] - w[n]).max(0.0) * ell_max(n);
    }
    let f = 2.0 * k.r / (s.alpha * nf) * k.d / rho;
    vec![
        Term::new("2RΔ/(αN)", 2.0 * k.r * k.delta / (s.alpha * nf), -1.0, nf),
        Term::new("(2Rd/(αNρ))·[w_N·ℓ_N + Σ(w_n − w_{n+1})⁺·ℓ_n]", f * logs, -1.0, nf).with_log(ell_max(big_n)),
        Term::new("(2Rd/(αNρ))·(−ln β2)·Σ w_n", -f * s.beta2.ln() * w.iter().sum::<f64>(), 0.0, nf),
    ]
}

/// The explicit bound's value.
pub fn interp_explicit_value(k: &NonconvexConstants, s: &NonconvexSettings) -> f64 {
    total(&interp_explicit(k, s))
}

fn gamma(s: &RegretSettings) -> f64 {
    s.beta1 / s.beta2.sqrt()
}

/// Reddi et al.'s Lemma 2 constant: Σ_t α_t‖V̂_t^{−1/4} m_t‖² ≤ lemma2·Σ_i‖g_{1:T,i}‖₂.
fn amsgrad_lemma2(s: &RegretSettings, t: f64) -> f64 {
    s.alpha * (1.0 + t.ln()).sqrt() / ((1.0 - s.beta1) * (1.0 - gamma(s)) * (1.0 - s.beta2).sqrt())
}

/// The same for the mean (THEORY §4): 2α/((1−β1)√(1−β2)).
fn avgrad_lemma(s: &RegretSettings) -> f64 {
    2.0 * s.alpha / ((1.0 - s.beta1) * (1.0 - s.beta2).sqrt())
}

/// The two terms every regret bound shares (`first_factor` 1 for AMSGrad's, ½ for the derived).
fn regret_common(s: &RegretSettings, run: &RegretRun, t: f64, d_inf: f64, first_factor: f64) -> Vec<Term> {
    vec![
        Term::new(
            "D∞²√T/(α(1−β1))·Σ√D_T (×½ derived)",
            first_factor * d_inf * d_inf * t.sqrt() / (s.alpha * (1.0 - s.beta1)) * run.sqrt_d_final,
            0.5,
            t,
        ),
        Term::new(
            "D∞²/(2(1−β1))·Σ_t β1t·Σ√D_t/α_t",
            d_inf * d_inf / (2.0 * (1.0 - s.beta1)) * run.momentum_sum,
            0.0,
            t,
        ),
    ]
}

/// Every built-in bound.
pub fn registry() -> Vec<Bound> {
    vec![
        Bound {
            id: "defossez-adagrad".into(),
            title: "Adagrad, no momentum".into(),
            formula: "E‖∇F(x_τ)‖² ≤ 2RΔ/(α√N) + (4dR² + αdRL)·ln(1 + NR²/ε)/√N".into(),
            assumptions: "F ≥ F*, ∇F L-Lipschitz, E[G_n] = ∇F(x_{n−1}), ‖G_n‖∞ ≤ R − √ε a.s.; τ uniform on {0..N−1}".into(),
            source: Source::Published("Défossez, Bottou, Bach, Usunier, TMLR 2022, Theorem 1"),
            form: Form::Nonconvex { covers: Box::new(|s| s.variant == Variant::Adagrad && s.beta1 == 0.0), terms: Box::new(defossez_adagrad) },
        },
        Bound {
            id: "defossez-adam".into(),
            title: "Adam, no momentum".into(),
            formula: "E‖∇F(x_τ)‖² ≤ 2RΔ/(αN) + E·(ln(1 + R²/((1−β2)ε))/N − ln β2), E = 4dR²/√(1−β2) + αdRL/(1−β2)".into(),
            assumptions: "as Theorem 1, 0 < β2 < 1, α_n = α√((1−β2^n)/(1−β2))".into(),
            source: Source::Published("Défossez, Bottou, Bach, Usunier, TMLR 2022, Theorem 2"),
            form: Form::Nonconvex { covers: Box::new(|s| s.variant == Variant::Adam && s.beta1 == 0.0), terms: Box::new(defossez_adam) },
        },
        Bound {
            id: "defossez-adagrad-momentum".into(),
            title: "Adagrad with heavy-ball momentum".into(),
            formula: "E‖∇F(x_τ)‖² ≤ 2R√N·Δ/(αÑ) + (√N/Ñ)·E·ln(1 + NR²/ε), Ñ = N − β1/(1−β1), E = αdRL + 12dR²/(1−β1) + 2α²dL²β1/(1−β1)".into(),
            assumptions: "as Theorem 1, 0 < β1 < 1, α_n = α(1−β1); P[τ = j] ∝ 1 − β1^{N−j}".into(),
            source: Source::Transcribed("Défossez, Bottou, Bach, Usunier, TMLR 2022, Theorem 3"),
            form: Form::Nonconvex { covers: Box::new(|s| s.variant == Variant::Adagrad && s.beta1 > 0.0), terms: Box::new(defossez_adagrad_momentum) },
        },
        Bound {
            id: "defossez-adam-momentum".into(),
            title: "Adam with heavy-ball momentum".into(),
            formula: "E‖∇F(x_τ)‖² ≤ 2RΔ/(αÑ) + E·(ln(1 + R²/((1−β2)ε))/Ñ − (N/Ñ)·ln β2), E = αdRL(1−β1)/((1−β1/β2)(1−β2)) + 12dR²√(1−β1)/((1−β1/β2)^{3/2}√(1−β2)) + 2α²dL²β1/((1−β1/β2)(1−β2)^{3/2})".into(),
            assumptions: "as Theorem 2, 0 < β1 < β2 < 1, α_n = α(1−β1)√((1−β2^n)/(1−β2)); P[τ = j] ∝ 1 − β1^{N−j}".into(),
            source: Source::Transcribed("Défossez, Bottou, Bach, Usunier, TMLR 2022, Theorem 4"),
            form: Form::Nonconvex { covers: Box::new(|s| s.variant == Variant::Adam && s.beta1 > 0.0), terms: Box::new(defossez_adam_momentum) },
        },
        Bound {
            id: "interp-semi".into(),
            title: "Adam↔AVGrad interpolation ρ, semi-explicit".into(),
            formula: "E‖∇F(x_τ)‖² ≤ 2RΔ/(αN) + (2R/(αN))·Σ_n w_n·E‖U_n‖², w_n = 2√c_n·R·α_n + Lα_n²/2, c_n = ρ + (1−ρ)/n".into(),
            assumptions: "as Theorem 2, β1 = 0, D_n = ρv_n + (1−ρ)v̄_n, α_n = α√Q_n, Q_n = ρS_n + (1−ρ)·mean(S_1..S_n)".into(),
            source: Source::Derived("§2"),
            form: Form::NonconvexSemi {
                covers: Box::new(|s| s.beta1 == 0.0 && matches!(s.variant, Variant::Interp { .. } | Variant::Adam)),
                terms: interp_semi,
            },
        },
        Bound {
            id: "interp-explicit".into(),
            title: "Adam↔AVGrad interpolation ρ > 0, explicit".into(),
            formula: "E‖∇F(x_τ)‖² ≤ 2RΔ/(αN) + (2Rd/(αNρ))·[w_N·ℓ_N + Σ_{n<N} (w_n − w_{n+1})⁺·ℓ_n − ln β2·Σ_n w_n], ℓ_n = ln(1 + R²S_n/ε)".into(),
            assumptions: "as interp-semi, ρ > 0".into(),
            source: Source::Derived("§3"),
            form: Form::Nonconvex {
                covers: Box::new(|s| s.beta1 == 0.0 && matches!(s.variant, Variant::Interp { rho } if rho > 0.0)),
                terms: Box::new(interp_explicit),
            },
        },
        Bound {
            id: "reddi-amsgrad".into(),
            title: "AMSGrad regret".into(),
            formula: "R_T ≤ D∞²√T/(α(1−β1))·Σ_i√v̂_{T,i} + D∞²/(2(1−β1))·Σ_tΣ_i β1t√v̂_{t,i}/α_t + α√(1+ln T)/((1−β1)²(1−γ)√(1−β2))·Σ_i‖g_{1:T,i}‖₂".into(),
            assumptions: "online convex losses on a set of ℓ∞-diameter D∞, α_t = α/√t, β1t ≤ β1, γ = β1/√β2 < 1".into(),
            source: Source::AsStated("Reddi, Kale, Kumar, ICLR 2018, Theorem 4"),
            form: Form::Regret {
                covers: Box::new(|s| s.second == SecondMoment::Max && gamma(s) < 1.0),
                terms: Box::new(|s, run, t, d_inf| {
                    let mut terms = regret_common(s, run, t, d_inf, 1.0);
                    let log = (1.0 + t.ln()).sqrt();
                    let value = amsgrad_lemma2(s, t) / (1.0 - s.beta1) * run.grad_l2_sum;
                    terms.push(Term::new("α√(1+ln T)/((1−β1)²(1−γ)√(1−β2))·Σ‖g_{1:T}‖₂", value, 0.0, t).with_log(log));
                    terms
                }),
            },
        },
        Bound {
            id: "avgrad-regret".into(),
            title: "AVGrad regret".into(),
            formula: "R_T ≤ D∞²√T/(2α(1−β1))·Σ_i√v̄_{T,i} + D∞²/(2(1−β1))·Σ_tΣ_i β1t√v̄_{t,i}/α_t + α(1+β1)/((1−β1)²√(1−β2))·Σ_i‖g_{1:T,i}‖₂".into(),
            assumptions: "as AMSGrad's, without γ < 1, and with a constant β1t = β1 (THEORY.md §4)".into(),
            source: Source::Derived("§4"),
            form: Form::Regret {
                covers: Box::new(|s| s.second == SecondMoment::Mean && s.lambda == 1.0),
                terms: Box::new(|s, run, t, d_inf| {
                    let mut terms = regret_common(s, run, t, d_inf, 0.5);
                    let value = (1.0 + s.beta1) / (2.0 * (1.0 - s.beta1)) * avgrad_lemma(s) * run.grad_l2_sum;
                    terms.push(Term::new("α(1+β1)/((1−β1)²√(1−β2))·Σ‖g_{1:T}‖₂", value, 0.0, t));
                    terms
                }),
            },
        },
        Bound {
            id: "maxmean-regret".into(),
            title: "AMSGrad↔AVGrad interpolation ρ, regret".into(),
            formula: "R_T ≤ D∞²√T/(2α(1−β1))·Σ_i√D_{T,i} + D∞²/(2(1−β1))·Σ_tΣ_i β1t√D_{t,i}/α_t + ((1+β1)/(2(1−β1)))·[ρ·Λ_max + (1−ρ)·Λ_mean]·Σ_i‖g_{1:T,i}‖₂".into(),
            assumptions: "as AMSGrad's, D_t = ρ·v̂_t + (1−ρ)·v̄_t, and with a constant β1t = β1 (THEORY.md §5)".into(),
            source: Source::Derived("§5"),
            form: Form::Regret {
                covers: Box::new(|s| matches!(s.second, SecondMoment::MaxMean { .. }) && gamma(s) < 1.0 && s.lambda == 1.0),
                terms: Box::new(|s, run, t, d_inf| {
                    let SecondMoment::MaxMean { rho } = s.second else { return vec![Term::new("∞", f64::INFINITY, 0.0, t)] };
                    let mut terms = regret_common(s, run, t, d_inf, 0.5);
                    let f = (1.0 + s.beta1) / (2.0 * (1.0 - s.beta1)) * run.grad_l2_sum;
                    let log = (1.0 + t.ln()).sqrt();
                    terms.push(Term::new("((1+β1)/(2(1−β1)))·ρ·Λ_max·Σ‖g_{1:T}‖₂", f * rho * amsgrad_lemma2(s, t), 0.0, t).with_log(log));
                    terms.push(Term::new("((1+β1)/(2(1−β1)))·(1−ρ)·Λ_mean·Σ‖g_{1:T}‖₂", f * (1.0 - rho) * avgrad_lemma(s), 0.0, t));
                    terms
                }),
            },
        },
    ]
}

// -------------------------------------------------------------------------------------------
// The slot for the paper's own statements.

/// One statement of the MADA paper (or any other source) as data: a formula in the variables
/// listed in `reports/reference/paper-bounds.toml`, evaluated like the built-in bounds.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PaperSlot {
    pub id: String,
    /// The statement as written in its source.
    pub statement: String,
    /// Where it is stated (paper, theorem number, page).
    pub source: String,
    /// Its assumptions, as written.
    pub assumptions: String,
    /// `nonconvex` (controls E‖∇F(x_τ)‖²) or `regret` (controls R_T).
    pub framework: String,
    /// Which algorithm of `frameworks` it covers: adagrad, adam, interp, amsgrad, avgrad, maxmean.
    pub covers: String,
    /// With momentum (β1 > 0)?
    #[serde(default)]
    pub momentum: bool,
    /// The bound, an `evalexpr` expression (`math::ln`, `math::sqrt`, `^`).
    pub expression: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SlotFile {
    #[serde(default)]
    bound: Vec<PaperSlot>,
}

/// Variables available to slot expressions.
pub const SLOT_VARIABLES: &[&str] = &[
    "d",
    "R",
    "L",
    "Delta",
    "eps",
    "alpha",
    "beta1",
    "beta2",
    "rho",
    "N",
    "T",
    "Dinf",
    "sum_sqrt_D_T",
    "momentum_sum",
    "grad_l2_sum",
];

impl PaperSlot {
    /// Evaluate with the given variable values (missing variables are an error naming them).
    pub fn evaluate(&self, vars: &[(&str, f64)]) -> Result<f64> {
        use evalexpr::{ContextWithMutableVariables, HashMapContext, Value};
        let mut ctx = HashMapContext::<evalexpr::DefaultNumericTypes>::new();
        for (name, v) in vars {
            ctx.set_value((*name).to_string(), Value::Float(*v)).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        evalexpr::eval_number_with_context(&self.expression, &ctx)
            .map_err(|e| anyhow::anyhow!("bound {}: cannot evaluate `{}`: {e}", self.id, self.expression))
    }

    /// Turn the slot into a registry entry.
    pub fn into_bound(self) -> Result<Bound> {
        let id = self.id.clone();
        let (title, assumptions, formula) = (self.statement.clone(), self.assumptions.clone(), self.expression.clone());
        let source = Source::Slot(self.source.clone());
        let momentum = self.momentum;
        let form = match (self.framework.as_str(), self.covers.as_str()) {
            ("nonconvex", "adagrad" | "adam" | "interp") => {
                let covers = self.covers.clone();
                Form::Nonconvex {
                    covers: Box::new(move |s| {
                        (s.beta1 > 0.0) == momentum
                            && match s.variant {
                                Variant::Adagrad => covers == "adagrad",
                                Variant::Adam => covers == "adam",
                                Variant::Interp { .. } => covers == "interp",
                            }
                    }),
                    terms: Box::new(move |k, s| {
                        let rho = if let Variant::Interp { rho } = s.variant { rho } else { 1.0 };
                        let value = self
                            .evaluate(&[
                                ("d", k.d),
                                ("R", k.r),
                                ("L", k.l),
                                ("Delta", k.delta),
                                ("eps", s.eps),
                                ("alpha", s.alpha),
                                ("beta1", s.beta1),
                                ("beta2", s.beta2),
                                ("rho", rho),
                                ("N", s.steps as f64),
                            ])
                            .unwrap_or(f64::NAN);
                        vec![Term::new("the slot's expression", value, 0.0, s.steps as f64)]
                    }),
                }
            }
            ("regret", "amsgrad" | "avgrad" | "maxmean") => {
                let covers = self.covers.clone();
                Form::Regret {
                    covers: Box::new(move |s| match s.second {
                        SecondMoment::Max => covers == "amsgrad",
                        SecondMoment::Mean => covers == "avgrad",
                        SecondMoment::MaxMean { .. } => covers == "maxmean",
                        SecondMoment::Ema => false,
                    }),
                    terms: Box::new(move |s, run, t, d_inf| {
                        let rho = match s.second {
                            SecondMoment::Mean => 0.0,
                            SecondMoment::MaxMean { rho } => rho,
                            _ => 1.0,
                        };
                        let value = self
                            .evaluate(&[
                                ("alpha", s.alpha),
                                ("beta1", s.beta1),
                                ("beta2", s.beta2),
                                ("rho", rho),
                                ("T", t),
                                ("Dinf", d_inf),
                                ("sum_sqrt_D_T", run.sqrt_d_final),
                                ("momentum_sum", run.momentum_sum),
                                ("grad_l2_sum", run.grad_l2_sum),
                            ])
                            .unwrap_or(f64::NAN);
                        vec![Term::new("the slot's expression", value, 0.0, t)]
                    }),
                }
            }
            (f, c) => bail!("bound {id}: unknown framework/covers combination `{f}`/`{c}`"),
        };
        Ok(Bound { id, title, formula, assumptions, source, form })
    }
}

/// Read the paper-slot file (TOML, `[[bound]]` tables). A missing file means no slots.
pub fn read_slots(path: &Path) -> Result<Vec<PaperSlot>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file: SlotFile = toml::from_str(&text).with_context(|| format!("invalid bound slots in {}", path.display()))?;
    for s in &file.bound {
        if !matches!(s.framework.as_str(), "nonconvex" | "regret") {
            bail!(
                "{}: bound {}: framework must be `nonconvex` or `regret`, not `{}`",
                path.display(),
                s.id,
                s.framework
            );
        }
    }
    Ok(file.bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(variant: Variant) -> NonconvexSettings {
        NonconvexSettings { variant, alpha: 0.01, beta1: 0.0, beta2: 0.99, eps: 1e-8, steps: 200 }
    }

    #[test]
    fn derived_explicit_bound_at_rho_one_is_no_looser_than_theorem_2() {
        let k = NonconvexConstants { d: 5.0, r: 2.0, l: 3.0, delta: 1.5 };
        for steps in [10, 100, 1000] {
            let s = NonconvexSettings { steps, ..settings(Variant::Interp { rho: 1.0 }) };
            let ours = interp_explicit_value(&k, &s);
            let published = total(&defossez_adam(&k, &NonconvexSettings { variant: Variant::Adam, ..s }));
            assert!(ours <= published * (1.0 + 1e-12), "N={steps}: {ours} > {published}");
        }
    }

    #[test]
    fn slot_expression_reproduces_a_builtin_bound() {
        let slot = PaperSlot {
            id: "t2".into(),
            statement: "Theorem 2".into(),
            source: "test".into(),
            assumptions: "".into(),
            framework: "nonconvex".into(),
            covers: "adam".into(),
            momentum: false,
            expression: "2*R*Delta/(alpha*N) + (4*d*R^2/math::sqrt(1-beta2) + alpha*d*R*L/(1-beta2)) * (math::ln(1 + R^2/((1-beta2)*eps))/N - math::ln(beta2))".into(),
        };
        let b = slot.into_bound().unwrap();
        let k = NonconvexConstants { d: 3.0, r: 1.5, l: 2.0, delta: 0.7 };
        let s = settings(Variant::Adam);
        let Form::Nonconvex { terms, covers } = &b.form else { panic!() };
        let v = total(&terms(&k, &s));
        assert!((v - total(&defossez_adam(&k, &s))).abs() < 1e-9 * v, "{v}");
        // It does not apply to another algorithm.
        assert!(covers(&s) && !covers(&settings(Variant::Adagrad)));
    }

    #[test]
    fn slot_file_errors_name_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("paper-bounds.toml");
        std::fs::write(&p, "[[bound]]\nid = \"x\"\nstatment = \"typo\"\n").unwrap();
        let e = format!("{:#}", read_slots(&p).unwrap_err());
        assert!(e.contains("paper-bounds.toml") && e.contains("statment"), "{e}");
        assert!(read_slots(&dir.path().join("absent.toml")).unwrap().is_empty());
    }

    #[test]
    fn tau_weights_are_a_distribution() {
        for b1 in [0.0, 0.5, 0.9] {
            let w = tau_weights(b1, 50);
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            assert!(w.windows(2).all(|p| p[0] >= p[1] - 1e-15));
        }
    }
}
