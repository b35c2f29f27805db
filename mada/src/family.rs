//! The MADA parameterized optimizer: update rule, closed-form one-step hyper-gradients and the
//! fused kernels that compute them.
//!
//! # The update (`gdtuo.Meta.step` of the official code, verified against it)
//!
//! Per element, at update t = 1, 2, … of a tensor, with gradient g_t, coefficients
//! q_t = (β1, β2, β3, ρ, c, γ) and learning rate η_t:
//!
//! ```text
//! d_t  = g_t − g_{t−1}                    ĝ_t = g_t + β3·d_t          s_t = sign(ĝ_t² − v_{t−1})
//! g̃²_t = c·ĝ_t² + (1−c)·(v_{t−1} + ĝ_t²·s_t)                          (c = 0: Yogi's increment)
//! m_t  = β1·m_{t−1} + (1−β1)·g_t          v_t = β2·v_{t−1} + (1−β2)·g̃²_t
//! n_t  = β3·n_{t−1} + (1−β3)·d_t          v̄_t = (v_t + (t−1)·v̄_{t−1}) / t   (AVGrad's mean)
//! Lion: OfficialCode  mL_t = βL2·mL_{t−1} + (1−βL2)·g_t,  cL_t = βL1·mL_t + (1−βL1)·g_t
//!       Textbook      cL_t = βL1·mL_{t−1} + (1−βL1)·g_t,  mL_t = βL2·mL_{t−1} + (1−βL2)·g_t
//! m̂_t  = m_t / (1−β1^t)                   v̂_t = (ρ·v_t + (1−ρ)·v̄_t) / (1−β2^t)
//! u_t  = γ·(m̂_t + β3·n_t)/(√v̂_t + ε) + (1−γ)·sign(cL_t)
//! x_t  = x_{t−1} − η_t·u_t
//! ```
//!
//! Conventions, all the official code's (and all stated here because each changes numbers):
//! - **Bias correction** divides m by 1−β1^t and the *mixed* second moment (the AVGrad mean
//!   included) by 1−β2^t, with the *current* β's; β3·n_t and the Lion direction are not
//!   corrected.
//! - **ε is added outside the square root.** Default ε = 1e-6 (`train_ddp.py`); the
//!   Shakespeare grid used 1e-8.
//! - **Initial accumulators**: m_0 = 0, v_0 = v̄_0 = 1e-15 (so v̂ > 0 and a zero gradient gives
//!   a finite step), g_0 = 0 (so d_1 = g_1), mL_0 = 0, and n_0 = g_1⊙g_1 under
//!   [`Semantics::OfficialCode`] (a quirk of the official `gdtuo.Meta`) or n_0 = 0 under
//!   [`Semantics::Textbook`].
//! - **Lion constants** βL1 = 0.95, βL2 = 0.98, fixed; Lion shares η_t and has no weight decay.
//! - **sign(0) = 0** (`torch.sign`).
//! - Weight decay is not part of u_t (see [`crate::clip::decoupled_weight_decay`]).
//! - The step counter t is per tensor (every tensor is updated at every step in practice, so it
//!   equals the official global counter).
//!
//! # The hyper-gradient (what the official autograd computes through `gdtuo.Meta`)
//!
//! After update t, the hyper-gradient of the next loss f(x_t; ξ) with respect to q_t, through
//! that one update only (all states from t−1, g_t and η_t held constant, and — the official
//! code's stop-gradient — v̄_t held constant inside v̂_t), is
//! h_t[q] = −η_t · Σ_i ∇f(x_t)_i · ∂u_{t,i}/∂q, with B1 = 1−β1^t, B2 = 1−β2^t,
//! N = m̂_t + β3·n_t, S = √v̂_t, D = S + ε, A = N/D, K = −N/(2·S·D²):
//!
//! ```text
//! ∂u/∂γ  = A − sign(cL_t)
//! ∂u/∂β1 = γ·[(m_{t−1} − g_t)/B1 + m_t·t·β1^{t−1}/B1²] / D
//! ∂u/∂β2 = γ·K·[ρ·(v_{t−1} − g̃²_t)/B2 + (ρ·v_t + (1−ρ)·v̄_t)·t·β2^{t−1}/B2²]
//! ∂u/∂β3 = γ·[(n_t + β3·(n_{t−1} − d_t))/D + K·ρ·(1−β2)·2·ĝ_t·d_t·(c + (1−c)·s_t)/B2]
//! ∂u/∂ρ  = γ·K·(v_t − v̄_t)/B2
//! ∂u/∂c  = γ·K·ρ·(1−β2)·(ĝ_t² − v_{t−1} − ĝ_t²·s_t)/B2
//! ```
//!
//! # The running maximum instead of the mean (claim 5)
//!
//! With [`RunningMoment::Max`], v̄_t is replaced by AMSGrad's running maximum
//! v̂max_t = max(v̂max_{t−1}, v_t), v̂max_0 = v_0, so ρ = 0 is AMSGrad and ρ = 1 still Adam. The
//! official code stops the gradient through v̄_t; the maximum is differentiated instead, with
//! χ_t = ∂v̂max_t/∂v_t = 1 where v_t is the new maximum, 0 where an earlier value holds it and ½
//! at a tie (`torch.maximum`). With κ = ρ + (1−ρ)·χ_t in place of ρ in the β2, β3 and c partials
//! above (for the mean κ = ρ), and v̂max_t in place of v̄_t everywhere, the partials are those
//! of the mean — which is what makes the two comparable: the max contributes nothing through
//! the current step wherever an old value holds it.
//!
//! # What is stored, and why
//!
//! The hyper-gradient needs ∇f(x_t), which exists only at the next step, while that step's
//! update needs the hyper-step first; so a step makes two passes: the hyper-gradient pass
//! (reads the new gradient and the state) and the update pass. Instead of storing six partial
//! derivatives per element, the partials are recomputed from the moments: m_{t−1} − g_t =
//! (m_t − g_t)/β1 and n_t + β3(n_{t−1} − d_t) = 2n_t − d_t are exact identities of the
//! recursions, so beyond the six recursion buffers (m, v, v̄, n, g_{t−1}, mL) only d_t, v_{t−1}
//! and the byte sign(cL_t) are kept — and only while some coefficient is learned or
//! monitored. Per parameter that is 24 bytes (f32, frozen) or 33 bytes (learning), against
//! Adam's 8.

