//! Standalone baseline optimizers, each a small type with its own documented conventions.
//!
//! - [`Sgd`], [`Adam`] (and AdamW via `decoupled`), [`AmsGrad`]: PyTorch's `torch.optim`
//!   conventions (bias-corrected, ε added outside √ after dividing √v by √(1−β2^t), state
//!   initialised to zero, AMSGrad keeping the max of the *raw* v before bias correction).
//!   PyTorch forms m with `lerp` (m + (1−β1)(g − m)); we use β1·m + (1−β1)·g, which agrees to
//!   the last bit or two.
//! - [`AvGrad`]: Adam with √v replaced by the square root of the arithmetic mean of v_1..v_t
//!   (the MADA paper's AMSGrad variant, ρ = 0 of the family) in the same PyTorch conventions.
//! - [`Yogi`], [`Adan`], [`Lion`]: the conventions of the `pytorch-optimizer` 4.1.0 package
//!   (Yogi: m_0 = v_0 = `initial_accumulator`, Adam bias correction; Adan: zero gradient
//!   difference at step 1, √ of the bias-corrected third moment plus ε; Lion: sign of
//!   β1·m + (1−β1)·g, then m ← β2·m + (1−β2)·g).
//!
//! Weight decay: only Adam/AdamW/AMSGrad/AVGrad/SGD carry it (as PyTorch does); the paper's
//! training loops decay outside the optimizer ([`crate::clip::decoupled_weight_decay`]).

use serde::{Deserialize, Serialize};

use crate::error::{check_beta, check_range};
use crate::float::{sign, Float};
use crate::optimizer::{debias, Optimizer, TensorState, TensorStates};
use crate::simd::simd_kernel;
use crate::{par, OptimError};

fn check_lr(lr: f64) -> Result<(), OptimError> {
    check_range("lr", lr, 0.0, f64::MAX)
}

/// A per-tensor state made of equally long buffers and a step counter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound(serialize = "T: Float", deserialize = "T: Float"))]
pub struct Buffers<T, const N: usize> {
    /// Updates of this tensor so far.
    pub t: u64,
    /// The state buffers (meaning per optimizer).
    #[serde(with = "serde_arrays")]
    pub bufs: [Vec<T>; N],
}

mod serde_arrays {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, T: Serialize, const N: usize>(a: &[Vec<T>; N], s: S) -> Result<S::Ok, S::Error> {
        a.as_slice().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>, const N: usize>(
        d: D,
    ) -> Result<[Vec<T>; N], D::Error> {
        let v: Vec<Vec<T>> = Vec::deserialize(d)?;
        let got = v.len();
        v.try_into().map_err(|_| D::Error::custom(format!("expected {N} state buffers, found {got}")))
    }
}

impl<T, const N: usize> TensorState for Buffers<T, N> {
    fn len(&self) -> usize {
        self.bufs.first().map_or(0, Vec::len)
    }
}

impl<T: Float, const N: usize> Buffers<T, N> {
    pub(crate) fn filled(len: usize, values: [T; N]) -> Self {
        Self { t: 0, bufs: values.map(|x| vec![x; len]) }
    }
}

// ---------------------------------------------------------------------------------------------
// SGD

/// SGD with heavy-ball (or Nesterov) momentum, PyTorch convention: the buffer starts as the
/// first gradient, then b ← μ·b + (1 − dampening)·g; L2 weight decay adds wd·p to g.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SgdConfig {
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self { momentum: 0.0, dampening: 0.0, nesterov: false, weight_decay: 0.0 }
    }
}

/// See [`SgdConfig`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(bound(serialize = "T: Float", deserialize = "T: Float"))]
pub struct Sgd<T> {
    config: SgdConfig,
    states: TensorStates<Buffers<T, 1>>,
}

impl<T: Float> Sgd<T> {
    /// The settings.
    pub fn config(&self) -> &SgdConfig {
        &self.config
    }

    #[cfg(feature = "candle")]
    pub(crate) fn states_mut(&mut self) -> &mut TensorStates<Buffers<T, 1>> {
        &mut self.states
    }

