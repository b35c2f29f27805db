//! Every optimizer of this crate as a [`candle_nn::Optimizer`] over [`Var`]s.
//!
//! On the CPU the step runs the same fused slice kernels, in place on the variables' storage
//! (through candle's in-place custom ops): no copies, no autograd graph. On another device the
//! optimizer state lives in host memory and each step copies the gradient in and the updated
//! parameter out ("optimizer offload"); the arithmetic is the same kernel either way.
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

use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, Device, Layout, Storage, Tensor, Var, WithDType};

use crate::{Float, Mada, OptimError, Optimizer};

fn err(e: OptimError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// An optimizer of this crate bound to a list of candle variables (all of dtype `T`).
pub struct VarOptimizer<T, O> {
    vars: Vec<Var>,
    opt: O,
    lr: f64,
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

impl<T: CandleFloat, O: Optimizer<T>> VarOptimizer<T, O> {
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
        Ok(Self { vars, opt, lr, _t: std::marker::PhantomData })
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
        let host = self.host_grads(grads)?;
        let opt = &mut self.opt;
        Self::with_slices(&host, |slices| opt.prepare(slices))?.map_err(err)
    }

    /// Update every variable that has a gradient, without [`prepare`](Self::prepare).
    pub fn update(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        for index in 0..self.vars.len() {
            let var = self.vars[index].clone();
            let Some(grad) = grads.get(var.as_tensor()) else { continue };
            if matches!(var.device(), Device::Cpu) && matches!(grad.device(), Device::Cpu) {
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

impl<T: CandleFloat, O: Optimizer<T>> candle_nn::Optimizer for VarOptimizer<T, O> {
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