use serde::{Deserialize, Serialize};

use crate::coefficients::{Coef, CoefficientBox, Coefficients};
use crate::error::check_range;
use crate::float::{sign, sign_i8, Float};
use crate::hyper::{HyperConfig, HyperOptimizer, HyperStep};
use crate::optimizer::{debias, Optimizer, TensorState, TensorStates};
use crate::par;
use crate::simd::simd_kernel;
use crate::OptimError;

/// Which of the two readings of the family to compute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Semantics {
    /// What the official code computes and what produced the paper's numbers: n_0 = g_1⊙g_1,
    /// and the Lion direction taken from the *updated* Lion momentum
    /// (cL_t = βL1·βL2·mL_{t−1} + (1 − βL1·βL2)·g_t).
    #[default]
    OfficialCode,
    /// The textbook reading: n_0 = 0, and Lion's c_t = βL1·mL_{t−1} + (1−βL1)·g_t interpolating
    /// with the *previous* momentum before mL is updated.
    Textbook,
}

/// What ρ interpolates v_t with: AVGrad's running mean (the official code) or AMSGrad's running
/// maximum (the first version of the official code had it commented out; a third-party rendering
/// of the paper uses it). Claim 5 of the paper compares the two.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunningMoment {
    /// v̄_t = (v_t + (t−1)·v̄_{t−1})/t, held constant inside v̂_t by the hyper-gradient (the
    /// official code's stop-gradient): ρ = 0 is AVGrad.
    #[default]
    Mean,
    /// v̂max_t = max(v̂max_{t−1}, v_t) (v̂max_0 = v_0), differentiated through the max: its
    /// derivative with respect to v_t is 1 where v_t is the new maximum, 0 where an earlier value
    /// holds it, and ½ at a tie (`torch.maximum`'s convention). ρ = 0 is AMSGrad (torch's
    /// `amsgrad=True`: the maximum of the raw second moments, then the bias correction).
    Max,
}

/// Fixed settings of the MADA update (everything except the learned coefficients).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MadaConfig {
    /// ε, added outside the square root.
    pub eps: f64,
    /// Official-code or textbook reading.
    pub semantics: Semantics,
    /// Lion's interpolation constant βL1 (official: 0.95).
    pub lion_beta1: f64,
    /// Lion's momentum decay βL2 (official: 0.98).
    pub lion_beta2: f64,
    /// v_0 = v̄_0 (official: 1e-15).
    pub initial_v: f64,
    /// The box the coefficients are projected onto.
    pub bounds: CoefficientBox,
    /// What ρ interpolates v_t with (official: the running mean).
    pub running: RunningMoment,
}

impl Default for MadaConfig {
    fn default() -> Self {
        Self {
            eps: 1e-6,
            semantics: Semantics::OfficialCode,
            lion_beta1: 0.95,
            lion_beta2: 0.98,
            initial_v: 1e-15,
            bounds: CoefficientBox::OFFICIAL,
            running: RunningMoment::Mean,
        }
    }
}

impl MadaConfig {
    /// The official settings with another ε.
    pub fn with_eps(eps: f64) -> Self {
        Self { eps, ..Self::default() }
    }

    fn validate(&self) -> Result<(), OptimError> {
        check_range("eps", self.eps, 0.0, 1.0)?;
        check_range("lion_beta1", self.lion_beta1, 0.0, 1.0)?;
        check_range("lion_beta2", self.lion_beta2, 0.0, 1.0)?;
        check_range("initial_v", self.initial_v, 0.0, f64::MAX)?;
        for (i, c) in Coef::ALL.into_iter().enumerate() {
            let (lo, hi) = (self.bounds.lo[i], self.bounds.hi[i]);
            if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
                return Err(OptimError::Unsupported(format!("empty or non-finite box for {c}: [{lo}, {hi}]")));
            }
        }
        // β1 and β2 must stay away from 0 (the partials divide by β1) and below 1 (bias
        // correction divides by 1 − β^t).
        if self.bounds.lo[0] <= 0.0 || self.bounds.hi[0] >= 1.0 || self.bounds.lo[1] <= 0.0 || self.bounds.hi[1] >= 1.0
        {
            return Err(OptimError::Unsupported("the box must keep beta1 and beta2 inside (0, 1)".into()));
        }
        if self.bounds.hi[2] >= 1.0 {
            return Err(OptimError::Unsupported("the box must keep beta3 below 1".into()));
        }
        Ok(())
    }
}