    pub fn new(config: SgdConfig) -> Result<Self, OptimError> {
        check_range("momentum", config.momentum, 0.0, 1.0)?;
        check_range("dampening", config.dampening, 0.0, 1.0)?;
        check_range("weight_decay", config.weight_decay, 0.0, f64::MAX)?;
        if config.nesterov && (config.momentum == 0.0 || config.dampening != 0.0) {
            return Err(OptimError::Unsupported("nesterov needs momentum > 0 and no dampening".into()));
        }
        Ok(Self { config, states: TensorStates::default() })
    }
}

impl<T: Float> Optimizer<T> for Sgd<T> {
    fn name(&self) -> &'static str {
        "sgd"
    }

    fn update_tensor(&mut self, index: usize, param: &mut [T], grad: &[T], lr: f64) -> Result<(), OptimError> {
        check_lr(lr)?;
        let c = self.config;
        let s =
            self.states.get_or_init(index, param.len(), grad.len(), || Buffers::filled(param.len(), [T::zero()]))?;
        s.t += 1;
        let first = s.t == 1;
        let (mu, damp, wd, lr) = (T::of(c.momentum), T::of(1.0 - c.dampening), T::of(c.weight_decay), T::of(lr));
        let [buf] = &mut s.bufs;
        let k = SgdScalars { mu, damp, wd, lr, first, momentum: c.momentum != 0.0, nesterov: c.nesterov };
        par::for_each((param, grad, &mut buf[..]), &|views| sgd_chunk(&k, views));
        Ok(())
    }

    fn state_bytes_per_param(&self) -> usize {
        if self.config.momentum == 0.0 {
            0
        } else {
            T::BYTES
        }
    }
}

struct SgdScalars<T> {
    mu: T,
    damp: T,
    wd: T,
    lr: T,
    first: bool,
    momentum: bool,
    nesterov: bool,
}

#[inline(always)]
fn sgd_kernel<T: Float>(k: &SgdScalars<T>, (p, g, b): (&mut [T], &[T], &mut [T])) {
    let (g, b) = (&g[..p.len()], &mut b[..p.len()]);
    for i in 0..p.len() {
        let d = g[i] + k.wd * p[i];
        let step = if !k.momentum {
            d
        } else {
            b[i] = if k.first { d } else { k.mu * b[i] + k.damp * d };
            if k.nesterov {
                d + k.mu * b[i]
            } else {
                b[i]
            }
        };
        p[i] = p[i] - k.lr * step;
    }
}

simd_kernel!(fn sgd_chunk[T: Float](k: &SgdScalars<T>, views: (&mut [T], &[T], &mut [T])) = sgd_kernel[T]);

// ---------------------------------------------------------------------------------------------
// Adam, AMSGrad, AVGrad

/// Settings shared by [`Adam`], [`AmsGrad`] and [`AvGrad`]. `decoupled = true` with
/// `weight_decay > 0` is AdamW (p ← p·(1 − lr·wd) before the update); otherwise weight decay
/// is L2 (g ← g + wd·p).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub decoupled: bool,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, decoupled: false }
    }
}

impl AdamConfig {
    /// AdamW with PyTorch's default decay 0.01.
    pub fn adamw(weight_decay: f64) -> Self {
        Self { weight_decay, decoupled: true, ..Self::default() }
    }

    fn validate(&self) -> Result<(), OptimError> {
        check_beta("beta1", self.beta1)?;
        check_beta("beta2", self.beta2)?;
        check_range("eps", self.eps, 0.0, 1.0)?;
        check_range("weight_decay", self.weight_decay, 0.0, f64::MAX)
    }
}

/// How the second-moment denominator is formed (a const parameter of the kernel).
const EMA: u8 = 0; // √v_t (Adam)
const MAX: u8 = 1; // √max(v_1..v_t) (AMSGrad, PyTorch: max of the raw v)
const MEAN: u8 = 2; // √mean(v_1..v_t) (AVGrad)

