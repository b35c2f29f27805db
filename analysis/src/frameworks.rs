//! The algorithms exactly as the bounds' frameworks state them (THEORY.md §1 and §4).
//!
//! These are *not* the training optimizers of the `mada` crate (PyTorch conventions, ε outside
//! the root, bias-corrected m): a bound is checked against the algorithm it is proved for.
//! THEORY.md gives the map between the two forms.

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::problems::{Noise, Objective};

/// Step-size rule of the nonconvex (Défossez et al.) form.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Variant {
    /// β2 = 1 (v is the plain sum of squares), α_n = α(1 − β1).
    Adagrad,
    /// 0 < β2 < 1, D_n = v_n, α_n = α(1 − β1)·√S_n, S_n = Σ_{j<n} β2^j.
    Adam,
    /// 0 < β2 < 1, β1 = 0, D_n = ρ·v_n + (1 − ρ)·v̄_n with v̄_n = mean(v_1..v_n),
    /// α_n = α·√Q_n, Q_n = ρ·S_n + (1 − ρ)·mean(S_1..S_n). ρ = 1 is `Adam`, ρ = 0 AVGrad.
    Interp { rho: f64 },
}

/// Settings of a nonconvex-form run.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct NonconvexSettings {
    pub variant: Variant,
    pub alpha: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub steps: usize,
}

/// S_n = Σ_{j<n} β2^j = (1 − β2^n)/(1 − β2) (n for β2 = 1).
pub fn s_n(beta2: f64, n: usize) -> f64 {
    if beta2 == 1.0 {
        n as f64
    } else {
        (1.0 - beta2.powi(n as i32)) / (1.0 - beta2)
    }
}

/// mean(S_1..S_n) = (1/(1−β2))·(1 − β2(1 − β2^n)/(n(1 − β2))) in closed form ((n+1)/2 for β2 = 1).
pub fn mean_s_n(beta2: f64, n: usize) -> f64 {
    let nf = n as f64;
    if beta2 == 1.0 {
        (nf + 1.0) / 2.0
    } else {
        (1.0 - beta2 * (1.0 - beta2.powi(n as i32)) / (nf * (1.0 - beta2))) / (1.0 - beta2)
    }
}

impl NonconvexSettings {
    /// c_n: the weight of the current squared gradient in the denominator D_n
    /// (D_n = P_n + c_n·G_n² with P_n known before G_n): 1 for Adam/Adagrad, ρ + (1 − ρ)/n.
    pub fn c(&self, n: usize) -> f64 {
        match self.variant {
            Variant::Interp { rho } => rho + (1.0 - rho) / n as f64,
            _ => 1.0,
        }
    }

    /// Q_n: the a.s. bound D_n ≤ R²·Q_n (for ‖G‖∞ ≤ R); S_n for Adam, ρS_n + (1−ρ)·mean S.
    pub fn q(&self, n: usize) -> f64 {
        match self.variant {
            Variant::Adagrad => n as f64,
            Variant::Adam => s_n(self.beta2, n),
            Variant::Interp { rho } => rho * s_n(self.beta2, n) + (1.0 - rho) * mean_s_n(self.beta2, n),
        }
    }

    /// α_n.
    pub fn step(&self, n: usize) -> f64 {
        match self.variant {
            Variant::Adagrad => self.alpha * (1.0 - self.beta1),
            _ => self.alpha * (1.0 - self.beta1) * self.q(n).sqrt(),
        }
    }
}

/// What a nonconvex-form run records.
#[derive(Clone, Debug, Default)]
pub struct NonconvexRun {
    /// ‖∇F(x_{n−1})‖² for n = 1..N (the gradient at the point where G_n is drawn).
    pub grad_norm_sq: Vec<f64>,
    /// ‖U_n‖² = Σ_i G_{n,i}²/(ε + D_{n,i}) for n = 1..N.
    pub u_norm_sq: Vec<f64>,
    /// Whether every iterate stayed in the problem's region.
    pub stayed_in_region: bool,
    /// max over the run of ‖G_n‖∞ (must not exceed R − √ε).
    pub max_abs_grad: f64,
}

