//! One update, as the official loops take it (`train.py`, `train_ddp.py` of the official repository), for a world of `ranks` ranks
//! computed in this process (all of them, emulating a data-parallel run on one device) or
//! spread over processes ([`Collective`]):
//!
//! 1. Every rank r runs its `grad_accum / ranks` micro-batches, each loss divided by
//!    `grad_accum`, and sums their gradients (ranks in order, so that one process and several
//!    add in the same order). Several processes then sum their shares in one all-reduce of the
//!    flattened gradients, and one all-reduce of a small f64 buffer carries every micro-batch's
//!    loss, every rank's hyper-gradient and the item count, each in its own slot, so that the
//!    logged loss and the hyper-gradient are added in rank order exactly as one process adds
//!    them. A non-finite loss is found on those summed values, by every process alike.
//! 2. The hyper-gradient of the previous update (MADA, HyperAdam) is taken from each rank's
//!    *first* micro-batch, before any clipping, and summed over the ranks. With the loss divided
//!    by `grad_accum` = ranks × per-rank accumulation A this is exactly `train_ddp.py`'s
//!    mean over ranks of (1/A)·∂f(x_t; ξ_r)/∂q; with one rank it is `train.py`'s (A = 1) or the
//!    1/A-scaled first micro-batch. The hyper-step (clip ±10, momentum, projection, no step
//!    during the warm-up) then changes only the coefficients, so taking it after the
//!    micro-batches is the same as taking it right after the first one.
//! 3. The gradient norm is clipped: of the whole update's gradient (`global`), or of each
//!    rank's gradient, the mean over its micro-batches, before they are averaged (`per-rank`,
//!    as `train_ddp.py` clips before its all-reduce).
//! 4. Decoupled weight decay p ← p − lr·wd·p on tensors of dimension ≥ 2, then the optimizer
//!    update with the scheduled lr.
//!
//! What still differs from `train_ddp.py`: its very first update sees 2 micro-batches instead of
//! `grad_accum` (its loop takes the first update at micro-step 1), and its lr schedule counts
//! micro-steps (set `schedule.in_micro_steps`).

use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use mada::candle::VarOptimizer;
use mada::{AnyOptimizer, HyperStep};

use crate::models::nn::ParamStore;
use crate::parallel::{self, Collective, SingleProcess};
use crate::run::log::HyperRecord;
use crate::run::spec::{ClipMode, RunSpec};
use crate::run::workload::{MicroBatch, Workload};

pub(crate) type Opt = VarOptimizer<f32, AnyOptimizer<f32>>;

/// A run whose loss, gradient or hyper-gradient went non-finite: its optimizer diverged. (The
/// run stops; a robustness grid counts the cell as diverged rather than missing.)
#[derive(Debug, thiserror::Error)]
#[error("update {update}: {what}")]
pub struct Diverged {
    /// The update (from 1) at which it was found.
    pub update: u64,
    pub what: String,
}

fn diverged(update: u64, what: impl Into<String>) -> anyhow::Error {
    Diverged { update, what: what.into() }.into()
}

/// `acc += more·scale` over the variables (`acc` empty: `more` itself, scaled).
fn add_grads(acc: &mut Option<GradStore>, vars: &[Var], mut more: GradStore, scale: f64) -> Result<()> {
    let Some(acc) = acc else {
        if scale != 1.0 {
            for v in vars {
                if let Some(g) = more.get(v.as_tensor()) {
                    let scaled = (g * scale)?;
                    more.insert(v.as_tensor(), scaled);
                }
            }
        }
        *acc = Some(more);
        return Ok(());
    };
    for v in vars {
        if let Some(g) = more.get(v.as_tensor()) {
            let g = if scale == 1.0 { g.clone() } else { (g * scale)? };
            let total = match acc.get(v.as_tensor()) {
                Some(a) => (a + g)?,
                None => g,
            };
            acc.insert(v.as_tensor(), total);
        }
    }
    Ok(())
}

/// Global L2 norm of the gradients (times `scale`), and the name of the first non-finite one.
/// Each tensor's sum of squares is taken on its device; the sums reach the host in one copy
/// (one synchronisation per update on a GPU) and add up there in f64, in parameter order.
fn grad_norm(params: &ParamStore, grads: &GradStore, scale: f64) -> Result<(f64, Option<String>)> {
    let mut names = Vec::new();
    let mut sums = Vec::new();
    for (name, v) in params.params() {
        if let Some(g) = grads.get(v.as_tensor()) {
            names.push(name);
            sums.push(g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?);
        }
    }
    if sums.is_empty() {
        return Ok((0.0, None));
    }
    let sums = Tensor::stack(&sums, 0)?.to_vec1::<f64>()?;
    let mut total = 0f64;
    for (name, s) in names.into_iter().zip(sums) {
        if !s.is_finite() {
            return Ok((s, Some(name.clone())));
        }
        total += s;
    }
    Ok((total.sqrt() * scale, None))
}

