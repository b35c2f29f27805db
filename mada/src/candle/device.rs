//! Optimizer state on the parameters' own device, updated with candle tensor operations.
//!
//! The CPU keeps its fused slice kernels ([`crate::family`], [`crate::baselines`]); on any other
//! device (CUDA) every optimizer of [`AnyOptimizer`] steps with its state resident there. The
//! operations below are the kernels' element formulas written as whole-tensor operations, in
//! the kernels' order of operations and with the same constants (cast from the same f64
//! values), so on a device with IEEE arithmetic they round as the kernels do: on the CPU device
//! the parameters and the state agree with the fused kernels bit for bit
//! (`tests/device_path.rs`). MADA's hyper-gradient terms are reduced in f64 (the kernels reduce
//! blocks in `T` first), so hyper-gradients agree to rounding, not bit for bit.
//!
//! State moves between the host optimizer and the device lazily: a tensor's first update on a
//! device takes its host state (if any: a restored checkpoint) and uploads it;
//! [`super::VarOptimizer::sync_to_host`] brings every device state back (checkpoints keep the
//! host format, so a run saved on a GPU resumes on the CPU and back).

use candle_core::{DType, Device, Tensor};

use crate::baselines::Buffers;
use crate::family::{pack_sign_chi, unpack_sign_chi, MadaTensorState, Scalars};
use crate::float::sign_i8;
use crate::optimizer::debias;
use crate::{AnyOptimizer, Coefficients, Mada, OptimError, RunningMoment, Semantics};

use super::CandleFloat;

type R<T> = Result<T, OptimError>;

fn dev(e: candle_core::Error) -> OptimError {
    OptimError::Unsupported(format!("device optimizer: {e}"))
}

/// x·a (candle casts `a` from f64 to the tensor's dtype, as the kernels' `T::of`).
fn mul(x: &Tensor, a: f64) -> R<Tensor> {
    x.affine(a, 0.0).map_err(dev)
}

fn add(a: &Tensor, b: &Tensor) -> R<Tensor> {
    (a + b).map_err(dev)
}

fn sub(a: &Tensor, b: &Tensor) -> R<Tensor> {
    (a - b).map_err(dev)
}

fn prod(a: &Tensor, b: &Tensor) -> R<Tensor> {
    (a * b).map_err(dev)
}

fn div(a: &Tensor, b: &Tensor) -> R<Tensor> {
    (a / b).map_err(dev)
}

/// β·x + (1−β)·y with the two constants as given.
fn ema(x: &Tensor, b: f64, y: &Tensor, omb: f64) -> R<Tensor> {
    add(&mul(x, b)?, &mul(y, omb)?)
}

fn full_like(x: &Tensor, v: f64) -> R<Tensor> {
    x.ones_like().and_then(|o| o.affine(v, 0.0)).map_err(dev)
}

/// The per-tensor state of one optimizer on a device.
pub(crate) enum DeviceState {
    /// A baseline's step counter and buffers (the order of its [`Buffers`]).
    Buffers {
        t: u64,
        bufs: Vec<Tensor>,
    },
    Mada(Box<DeviceMada>),
}

/// [`MadaTensorState`] on a device; the Lion sign and the max's derivative χ as tensors.
pub(crate) struct DeviceMada {
    t: u64,
    m: Tensor,
    v: Tensor,
    v_mean: Tensor,
    n: Tensor,
    g_prev: Tensor,
    lion_m: Tensor,
    /// (d_t, v_{t−1}, sign(cL_t), χ_t) of the last update, when hyper-gradients are tracked.
    tracked: Option<[Tensor; 4]>,
    last_coefficients: Coefficients,
    last_lr: f64,
}

impl DeviceState {
    pub(crate) fn updates(&self) -> u64 {
        match self {
            DeviceState::Buffers { t, .. } => *t,
            DeviceState::Mada(m) => m.t,
        }
    }
}