/// Run the nonconvex form for `settings.steps` updates with noise seed `seed`.
pub fn run_nonconvex(obj: &dyn Objective, noise: Noise, s: &NonconvexSettings, seed: u64) -> NonconvexRun {
    let d = obj.dim();
    let region = obj.constants().region;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut x = obj.x0();
    let (mut m, mut v, mut v_sum) = (vec![0.0; d], vec![0.0; d], vec![0.0; d]);
    let mut out = NonconvexRun { stayed_in_region: region.contains(&x), ..Default::default() };
    let beta2 = if s.variant == Variant::Adagrad { 1.0 } else { s.beta2 };
    for n in 1..=s.steps {
        let true_grad = obj.grad(&x);
        out.grad_norm_sq.push(true_grad.iter().map(|g| g * g).sum());
        let mut g = true_grad;
        noise.perturb(&mut g, &mut rng);
        out.max_abs_grad = g.iter().fold(out.max_abs_grad, |a, v| a.max(v.abs()));
        let step = s.step(n);
        let mut u2 = 0.0;
        for i in 0..d {
            v[i] = beta2 * v[i] + g[i] * g[i];
            v_sum[i] += v[i];
            m[i] = s.beta1 * m[i] + g[i];
            let denom = match s.variant {
                Variant::Interp { rho } => rho * v[i] + (1.0 - rho) * v_sum[i] / n as f64,
                _ => v[i],
            };
            u2 += g[i] * g[i] / (s.eps + denom);
            x[i] -= step * m[i] / (s.eps + denom).sqrt();
        }
        out.u_norm_sq.push(u2);
        if !region.contains(&x) {
            out.stayed_in_region = false;
        }
        if x.iter().any(|v| !v.is_finite()) {
            out.stayed_in_region = false;
            break;
        }
    }
    out
}

// -------------------------------------------------------------------------------------------
// The online convex (Reddi, Kale, Kumar 2018) form.

/// Second-moment rule of the regret-form algorithm.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum SecondMoment {
    /// AMSGrad: v̂_t = max(v̂_{t−1}, v_t).
    Max,
    /// AVGrad: v̄_t = mean(v_1..v_t).
    Mean,
    /// ρ·v̂_t + (1 − ρ)·v̄_t.
    MaxMean { rho: f64 },
    /// Adam (v_t itself): not covered by any regret bound (Reddi et al.'s counterexample).
    Ema,
}

/// Reddi et al.'s Algorithm 2 with a chosen second moment: m_t = β1t m_{t−1} + (1−β1t) g_t,
/// v_t = β2 v_{t−1} + (1−β2) g_t², x_{t+1} = Π_box(x_t − α_t m_t/√D_t), α_t = α/√t,
/// β1t = β1·λ^{t−1}, no bias correction, no ε (D_t > 0 once a gradient is non-zero).
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct RegretSettings {
    pub second: SecondMoment,
    pub alpha: f64,
    pub beta1: f64,
    pub lambda: f64,
    pub beta2: f64,
}

/// What a regret-form run records (everything its bounds need).
#[derive(Clone, Debug)]
pub struct RegretRun {
    /// R_T = Σ_t f_t(x_t) − min_x Σ_t f_t(x).
    pub regret: f64,
    /// Σ_i √D_{T,i}.
    pub sqrt_d_final: f64,
    /// Σ_t Σ_i β1t·√D_{t,i}/α_t.
    pub momentum_sum: f64,
    /// Σ_i ‖g_{1:T,i}‖₂.
    pub grad_l2_sum: f64,
    /// Iterates x_1..x_T (first coordinate), for plots.
    pub x_first: Vec<f64>,
}

/// An online linear problem f_t(x) = ⟨g_t, x⟩ on the box [lo, hi]^d. g_t may depend on the
/// iterate x_t (an adaptive adversary): the algorithms are deterministic, so an adaptive
/// sequence is one fixed sequence for them and every regret bound covers it.
pub trait OnlineLinear {
    fn dim(&self) -> usize;
    fn bounds(&self) -> (f64, f64);
    /// g_t for t = 1, 2, …, seeing the iterate x_t.
    fn gradient(&self, t: usize, x: &[f64], out: &mut [f64]);
}

/// Reddi et al.'s counterexample: d = 1 on [−1, 1], f_t(x) = C·x if t mod 3 = 1, else −x,
/// generalized to any period and constant (the MADA repository uses C = 1010, period 101,
/// and −10 in between).
pub struct ReddiSequence {
    pub period: usize,
    pub big: f64,
    pub small: f64,
}

impl OnlineLinear for ReddiSequence {
    fn dim(&self) -> usize {
        1
    }
    fn bounds(&self) -> (f64, f64) {
        (-1.0, 1.0)
    }
    fn gradient(&self, t: usize, _x: &[f64], out: &mut [f64]) {
        out[0] = if t % self.period == 1 { self.big } else { self.small };
    }
}

/// Random bounded linear losses with a drift, reproducible from a seed.
pub struct RandomLinear {
    pub d: usize,
    pub g_inf: f64,
    pub drift: Vec<f64>,
    pub seed: u64,
}

