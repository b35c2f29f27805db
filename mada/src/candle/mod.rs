//! Every optimizer of this crate as a [`candle_nn::Optimizer`] over [`Var`]s.
//!
//! On the CPU the step runs the same fused slice kernels, in place on the variables' storage
//! (through candle's in-place custom ops): no copies, no autograd graph. On another device
//! (CUDA) an [`AnyOptimizer`] keeps its state on the parameters' device and steps with candle
//! tensor operations ([`device`]: the kernels' formulas, whole tensors at a time); any other
//! optimizer type keeps its state in host memory and each step copies the gradient in and the
//! updated parameter out ("optimizer offload").
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use candle_nn::Optimizer as _;
//! use mada::candle::VarOptimizer;
//! use mada::{Coefficients, HyperConfig, Mada, MadaConfig};
//!
//! let w = Var::new(&[1.0f32, -2.0], &Device::Cpu)?;
//! let mada = Mada::<f32>::new(MadaConfig::default(), HyperConfig::mada([1e-3; 6]), Coefficients::adam(0.9, 0.95))?;
//! let mut opt = VarOptimizer::new(vec![w.clone()], (mada, 0.1))?;
//! for _ in 0..3 {
//!     let loss = w.as_tensor().sqr()?.sum_all()?;
//!     opt.backward_step(&loss)?;
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub(crate) mod device;

use std::any::Any;
use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, Device, Layout, Storage, Tensor, Var, WithDType};

use crate::{AnyOptimizer, Float, HyperStep, Mada, OptimError, Optimizer};

fn err(e: OptimError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// A [`GradStore`] holding exactly `grads[i]` for `vars[i]`, without a backward pass: for
/// driving a [`VarOptimizer`] with gradients computed elsewhere (another framework, a reference
/// implementation, a test). The store also holds the gradient of the scalar constant it was
/// started from, which no variable refers to.
pub fn gradient_store(vars: &[Var], grads: &[Tensor]) -> candle_core::Result<GradStore> {
    if vars.len() != grads.len() {
        candle_core::bail!("{} variables but {} gradients", vars.len(), grads.len());
    }
    let device = vars.first().map_or(Device::Cpu, |v| v.device().clone());
    // The backward pass of a constant: a store with no variable in it.
    let mut store = Tensor::new(0f32, &device)?.backward()?;
    for (v, g) in vars.iter().zip(grads) {
        store.insert(v.as_tensor(), g.clone());
    }
    Ok(store)
}

/// One spec per optimizer and variant of [`AnyOptimizer`] (MADA learning all six coefficients,
/// over the running maximum, the textbook reading, frozen): the set the device path is checked
/// on, here against the fused kernels (`tests/device_path.rs`) and on a GPU by
/// `paper-repro gpu-check`.
pub const EVERY_OPTIMIZER: &[&str] = &[
    r#"{"name": "sgd", "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}"#,
    r#"{"name": "sgd", "momentum": 0.9, "nesterov": true}"#,
    r#"{"name": "adam", "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.01}"#,
    r#"{"name": "adam", "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1, "decoupled": true}"#,
    r#"{"name": "amsgrad", "beta1": 0.8, "beta2": 0.95}"#,
    r#"{"name": "avgrad", "beta1": 0.8, "beta2": 0.95}"#,
    r#"{"name": "yogi", "beta1": 0.9, "beta2": 0.99, "eps": 1e-3}"#,
    r#"{"name": "adan"}"#,
    r#"{"name": "lion", "beta1": 0.9, "beta2": 0.99}"#,
    // MADA learning all six coefficients, from an interior point, official semantics.
    r#"{"name": "mada", "eps": 1e-8, "coefficients": {"beta1": 0.85, "beta2": 0.95, "beta3": 0.2, "rho": 0.6, "c": 0.7, "gamma": 0.9},
        "hyper": {"lr": {"beta1": 0.01, "beta2": 0.01, "beta3": 0.01, "rho": 0.01, "c": 0.01, "gamma": 0.01}, "momentum": {"beta1": 0.5, "rho": 0.5}, "clip": 10}}"#,
    // … over AMSGrad's running maximum, and in the textbook reading, and frozen.
    r#"{"name": "mada", "running": "max", "coefficients": {"beta1": 0.85, "beta2": 0.95, "beta3": 0.2, "rho": 0.6, "c": 0.7, "gamma": 0.9},
        "hyper": {"lr": {"beta1": 0.01, "beta2": 0.01, "beta3": 0.01, "rho": 0.01, "c": 0.01, "gamma": 0.01}}}"#,
    r#"{"name": "mada", "semantics": "textbook", "coefficients": {"beta1": 0.9, "beta2": 0.99, "beta3": 0.1, "rho": 0.3, "c": 0.5, "gamma": 0.5},
        "hyper": {"lr": {"rho": 0.05, "gamma": 0.05}, "start": 3}}"#,
    r#"{"name": "mada", "coefficients": {"beta1": 0.9, "beta2": 0.99, "beta3": 0.0, "rho": 1.0, "c": 1.0, "gamma": 1.0}}"#,
];