fn upload<T: CandleFloat>(v: &[T], shape: &candle_core::Shape, device: &Device) -> R<Tensor> {
    Tensor::from_slice(v, shape, device).map_err(dev)
}

fn download<T: CandleFloat>(t: &Tensor) -> R<Vec<T>> {
    t.flatten_all().and_then(|f| f.to_dtype(T::DTYPE)).and_then(|f| f.to_vec1::<T>()).map_err(dev)
}

fn buffers_up<T: CandleFloat, const N: usize>(
    b: Buffers<T, N>,
    shape: &candle_core::Shape,
    d: &Device,
) -> R<DeviceState> {
    let bufs = b.bufs.iter().map(|v| upload(v, shape, d)).collect::<R<Vec<_>>>()?;
    Ok(DeviceState::Buffers { t: b.t, bufs })
}

fn buffers_down<T: CandleFloat, const N: usize>(state: &DeviceState) -> R<Buffers<T, N>> {
    let DeviceState::Buffers { t, bufs } = state else {
        return Err(OptimError::Unsupported("device state of another optimizer".into()));
    };
    let vecs = bufs.iter().map(download::<T>).collect::<R<Vec<_>>>()?;
    let bufs: [Vec<T>; N] =
        vecs.try_into().map_err(|_| OptimError::Unsupported(format!("expected {N} device buffers")))?;
    Ok(Buffers { t: *t, bufs })
}

fn mada_up<T: CandleFloat>(s: MadaTensorState<T>, shape: &candle_core::Shape, d: &Device, max: bool) -> R<DeviceState> {
    let up = |v: &[T]| upload(v, shape, d);
    let tracked = if s.tracks() {
        let (signs, chis): (Vec<T>, Vec<T>) =
            s.lion_sign.iter().map(|&b| if max { unpack_sign_chi::<T>(b) } else { (T::of_i8(b), T::zero()) }).unzip();
        Some([up(&s.d_prev)?, up(&s.v_prev)?, up(&signs)?, up(&chis)?])
    } else {
        None
    };
    Ok(DeviceState::Mada(Box::new(DeviceMada {
        t: s.t,
        m: up(&s.m)?,
        v: up(&s.v)?,
        v_mean: up(&s.v_mean)?,
        n: up(&s.n)?,
        g_prev: up(&s.g_prev)?,
        lion_m: up(&s.lion_m)?,
        tracked,
        last_coefficients: s.last_coefficients,
        last_lr: s.last_lr,
    })))
}

fn mada_down<T: CandleFloat>(state: &DeviceState, max: bool) -> R<MadaTensorState<T>> {
    let DeviceState::Mada(s) = state else {
        return Err(OptimError::Unsupported("device state of another optimizer".into()));
    };
    let (d_prev, v_prev, lion_sign) = match &s.tracked {
        Some([d, v, sign, chi]) => {
            let (sign, chi) = (download::<T>(sign)?, download::<T>(chi)?);
            let packed =
                sign.iter().zip(&chi).map(|(&s, &c)| if max { pack_sign_chi(s, c) } else { sign_i8(s) }).collect();
            (download(d)?, download(v)?, packed)
        }
        None => (Vec::new(), Vec::new(), Vec::new()),
    };
    Ok(MadaTensorState {
        t: s.t,
        m: download(&s.m)?,
        v: download(&s.v)?,
        v_mean: download(&s.v_mean)?,
        n: download(&s.n)?,
        g_prev: download(&s.g_prev)?,
        lion_m: download(&s.lion_m)?,
        d_prev,
        v_prev,
        lion_sign,
        last_coefficients: s.last_coefficients,
        last_lr: s.last_lr,
    })
}