/// The clip factor `torch.nn.utils.clip_grad_norm_` applies for this norm.
fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// The name of the first parameter holding a non-finite value, if any.
fn first_non_finite_parameter(params: &ParamStore) -> Result<Option<String>> {
    for (name, v) in params.params() {
        let s = v.as_tensor().abs()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        if !s.is_finite() {
            return Ok(Some(name.clone()));
        }
    }
    Ok(None)
}

/// A model, its data and its optimizer, ready to take update steps.
pub struct Trainer {
    pub spec: RunSpec,
    pub work: Workload,
    pub opt: Opt,
    vars: Vec<Var>,
    /// Tensors of dimension ≥ 2 (decayed).
    decayed: Vec<usize>,
    collective: Box<dyn Collective>,
}

/// What one update did.
pub struct StepOutput {
    pub lr: f64,
    /// Mean training loss over the update's micro-batches (of every process).
    pub loss: f64,
    /// Norm of the whole update's gradient, before clipping.
    pub grad_norm: f64,
    /// The hyper-gradient of the previous update and what the hyper-step did with it.
    pub hyper: HyperRecord,
    /// Coefficients after the hyper-step (NaN for non-MADA optimizers).
    pub coefficients: [f64; 6],
    /// Tokens or images processed (by every process).
    pub items: usize,
    /// Where each micro-batch's rows came from: (micro-batch index, row starts).
    pub batches: Vec<(u64, Vec<usize>)>,
    /// Seconds in forward + backward, and in the optimizer (hyper-gradient, clipping, decay,
    /// update).
    pub model_s: f64,
    pub optimizer_s: f64,
    /// Seconds of it in the collective calls (the all-reduces; 0 in one process).
    pub collective_s: f64,
}

impl Trainer {
    /// One process computing every rank of the spec.
    pub fn new(spec: &RunSpec) -> Result<Self> {
        Self::with_collective(spec, Box::new(SingleProcess))
    }

    /// A process of a data-parallel run computing its share of the spec's ranks.
    pub fn with_collective(spec: &RunSpec, collective: Box<dyn Collective>) -> Result<Self> {
        spec.validate()?;
        if !spec.ranks.is_multiple_of(collective.processes()) {
            bail!("ranks = {} cannot be shared out over {} processes", spec.ranks, collective.processes());
        }
        let work = Workload::build(spec)?;
        let vars = work.params().vars();
        let decayed =
            work.params().params().iter().enumerate().filter(|(_, (_, v))| v.rank() >= 2).map(|(i, _)| i).collect();
        let opt =
            VarOptimizer::with_optimizer(vars.clone(), AnyOptimizer::from_spec(&spec.optimizer)?, spec.schedule.lr)?;
        Ok(Self { spec: spec.clone(), work, opt, vars, decayed, collective })
    }

    pub fn collective(&self) -> &dyn Collective {
        &*self.collective
    }

    /// The hyper-gradient of the optimizer's last update on `grads` (None: not MADA-family, or
    /// no update yet).
    fn hypergradient(&mut self, grads: &GradStore) -> Result<Option<[f64; 6]>> {
        Ok(self.opt.mada_hypergradient(grads)?)
    }