/// An optimizer of this crate bound to a list of candle variables (all of dtype `T`).
pub struct VarOptimizer<T, O> {
    vars: Vec<Var>,
    opt: O,
    lr: f64,
    /// Per variable: its optimizer state on its device (the device path of [`AnyOptimizer`]).
    device_states: Vec<Option<device::DeviceState>>,
    /// Take the device path on the CPU too (to test it against the fused kernels).
    device_path_on_cpu: bool,
    _t: std::marker::PhantomData<T>,
}

/// Element types with a candle dtype.
pub trait CandleFloat: Float + WithDType {
    /// The elements of a CPU storage of this dtype, mutably.
    fn storage_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
}

impl CandleFloat for f32 {
    fn storage_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl CandleFloat for f64 {
    fn storage_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
}

/// A gradient as a host slice: borrowed from CPU storage when contiguous, else copied.
enum HostGrad<T> {
    Cpu(Tensor),
    Copied(Vec<T>),
    Missing,
}

impl<T: CandleFloat> HostGrad<T> {
    fn of(grad: Option<&Tensor>) -> candle_core::Result<Self> {
        let Some(g) = grad else { return Ok(Self::Missing) };
        if matches!(g.device(), Device::Cpu) {
            Ok(Self::Cpu(g.contiguous()?))
        } else {
            Ok(Self::Copied(g.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<T>()?))
        }
    }
}

fn contiguous_slice<'a, T>(data: &'a [T], layout: &Layout) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("tensor is not contiguous"),
    }
}

/// The in-place update of one CPU variable by the optimizer.
struct UpdateOp<'a, T, O> {
    opt: RefCell<&'a mut O>,
    index: usize,
    lr: f64,
    result: RefCell<Result<(), OptimError>>,
    _t: std::marker::PhantomData<T>,
}

impl<T: CandleFloat, O: Optimizer<T>> candle_core::InplaceOp2 for UpdateOp<'_, T, O> {
    fn name(&self) -> &'static str {
        "mada-optimizer-update"
    }

    fn cpu_fwd(&self, param: &mut CpuStorage, pl: &Layout, grad: &CpuStorage, gl: &Layout) -> candle_core::Result<()> {
        let grad = contiguous_slice(grad.as_slice::<T>()?, gl)?;
        let Some((start, end)) = pl.contiguous_offsets() else { candle_core::bail!("variable is not contiguous") };
        let Some(data) = T::storage_mut(param) else { candle_core::bail!("variable dtype is not {:?}", T::DTYPE) };
        let param = &mut data[start..end];
        *self.result.borrow_mut() = self.opt.borrow_mut().update_tensor(self.index, param, grad, self.lr);
        Ok(())
    }
}

/// p ← p − lr·wd·p in place on one CPU variable.
struct DecayOp<T> {
    lr: f64,
    weight_decay: f64,
    _t: std::marker::PhantomData<T>,
}

impl<T: CandleFloat> candle_core::InplaceOp1 for DecayOp<T> {
    fn name(&self) -> &'static str {
        "decoupled-weight-decay"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("variable is not contiguous") };
        let Some(data) = T::storage_mut(s) else { candle_core::bail!("variable dtype is not {:?}", T::DTYPE) };
        crate::clip::decoupled_weight_decay(&mut data[a..b], self.lr, self.weight_decay);
        Ok(())
    }
}