/// The state of one tensor. Field names follow the update formulas of the module docs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound(serialize = "T: Float", deserialize = "T: Float"))]
pub struct MadaTensorState<T> {
    /// Updates of this tensor so far (t).
    pub t: u64,
    /// m_t: first moment.
    pub m: Vec<T>,
    /// v_t: second moment (EMA of g̃²).
    pub v: Vec<T>,
    /// v̄_t: arithmetic mean of v_1..v_t (AVGrad) — or, with [`RunningMoment::Max`], the running
    /// maximum max(v_0, v_1..v_t) (AMSGrad).
    pub v_mean: Vec<T>,
    /// n_t: EMA of gradient differences (Adan-like).
    pub n: Vec<T>,
    /// g_t, the last gradient (becomes g_{t−1} at the next update).
    pub g_prev: Vec<T>,
    /// mL_t: Lion momentum.
    pub lion_m: Vec<T>,
    /// d_t of the last update (hyper-gradient only; empty when not tracked).
    pub d_prev: Vec<T>,
    /// v_{t−1} of the last update (hyper-gradient only; empty when not tracked).
    pub v_prev: Vec<T>,
    /// sign(cL_t) of the last update (hyper-gradient only; empty when not tracked); with
    /// [`RunningMoment::Max`] it also carries the max's derivative χ_t ∈ {0, ½, 1} (see
    /// [`pack_sign_chi`]).
    pub lion_sign: Vec<i8>,
    /// Coefficients used by the last update (q_t).
    pub last_coefficients: Coefficients,
    /// Learning rate of the last update (η_t).
    pub last_lr: f64,
}

impl<T> TensorState for MadaTensorState<T> {
    fn len(&self) -> usize {
        self.m.len()
    }
}

impl<T: Float> MadaTensorState<T> {
    pub(crate) fn new(grad: &[T], config: &MadaConfig, track: bool) -> Self {
        let len = grad.len();
        let v0 = T::of(config.initial_v);
        let n = match config.semantics {
            Semantics::OfficialCode => grad.iter().map(|&g| g * g).collect(),
            Semantics::Textbook => vec![T::zero(); len],
        };
        let tracked = |x: T| if track { vec![x; len] } else { Vec::new() };
        Self {
            t: 0,
            m: vec![T::zero(); len],
            v: vec![v0; len],
            v_mean: vec![v0; len],
            n,
            g_prev: vec![T::zero(); len],
            lion_m: vec![T::zero(); len],
            d_prev: tracked(T::zero()),
            v_prev: tracked(T::zero()),
            lion_sign: if track { vec![0; len] } else { Vec::new() },
            last_coefficients: Coefficients::default(),
            last_lr: 0.0,
        }
    }

    pub(crate) fn tracks(&self) -> bool {
        self.lion_sign.len() == self.m.len()
    }
}

/// Scalars of one update (or of the hyper-gradient of one update), cast once to `T`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scalars<T> {
    pub(crate) b1: T,
    pub(crate) omb1: T,
    pub(crate) b2: T,
    pub(crate) omb2: T,
    pub(crate) b3: T,
    pub(crate) omb3: T,
    pub(crate) rho: T,
    pub(crate) omrho: T,
    pub(crate) c: T,
    pub(crate) omc: T,
    pub(crate) gamma: T,
    pub(crate) omgamma: T,
    pub(crate) inv_bc1: T,
    pub(crate) inv_bc2: T,
    pub(crate) eps: T,
    /// 1/ε (1/D where v̂ = 0; ∞ for ε = 0, which then never enters a product).
    pub(crate) inv_eps: T,
    pub(crate) lr: T,
    pub(crate) lion_b1: T,
    pub(crate) lion_omb1: T,
    pub(crate) lion_b2: T,
    pub(crate) lion_omb2: T,
    /// t − 1 and 1/t, for the running mean.
    pub(crate) t_minus_1: T,
    pub(crate) inv_t: T,
    /// 1/β1, ∂(1/B1)/∂β1 = t·β1^{t−1}/B1², ∂(1/B2)/∂β2 = t·β2^{t−1}/B2².
    pub(crate) inv_b1: T,
    pub(crate) dinv_bc1: T,
    pub(crate) dinv_bc2: T,
}

