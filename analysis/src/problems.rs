//! Synthetic problems with their constants computed (never assumed): smoothness L, a
//! coordinate-wise bound on the true gradient over a stated region, a lower bound on the
//! infimum, and a bounded, unbiased noise model for stochastic gradients.
//!
//! Every problem states the region on which its constants hold. Problems whose gradients are
//! bounded only on a region (quadratics, Rosenbrock) report it, and a run that leaves it is
//! excluded from a bound check with that reason (the constants would not apply).

use nalgebra::{DMatrix, DVector, SymmetricEigen};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// The region on which a problem's constants hold.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Region {
    /// All of ℝ^d.
    Everywhere,
    /// The box lo ≤ x ≤ hi (coordinate-wise).
    Box { lo: Vec<f64>, hi: Vec<f64> },
}

impl Region {
    pub fn contains(&self, x: &[f64]) -> bool {
        match self {
            Region::Everywhere => true,
            Region::Box { lo, hi } => x.iter().zip(lo.iter().zip(hi)).all(|(v, (l, h))| *v >= *l && *v <= *h),
        }
    }
}

/// Constants of a problem, valid on its region.
#[derive(Clone, Debug, Serialize)]
pub struct Constants {
    /// Dimension.
    pub d: usize,
    /// ∇F is L-Lipschitz (Euclidean) on the region.
    pub smoothness: f64,
    /// sup over the region of ‖∇F(x)‖∞.
    pub grad_sup: f64,
    /// A lower bound on inf F (so F(x0) − lower is an upper bound on F(x0) − F*).
    pub inf_lower: f64,
    /// Convex?
    pub convex: bool,
    /// Where these hold.
    pub region: Region,
}

/// A deterministic objective F with its gradient.
pub trait Objective: Send + Sync {
    fn name(&self) -> String;
    fn dim(&self) -> usize;
    fn value(&self, x: &[f64]) -> f64;
    fn grad(&self, x: &[f64]) -> Vec<f64>;
    fn constants(&self) -> Constants;
    fn x0(&self) -> Vec<f64>;
}

/// Additive noise ξ with iid coordinates uniform on [−σ√3, σ√3]: mean 0, variance σ², and
/// |ξ_i| ≤ σ√3 almost surely (the a.s. bound the theorems need).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Noise {
    pub sigma: f64,
}

impl Noise {
    pub fn bound(&self) -> f64 {
        self.sigma * 3f64.sqrt()
    }

    pub fn perturb(&self, g: &mut [f64], rng: &mut StdRng) {
        if self.sigma > 0.0 {
            let b = self.bound();
            for v in g {
                *v += rng.random_range(-b..=b);
            }
        }
    }
}

fn sym_max_eig(m: &DMatrix<f64>) -> f64 {
    SymmetricEigen::new(m.clone()).eigenvalues.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
}

fn random_orthogonal(d: usize, rng: &mut StdRng) -> DMatrix<f64> {
    let a = DMatrix::from_fn(d, d, |_, _| rng.random_range(-1.0..1.0));
    a.qr().q()
}

// -------------------------------------------------------------------------------------------
/// F(x) = ½ (x − x*)ᵀ A (x − x*) with A = Q diag(λ) Qᵀ, λ geometric from L/κ to L.
/// The gradient is bounded on the box x* ± B: |∇_i F| ≤ Σ_j |A_ij|·B.
pub struct Quadratic {
    pub a: DMatrix<f64>,
    pub x_star: DVector<f64>,
    pub start: Vec<f64>,
    pub half_width: f64,
    pub condition: f64,
}

impl Quadratic {
    pub fn random(d: usize, condition: f64, l: f64, rng: &mut StdRng) -> Self {
        let q = random_orthogonal(d, rng);
        let lambdas: Vec<f64> = (0..d)
            .map(|i| if d == 1 { l } else { l / condition * condition.powf(i as f64 / (d - 1) as f64) })
            .collect();
        let a = &q * DMatrix::from_diagonal(&DVector::from_vec(lambdas)) * q.transpose();
        let a = (&a + a.transpose()) * 0.5;
        let x_star = DVector::from_fn(d, |_, _| rng.random_range(-1.0..1.0));
        let start: Vec<f64> = (0..d).map(|i| x_star[i] + rng.random_range(-1.0..1.0)).collect();
        Self { a, x_star, start, half_width: 3.0, condition }
    }
}