impl OnlineLinear for RandomLinear {
    fn dim(&self) -> usize {
        self.d
    }
    fn bounds(&self) -> (f64, f64) {
        (-1.0, 1.0)
    }
    fn gradient(&self, t: usize, _x: &[f64], out: &mut [f64]) {
        // A counter-based generator so g_t does not depend on the order of calls.
        for (i, o) in out.iter_mut().enumerate() {
            let mut z = self.seed ^ ((t as u64) << 20) ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
            *o = (self.drift[i] + u).clamp(-self.g_inf, self.g_inf);
        }
    }
}

/// The adaptive adversary that presses on the regret bounds: g_{t,i} = +G if x_{t,i} ≥ c_i and
/// −G otherwise, on [−1, 1]^d. The iterate is pushed back across c every round, so the method
/// pays about G·|x_t − c| per coordinate and round while the best fixed point pays almost
/// nothing: the regret grows like the step sizes' sum, which is what the bounds' last term
/// charges for.
pub struct SignAdversary {
    pub g: f64,
    pub center: Vec<f64>,
}

impl OnlineLinear for SignAdversary {
    fn dim(&self) -> usize {
        self.center.len()
    }
    fn bounds(&self) -> (f64, f64) {
        (-1.0, 1.0)
    }
    fn gradient(&self, _t: usize, x: &[f64], out: &mut [f64]) {
        for ((o, x), c) in out.iter_mut().zip(x).zip(&self.center) {
            *o = if x >= c { self.g } else { -self.g };
        }
    }
}

/// Run the regret form for `steps` rounds from x_1 = 0.
pub fn run_regret(problem: &dyn OnlineLinear, s: &RegretSettings, steps: usize) -> RegretRun {
    let d = problem.dim();
    let (lo, hi) = problem.bounds();
    let mut x = vec![0.0f64; d];
    let (mut m, mut v, mut v_max, mut v_sum) = (vec![0.0f64; d], vec![0.0f64; d], vec![0.0f64; d], vec![0.0f64; d]);
    let mut g = vec![0.0; d];
    let (mut loss, mut g_total, mut g_sq) = (0.0, vec![0.0; d], vec![0.0; d]);
    let mut momentum_sum = 0.0;
    let mut denom = vec![0.0; d];
    let mut x_first = Vec::with_capacity(steps);
    for t in 1..=steps {
        problem.gradient(t, &x, &mut g);
        for i in 0..d {
            loss += g[i] * x[i];
            g_total[i] += g[i];
            g_sq[i] += g[i] * g[i];
        }
        let beta1t = s.beta1 * s.lambda.powi(t as i32 - 1);
        let alpha_t = s.alpha / (t as f64).sqrt();
        for i in 0..d {
            m[i] = beta1t * m[i] + (1.0 - beta1t) * g[i];
            v[i] = s.beta2 * v[i] + (1.0 - s.beta2) * g[i] * g[i];
            v_max[i] = v_max[i].max(v[i]);
            v_sum[i] += v[i];
            let mean = v_sum[i] / t as f64;
            denom[i] = match s.second {
                SecondMoment::Max => v_max[i],
                SecondMoment::Mean => mean,
                SecondMoment::MaxMean { rho } => rho * v_max[i] + (1.0 - rho) * mean,
                SecondMoment::Ema => v[i],
            };
            momentum_sum += beta1t * denom[i].sqrt() / alpha_t;
            if denom[i] > 0.0 {
                // The weighted projection onto a box is the coordinate clamp.
                x[i] = (x[i] - alpha_t * m[i] / denom[i].sqrt()).clamp(lo, hi);
            }
        }
        x_first.push(x[0]);
    }
    // The best fixed point of a linear loss on a box is a corner.
    let best: f64 = g_total.iter().map(|gt| if *gt > 0.0 { gt * lo } else { gt * hi }).sum();
    RegretRun {
        regret: loss - best,
        sqrt_d_final: denom.iter().map(|v| v.sqrt()).sum(),
        momentum_sum,
        grad_l2_sum: g_sq.iter().map(|v| v.sqrt()).sum(),
        x_first,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_closed_form_mean_of_s_is_the_mean() {
        for beta2 in [0.5, 0.9, 0.999, 1.0] {
            for n in [1, 2, 7, 300] {
                let direct = (1..=n).map(|k| s_n(beta2, k)).sum::<f64>() / n as f64;
                assert!((mean_s_n(beta2, n) - direct).abs() <= 1e-9 * direct, "β2={beta2} n={n}");
            }
        }
    }
}