impl<T: Float> Scalars<T> {
    pub(crate) fn new(q: &Coefficients, t: u64, lr: f64, config: &MadaConfig) -> Self {
        let tf = t as f64;
        let bc1 = debias(q.beta1, t);
        let bc2 = debias(q.beta2, t);
        Self {
            b1: T::of(q.beta1),
            omb1: T::of(1.0 - q.beta1),
            b2: T::of(q.beta2),
            omb2: T::of(1.0 - q.beta2),
            b3: T::of(q.beta3),
            omb3: T::of(1.0 - q.beta3),
            rho: T::of(q.rho),
            omrho: T::of(1.0 - q.rho),
            c: T::of(q.c),
            omc: T::of(1.0 - q.c),
            gamma: T::of(q.gamma),
            omgamma: T::of(1.0 - q.gamma),
            inv_bc1: T::of(1.0 / bc1),
            inv_bc2: T::of(1.0 / bc2),
            eps: T::of(config.eps),
            inv_eps: T::of(1.0 / config.eps),
            lr: T::of(lr),
            lion_b1: T::of(config.lion_beta1),
            lion_omb1: T::of(1.0 - config.lion_beta1),
            lion_b2: T::of(config.lion_beta2),
            lion_omb2: T::of(1.0 - config.lion_beta2),
            t_minus_1: T::of(tf - 1.0),
            inv_t: T::of(1.0 / tf),
            inv_b1: T::of(1.0 / q.beta1),
            dinv_bc1: T::of(tf * q.beta1.powf(tf - 1.0) / (bc1 * bc1)),
            dinv_bc2: T::of(tf * q.beta2.powf(tf - 1.0) / (bc2 * bc2)),
        }
    }
}

/// Everything one element's update produces.
#[derive(Clone, Copy, Debug)]
struct ElementUpdate<T> {
    u: T,
    m: T,
    v: T,
    v_mean: T,
    n: T,
    lion_m: T,
    d: T,
    lion_sign: T,
    /// ∂(running moment)/∂v_t: 0 for the (detached) mean; 0, ½ or 1 for the max.
    chi: T,
}

/// The byte kept per element for the hyper-gradient: sign(cL_t) ∈ {−1, 0, 1}, plus 4·code of
/// χ_t (code 0, 1, 2 for χ = 0, ½, 1) with the running maximum. With the mean the code is 0 and
/// the byte is the plain sign.
#[inline(always)]
pub(crate) fn pack_sign_chi<T: Float>(lion_sign: T, chi: T) -> i8 {
    let two = T::one() + T::one();
    let code = (chi * two).f64() as i8;
    sign_i8(lion_sign) + 4 * code
}

/// The inverse of [`pack_sign_chi`]: (sign(cL_t), χ_t).
#[inline(always)]
pub(crate) fn unpack_sign_chi<T: Float>(b: i8) -> (T, T) {
    let code = (b + 1).div_euclid(4);
    let half = T::one() / (T::one() + T::one());
    (T::of_i8(b - 4 * code), T::of_i8(code) * half)
}

/// One element of the update. `v_mean_detached` replaces v̄_t inside v̂_t (the tests use it to
/// reproduce the official stop-gradient in finite differences); the kernels pass `None`. `MAX`
/// selects the running maximum instead of the mean.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn element_update<T: Float, const TEXTBOOK: bool, const MAX: bool>(
    k: &Scalars<T>,
    g: T,
    m: T,
    v_old: T,
    v_mean: T,
    n: T,
    g_prev: T,
    lion_m: T,
    v_mean_detached: Option<T>,
) -> ElementUpdate<T> {
    let d = g - g_prev;
    let ghat = g + k.b3 * d;
    let ghat2 = ghat * ghat;
    let s = sign(ghat2 - v_old);
    let gt2 = k.c * ghat2 + k.omc * (v_old + ghat2 * s);
    let m = k.b1 * m + k.omb1 * g;
    let v = k.b2 * v_old + k.omb2 * gt2;
    let n = k.b3 * n + k.omb3 * d;
    let (lion_m, lion_dir) = if TEXTBOOK {
        (k.lion_b2 * lion_m + k.lion_omb2 * g, k.lion_b1 * lion_m + k.lion_omb1 * g)
    } else {
        let lm = k.lion_b2 * lion_m + k.lion_omb2 * g;
        (lm, k.lion_b1 * lm + k.lion_omb1 * g)
    };
    let (v_mean, chi) = if MAX {
        let half = T::one() / (T::one() + T::one());
        let chi = if v > v_mean {
            T::one()
        } else if v < v_mean {
            T::zero()
        } else {
            half
        };
        (if v > v_mean { v } else { v_mean }, chi)
    } else {
        ((v + k.t_minus_1 * v_mean) * k.inv_t, T::zero())
    };
    let mean_in_vhat = match v_mean_detached {
        Some(x) => x,
        None => v_mean,
    };
    let m_hat = m * k.inv_bc1;
    let v_hat = (k.rho * v + k.omrho * mean_in_vhat) * k.inv_bc2;
    let adaptive = (m_hat + k.b3 * n) / (v_hat.sqrt() + k.eps);
    let lion_sign = sign(lion_dir);
    let u = k.gamma * adaptive + k.omgamma * lion_sign;
    ElementUpdate { u, m, v, v_mean, n, lion_m, d, lion_sign, chi }
}