/// Take tensor `index`'s host state out of `opt` and put it on `device` (None: no host state).
pub(crate) fn take_to_device<T: CandleFloat>(
    opt: &mut AnyOptimizer<T>,
    index: usize,
    shape: &candle_core::Shape,
    device: &Device,
) -> R<Option<DeviceState>> {
    Ok(match opt {
        AnyOptimizer::Sgd(o) => o.states_mut().take(index).map(|s| buffers_up(s, shape, device)).transpose()?,
        AnyOptimizer::Adam(o) => o.states_mut().take(index).map(|s| buffers_up(s, shape, device)).transpose()?,
        AnyOptimizer::AmsGrad(o) => o.states_mut().take(index).map(|s| buffers_up(s, shape, device)).transpose()?,
        AnyOptimizer::AvGrad(o) => o.states_mut().take(index).map(|s| buffers_up(s, shape, device)).transpose()?,
        AnyOptimizer::Yogi(o) => o.states_mut().take(index).map(|s| buffers_up(s, shape, device)).transpose()?,
        AnyOptimizer::Adan(o) => o.states_mut().take(index).map(|s| buffers_up(s, shape, device)).transpose()?,
        AnyOptimizer::Lion(o) => o.states_mut().take(index).map(|s| buffers_up(s, shape, device)).transpose()?,
        AnyOptimizer::Mada(o) => {
            let max = o.config().running == RunningMoment::Max;
            o.states_mut().take(index).map(|s| mada_up(s, shape, device, max)).transpose()?
        }
    })
}

/// Put a device state back into `opt` as tensor `index`'s host state.
pub(crate) fn put_to_host<T: CandleFloat>(opt: &mut AnyOptimizer<T>, index: usize, state: &DeviceState) -> R<()> {
    match opt {
        AnyOptimizer::Sgd(o) => o.states_mut().put(index, buffers_down(state)?),
        AnyOptimizer::Adam(o) => o.states_mut().put(index, buffers_down(state)?),
        AnyOptimizer::AmsGrad(o) => o.states_mut().put(index, buffers_down(state)?),
        AnyOptimizer::AvGrad(o) => o.states_mut().put(index, buffers_down(state)?),
        AnyOptimizer::Yogi(o) => o.states_mut().put(index, buffers_down(state)?),
        AnyOptimizer::Adan(o) => o.states_mut().put(index, buffers_down(state)?),
        AnyOptimizer::Lion(o) => o.states_mut().put(index, buffers_down(state)?),
        AnyOptimizer::Mada(o) => {
            let max = o.config().running == RunningMoment::Max;
            o.states_mut().put(index, mada_down(state, max)?)
        }
    }
    Ok(())
}

fn zeros(grad: &Tensor, n: usize) -> R<Vec<Tensor>> {
    (0..n).map(|_| grad.zeros_like().map_err(dev)).collect()
}

/// A fresh state for tensor `grad`'s shape, as each optimizer's host state starts.
fn fresh<T: CandleFloat>(opt: &AnyOptimizer<T>, grad: &Tensor) -> R<DeviceState> {
    let buffers = |bufs| Ok(DeviceState::Buffers { t: 0, bufs });
    match opt {
        AnyOptimizer::Sgd(_) | AnyOptimizer::Lion(_) => buffers(zeros(grad, 1)?),
        AnyOptimizer::Adam(_) => buffers(zeros(grad, 2)?),
        AnyOptimizer::AmsGrad(_) | AnyOptimizer::AvGrad(_) => buffers(zeros(grad, 3)?),
        AnyOptimizer::Yogi(o) => {
            let init = o.config().initial_accumulator;
            buffers(vec![full_like(grad, init)?, full_like(grad, init)?])
        }
        AnyOptimizer::Adan(_) => {
            let mut b = zeros(grad, 3)?;
            b.push(grad.copy().map_err(dev)?); // zero difference at step 1
            buffers(b)
        }
        AnyOptimizer::Mada(o) => {
            let c = o.config();
            let v0 = full_like(grad, c.initial_v)?;
            let n = match c.semantics {
                Semantics::OfficialCode => prod(grad, grad)?,
                Semantics::Textbook => grad.zeros_like().map_err(dev)?,
            };
            let z = || grad.zeros_like().map_err(dev);
            let tracked = if o.tracks() { Some([z()?, z()?, z()?, z()?]) } else { None };
            Ok(DeviceState::Mada(Box::new(DeviceMada {
                t: 0,
                m: z()?,
                v: v0.clone(),
                v_mean: v0,
                n,
                g_prev: z()?,
                lion_m: z()?,
                tracked,
                last_coefficients: Coefficients::default(),
                last_lr: 0.0,
            })))
        }
    }
}

