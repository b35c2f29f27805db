//! The interface every optimizer of this crate implements, over plain slices.

use serde::{Deserialize, Serialize};

use crate::{Float, OptimError};

/// An optimizer over a model given as a list of tensors (flat slices).
///
/// Each tensor keeps its own state, created at its first update; the tensor's position in
/// the list is its identity, so a model must present its tensors in the same order at every
/// step (tied weights once). Learning rates are supplied per step: schedules live outside.
pub trait Optimizer<T: Float>: Send {
    /// Short name (`adam`, `mada`, …).
    fn name(&self) -> &'static str;

    /// Work that needs every tensor's gradient before any tensor is updated. MADA computes the
    /// hyper-gradient of its previous update from `grads` here and takes its hyper-step; the
    /// baselines do nothing.
    fn prepare(&mut self, grads: &[&[T]]) -> Result<(), OptimError> {
        let _ = grads;
        Ok(())
    }

    /// Update tensor `index` in place: `param ← param − lr·u(grad, state)`.
    fn update_tensor(&mut self, index: usize, param: &mut [T], grad: &[T], lr: f64) -> Result<(), OptimError>;

    /// One optimizer step over the whole model: [`prepare`](Self::prepare), then every
    /// tensor's update.
    fn step(&mut self, params: &mut [&mut [T]], grads: &[&[T]], lr: f64) -> Result<(), OptimError> {
        if params.len() != grads.len() {
            return Err(OptimError::TensorCountMismatch { params: params.len(), grads: grads.len() });
        }
        self.prepare(grads)?;
        for (index, (param, grad)) in params.iter_mut().zip(grads).enumerate() {
            self.update_tensor(index, param, grad, lr)?;
        }
        Ok(())
    }

    /// Bytes of optimizer state per parameter element once every tensor has been updated.
    fn state_bytes_per_param(&self) -> usize;
}

/// Per-tensor optimizer states, indexed by the tensor's position in the model.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(bound(serialize = "S: Serialize", deserialize = "S: Deserialize<'de>"))]
pub struct TensorStates<S> {
    states: Vec<Option<S>>,
}

impl<S> Default for TensorStates<S> {
    fn default() -> Self {
        Self { states: Vec::new() }
    }
}

/// What a per-tensor state must tell its container.
pub trait TensorState {
    /// Number of parameter elements the state was created for.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<S: TensorState> TensorStates<S> {
    /// The state of tensor `index`, created by `init` on first use; errors if the tensor's
    /// length changed since.
    pub fn get_or_init(
        &mut self,
        index: usize,
        param_len: usize,
        grad_len: usize,
        init: impl FnOnce() -> S,
    ) -> Result<&mut S, OptimError> {
        if param_len != grad_len {
            return Err(OptimError::LengthMismatch { index, param: param_len, grad: grad_len });
        }
        if self.states.len() <= index {
            self.states.resize_with(index + 1, || None);
        }
        let slot = &mut self.states[index];
        if slot.is_none() {
            *slot = Some(init());
        }
        let state = slot.as_mut().expect("just created");
        if state.len() != param_len {
            return Err(OptimError::StateMismatch { index, state: state.len(), got: param_len });
        }
        Ok(state)
    }

    /// The state of tensor `index`, if it has been updated.
    pub fn get(&self, index: usize) -> Option<&S> {
        self.states.get(index).and_then(|s| s.as_ref())
    }

    /// Every existing state with its index.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &S)> {
        self.states.iter().enumerate().filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
    }

    /// Number of tensor slots (updated or not).
    pub fn slots(&self) -> usize {
        self.states.len()
    }

    /// Remove and return the state of tensor `index` (a device-resident copy replaces it).
    #[cfg(feature = "candle")]
    pub(crate) fn take(&mut self, index: usize) -> Option<S> {
        self.states.get_mut(index).and_then(Option::take)
    }

    /// Put back the state of tensor `index`.
    #[cfg(feature = "candle")]
    pub(crate) fn put(&mut self, index: usize, state: S) {
        if self.states.len() <= index {
            self.states.resize_with(index + 1, || None);
        }
        self.states[index] = Some(state);
    }
}

/// Bias-correction denominator 1 − β^t (`powf`, as C's `pow` and numpy compute it).
#[inline]
pub(crate) fn debias(beta: f64, t: u64) -> f64 {
    1.0 - beta.powf(t as f64)
}