/// ∂u_t/∂q for one element, from the state left by update t (module docs, "What is stored").
/// `chi` = ∂(running moment)/∂v_t (0 for the detached mean). Returns the partials in [`Coef`]
/// order.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn element_partials<T: Float, const MAX: bool>(
    k: &Scalars<T>,
    g: T,
    d: T,
    v_old: T,
    m: T,
    v: T,
    v_mean: T,
    n: T,
    lion_sign: T,
    chi: T,
) -> [T; 6] {
    let two = T::one() + T::one();
    let ghat = g + k.b3 * d;
    let ghat2 = ghat * ghat;
    let s = sign(ghat2 - v_old);
    let gt2 = k.c * ghat2 + k.omc * (v_old + ghat2 * s);
    let m_hat = m * k.inv_bc1;
    let mix = k.rho * v + k.omrho * v_mean;
    let root = (mix * k.inv_bc2).sqrt();
    // One division for both reciprocals: r = 1/(S·D), 1/D = S·r, 1/S = D·r. Where v̂ = 0 (a
    // second moment that underflowed, after a long run of zero gradients) √ has no derivative:
    // there D = ε, and the partials through v̂ are taken as 0 (the official autograd gives NaN
    // there, which would end the run).
    let positive = root > T::zero();
    let den = root + k.eps;
    let r = T::one() / if positive { root * den } else { T::one() };
    let inv_den = if positive { root * r } else { k.inv_eps };
    let numer = m_hat + k.b3 * n;
    let a = numer * inv_den;
    // K = ∂A/∂v̂ = −N / (2·S·D²) = −A·(1/D)·(1/S)/2
    let kk = if positive { -a * inv_den * (den * r) / two } else { T::zero() };
    let gk = k.gamma * kk;
    // κ = ∂mix/∂v_t: ρ with the detached mean, ρ + (1 − ρ)·χ through the maximum.
    let kappa = if MAX { k.rho + k.omrho * chi } else { k.rho };
    let rho_omb2_bc2 = kappa * k.omb2 * k.inv_bc2;
    [
        k.gamma * ((m - g) * k.inv_b1 * k.inv_bc1 + m * k.dinv_bc1) * inv_den,
        gk * (kappa * (v_old - gt2) * k.inv_bc2 + mix * k.dinv_bc2),
        k.gamma * (two * n - d) * inv_den + gk * rho_omb2_bc2 * two * ghat * d * (k.c + k.omc * s),
        gk * (v - v_mean) * k.inv_bc2,
        gk * rho_omb2_bc2 * (ghat2 - v_old - ghat2 * s),
        a - lion_sign,
    ]
}

/// The MADA optimizer: the parameterized update, its state, and the hyper-optimizer of the
/// coefficients.
///
/// ```
/// use mada::{Mada, MadaConfig, HyperConfig, Coefficients, Optimizer};
/// let mut opt = Mada::<f64>::new(MadaConfig::default(), HyperConfig::mada([1e-3; 6]), Coefficients::adam(0.9, 0.95)).unwrap();
/// let mut w = vec![1.0, -2.0];
/// for _ in 0..3 {
///     let g: Vec<f64> = w.iter().map(|x| 2.0 * x).collect(); // ∇ of ‖w‖²
///     opt.step(&mut [&mut w[..]], &[&g[..]], 0.1).unwrap();
/// }
/// assert!(w[0].abs() < 1.0);
/// ```
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(bound(serialize = "T: Float", deserialize = "T: Float"))]
pub struct Mada<T> {
    config: MadaConfig,
    hyper: HyperOptimizer,
    states: TensorStates<MadaTensorState<T>>,
    last_hypergradient: Option<[f64; 6]>,
}

/// What [`Mada::step`] did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MadaStepInfo {
    /// The hyper-gradient of the previous update (None at the first update or while nothing
    /// is learned or monitored).
    pub hypergradient: Option<[f64; 6]>,
    /// The hyper-step taken before this update, if any.
    pub hyper_step: Option<HyperStep>,
    /// The coefficients this update used.
    pub coefficients: Coefficients,
}

impl<T: Float> Mada<T> {
    /// A MADA optimizer starting at `coefficients`; errors on a setting out of range or a
    /// starting point outside the box.
    pub fn new(config: MadaConfig, hyper: HyperConfig, coefficients: Coefficients) -> Result<Self, OptimError> {
        config.validate()?;
        config.bounds.check(&coefficients)?;
        Ok(Self {
            config,
            hyper: HyperOptimizer::new(hyper, coefficients)?,
            states: TensorStates::default(),
            last_hypergradient: None,
        })
    }

    /// The fixed settings.
    pub fn config(&self) -> &MadaConfig {
        &self.config
    }

    /// The hyper-optimizer settings.
    pub fn hyper_config(&self) -> &HyperConfig {
        self.hyper.config()
    }

    /// The coefficients the next update will use (before its hyper-step, if any).
    pub fn coefficients(&self) -> Coefficients {
        self.hyper.coefficients()
    }