impl Objective for Quadratic {
    fn name(&self) -> String {
        format!("quadratic(d={}, kappa={:.0})", self.x_star.len(), self.condition)
    }
    fn dim(&self) -> usize {
        self.x_star.len()
    }
    fn value(&self, x: &[f64]) -> f64 {
        let e = DVector::from_column_slice(x) - &self.x_star;
        0.5 * e.dot(&(&self.a * &e))
    }
    fn grad(&self, x: &[f64]) -> Vec<f64> {
        let e = DVector::from_column_slice(x) - &self.x_star;
        (&self.a * e).iter().cloned().collect()
    }
    fn constants(&self) -> Constants {
        let d = self.dim();
        let grad_sup =
            (0..d).map(|i| (0..d).map(|j| self.a[(i, j)].abs()).sum::<f64>() * self.half_width).fold(0.0, f64::max);
        Constants {
            d,
            smoothness: sym_max_eig(&self.a),
            grad_sup,
            inf_lower: 0.0,
            convex: true,
            region: Region::Box {
                lo: self.x_star.iter().map(|c| c - self.half_width).collect(),
                hi: self.x_star.iter().map(|c| c + self.half_width).collect(),
            },
        }
    }
    fn x0(&self) -> Vec<f64> {
        self.start.clone()
    }
}

// -------------------------------------------------------------------------------------------
/// Logistic regression F(w) = (1/n) Σ log(1 + exp(−y_i x_iᵀw)), labels ±1, on generated data:
/// separable (labels from a teacher) or not (labels flipped with probability 0.2).
/// L = λmax(XᵀX)/(4n); |∇_j F| ≤ max_i |x_ij|; F ≥ 0.
pub struct Logistic {
    pub x: DMatrix<f64>,
    pub y: Vec<f64>,
    pub separable: bool,
}

impl Logistic {
    pub fn random(n: usize, d: usize, separable: bool, rng: &mut StdRng) -> Self {
        let x = DMatrix::from_fn(n, d, |_, _| rng.random_range(-1.0..1.0));
        let teacher: Vec<f64> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let y = (0..n)
            .map(|i| {
                let s: f64 = (0..d).map(|j| x[(i, j)] * teacher[j]).sum();
                let label = if s >= 0.0 { 1.0 } else { -1.0 };
                if !separable && rng.random_bool(0.2) {
                    -label
                } else {
                    label
                }
            })
            .collect();
        Self { x, y, separable }
    }
}

/// (1/n) Σ_i φ(x_iᵀw, y_i) for a linear model with per-example loss φ.
fn glm_value(x: &DMatrix<f64>, y: &[f64], w: &[f64], phi: impl Fn(f64, f64) -> f64) -> f64 {
    let n = x.nrows();
    (0..n).map(|i| phi((0..w.len()).map(|j| x[(i, j)] * w[j]).sum(), y[i])).sum::<f64>() / n as f64
}

/// Its gradient (1/n) Σ_i φ'(x_iᵀw, y_i)·x_i, given φ' = ∂φ/∂z.
fn glm_grad(x: &DMatrix<f64>, y: &[f64], w: &[f64], dphi: impl Fn(f64, f64) -> f64) -> Vec<f64> {
    let (n, d) = (x.nrows(), x.ncols());
    let mut g = vec![0.0; d];
    for i in 0..n {
        let coef = dphi((0..d).map(|j| x[(i, j)] * w[j]).sum(), y[i]) / n as f64;
        for (j, gj) in g.iter_mut().enumerate() {
            *gj += coef * x[(i, j)];
        }
    }
    g
}