struct AdamScalars<T> {
    step_size: T,
    inv_bc2_sqrt: T,
    b1: T,
    omb1: T,
    b2: T,
    omb2: T,
    eps: T,
    l2: T,
    shrink: T,
    inv_t: T,
    t_minus_1: T,
}

type AdamViews<'a, T> = (&'a mut [T], &'a [T], &'a mut [T], &'a mut [T], &'a mut [T]);

#[inline(always)]
fn adam_kernel<T: Float, const KIND: u8>(k: &AdamScalars<T>, (p, g, m, v, x): AdamViews<'_, T>) {
    let len = p.len();
    let (g, m, v) = (&g[..len], &mut m[..len], &mut v[..len]);
    let x = &mut x[..if KIND == EMA { 0 } else { len }];
    for i in 0..len {
        let gi = g[i] + k.l2 * p[i];
        let pi = p[i] * k.shrink;
        m[i] = k.b1 * m[i] + k.omb1 * gi;
        v[i] = k.b2 * v[i] + k.omb2 * gi * gi;
        let second = if KIND == MAX {
            x[i] = x[i].max(v[i]);
            x[i]
        } else if KIND == MEAN {
            x[i] = (v[i] + k.t_minus_1 * x[i]) * k.inv_t;
            x[i]
        } else {
            v[i]
        };
        let denom = second.sqrt() * k.inv_bc2_sqrt + k.eps;
        p[i] = pi - k.step_size * (m[i] / denom);
    }
}

simd_kernel!(fn adam_chunk[T: Float, const KIND: u8](k: &AdamScalars<T>, views: AdamViews<'_, T>) = adam_kernel[T, KIND]);

/// The shared update of Adam, AMSGrad and AVGrad.
fn adam_like_update<T: Float, const N: usize, const KIND: u8>(
    c: &AdamConfig,
    s: &mut Buffers<T, N>,
    param: &mut [T],
    grad: &[T],
    lr: f64,
) {
    s.t += 1;
    let t = s.t;
    let k = AdamScalars {
        step_size: T::of(lr / debias(c.beta1, t)),
        inv_bc2_sqrt: T::of(1.0 / debias(c.beta2, t).sqrt()),
        b1: T::of(c.beta1),
        omb1: T::of(1.0 - c.beta1),
        b2: T::of(c.beta2),
        omb2: T::of(1.0 - c.beta2),
        eps: T::of(c.eps),
        l2: T::of(if c.decoupled { 0.0 } else { c.weight_decay }),
        shrink: T::of(if c.decoupled { 1.0 - lr * c.weight_decay } else { 1.0 }),
        inv_t: T::of(1.0 / t as f64),
        t_minus_1: T::of(t as f64 - 1.0),
    };
    let (m, rest) = s.bufs.split_first_mut().expect("at least m");
    let (v, extra) = rest.split_first_mut().expect("at least v");
    let extra: &mut [T] = extra.first_mut().map_or(&mut [], |e| &mut e[..]);
    par::for_each((param, grad, &mut m[..], &mut v[..], extra), &|views| adam_chunk::<T, KIND>(&k, views));
}

macro_rules! adam_like {
    ($(#[$doc:meta])* $name:ident, $label:literal, $kind:ident, $n:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, Serialize, Deserialize)]
        #[serde(bound(serialize = "T: Float", deserialize = "T: Float"))]
        pub struct $name<T> {
            config: AdamConfig,
            states: TensorStates<Buffers<T, $n>>,
        }

        impl<T: Float> $name<T> {
            pub fn new(config: AdamConfig) -> Result<Self, OptimError> {
                config.validate()?;
                Ok(Self { config, states: TensorStates::default() })
            }

            /// The settings.
            pub fn config(&self) -> &AdamConfig {
                &self.config
            }

            #[cfg(feature = "candle")]
            pub(crate) fn states_mut(&mut self) -> &mut TensorStates<Buffers<T, $n>> {
                &mut self.states
            }
        }

        impl<T: Float> Optimizer<T> for $name<T> {
            fn name(&self) -> &'static str {
                $label
            }

            fn update_tensor(&mut self, index: usize, param: &mut [T], grad: &[T], lr: f64) -> Result<(), OptimError> {
                check_lr(lr)?;
                let s = self.states.get_or_init(index, param.len(), grad.len(), || Buffers::filled(param.len(), [T::zero(); $n]))?;
                adam_like_update::<T, $n, $kind>(&self.config, s, param, grad, lr);
                Ok(())
            }

            fn state_bytes_per_param(&self) -> usize {
                $n * T::BYTES
            }
        }
    };
}

adam_like!(
    /// Adam / AdamW, PyTorch convention (state: m, v).
    Adam, "adam", EMA, 2
);
adam_like!(
    /// AMSGrad, PyTorch convention: max of the raw v, then bias correction (state: m, v, v_max).
    AmsGrad, "amsgrad", MAX, 3
);
adam_like!(
    /// AVGrad: the running arithmetic mean of v_1..v_t in place of AMSGrad's max (state: m, v, v̄).
    AvGrad, "avgrad", MEAN, 3
);

// ---------------------------------------------------------------------------------------------
// Yogi

/// Yogi, `pytorch-optimizer` convention: m_0 = v_0 = `initial_accumulator`;
/// v ← v − (1−β2)·sign(v − g²)·g²; step lr/(1−β1^t)·m/(√v/√(1−β2^t) + ε).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct YogiConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub initial_accumulator: f64,
}

impl Default for YogiConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-3, initial_accumulator: 1e-6 }
    }
}