    /// Overwrite the coefficients (projected onto the box), e.g. to start a run from a chosen
    /// point of the family. The hyper-momentum is kept.
    pub fn set_coefficients(&mut self, q: Coefficients) -> Result<(), OptimError> {
        self.config.bounds.check(&q)?;
        self.hyper.set_coefficients(q);
        Ok(())
    }

    /// The last hyper-gradient computed by [`prepare`](Optimizer::prepare) or
    /// [`hypergradient`](Self::hypergradient) through [`step`](Optimizer::step).
    pub fn last_hypergradient(&self) -> Option<[f64; 6]> {
        self.last_hypergradient
    }

    /// Updates completed so far (of the most-updated tensor).
    pub fn completed_updates(&self) -> u64 {
        self.states.iter().map(|(_, s)| s.t).max().unwrap_or(0)
    }

    /// The per-tensor states, for inspection.
    pub fn tensor_state(&self, index: usize) -> Option<&MadaTensorState<T>> {
        self.states.get(index)
    }

    /// Whether the hyper-gradient is computed at each step.
    pub(crate) fn tracks(&self) -> bool {
        self.hyper.config().tracks()
    }

    /// The per-tensor states (the device path moves them out and back).
    #[cfg(feature = "candle")]
    pub(crate) fn states_mut(&mut self) -> &mut TensorStates<MadaTensorState<T>> {
        &mut self.states
    }

    /// Whether the hyper-step is taken (or monitored) before the update after `done` updates.
    #[cfg(feature = "candle")]
    pub(crate) fn hyper_active_after(&self, done: u64) -> bool {
        self.hyper.config().monitor || self.hyper.active_at(done)
    }

    /// Record the hyper-gradient the device path computed.
    #[cfg(feature = "candle")]
    pub(crate) fn set_last_hypergradient(&mut self, h: Option<[f64; 6]>) {
        self.last_hypergradient = h;
    }

    /// This tensor's contribution to the hyper-gradient of its last update: −η_t Σ_i grad_i ·
    /// ∂u_{t,i}/∂q, where `grad` = ∇f(x_t; ξ) is a gradient at the parameters that update
    /// produced. Contributions of all tensors (and, in data-parallel training, all ranks) add
    /// up to the hyper-gradient. Zero for a tensor that has not been updated.
    pub fn hypergradient_of_tensor(&self, index: usize, grad: &[T]) -> Result<[f64; 6], OptimError> {
        let Some(state) = self.states.get(index) else {
            return Ok([0.0; 6]);
        };
        if state.len() != grad.len() {
            return Err(OptimError::StateMismatch { index, state: state.len(), got: grad.len() });
        }
        if !state.tracks() {
            return Err(OptimError::Unsupported(
                "hyper-gradients are not tracked: learn or monitor a coefficient (HyperConfig)".into(),
            ));
        }
        if state.t == 0 {
            return Ok([0.0; 6]);
        }
        let k = Scalars::<T>::new(&state.last_coefficients, state.t, state.last_lr, &self.config);
        let views = (
            grad,
            (&state.g_prev[..], &state.d_prev[..], &state.v_prev[..], &state.m[..]),
            (&state.v[..], &state.v_mean[..], &state.n[..], &state.lion_sign[..]),
        );
        let add = |a: [f64; 6], b: [f64; 6]| std::array::from_fn(|i| a[i] + b[i]);
        let sums = match self.config.running {
            RunningMoment::Mean => par::fold(views, &|chunk| partial_sums::<T, false>(&k, chunk), &add),
            RunningMoment::Max => par::fold(views, &|chunk| partial_sums::<T, true>(&k, chunk), &add),
        };
        Ok(sums.map(|s| -state.last_lr * s))
    }

    /// The hyper-gradient of the last update over the whole model (`None` before the first
    /// update, and when no coefficient is learned or monitored). An empty gradient slice marks
    /// a tensor without gradient: it contributes 0.
    pub fn hypergradient(&self, grads: &[&[T]]) -> Result<Option<[f64; 6]>, OptimError> {
        if self.completed_updates() == 0 || !self.tracks() {
            return Ok(None);
        }
        let mut total = [0.0; 6];
        for (index, grad) in grads.iter().enumerate().filter(|(_, g)| !g.is_empty()) {
            let part = self.hypergradient_of_tensor(index, grad)?;
            for (t, p) in total.iter_mut().zip(part) {
                *t += p;
            }
        }
        Ok(Some(total))
    }

    /// Take one hyper-step along `h` (clipping, momentum, SGD, projection, warm-up and the set
    /// of learned coefficients as configured). Returns what was done; `None` during warm-up.
    pub fn apply_hypergradient(&mut self, h: [f64; 6]) -> Result<Option<HyperStep>, OptimError> {
        self.apply_hypergradient_after(h, self.completed_updates())
    }

    /// [`apply_hypergradient`](Self::apply_hypergradient) after `done` updates (for state kept
    /// outside this struct, on a device).
    pub fn apply_hypergradient_after(&mut self, h: [f64; 6], done: u64) -> Result<Option<HyperStep>, OptimError> {
        for c in Coef::ALL {
            let x = h[c.index()];
            if !x.is_finite() && self.hyper.config().learned[c.index()] {
                return Err(OptimError::NonFiniteHypergradient { coef: c, value: x, step: done });
            }
        }
        Ok(self.hyper.step(h, done, &self.config.bounds))
    }