/// One update of one tensor on its device: returns the new parameter. `state` is created on
/// first use.
pub(crate) fn update<T: CandleFloat>(
    opt: &AnyOptimizer<T>,
    state: &mut Option<DeviceState>,
    param: &Tensor,
    grad: &Tensor,
    lr: f64,
) -> R<Tensor> {
    if !(lr.is_finite() && lr >= 0.0) {
        return Err(OptimError::InvalidSetting { name: "lr", value: lr, why: "out of range" });
    }
    if param.shape() != grad.shape() {
        return Err(OptimError::Unsupported(format!(
            "parameter of shape {:?}, gradient of shape {:?}",
            param.shape(),
            grad.shape()
        )));
    }
    let s = match state {
        Some(s) => s,
        None => state.insert(fresh(opt, grad)?),
    };
    match (opt, s) {
        (AnyOptimizer::Sgd(o), DeviceState::Buffers { t, bufs }) => {
            let c = o.config();
            *t += 1;
            let d = add(grad, &mul(param, c.weight_decay)?)?;
            let step = if c.momentum == 0.0 {
                d
            } else {
                bufs[0] = if *t == 1 { d.clone() } else { ema(&bufs[0], c.momentum, &d, 1.0 - c.dampening)? };
                if c.nesterov {
                    add(&d, &mul(&bufs[0], c.momentum)?)?
                } else {
                    bufs[0].clone()
                }
            };
            sub(param, &mul(&step, lr)?)
        }
        (AnyOptimizer::Adam(o), DeviceState::Buffers { t, bufs }) => {
            adam_like(o.config(), Second::Ema, t, bufs, param, grad, lr)
        }
        (AnyOptimizer::AmsGrad(o), DeviceState::Buffers { t, bufs }) => {
            adam_like(o.config(), Second::Max, t, bufs, param, grad, lr)
        }
        (AnyOptimizer::AvGrad(o), DeviceState::Buffers { t, bufs }) => {
            adam_like(o.config(), Second::Mean, t, bufs, param, grad, lr)
        }
        (AnyOptimizer::Yogi(o), DeviceState::Buffers { t, bufs }) => {
            let c = o.config();
            *t += 1;
            let g2 = prod(grad, grad)?;
            bufs[0] = ema(&bufs[0], c.beta1, grad, 1.0 - c.beta1)?;
            let sgn = sub(&bufs[1], &g2)?.sign().map_err(dev)?;
            bufs[1] = sub(&bufs[1], &prod(&mul(&sgn, 1.0 - c.beta2)?, &g2)?)?;
            let denom = mul(&bufs[1].sqrt().map_err(dev)?, 1.0 / debias(c.beta2, *t).sqrt())?
                .affine(1.0, c.eps)
                .map_err(dev)?;
            sub(param, &mul(&div(&bufs[0], &denom)?, lr / debias(c.beta1, *t))?)
        }
        (AnyOptimizer::Adan(o), DeviceState::Buffers { t, bufs }) => {
            let c = o.config();
            *t += 1;
            let d = sub(grad, &bufs[3])?;
            bufs[0] = ema(&bufs[0], c.beta1, grad, 1.0 - c.beta1)?;
            bufs[1] = ema(&bufs[1], c.beta2, &d, 1.0 - c.beta2)?;
            let z = add(&mul(&d, c.beta2)?, grad)?;
            bufs[2] = add(&mul(&bufs[2], c.beta3)?, &prod(&mul(&z, 1.0 - c.beta3)?, &z)?)?;
            let denom = mul(&bufs[2].sqrt().map_err(dev)?, 1.0 / debias(c.beta3, *t).sqrt())?
                .affine(1.0, c.eps)
                .map_err(dev)?;
            let p = sub(param, &mul(&div(&bufs[0], &denom)?, lr / debias(c.beta1, *t))?)?;
            let p = sub(&p, &mul(&div(&bufs[1], &denom)?, lr * c.beta2 / debias(c.beta2, *t))?)?;
            bufs[3] = grad.copy().map_err(dev)?;
            Ok(p)
        }
        (AnyOptimizer::Lion(o), DeviceState::Buffers { t, bufs }) => {
            let c = o.config();
            *t += 1;
            let u = ema(&bufs[0], c.beta1, grad, 1.0 - c.beta1)?.sign().map_err(dev)?;
            bufs[0] = ema(&bufs[0], c.beta2, grad, 1.0 - c.beta2)?;
            sub(param, &mul(&u, lr)?)
        }
        (AnyOptimizer::Mada(o), DeviceState::Mada(s)) => mada_update(o, s, param, grad, lr),
        _ => Err(OptimError::Unsupported("the device state belongs to another optimizer".into())),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Second {
    Ema,
    Max,
    Mean,
}

/// Adam, AMSGrad, AVGrad (PyTorch conventions; [`crate::baselines::AdamConfig`]).
fn adam_like(
    c: &crate::AdamConfig,
    kind: Second,
    t: &mut u64,
    bufs: &mut [Tensor],
    param: &Tensor,
    grad: &Tensor,
    lr: f64,
) -> R<Tensor> {
    *t += 1;
    let l2 = if c.decoupled { 0.0 } else { c.weight_decay };
    let shrink = if c.decoupled { 1.0 - lr * c.weight_decay } else { 1.0 };
    let g = add(grad, &mul(param, l2)?)?;
    let p = mul(param, shrink)?;
    bufs[0] = ema(&bufs[0], c.beta1, &g, 1.0 - c.beta1)?;
    bufs[1] = add(&mul(&bufs[1], c.beta2)?, &prod(&mul(&g, 1.0 - c.beta2)?, &g)?)?;
    let second = match kind {
        Second::Ema => bufs[1].clone(),
        Second::Max => {
            bufs[2] = bufs[2].maximum(&bufs[1]).map_err(dev)?;
            bufs[2].clone()
        }
        Second::Mean => {
            bufs[2] = mul(&add(&bufs[1], &mul(&bufs[2], *t as f64 - 1.0)?)?, 1.0 / *t as f64)?;
            bufs[2].clone()
        }
    };
    let denom = mul(&second.sqrt().map_err(dev)?, 1.0 / debias(c.beta2, *t).sqrt())?.affine(1.0, c.eps).map_err(dev)?;
    sub(&p, &mul(&div(&bufs[0], &denom)?, lr / debias(c.beta1, *t))?)
}

/// MADA's update ([`crate::family`]'s `element_update`, whole tensors at a time).
fn mada_update<T: CandleFloat>(o: &Mada<T>, s: &mut DeviceMada, param: &Tensor, grad: &Tensor, lr: f64) -> R<Tensor> {
    let config = *o.config();
    let q = o.coefficients();
    s.t += 1;
    let k = Scalars::<f64>::new(&q, s.t, lr, &config);
    let g = grad;
    let v_old = s.v.clone();
    let d = sub(g, &s.g_prev)?;
    let ghat = add(g, &mul(&d, k.b3)?)?;
    let ghat2 = prod(&ghat, &ghat)?;
    let sgn = sub(&ghat2, &v_old)?.sign().map_err(dev)?;
    let gt2 = add(&mul(&ghat2, k.c)?, &mul(&add(&v_old, &prod(&ghat2, &sgn)?)?, k.omc)?)?;
    s.m = ema(&s.m, k.b1, g, k.omb1)?;
    s.v = ema(&v_old, k.b2, &gt2, k.omb2)?;
    s.n = ema(&s.n, k.b3, &d, k.omb3)?;
    let lion_dir = match config.semantics {
        Semantics::Textbook => {
            let dir = ema(&s.lion_m, k.lion_b1, g, k.lion_omb1)?;
            s.lion_m = ema(&s.lion_m, k.lion_b2, g, k.lion_omb2)?;
            dir
        }
        Semantics::OfficialCode => {
            s.lion_m = ema(&s.lion_m, k.lion_b2, g, k.lion_omb2)?;
            ema(&s.lion_m, k.lion_b1, g, k.lion_omb1)?
        }
    };
    let chi = match config.running {
        RunningMoment::Max => {
            let above = s.v.gt(&s.v_mean).map_err(dev)?;
            let below = s.v.lt(&s.v_mean).map_err(dev)?;
            let (one, zero, half) = (full_like(&s.v, 1.0)?, s.v.zeros_like().map_err(dev)?, full_like(&s.v, 0.5)?);
            let chi = above.where_cond(&one, &below.where_cond(&zero, &half).map_err(dev)?).map_err(dev)?;
            s.v_mean = above.where_cond(&s.v, &s.v_mean).map_err(dev)?;
            Some(chi)
        }
        RunningMoment::Mean => {
            s.v_mean = mul(&add(&s.v, &mul(&s.v_mean, k.t_minus_1)?)?, k.inv_t)?;
            None
        }
    };
    let m_hat = mul(&s.m, k.inv_bc1)?;
    let v_hat = mul(&add(&mul(&s.v, k.rho)?, &mul(&s.v_mean, k.omrho)?)?, k.inv_bc2)?;
    let den = v_hat.sqrt().and_then(|r| r.affine(1.0, k.eps)).map_err(dev)?;
    let adaptive = div(&add(&m_hat, &mul(&s.n, k.b3)?)?, &den)?;
    let lion_sign = lion_dir.sign().map_err(dev)?;
    let u = add(&mul(&adaptive, k.gamma)?, &mul(&lion_sign, k.omgamma)?)?;
    if let Some(tr) = &mut s.tracked {
        let chi = match chi {
            Some(c) => c,
            None => s.v.zeros_like().map_err(dev)?,
        };
        *tr = [d, v_old, lion_sign, chi];
    }
    s.g_prev = g.copy().map_err(dev)?;
    s.last_coefficients = q;
    s.last_lr = lr;
    sub(param, &mul(&u, lr)?)
}

/// Tensor `state`'s contribution to the hyper-gradient of its last update at the new gradient
/// `grad` ([`Mada::hypergradient_of_tensor`] on the device): the six sums in f64, as a tensor
/// on the device (None before the first update), so that a model's contributions add up there
/// and reach the host in one copy.
pub(crate) fn mada_hypergradient<T: CandleFloat>(o: &Mada<T>, state: &DeviceState, grad: &Tensor) -> R<Option<Tensor>> {
    let DeviceState::Mada(s) = state else {
        return Err(OptimError::Unsupported("the device state belongs to another optimizer".into()));
    };
    let Some([d, v_old, lion_sign, chi]) = &s.tracked else {
        return Err(OptimError::Unsupported(
            "hyper-gradients are not tracked: learn or monitor a coefficient (HyperConfig)".into(),
        ));
    };
    if s.t == 0 {
        return Ok(None);
    }
    let config = *o.config();
    let k = Scalars::<f64>::new(&s.last_coefficients, s.t, s.last_lr, &config);
    // Products of scalars the kernel forms in T, formed in T here too.
    let in_t = |a: f64, b: f64| (T::of(a) * T::of(b)).f64();
    let (g, m, v, v_mean, n) = (&s.g_prev, &s.m, &s.v, &s.v_mean, &s.n);
    let ghat = add(g, &mul(d, k.b3)?)?;
    let ghat2 = prod(&ghat, &ghat)?;
    let sgn = sub(&ghat2, v_old)?.sign().map_err(dev)?;
    let gt2 = add(&mul(&ghat2, k.c)?, &mul(&add(v_old, &prod(&ghat2, &sgn)?)?, k.omc)?)?;
    let m_hat = mul(m, k.inv_bc1)?;
    let mix = add(&mul(v, k.rho)?, &mul(v_mean, k.omrho)?)?;
    let root = mul(&mix, k.inv_bc2)?.sqrt().map_err(dev)?;
    let positive = root.gt(0.0).map_err(dev)?;
    let den = root.affine(1.0, k.eps).map_err(dev)?;
    let ones = full_like(&root, 1.0)?;
    let r = positive.where_cond(&prod(&root, &den)?, &ones).map_err(dev)?.recip().map_err(dev)?;
    let inv_den = positive.where_cond(&prod(&root, &r)?, &full_like(&root, k.inv_eps)?).map_err(dev)?;
    let numer = add(&m_hat, &mul(n, k.b3)?)?;
    let a = prod(&numer, &inv_den)?;
    let kk_pos = mul(&prod(&prod(&a.neg().map_err(dev)?, &inv_den)?, &prod(&den, &r)?)?, 0.5)?;
    let kk = positive.where_cond(&kk_pos, &root.zeros_like().map_err(dev)?).map_err(dev)?;
    let gk = mul(&kk, k.gamma)?;
    let c_term = add(&mul(&sgn, k.omc)?, &full_like(&sgn, k.c)?)?;
    let ghat2_change = sub(&sub(&ghat2, v_old)?, &prod(&ghat2, &sgn)?)?;
    // κ = ∂mix/∂v_t: ρ with the detached mean (a scalar), ρ + (1 − ρ)·χ through the maximum.
    let (kappa_term, gk_rho) = match config.running {
        RunningMoment::Mean => {
            (mul(&mul(&sub(v_old, &gt2)?, k.rho)?, k.inv_bc2)?, mul(&gk, in_t(in_t(k.rho, k.omb2), k.inv_bc2))?)
        }
        RunningMoment::Max => {
            let kappa = add(&mul(chi, k.omrho)?, &full_like(chi, k.rho)?)?;
            let rho_omb2_bc2 = mul(&mul(&kappa, k.omb2)?, k.inv_bc2)?;
            (mul(&prod(&kappa, &sub(v_old, &gt2)?)?, k.inv_bc2)?, prod(&gk, &rho_omb2_bc2)?)
        }
    };
    let p0 =
        prod(&mul(&add(&mul(&mul(&sub(m, g)?, k.inv_b1)?, k.inv_bc1)?, &mul(m, k.dinv_bc1)?)?, k.gamma)?, &inv_den)?;
    let p1 = prod(&gk, &add(&kappa_term, &mul(&mix, k.dinv_bc2)?)?)?;
    let p2 = add(
        &prod(&mul(&sub(&mul(n, 2.0)?, d)?, k.gamma)?, &inv_den)?,
        &prod(&prod(&prod(&mul(&gk_rho, 2.0)?, &ghat)?, d)?, &c_term)?,
    )?;
    let p4 = prod(&gk_rho, &ghat2_change)?;
    let p3 = mul(&prod(&gk, &sub(v, v_mean)?)?, k.inv_bc2)?;
    let p5 = sub(&a, lion_sign)?;
    let w = grad;
    let weighted =
        [p0, p1, p2, p3, p4, p5].iter().map(|p| prod(w, p)?.flatten_all().map_err(dev)).collect::<R<Vec<_>>>()?;
    let sums = Tensor::stack(&weighted, 0)
        .and_then(|w| w.to_dtype(DType::F64))
        .and_then(|w| w.sum(1))
        .and_then(|w| w.affine(-s.last_lr, 0.0))
        .map_err(dev)?;
    Ok(Some(sums))
}