/// See [`YogiConfig`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(bound(serialize = "T: Float", deserialize = "T: Float"))]
pub struct Yogi<T> {
    config: YogiConfig,
    states: TensorStates<Buffers<T, 2>>,
}

impl<T: Float> Yogi<T> {
    /// The settings.
    pub fn config(&self) -> &YogiConfig {
        &self.config
    }

    #[cfg(feature = "candle")]
    pub(crate) fn states_mut(&mut self) -> &mut TensorStates<Buffers<T, 2>> {
        &mut self.states
    }

    pub fn new(config: YogiConfig) -> Result<Self, OptimError> {
        check_beta("beta1", config.beta1)?;
        check_beta("beta2", config.beta2)?;
        check_range("eps", config.eps, 0.0, 1.0)?;
        check_range("initial_accumulator", config.initial_accumulator, 0.0, f64::MAX)?;
        Ok(Self { config, states: TensorStates::default() })
    }
}

impl<T: Float> Optimizer<T> for Yogi<T> {
    fn name(&self) -> &'static str {
        "yogi"
    }

    fn update_tensor(&mut self, index: usize, param: &mut [T], grad: &[T], lr: f64) -> Result<(), OptimError> {
        check_lr(lr)?;
        let c = self.config;
        let init = T::of(c.initial_accumulator);
        let s =
            self.states.get_or_init(index, param.len(), grad.len(), || Buffers::filled(param.len(), [init, init]))?;
        s.t += 1;
        let step_size = T::of(lr / debias(c.beta1, s.t));
        let inv_bc2_sqrt = T::of(1.0 / debias(c.beta2, s.t).sqrt());
        let k = [step_size, inv_bc2_sqrt, T::of(c.beta1), T::of(1.0 - c.beta1), T::of(1.0 - c.beta2), T::of(c.eps)];
        let [m, v] = &mut s.bufs;
        par::for_each((param, grad, &mut m[..], &mut v[..]), &|views| yogi_chunk(&k, views));
        Ok(())
    }

    fn state_bytes_per_param(&self) -> usize {
        2 * T::BYTES
    }
}

/// Scalars: step size, 1/√(1−β2^t), β1, 1−β1, 1−β2, ε.
#[inline(always)]
fn yogi_kernel<T: Float>(k: &[T; 6], (p, g, m, v): (&mut [T], &[T], &mut [T], &mut [T])) {
    let [step_size, inv_bc2_sqrt, b1, omb1, omb2, eps] = *k;
    let (g, m, v) = (&g[..p.len()], &mut m[..p.len()], &mut v[..p.len()]);
    for i in 0..p.len() {
        let g2 = g[i] * g[i];
        m[i] = b1 * m[i] + omb1 * g[i];
        v[i] = v[i] - omb2 * sign(v[i] - g2) * g2;
        let denom = v[i].sqrt() * inv_bc2_sqrt + eps;
        p[i] = p[i] - step_size * (m[i] / denom);
    }
}