    /// Update `step` (counted from 0; messages and logs call it update `step + 1`).
    pub fn step(&mut self, step: u64) -> Result<StepOutput> {
        let (world, ga) = (self.spec.ranks, self.spec.grad_accum);
        let per_rank = ga / world;
        let lr = self.spec.schedule.at(step, ga);
        let update = step + 1;
        let (mut model_s, mut optimizer_s) = (0.0, 0.0);
        let mut total: Option<GradStore> = None;
        // The all-reduced buffer: each micro-batch's loss / grad_accum at slot rank·A + local,
        // then each rank's hyper-gradient (6 slots), then the item count and whether
        // hyper-gradients were taken. Slots of ranks other processes compute stay 0.
        let (hyper_at, items_at) = (ga as usize, ga as usize + 6 * world as usize);
        let mut shared = vec![0f64; items_at + 2];
        let mut batches = Vec::new();
        'ranks: for rank in self.collective.ranks_here(world) {
            let mut rank_acc: Option<GradStore> = None;
            for local in 0..per_rank {
                let mb = MicroBatch { step, rank, ranks: world, local };
                let t = Instant::now();
                let (loss, n, rows) = self.work.micro_loss(mb, ga)?;
                let value = loss.to_scalar::<f32>()? as f64;
                shared[(rank * per_rank + local) as usize] = value / ga as f64;
                if !value.is_finite() {
                    // Reported after the sums, by every process (see below).
                    break 'ranks;
                }
                shared[items_at] += n as f64;
                batches.push((mb.index(), rows));
                let grads = (loss / ga as f64)?.backward()?;
                model_s += t.elapsed().as_secs_f64();
                let t = Instant::now();
                if local == 0 {
                    if let Some(h) = self.hypergradient(&grads)? {
                        shared[hyper_at + 6 * rank as usize..][..6].copy_from_slice(&h);
                        shared[items_at + 1] = 1.0;
                    }
                }
                add_grads(&mut rank_acc, &self.vars, grads, 1.0)?;
                optimizer_s += t.elapsed().as_secs_f64();
            }
            let t = Instant::now();
            let rank_acc = rank_acc.context("a rank without micro-batches")?;
            // Per-rank clipping acts on the rank's mean gradient, `world` × its share of the sum.
            let scale = match self.spec.clip_mode {
                ClipMode::PerRank if world > 1 => {
                    let (norm, _) = grad_norm(self.work.params(), &rank_acc, world as f64)?;
                    clip_factor(norm, self.spec.grad_clip)
                }
                _ => 1.0,
            };
            add_grads(&mut total, &self.vars, rank_acc, scale)?;
            optimizer_s += t.elapsed().as_secs_f64();
        }
        let t = Instant::now();
        self.collective.sum_f64(&mut shared)?;
        let mut collective_s = t.elapsed().as_secs_f64();
        if let Some(slot) = shared[..ga as usize].iter().position(|l| !l.is_finite()) {
            let (rank, local) = (slot as u64 / per_rank, slot as u64 % per_rank);
            let value = shared[slot] * ga as f64;
            let at = format!("micro-batch {} (rank {rank})", local * world + rank + 1);
            return Err(match first_non_finite_parameter(self.work.params())? {
                Some(p) => diverged(update, format!("{at}: the training loss is {value}: parameter {p} is not finite")),
                None => diverged(
                    update,
                    format!(
                        "{at}: the training loss is {value} with every parameter finite (an activation overflowed: \
                         lower the learning rate or clip harder)"
                    ),
                ),
            });
        }
        let loss_total = shared[..ga as usize].iter().fold(0.0, |a, l| a + l);
        let hyper_sum = (shared[items_at + 1] > 0.0).then(|| {
            let mut sum = [0f64; 6];
            for h in shared[hyper_at..items_at].chunks(6) {
                sum.iter_mut().zip(h).for_each(|(s, x)| *s += x);
            }
            sum
        });
        let mut total = total.context("no micro-batch")?;
        if self.collective.processes() > 1 {
            let reduce = Instant::now();
            let held: Vec<&Var> = self.vars.iter().filter(|v| total.get(v.as_tensor()).is_some()).collect();
            let grads: Vec<Tensor> =
                held.iter().map(|v| total.get(v.as_tensor()).cloned()).collect::<Option<_>>().context("gradient")?;
            for (v, g) in held.into_iter().zip(self.collective.sum_tensors(&grads)?) {
                total.insert(v.as_tensor(), g);
            }
            collective_s += reduce.elapsed().as_secs_f64();
        }
        let hyper = self.hyper_step(hyper_sum, update)?;
        let (norm, bad) = grad_norm(self.work.params(), &total, 1.0)?;
        if let Some(name) = bad {
            return Err(diverged(update, format!("the gradient of {name} is not finite")));
        }
        let global = match self.spec.clip_mode {
            ClipMode::PerRank if world > 1 => 1.0,
            _ => clip_factor(norm, self.spec.grad_clip),
        };
        if global != 1.0 {
            for v in &self.vars {
                if let Some(g) = total.get(v.as_tensor()) {
                    let scaled = (g * global)?;
                    total.insert(v.as_tensor(), scaled);
                }
            }
        }
        self.opt.decoupled_weight_decay(&self.decayed, lr, self.spec.weight_decay)?;
        candle_nn::Optimizer::set_learning_rate(&mut self.opt, lr);
        self.opt.update(&total)?;
        optimizer_s += t.elapsed().as_secs_f64();
        Ok(StepOutput {
            lr,
            loss: loss_total,
            grad_norm: norm,
            hyper,
            coefficients: self.opt.optimizer().as_mada().map(|m| m.coefficients().to_array()).unwrap_or([f64::NAN; 6]),
            items: shared[items_at] as usize,
            batches,
            model_s,
            optimizer_s,
            collective_s,
        })
    }

    /// A checksum of the parameters, compared across the processes: an error (every process's)
    /// when they differ.
    pub fn check_processes_agree(&self, update: u64) -> Result<()> {
        if self.collective.processes() > 1 && !self.collective.agree(parallel::parameter_checksum(&self.vars)?)? {
            return Err(parallel::RanksDisagree { update }.into());
        }
        Ok(())
    }

    /// Take the hyper-step with the ranks' summed hyper-gradient.
    fn hyper_step(&mut self, summed: Option<[f64; 6]>, update: u64) -> Result<HyperRecord> {
        let Some(h) = summed else { return Ok(HyperRecord::NONE) };
        if self.opt.optimizer().as_mada().is_none() {
            return Ok(HyperRecord::NONE);
        }
        let taken: Option<HyperStep> = self.opt.apply_mada_hypergradient(h).map_err(|e| match e {
            mada::OptimError::NonFiniteHypergradient { .. } => diverged(update, e.to_string()),
            other => anyhow!("update {update}: {other}"),
        })?;
        let c = self.opt.optimizer().as_mada().context("MADA")?.hyper_config();
        Ok(HyperRecord::new(h, taken.as_ref(), c.clip, c.learned))
    }
}