impl<T: CandleFloat, O: Optimizer<T> + 'static> VarOptimizer<T, O> {
    /// Bind `opt` to `vars` (every variable must have dtype `T` and be contiguous).
    pub fn with_optimizer(vars: Vec<Var>, opt: O, lr: f64) -> candle_core::Result<Self> {
        for (i, v) in vars.iter().enumerate() {
            if v.dtype() != T::DTYPE {
                candle_core::bail!("variable {i} has dtype {:?}, the optimizer runs on {:?}", v.dtype(), T::DTYPE);
            }
            if !v.is_contiguous() {
                candle_core::bail!("variable {i} is not contiguous");
            }
        }
        let device_states = vars.iter().map(|_| None).collect();
        Ok(Self { vars, opt, lr, device_states, device_path_on_cpu: false, _t: std::marker::PhantomData })
    }

    /// Step CPU variables with the device path (candle tensor operations) instead of the fused
    /// kernels: what a CUDA device runs, on the CPU, for testing it against the kernels.
    pub fn with_device_path_on_cpu(mut self) -> Self {
        self.device_path_on_cpu = true;
        self
    }

    /// The wrapped optimizer as an [`AnyOptimizer`], if it is one (the device path needs it).
    fn any_mut(&mut self) -> Option<&mut AnyOptimizer<T>> {
        (&mut self.opt as &mut dyn Any).downcast_mut::<AnyOptimizer<T>>()
    }

    fn any(&self) -> Option<&AnyOptimizer<T>> {
        (&self.opt as &dyn Any).downcast_ref::<AnyOptimizer<T>>()
    }

    /// The MADA optimizer inside (a [`Mada`] or an [`AnyOptimizer::Mada`]).
    fn mada(&self) -> Option<&Mada<T>> {
        (&self.opt as &dyn Any).downcast_ref::<Mada<T>>().or_else(|| self.any().and_then(|a| a.as_mada()))
    }

    /// Whether variable `index` steps on its device with its state there.
    fn on_device(&self, index: usize) -> bool {
        self.any().is_some() && (self.device_path_on_cpu || !matches!(self.vars[index].device(), Device::Cpu))
    }

    /// Move the host state of every device variable that has one (a restored checkpoint) to
    /// its device.
    fn upload_pending(&mut self) -> candle_core::Result<()> {
        for index in 0..self.vars.len() {
            if self.on_device(index) && self.device_states[index].is_none() {
                let var = self.vars[index].clone();
                let Some(any) = self.any_mut() else { return Ok(()) };
                self.device_states[index] =
                    device::take_to_device(any, index, var.shape(), var.device()).map_err(err)?;
            }
        }
        Ok(())
    }

    /// Updates completed so far (host and device states).
    pub fn completed_updates(&self) -> u64 {
        let device = self.device_states.iter().flatten().map(|s| s.updates()).max().unwrap_or(0);
        device.max(self.mada().map_or(0, |m| m.completed_updates()))
    }

    /// Bring every device-resident state back into the wrapped optimizer (before saving it:
    /// [`optimizer`](Self::optimizer) holds the state of device variables only after this).
    /// The next update on a device uploads it again.
    pub fn sync_to_host(&mut self) -> candle_core::Result<()> {
        let states = std::mem::take(&mut self.device_states);
        let count = states.len();
        if let Some(any) = self.any_mut() {
            for (index, state) in states.iter().enumerate() {
                if let Some(s) = state {
                    device::put_to_host(any, index, s).map_err(err)?;
                }
            }
        }
        self.device_states = (0..count).map(|_| None).collect();
        Ok(())
    }

    /// Replace the wrapped optimizer (a restored checkpoint); device-resident states are
    /// dropped and the next update on a device uploads the restored ones.
    pub fn set_optimizer(&mut self, opt: O) {
        self.opt = opt;
        self.device_states.iter_mut().for_each(|s| *s = None);
    }

    /// The hyper-gradient of MADA's last update evaluated on `grads` (gradients at the current
    /// parameters, e.g. of the first micro-batch after an update as `train_ddp.py` takes it):
    /// `None` before the first update, or when the optimizer is not MADA or tracks nothing.
    pub fn mada_hypergradient(&mut self, grads: &GradStore) -> candle_core::Result<Option<[f64; 6]>> {
        self.upload_pending()?;
        let Some(mada) = self.mada() else { return Ok(None) };
        if self.completed_updates() == 0 || !mada.tracks() {
            return Ok(None);
        }
        let mut total = [0.0; 6];
        let mut host: Vec<HostGrad<T>> = Vec::with_capacity(self.vars.len());
        // Device contributions add up on their device; one copy per device reaches the host.
        let mut on_devices: Vec<Tensor> = Vec::new();
        for (index, var) in self.vars.iter().enumerate() {
            let grad = grads.get(var.as_tensor());
            if self.on_device(index) {
                if let (Some(g), Some(state)) = (grad, &self.device_states[index]) {
                    if let Some(part) = device::mada_hypergradient(mada, state, g).map_err(err)? {
                        match on_devices.iter_mut().find(|t| t.device().same_device(part.device())) {
                            Some(t) => *t = (&*t + &part)?,
                            None => on_devices.push(part),
                        }
                    }
                }
                host.push(HostGrad::Missing);
            } else {
                host.push(HostGrad::of(grad)?);
            }
        }
        for part in on_devices {
            let part = part.to_vec1::<f64>()?;
            total.iter_mut().zip(part).for_each(|(t, p)| *t += p);
        }
        let part = Self::with_slices(&host, |slices| mada.hypergradient(slices))?.map_err(err)?;
        if let Some(part) = part {
            total.iter_mut().zip(part).for_each(|(t, p)| *t += p);
        }
        Ok(Some(total))
    }

    /// MADA's hyper-step along `h` after the updates completed so far (see
    /// [`Mada::apply_hypergradient`]); `Ok(None)` for other optimizers and during warm-up.
    pub fn apply_mada_hypergradient(&mut self, h: [f64; 6]) -> Result<Option<HyperStep>, OptimError> {
        let done = self.completed_updates();
        let mada = match (&mut self.opt as &mut dyn Any).downcast_mut::<Mada<T>>() {
            Some(m) => Some(m),
            None => self.any_mut().and_then(|a| a.as_mada_mut()),
        };
        match mada {
            Some(m) => m.apply_hypergradient_after(h, done),
            None => Ok(None),
        }
    }

    /// The variables, in the order that indexes the optimizer's per-tensor state.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The wrapped optimizer.
    pub fn optimizer(&self) -> &O {
        &self.opt
    }

    /// The wrapped optimizer, mutably (e.g. to restore saved state).
    pub fn optimizer_mut(&mut self) -> &mut O {
        &mut self.opt
    }

    fn host_grads(&self, grads: &GradStore) -> candle_core::Result<Vec<HostGrad<T>>> {
        self.vars.iter().map(|v| HostGrad::of(grads.get(v.as_tensor()))).collect()
    }

    /// Run `f` with the optimizer and every gradient as a host slice, in variable order (empty
    /// where a variable got no gradient). On the CPU the slices borrow the gradients' storage.
    pub fn with_gradients<R>(&self, grads: &GradStore, f: impl FnOnce(&O, &[&[T]]) -> R) -> candle_core::Result<R> {
        let host = self.host_grads(grads)?;
        Self::with_slices(&host, |slices| f(&self.opt, slices))
    }

    /// Decoupled weight decay p ← p − lr·wd·p on the variables `indices` (in place on the CPU).
    pub fn decoupled_weight_decay(&self, indices: &[usize], lr: f64, weight_decay: f64) -> candle_core::Result<()> {
        if weight_decay == 0.0 || lr == 0.0 {
            return Ok(());
        }
        for &i in indices {
            let var = &self.vars[i];
            if matches!(var.device(), Device::Cpu) {
                var.as_tensor().inplace_op1(&DecayOp::<T> { lr, weight_decay, _t: std::marker::PhantomData })?;
            } else {
                var.set(&(var.as_tensor() * (1.0 - lr * weight_decay))?)?;
            }
        }
        Ok(())
    }

    /// Run `f` with every gradient as a host slice (empty where a variable got no gradient);
    /// the CPU storages stay read-locked while `f` runs.
    fn with_slices<R>(host: &[HostGrad<T>], f: impl FnOnce(&[&[T]]) -> R) -> candle_core::Result<R> {
        let guards: Vec<_> = host
            .iter()
            .map(|h| match h {
                HostGrad::Cpu(t) => Some(t.storage_and_layout()),
                _ => None,
            })
            .collect();
        let slices = host
            .iter()
            .zip(&guards)
            .map(|(h, guard)| match (h, guard) {
                (HostGrad::Copied(v), _) => Ok(&v[..]),
                (HostGrad::Cpu(_), Some((storage, layout))) => match &**storage {
                    Storage::Cpu(cpu) => contiguous_slice(cpu.as_slice::<T>()?, layout),
                    _ => candle_core::bail!("expected CPU storage"),
                },
                _ => Ok(&[][..]),
            })
            .collect::<candle_core::Result<Vec<&[T]>>>()?;
        Ok(f(&slices))
    }

    /// [`Optimizer::prepare`] (MADA: the hyper-gradient of the last update and the
    /// hyper-step) on these gradients.
    pub fn prepare(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        if !(0..self.vars.len()).any(|i| self.on_device(i)) {
            let host = self.host_grads(grads)?;
            let opt = &mut self.opt;
            return Self::with_slices(&host, |slices| opt.prepare(slices))?.map_err(err);
        }
        // Device-resident state: MADA's prepare (the hyper-gradient, then the hyper-step),
        // as `Mada::prepare` takes it.
        let Some(mada) = self.mada() else { return Ok(()) };
        let done = self.completed_updates();
        if !mada.tracks() || !mada.hyper_active_after(done) {
            if let Some(m) = self.any_mut().and_then(|a| a.as_mada_mut()) {
                m.set_last_hypergradient(None);
            }
            return Ok(());
        }
        let h = self.mada_hypergradient(grads)?;
        if let Some(m) = self.any_mut().and_then(|a| a.as_mada_mut()) {
            m.set_last_hypergradient(h);
            if let Some(h) = h {
                m.apply_hypergradient_after(h, done).map_err(err)?;
            }
        }
        Ok(())
    }

    /// Update every variable that has a gradient, without [`prepare`](Self::prepare).
    pub fn update(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        for index in 0..self.vars.len() {
            let var = self.vars[index].clone();
            let Some(grad) = grads.get(var.as_tensor()) else { continue };
            if self.on_device(index) {
                let lr = self.lr;
                if self.device_states[index].is_none() {
                    // A restored (or CPU-created) host state moves to the device at first use.
                    self.upload_pending()?;
                }
                let mut state = self.device_states[index].take();
                let Some(any) = self.any() else { candle_core::bail!("the device path needs an AnyOptimizer") };
                let updated = device::update(any, &mut state, var.as_tensor(), &grad.contiguous()?, lr).map_err(err)?;
                self.device_states[index] = state;
                var.set(&updated)?;
            } else if matches!(var.device(), Device::Cpu) && matches!(grad.device(), Device::Cpu) {
                let grad = grad.contiguous()?;
                let op = UpdateOp {
                    opt: RefCell::new(&mut self.opt),
                    index,
                    lr: self.lr,
                    result: RefCell::new(Ok(())),
                    _t: std::marker::PhantomData,
                };
                var.as_tensor().inplace_op2(&grad, &op)?;
                op.result.into_inner().map_err(err)?;
            } else {
                // Offload: host copies of gradient and parameter, the same kernel, copy back.
                let g = grad.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<T>()?;
                let mut p = var.as_tensor().flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<T>()?;
                self.opt.update_tensor(index, &mut p, &g, self.lr).map_err(err)?;
                let updated = Tensor::from_vec(p, var.shape(), &Device::Cpu)?.to_device(var.device())?;
                var.set(&updated)?;
            }
        }
        Ok(())
    }
}

impl<T: CandleFloat> VarOptimizer<T, Mada<T>> {
    /// The hyper-gradient of MADA's last update evaluated on `grads` (gradients at the current
    /// parameters, e.g. of the first micro-batch after an update as `train_ddp.py` takes it);
    /// `None` before the first update.
    pub fn hypergradient(&self, grads: &GradStore) -> candle_core::Result<Option<[f64; 6]>> {
        self.with_gradients(grads, |opt, slices| opt.hypergradient(slices))?.map_err(err)
    }
}

impl<T: CandleFloat, O: Optimizer<T> + 'static> candle_nn::Optimizer for VarOptimizer<T, O> {
    /// The optimizer and the initial learning rate.
    type Config = (O, f64);

    fn new(vars: Vec<Var>, (opt, lr): (O, f64)) -> candle_core::Result<Self> {
        Self::with_optimizer(vars, opt, lr)
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.prepare(grads)?;
        self.update(grads)
    }

    fn learning_rate(&self) -> f64 {
        self.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.lr = lr;
    }
}