    /// [`Optimizer::step`] with a report of what happened.
    pub fn step_with_info(
        &mut self,
        params: &mut [&mut [T]],
        grads: &[&[T]],
        lr: f64,
    ) -> Result<MadaStepInfo, OptimError> {
        if params.len() != grads.len() {
            return Err(OptimError::TensorCountMismatch { params: params.len(), grads: grads.len() });
        }
        let hyper_step = self.prepare_with_info(grads)?;
        let coefficients = self.coefficients();
        for (index, (param, grad)) in params.iter_mut().zip(grads).enumerate() {
            self.update_tensor(index, param, grad, lr)?;
        }
        Ok(MadaStepInfo { hypergradient: self.last_hypergradient, hyper_step, coefficients })
    }

    fn prepare_with_info(&mut self, grads: &[&[T]]) -> Result<Option<HyperStep>, OptimError> {
        self.last_hypergradient = None;
        if !self.tracks() {
            return Ok(None);
        }
        let done = self.completed_updates();
        // During warm-up nothing is learned, so skip the pass unless the user monitors.
        if !self.hyper.config().monitor && !self.hyper.active_at(done) {
            return Ok(None);
        }
        let Some(h) = self.hypergradient(grads)? else {
            return Ok(None);
        };
        self.last_hypergradient = Some(h);
        self.apply_hypergradient(h)
    }
}

/// Pass 1 over one chunk: Σ grad·∂u/∂q, accumulated in `T` over blocks of [`BLOCK`] elements
/// (first into [`LANES`] fixed lanes, so the loops vectorize and the summation order is fixed
/// in code) and in f64 across blocks.
#[inline(always)]
fn partial_sums_kernel<T: Float, const MAX: bool>(k: &Scalars<T>, views: HyperViews<'_, T>) -> [f64; 6] {
    let (w, (g, d, v_old, m), (v, v_mean, n, lion_sign)) = views;
    let mut total = [0.0f64; 6];
    let mut weighted = [[T::zero(); BLOCK]; 6];
    let mut start = 0;
    while start < w.len() {
        let len = BLOCK.min(w.len() - start);
        let r = start..start + len;
        let (w, g, d, v_old, m) = (&w[r.clone()], &g[r.clone()], &d[r.clone()], &v_old[r.clone()], &m[r.clone()]);
        let (v, v_mean, n, ls) = (&v[r.clone()], &v_mean[r.clone()], &n[r.clone()], &lion_sign[r]);
        // Map: the weighted partials of every element (no dependence between iterations).
        for i in 0..len {
            let (lion_sign, chi) = if MAX { unpack_sign_chi(ls[i]) } else { (T::of_i8(ls[i]), T::zero()) };
            let p = element_partials::<T, MAX>(k, g[i], d[i], v_old[i], m[i], v[i], v_mean[i], n[i], lion_sign, chi);
            for q in 0..6 {
                weighted[q][i] = w[i] * p[q];
            }
        }
        // Reduce: LANES running sums per coefficient, then the lanes in order. The six
        // coefficients' chains are independent, so they advance side by side (each in its own
        // fixed order): one after the other, each chain's additions would wait on the last.
        let mut lanes = [[T::zero(); LANES]; 6];
        let body = len - len % LANES;
        for start in (0..body).step_by(LANES) {
            for q in 0..6 {
                for l in 0..LANES {
                    lanes[q][l] = lanes[q][l] + weighted[q][start + l];
                }
            }
        }
        for l in 0..len - body {
            for q in 0..6 {
                lanes[q][l] = lanes[q][l] + weighted[q][body + l];
            }
        }
        let mut sums = [0.0f64; 6];
        for lane in 0..LANES {
            for (sum, row) in sums.iter_mut().zip(&lanes) {
                *sum += row[lane].f64();
            }
        }
        for (total, sum) in total.iter_mut().zip(sums) {
            *total += sum;
        }
        start += len;
    }
    total
}

/// The slices the hyper-gradient pass reads: the new gradient, then (g_t, d_t, v_{t−1}, m_t)
/// and (v_t, v̄_t, n_t, sign(cL_t)).
type HyperViews<'a, T> = (&'a [T], (&'a [T], &'a [T], &'a [T], &'a [T]), (&'a [T], &'a [T], &'a [T], &'a [i8]));

/// The slices the update pass touches: parameter, gradient, (m, v, v̄, n), (g_prev, mL),
/// (d_prev, v_prev, lion_sign).
type UpdateViews<'a, T> = (
    &'a mut [T],
    &'a [T],
    (&'a mut [T], &'a mut [T], &'a mut [T], &'a mut [T]),
    (&'a mut [T], &'a mut [T]),
    (&'a mut [T], &'a mut [T], &'a mut [i8]),
);