fn log1p_exp(z: f64) -> f64 {
    if z > 0.0 {
        z + (-z).exp().ln_1p()
    } else {
        z.exp().ln_1p()
    }
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

impl Objective for Logistic {
    fn name(&self) -> String {
        format!(
            "logistic(n={}, d={}, {})",
            self.x.nrows(),
            self.x.ncols(),
            if self.separable { "separable" } else { "noisy labels" }
        )
    }
    fn dim(&self) -> usize {
        self.x.ncols()
    }
    fn value(&self, w: &[f64]) -> f64 {
        glm_value(&self.x, &self.y, w, |z, y| log1p_exp(-y * z))
    }
    fn grad(&self, w: &[f64]) -> Vec<f64> {
        glm_grad(&self.x, &self.y, w, |z, y| -y * sigmoid(-y * z))
    }
    fn constants(&self) -> Constants {
        let n = self.x.nrows() as f64;
        let xtx = self.x.transpose() * &self.x;
        let grad_sup = (0..self.x.ncols()).map(|j| self.x.column(j).amax()).fold(0.0, f64::max);
        Constants {
            d: self.dim(),
            smoothness: sym_max_eig(&xtx) / (4.0 * n),
            grad_sup,
            inf_lower: 0.0,
            convex: true,
            region: Region::Everywhere,
        }
    }
    fn x0(&self) -> Vec<f64> {
        vec![0.0; self.dim()]
    }
}

// -------------------------------------------------------------------------------------------
/// Rosenbrock F(x, y) = (1 − x)² + 100 (y − x²)² on the box [−2, 2] × [−1, 3].
/// On the box: L ≤ 6002 (Gershgorin on the Hessian [[1200x² − 400y + 2, −400x], [−400x, 200]]),
/// |∂F/∂x| ≤ 2·3 + 400·2·5 = 4006, |∂F/∂y| ≤ 200·5 = 1000; inf F = 0.
pub struct Rosenbrock {
    pub start: [f64; 2],
}

impl Objective for Rosenbrock {
    fn name(&self) -> String {
        "rosenbrock".to_string()
    }
    fn dim(&self) -> usize {
        2
    }
    fn value(&self, p: &[f64]) -> f64 {
        (1.0 - p[0]).powi(2) + 100.0 * (p[1] - p[0] * p[0]).powi(2)
    }
    fn grad(&self, p: &[f64]) -> Vec<f64> {
        let (x, y) = (p[0], p[1]);
        vec![-2.0 * (1.0 - x) - 400.0 * x * (y - x * x), 200.0 * (y - x * x)]
    }
    fn constants(&self) -> Constants {
        Constants {
            d: 2,
            smoothness: 6002.0,
            grad_sup: 4006.0,
            inf_lower: 0.0,
            convex: false,
            region: Region::Box { lo: vec![-2.0, -1.0], hi: vec![2.0, 3.0] },
        }
    }
    fn x0(&self) -> Vec<f64> {
        self.start.to_vec()
    }
}

// -------------------------------------------------------------------------------------------
/// Robust (Cauchy) regression F(w) = (1/n) Σ log(1 + (x_iᵀw − y_i)²): nonconvex with bounded
/// gradient. ρ(r) = log(1 + r²) has |ρ'| ≤ 1 and |ρ''| ≤ 2, so L = 2 λmax(XᵀX)/n and
/// |∇_j F| ≤ (1/n) Σ_i |x_ij|; F ≥ 0.
pub struct RobustRegression {
    pub x: DMatrix<f64>,
    pub y: Vec<f64>,
}

impl RobustRegression {
    pub fn random(n: usize, d: usize, rng: &mut StdRng) -> Self {
        let x = DMatrix::from_fn(n, d, |_, _| rng.random_range(-1.0..1.0));
        let w: Vec<f64> = (0..d).map(|_| rng.random_range(-2.0..2.0)).collect();
        let y = (0..n)
            .map(|i| {
                let clean: f64 = (0..d).map(|j| x[(i, j)] * w[j]).sum();
                // 10% gross outliers: the reason for a robust loss.
                if rng.random_bool(0.1) {
                    clean + rng.random_range(-20.0..20.0)
                } else {
                    clean + rng.random_range(-0.1..0.1)
                }
            })
            .collect();
        Self { x, y }
    }
}

impl Objective for RobustRegression {
    fn name(&self) -> String {
        format!("robust-regression(n={}, d={})", self.x.nrows(), self.x.ncols())
    }
    fn dim(&self) -> usize {
        self.x.ncols()
    }
    fn value(&self, w: &[f64]) -> f64 {
        glm_value(&self.x, &self.y, w, |z, y| ((z - y) * (z - y)).ln_1p())
    }
    fn grad(&self, w: &[f64]) -> Vec<f64> {
        glm_grad(&self.x, &self.y, w, |z, y| 2.0 * (z - y) / (1.0 + (z - y) * (z - y)))
    }
    fn constants(&self) -> Constants {
        let n = self.x.nrows() as f64;
        let xtx = self.x.transpose() * &self.x;
        let grad_sup =
            (0..self.x.ncols()).map(|j| self.x.column(j).iter().map(|v| v.abs()).sum::<f64>() / n).fold(0.0, f64::max);
        Constants {
            d: self.dim(),
            smoothness: 2.0 * sym_max_eig(&xtx) / n,
            grad_sup,
            inf_lower: 0.0,
            convex: false,
            region: Region::Everywhere,
        }
    }
    fn x0(&self) -> Vec<f64> {
        vec![0.0; self.dim()]
    }
}

// -------------------------------------------------------------------------------------------
/// A two-layer tanh network with a fixed output layer v, trained in its first layer W (h × p):
/// F(W) = (1/2n) Σ (vᵀ tanh(W x_i) − y_i)². Nonconvex; with r_i = vᵀtanh(Wx_i) − y_i,
/// |r_i| ≤ ‖v‖₁ + |y_i|, so |∂F/∂W_jk| ≤ (1/n) Σ_i (‖v‖₁ + |y_i|)·|v_j|·|x_ik|, and
/// ‖∇²F‖ ≤ (1/n) Σ_i ‖x_i‖²·(‖v‖₂² + (‖v‖₁ + |y_i|)·max_j|v_j|·4/(3√3)) (|tanh'| ≤ 1,
/// |tanh''| ≤ 4/(3√3)); F ≥ 0.
pub struct TanhNet {
    pub x: DMatrix<f64>,
    pub y: Vec<f64>,
    pub v: Vec<f64>,
    pub hidden: usize,
    pub start: Vec<f64>,
}

impl TanhNet {
    pub fn random(n: usize, p: usize, hidden: usize, rng: &mut StdRng) -> Self {
        let x = DMatrix::<f64>::from_fn(n, p, |_, _| rng.random_range(-1.0..1.0));
        let y = (0..n).map(|i| (2.0f64 * x[(i, 0)]).sin() + 0.5 * x[(i, p - 1)]).collect();
        let v = (0..hidden).map(|_| rng.random_range(-1.0..1.0)).collect();
        let start = (0..hidden * p).map(|_| rng.random_range(-0.5..0.5)).collect();
        Self { x, y, v, hidden, start }
    }

    fn residuals_and_hidden(&self, w: &[f64]) -> (Vec<f64>, Vec<Vec<f64>>) {
        let (n, p) = (self.x.nrows(), self.x.ncols());
        let mut res = Vec::with_capacity(n);
        let mut acts = Vec::with_capacity(n);
        for i in 0..n {
            let a: Vec<f64> =
                (0..self.hidden).map(|j| (0..p).map(|k| w[j * p + k] * self.x[(i, k)]).sum::<f64>().tanh()).collect();
            res.push(a.iter().zip(&self.v).map(|(a, v)| a * v).sum::<f64>() - self.y[i]);
            acts.push(a);
        }
        (res, acts)
    }
}

impl Objective for TanhNet {
    fn name(&self) -> String {
        format!("tanh-net(n={}, p={}, h={})", self.x.nrows(), self.x.ncols(), self.hidden)
    }
    fn dim(&self) -> usize {
        self.hidden * self.x.ncols()
    }
    fn value(&self, w: &[f64]) -> f64 {
        let (res, _) = self.residuals_and_hidden(w);
        res.iter().map(|r| r * r).sum::<f64>() / (2.0 * res.len() as f64)
    }
    fn grad(&self, w: &[f64]) -> Vec<f64> {
        let (n, p) = (self.x.nrows(), self.x.ncols());
        let (res, acts) = self.residuals_and_hidden(w);
        let mut g = vec![0.0; self.dim()];
        for i in 0..n {
            for j in 0..self.hidden {
                let c = res[i] * self.v[j] * (1.0 - acts[i][j] * acts[i][j]) / n as f64;
                for k in 0..p {
                    g[j * p + k] += c * self.x[(i, k)];
                }
            }
        }
        g
    }
    fn constants(&self) -> Constants {
        let (n, p) = (self.x.nrows(), self.x.ncols());
        let v1: f64 = self.v.iter().map(|v| v.abs()).sum();
        let v2sq: f64 = self.v.iter().map(|v| v * v).sum();
        let vmax = self.v.iter().map(|v| v.abs()).fold(0.0, f64::max);
        let tanh2 = 4.0 / (3.0 * 3f64.sqrt());
        let mut smooth = 0.0;
        let mut col_bound = vec![0.0; p];
        for i in 0..n {
            let xsq: f64 = (0..p).map(|k| self.x[(i, k)].powi(2)).sum();
            let r = v1 + self.y[i].abs();
            smooth += xsq * (v2sq + r * vmax * tanh2);
            for (k, c) in col_bound.iter_mut().enumerate() {
                *c += r * self.x[(i, k)].abs();
            }
        }
        let grad_sup = col_bound.iter().cloned().fold(0.0, f64::max) * vmax / n as f64;
        Constants {
            d: self.dim(),
            smoothness: smooth / n as f64,
            grad_sup,
            inf_lower: 0.0,
            convex: false,
            region: Region::Everywhere,
        }
    }
    fn x0(&self) -> Vec<f64> {
        self.start.clone()
    }
}

// -------------------------------------------------------------------------------------------
/// F(x) = g·Σ_i (√((x_i − c_i)² + δ²) − δ): a smoothed ℓ1 (pseudo-Huber) whose gradient keeps
/// almost its full magnitude g until the iterate is within δ of c. It is the problem the bounds
/// are nearly tight on: ‖∇F‖² stays near d·R² while the method travels, and F(x0) − F* is what
/// the travel costs. ∂_i F = g·e_i/√(e_i² + δ²) with e = x − c, so |∂_i F| < g everywhere;
/// ∂²_i F = g·δ²/(e_i² + δ²)^{3/2} ≤ g/δ and the Hessian is diagonal, so L = g/δ; F ≥ 0, convex.
pub struct Huber {
    pub g: f64,
    pub delta: f64,
    pub center: Vec<f64>,
    pub start: Vec<f64>,
}

impl Objective for Huber {
    fn name(&self) -> String {
        format!("huber(d={}, g={:.2}, delta={:.1e})", self.center.len(), self.g, self.delta)
    }
    fn dim(&self) -> usize {
        self.center.len()
    }
    fn value(&self, x: &[f64]) -> f64 {
        x.iter()
            .zip(&self.center)
            .map(|(x, c)| {
                // √(e² + δ²) − δ written as e²/(√(e² + δ²) + δ): no cancellation near the
                // minimum, where the lemma checks difference F values of order 1e-17.
                let e2 = (x - c).powi(2);
                self.g * e2 / ((e2 + self.delta * self.delta).sqrt() + self.delta)
            })
            .sum()
    }
    fn grad(&self, x: &[f64]) -> Vec<f64> {
        x.iter()
            .zip(&self.center)
            .map(|(x, c)| {
                let e = x - c;
                self.g * e / (e * e + self.delta * self.delta).sqrt()
            })
            .collect()
    }
    fn constants(&self) -> Constants {
        Constants {
            d: self.dim(),
            smoothness: self.g / self.delta,
            grad_sup: self.g,
            inf_lower: 0.0,
            convex: true,
            region: Region::Everywhere,
        }
    }
    fn x0(&self) -> Vec<f64> {
        self.start.clone()
    }
}

/// The kinds of problem the checks draw from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum Kind {
    Quadratic,
    LogisticSeparable,
    LogisticNoisy,
    Rosenbrock,
    RobustRegression,
    TanhNet,
    Huber,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Quadratic,
        Kind::LogisticSeparable,
        Kind::LogisticNoisy,
        Kind::Rosenbrock,
        Kind::RobustRegression,
        Kind::TanhNet,
        Kind::Huber,
    ];

    /// A random instance of this kind from `seed`.
    pub fn instance(self, seed: u64) -> Box<dyn Objective> {
        let mut rng = StdRng::seed_from_u64(seed);
        match self {
            Kind::Quadratic => {
                let d = rng.random_range(2..=8);
                let kappa = 10f64.powf(rng.random_range(0.0..3.0));
                Box::new(Quadratic::random(d, kappa, rng.random_range(0.5..4.0), &mut rng))
            }
            Kind::LogisticSeparable => {
                Box::new(Logistic::random(rng.random_range(20..60), rng.random_range(2..6), true, &mut rng))
            }
            Kind::LogisticNoisy => {
                Box::new(Logistic::random(rng.random_range(20..60), rng.random_range(2..6), false, &mut rng))
            }
            Kind::Rosenbrock => {
                Box::new(Rosenbrock { start: [rng.random_range(-1.5..-0.5), rng.random_range(0.0..2.0)] })
            }
            Kind::RobustRegression => {
                Box::new(RobustRegression::random(rng.random_range(20..60), rng.random_range(2..6), &mut rng))
            }
            Kind::TanhNet => Box::new(TanhNet::random(rng.random_range(10..30), 3, rng.random_range(2..5), &mut rng)),
            Kind::Huber => {
                let d = rng.random_range(1..=4);
                Box::new(Huber {
                    g: rng.random_range(0.5..2.0),
                    delta: 10f64.powf(rng.random_range(-2.0..0.0)),
                    center: vec![0.0; d],
                    start: (0..d)
                        .map(|_| rng.random_range(0.5..5.0) * if rng.random_bool(0.5) { 1.0 } else { -1.0 })
                        .collect(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finite-difference check of every gradient, and of the stated constants on random
    /// points of the region.
    #[test]
    fn the_pseudo_huber_value_keeps_its_precision_next_to_the_minimum() {
        // √(e² + δ²) − δ computed directly rounds to 0 for e = 1e-10, δ = 0.07 (e² is below δ²'s
        // ulp); the lemma checks difference such values, so they must keep full precision.
        let h = Huber { g: 1.6, delta: 0.07, center: vec![0.25], start: vec![0.0] };
        for e in [1e-10f64, 3e-7, 1e-3, 0.5, 40.0] {
            // The offset the function sees, after x = c + e rounds.
            let x = 0.25 + e;
            let e = x - 0.25;
            // g·(√(e² + δ²) − δ) to first order in e²/δ², with its next term.
            let want = 1.6 * (e * e / (2.0 * 0.07) - e.powi(4) / (8.0 * 0.07f64.powi(3)));
            let got = h.value(&[x]);
            if e < 1e-3 {
                assert!((got - want).abs() <= 1e-12 * want, "e = {e}: {got} vs {want}");
            }
            assert!(got > 0.0, "e = {e}: {got}");
        }
    }

    #[test]
    fn gradients_and_constants_hold_on_random_points() {
        for kind in Kind::ALL {
            for seed in 0..5 {
                let p = kind.instance(seed);
                let c = p.constants();
                let mut rng = StdRng::seed_from_u64(99 + seed);
                let point = |rng: &mut StdRng| -> Vec<f64> {
                    match &c.region {
                        Region::Everywhere => (0..c.d).map(|_| rng.random_range(-3.0..3.0)).collect(),
                        Region::Box { lo, hi } => lo.iter().zip(hi).map(|(l, h)| rng.random_range(*l..*h)).collect(),
                    }
                };
                for _ in 0..20 {
                    let x = point(&mut rng);
                    let g = p.grad(&x);
                    for i in 0..c.d {
                        let h = 1e-6;
                        let (mut a, mut b) = (x.clone(), x.clone());
                        a[i] += h;
                        b[i] -= h;
                        let fd = (p.value(&a) - p.value(&b)) / (2.0 * h);
                        assert!((fd - g[i]).abs() < 1e-4 * (1.0 + g[i].abs()), "{}: ∂{i} {} vs {fd}", p.name(), g[i]);
                        assert!(
                            g[i].abs() <= c.grad_sup * (1.0 + 1e-12),
                            "{}: |∇F| {} > {}",
                            p.name(),
                            g[i],
                            c.grad_sup
                        );
                    }
                    // L-smoothness along a random segment inside the region.
                    let y = point(&mut rng);
                    let gy = p.grad(&y);
                    let dg: f64 = g.iter().zip(&gy).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
                    let dx: f64 = x.iter().zip(&y).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
                    assert!(
                        dg <= c.smoothness * dx * (1.0 + 1e-9),
                        "{}: ‖Δ∇F‖ {dg} > L‖Δx‖ {}",
                        p.name(),
                        c.smoothness * dx
                    );
                    assert!(p.value(&x) >= c.inf_lower);
                }
            }
        }
    }
}