simd_kernel!(fn yogi_chunk[T: Float](k: &[T; 6], views: (&mut [T], &[T], &mut [T], &mut [T])) = yogi_kernel[T]);

// ---------------------------------------------------------------------------------------------
// Adan

/// Adan, `pytorch-optimizer` convention (betas (0.98, 0.92, 0.99) by default):
/// d_t = g_t − g_{t−1} (0 at step 1); m ← β1·m + (1−β1)·g; a ← β2·a + (1−β2)·d;
/// n ← β3·n + (1−β3)·(g + β2·d)²; D = √n/√(1−β3^t) + ε;
/// p ← p − lr/(1−β1^t)·m/D − lr·β2/(1−β2^t)·a/D.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdanConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub beta3: f64,
    pub eps: f64,
}

impl Default for AdanConfig {
    fn default() -> Self {
        Self { beta1: 0.98, beta2: 0.92, beta3: 0.99, eps: 1e-8 }
    }
}

/// See [`AdanConfig`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(bound(serialize = "T: Float", deserialize = "T: Float"))]
pub struct Adan<T> {
    config: AdanConfig,
    /// m, the difference average a, n, and the previous gradient.
    states: TensorStates<Buffers<T, 4>>,
}

impl<T: Float> Adan<T> {
    /// The settings.
    pub fn config(&self) -> &AdanConfig {
        &self.config
    }

    #[cfg(feature = "candle")]
    pub(crate) fn states_mut(&mut self) -> &mut TensorStates<Buffers<T, 4>> {
        &mut self.states
    }

    pub fn new(config: AdanConfig) -> Result<Self, OptimError> {
        check_beta("beta1", config.beta1)?;
        check_beta("beta2", config.beta2)?;
        check_beta("beta3", config.beta3)?;
        check_range("eps", config.eps, 0.0, 1.0)?;
        Ok(Self { config, states: TensorStates::default() })
    }
}

impl<T: Float> Optimizer<T> for Adan<T> {
    fn name(&self) -> &'static str {
        "adan"
    }

    fn update_tensor(&mut self, index: usize, param: &mut [T], grad: &[T], lr: f64) -> Result<(), OptimError> {
        check_lr(lr)?;
        let c = self.config;
        let s = self.states.get_or_init(index, param.len(), grad.len(), || {
            let mut b = Buffers::filled(param.len(), [T::zero(); 4]);
            b.bufs[3].copy_from_slice(grad); // zero difference at step 1
            b
        })?;
        s.t += 1;
        let t = s.t;
        let step1 = T::of(lr / debias(c.beta1, t));
        let step2 = T::of(lr * c.beta2 / debias(c.beta2, t));
        let inv_bc3_sqrt = T::of(1.0 / debias(c.beta3, t).sqrt());
        let k = [
            step1,
            step2,
            inv_bc3_sqrt,
            T::of(c.beta1),
            T::of(1.0 - c.beta1),
            T::of(c.beta2),
            T::of(1.0 - c.beta2),
            T::of(c.beta3),
            T::of(1.0 - c.beta3),
            T::of(c.eps),
        ];
        let [m, a, n, prev] = &mut s.bufs;
        par::for_each((param, grad, (&mut m[..], &mut a[..], &mut n[..], &mut prev[..])), &|views| {
            adan_chunk(&k, views)
        });
        Ok(())
    }

    fn state_bytes_per_param(&self) -> usize {
        4 * T::BYTES
    }
}

type AdanViews<'a, T> = (&'a mut [T], &'a [T], (&'a mut [T], &'a mut [T], &'a mut [T], &'a mut [T]));

