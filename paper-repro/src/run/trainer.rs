//! One update: micro-batches, the hyper-step, clipping, decay and the optimizer update.

use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::backprop::GradStore;
use mada::candle::VarOptimizer;
use mada::AnyOptimizer;

use crate::models::nn::ParamStore;
use crate::run::spec::RunSpec;
use crate::run::workload::Workload;

/// Add the micro-batch gradients `more` into `acc` (the first micro-batch's store).
fn sum_grads(acc: &mut Option<GradStore>, vars: &[candle_core::Var], more: GradStore) -> Result<()> {
    let Some(acc) = acc else {
        *acc = Some(more);
        return Ok(());
    };
    for v in vars {
        if let Some(g) = more.get(v.as_tensor()) {
            let total = match acc.get(v.as_tensor()) {
                Some(a) => (a + g)?,
                None => g.clone(),
            };
            acc.insert(v.as_tensor(), total);
        }
    }
    Ok(())
}

/// Global L2 norm of the gradients, and the name of the first non-finite one.
fn grad_norm(params: &ParamStore, grads: &GradStore) -> Result<(f64, Option<String>)> {
    let mut total = 0f64;
    for (name, v) in params.params() {
        if let Some(g) = grads.get(v.as_tensor()) {
            let s = g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            if !s.is_finite() {
                return Ok((s, Some(name.clone())));
            }
            total += s;
        }
    }
    Ok((total.sqrt(), None))
}

pub(crate) type Opt = VarOptimizer<f32, AnyOptimizer<f32>>;

/// A model, its data and its optimizer, ready to take update steps.
pub struct Trainer {
    pub spec: RunSpec,
    pub work: Workload,
    pub opt: Opt,
    vars: Vec<candle_core::Var>,
    /// Tensors of dimension ≥ 2 (decayed).
    decayed: Vec<usize>,
}

/// What one update did.
pub struct StepOutput {
    pub lr: f64,
    pub loss: f64,
    pub grad_norm: f64,
    /// Hyper-gradient used by the hyper-step before this update (NaN if none).
    pub hypergradient: [f64; 6],
    /// Coefficients after the update (NaN for non-MADA optimizers).
    pub coefficients: [f64; 6],
    /// Tokens or images processed.
    pub items: usize,
    /// Seconds in forward + backward, and in the optimizer (hyper-gradient, clipping, decay,
    /// update).
    pub model_s: f64,
    pub optimizer_s: f64,
}

impl Trainer {
    pub fn new(spec: &RunSpec) -> Result<Self> {
        spec.validate()?;
        let work = Workload::build(spec)?;
        let vars = work.params().vars();
        let decayed =
            work.params().params().iter().enumerate().filter(|(_, (_, v))| v.rank() >= 2).map(|(i, _)| i).collect();
        let opt =
            VarOptimizer::with_optimizer(vars.clone(), AnyOptimizer::from_spec(&spec.optimizer)?, spec.schedule.lr)?;
        Ok(Self { spec: spec.clone(), work, opt, vars, decayed })
    }

    /// Update `step` (0-based): micro-batches, hyper-step, clipping, decay, optimizer update.
    pub fn step(&mut self, step: u64) -> Result<StepOutput> {
        let ga = self.spec.grad_accum;
        let lr = self.spec.schedule.at(step, ga);
        let (mut model_s, mut optimizer_s) = (0.0, 0.0);
        let mut acc: Option<GradStore> = None;
        let mut loss_total = 0.0;
        let mut items = 0usize;
        let mut hyper = [f64::NAN; 6];
        for micro in 0..ga {
            let t = Instant::now();
            let (loss, n) = self.work.micro_loss(step, micro, ga)?;
            let value = loss.to_scalar::<f32>()? as f64;
            if !value.is_finite() {
                bail!("update {step}, micro-batch {micro}: the training loss is {value}");
            }
            loss_total += value / ga as f64;
            items += n;
            let grads = (loss / ga as f64)?.backward()?;
            model_s += t.elapsed().as_secs_f64();
            let t = Instant::now();
            if micro == 0 {
                // MADA / HyperAdam: the hyper-gradient of the previous update, from this first
                // micro-batch's (unclipped, 1/GA-scaled) gradient; hyper-step at once.
                let h = self.opt.with_gradients(&grads, |o, g| o.as_mada().map(|m| m.hypergradient(g)))?;
                if let Some(h) = h.transpose()?.flatten() {
                    if let Some(m) = self.opt.optimizer_mut().as_mada_mut() {
                        m.apply_hypergradient(h).map_err(|e| anyhow!("update {step}: {e}"))?;
                    }
                    hyper = h;
                }
            }
            sum_grads(&mut acc, &self.vars, grads)?;
            optimizer_s += t.elapsed().as_secs_f64();
        }
        let t = Instant::now();
        let mut acc = acc.context("no micro-batch")?;
        let (norm, bad) = grad_norm(self.work.params(), &acc)?;
        if let Some(name) = bad {
            bail!("update {step}: the gradient of {name} is not finite");
        }
        if self.spec.grad_clip > 0.0 && norm > self.spec.grad_clip {
            let scale = self.spec.grad_clip / (norm + 1e-6);
            for v in &self.vars {
                if let Some(g) = acc.get(v.as_tensor()) {
                    let scaled = (g * scale)?;
                    acc.insert(v.as_tensor(), scaled);
                }
            }
        }
        self.opt.decoupled_weight_decay(&self.decayed, lr, self.spec.weight_decay)?;
        candle_nn::Optimizer::set_learning_rate(&mut self.opt, lr);
        self.opt.update(&acc)?;
        optimizer_s += t.elapsed().as_secs_f64();
        Ok(StepOutput {
            lr,
            loss: loss_total,
            grad_norm: norm,
            hypergradient: hyper,
            coefficients: self.opt.optimizer().as_mada().map(|m| m.coefficients().to_array()).unwrap_or([f64::NAN; 6]),
            items,
            model_s,
            optimizer_s,
        })
    }
}