simd_kernel!(fn partial_sums[T: Float, const MAX: bool](k: &Scalars<T>, views: HyperViews<'_, T>) -> [f64; 6] = partial_sums_kernel[T, MAX]);
simd_kernel!(fn update_chunk[T: Float, const TEXTBOOK: bool, const TRACK: bool, const MAX: bool](k: &Scalars<T>, views: UpdateViews<'_, T>) = update_kernel[T, TEXTBOOK, TRACK, MAX]);

/// Elements per block of the hyper-gradient pass (its weighted partials stay in L1).
const BLOCK: usize = 256;
/// Independent partial sums per coefficient in that pass.
const LANES: usize = 16;

/// Pass 2 over one chunk: the update, writing the state the next hyper-gradient needs.
#[inline(always)]
fn update_kernel<T: Float, const TEXTBOOK: bool, const TRACK: bool, const MAX: bool>(
    k: &Scalars<T>,
    views: UpdateViews<'_, T>,
) {
    let (p, g, (m, v, v_mean, n), (g_prev, lion_m), (d_prev, v_prev, lion_sign)) = views;
    let len = p.len();
    // Re-slice to one length so the loop has no bounds checks and vectorizes.
    let (g, m, v, v_mean, n, g_prev, lion_m) = (
        &g[..len],
        &mut m[..len],
        &mut v[..len],
        &mut v_mean[..len],
        &mut n[..len],
        &mut g_prev[..len],
        &mut lion_m[..len],
    );
    let tracked = if TRACK { len } else { 0 };
    let (d_prev, v_prev, lion_sign) = (&mut d_prev[..tracked], &mut v_prev[..tracked], &mut lion_sign[..tracked]);
    for i in 0..len {
        let e = element_update::<T, TEXTBOOK, MAX>(k, g[i], m[i], v[i], v_mean[i], n[i], g_prev[i], lion_m[i], None);
        if TRACK {
            d_prev[i] = e.d;
            v_prev[i] = v[i];
            lion_sign[i] = if MAX { pack_sign_chi(e.lion_sign, e.chi) } else { sign_i8(e.lion_sign) };
        }
        p[i] = p[i] - k.lr * e.u;
        m[i] = e.m;
        v[i] = e.v;
        v_mean[i] = e.v_mean;
        n[i] = e.n;
        g_prev[i] = g[i];
        lion_m[i] = e.lion_m;
    }
}

impl<T: Float> Optimizer<T> for Mada<T> {
    fn name(&self) -> &'static str {
        "mada"
    }

    fn prepare(&mut self, grads: &[&[T]]) -> Result<(), OptimError> {
        self.prepare_with_info(grads).map(|_| ())
    }

    fn update_tensor(&mut self, index: usize, param: &mut [T], grad: &[T], lr: f64) -> Result<(), OptimError> {
        check_range("lr", lr, 0.0, f64::MAX)?;
        let track = self.tracks();
        let config = self.config;
        let q = self.hyper.coefficients();
        let state =
            self.states.get_or_init(index, param.len(), grad.len(), || MadaTensorState::new(grad, &config, track))?;
        if state.tracks() != track {
            return Err(OptimError::Unsupported(format!(
                "tensor {index}: state was created with hyper-gradient tracking {}, the optimizer now has it {}",
                state.tracks(),
                track
            )));
        }
        state.t += 1;
        let k = Scalars::<T>::new(&q, state.t, lr, &config);
        let s = state;
        let views = (
            param,
            grad,
            (&mut s.m[..], &mut s.v[..], &mut s.v_mean[..], &mut s.n[..]),
            (&mut s.g_prev[..], &mut s.lion_m[..]),
            (&mut s.d_prev[..], &mut s.v_prev[..], &mut s.lion_sign[..]),
        );
        use RunningMoment::{Max, Mean};
        match (config.semantics, track, config.running) {
            (Semantics::OfficialCode, true, Mean) => {
                par::for_each(views, &|c| update_chunk::<T, false, true, false>(&k, c))
            }
            (Semantics::OfficialCode, false, Mean) => {
                par::for_each(views, &|c| update_chunk::<T, false, false, false>(&k, c))
            }
            (Semantics::Textbook, true, Mean) => par::for_each(views, &|c| update_chunk::<T, true, true, false>(&k, c)),
            (Semantics::Textbook, false, Mean) => {
                par::for_each(views, &|c| update_chunk::<T, true, false, false>(&k, c))
            }
            (Semantics::OfficialCode, true, Max) => {
                par::for_each(views, &|c| update_chunk::<T, false, true, true>(&k, c))
            }
            (Semantics::OfficialCode, false, Max) => {
                par::for_each(views, &|c| update_chunk::<T, false, false, true>(&k, c))
            }
            (Semantics::Textbook, true, Max) => par::for_each(views, &|c| update_chunk::<T, true, true, true>(&k, c)),
            (Semantics::Textbook, false, Max) => par::for_each(views, &|c| update_chunk::<T, true, false, true>(&k, c)),
        }
        s.last_coefficients = q;
        s.last_lr = lr;
        Ok(())
    }

    fn state_bytes_per_param(&self) -> usize {
        6 * T::BYTES + if self.tracks() { 2 * T::BYTES + 1 } else { 0 }
    }
}

#[cfg(test)]
#[path = "family_tests.rs"]
mod tests;