/// Scalars: lr/(1−β1^t), lr·β2/(1−β2^t), 1/√(1−β3^t), β1, 1−β1, β2, 1−β2, β3, 1−β3, ε.
#[inline(always)]
fn adan_kernel<T: Float>(k: &[T; 10], (p, g, (m, a, n, prev)): AdanViews<'_, T>) {
    let [step1, step2, inv_bc3_sqrt, b1, omb1, b2, omb2, b3, omb3, eps] = *k;
    let len = p.len();
    let (g, m, a, n, prev) = (&g[..len], &mut m[..len], &mut a[..len], &mut n[..len], &mut prev[..len]);
    for i in 0..len {
        let d = g[i] - prev[i];
        m[i] = b1 * m[i] + omb1 * g[i];
        a[i] = b2 * a[i] + omb2 * d;
        let z = b2 * d + g[i];
        n[i] = b3 * n[i] + omb3 * z * z;
        let denom = n[i].sqrt() * inv_bc3_sqrt + eps;
        p[i] = p[i] - step1 * (m[i] / denom);
        p[i] = p[i] - step2 * (a[i] / denom);
        prev[i] = g[i];
    }
}

simd_kernel!(fn adan_chunk[T: Float](k: &[T; 10], views: AdanViews<'_, T>) = adan_kernel[T]);

// ---------------------------------------------------------------------------------------------
// Lion

/// Lion: u = sign(β1·m + (1−β1)·g), then m ← β2·m + (1−β2)·g (defaults 0.9, 0.99).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LionConfig {
    pub beta1: f64,
    pub beta2: f64,
}

impl Default for LionConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.99 }
    }
}

/// See [`LionConfig`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(bound(serialize = "T: Float", deserialize = "T: Float"))]
pub struct Lion<T> {
    config: LionConfig,
    states: TensorStates<Buffers<T, 1>>,
}

impl<T: Float> Lion<T> {
    /// The settings.
    pub fn config(&self) -> &LionConfig {
        &self.config
    }

    #[cfg(feature = "candle")]
    pub(crate) fn states_mut(&mut self) -> &mut TensorStates<Buffers<T, 1>> {
        &mut self.states
    }

    pub fn new(config: LionConfig) -> Result<Self, OptimError> {
        check_range("beta1", config.beta1, 0.0, 1.0)?;
        check_range("beta2", config.beta2, 0.0, 1.0)?;
        Ok(Self { config, states: TensorStates::default() })
    }
}

impl<T: Float> Optimizer<T> for Lion<T> {
    fn name(&self) -> &'static str {
        "lion"
    }

    fn update_tensor(&mut self, index: usize, param: &mut [T], grad: &[T], lr: f64) -> Result<(), OptimError> {
        check_lr(lr)?;
        let c = self.config;
        let s =
            self.states.get_or_init(index, param.len(), grad.len(), || Buffers::filled(param.len(), [T::zero()]))?;
        s.t += 1;
        let k = [T::of(c.beta1), T::of(1.0 - c.beta1), T::of(c.beta2), T::of(1.0 - c.beta2), T::of(lr)];
        let [m] = &mut s.bufs;
        par::for_each((param, grad, &mut m[..]), &|views| lion_chunk(&k, views));
        Ok(())
    }

    fn state_bytes_per_param(&self) -> usize {
        T::BYTES
    }
}

/// Scalars: β1, 1−β1, β2, 1−β2, lr.
#[inline(always)]
fn lion_kernel<T: Float>(k: &[T; 5], (p, g, m): (&mut [T], &[T], &mut [T])) {
    let [b1, omb1, b2, omb2, lr] = *k;
    let (g, m) = (&g[..p.len()], &mut m[..p.len()]);
    for i in 0..p.len() {
        let u = sign(b1 * m[i] + omb1 * g[i]);
        m[i] = b2 * m[i] + omb2 * g[i];
        p[i] = p[i] - lr * u;
    }
}

simd_kernel!(fn lion_chunk[T: Float](k: &[T; 5], views: (&mut [T], &[T], &mut [T])) = lion_kernel[T]);
