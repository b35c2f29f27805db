//! A run, fully resolved, as data: what the experiment catalog expands to, what a run's folder
//! is named after (a hash of this), and what `paper-repro train` reads.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use mada::OptimizerSpec;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::vision::VisionData;
use crate::models::gpt::GptConfig;
use crate::models::vision::VisionModelConfig;

/// The learning-rate schedule, evaluated at the update index (or the micro-step index, as
/// `train_ddp.py` does, when `in_micro_steps`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Floor of the cosine decay.
    #[serde(default)]
    pub min_lr: f64,
    /// Linear warm-up length: lr·it/warmup for it < warmup.
    #[serde(default)]
    pub warmup: u64,
    /// Cosine decay from `warmup` to `decay_until`, then `min_lr`; 0 = constant after warm-up.
    #[serde(default)]
    pub decay_until: u64,
    /// Count `it` in micro-steps (update × grad_accum) instead of updates.
    #[serde(default)]
    pub in_micro_steps: bool,
}

impl Schedule {
    /// nanoGPT's `get_lr`.
    pub fn at(&self, update: u64, grad_accum: u64) -> f64 {
        let it = if self.in_micro_steps { update * grad_accum } else { update };
        if it < self.warmup {
            return self.lr * it as f64 / self.warmup as f64;
        }
        if self.decay_until == 0 {
            return self.lr;
        }
        if it > self.decay_until {
            return self.min_lr;
        }
        let ratio = (it - self.warmup) as f64 / (self.decay_until - self.warmup).max(1) as f64;
        let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
        self.min_lr + coeff * (self.lr - self.min_lr)
    }
}

/// Where a language model's tokens come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextData {
    /// A folder with train.bin, val.bin (and meta.json). A relative path is resolved against
    /// the data root (`MADA_DATA`, default `.cache/data`).
    pub dir: PathBuf,
}

/// What to train.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Task {
    /// Next-token prediction with a GPT.
    Lm {
        data: TextData,
        model: GptConfig,
        /// Start from a checkpoint of this project (fine-tuning): a run folder or a
        /// model.safetensors; or a Hugging Face GPT-2 safetensors file with `hf = true`. A
        /// relative path is looked up in the working directory first (where `runs/` lives),
        /// then under the data root.
        #[serde(default)]
        init_from: Option<PathBuf>,
        #[serde(default)]
        init_from_hf: bool,
        /// Validation: this many deterministic chunks, each at most `eval_batch` windows.
        eval_chunks: usize,
        eval_batch: usize,
    },
    /// Image classification.
    Vision {
        data: VisionData,
        model: VisionModelConfig,
        /// Use only the first n training / test examples (0 = all).
        #[serde(default)]
        train_subset: usize,
        #[serde(default)]
        test_subset: usize,
    },
}

/// Where a run computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    #[default]
    Cpu,
    /// The first CUDA device (needs paper-repro built with `--features cuda`).
    Cuda,
}

impl DeviceKind {
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        }
    }
}

/// The arithmetic of the matrix products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// float32 everywhere (the official runs' `--dtype='float32'`).
    #[default]
    Fp32,
    /// float32 storage, TF32 tensor-core matrix products on CUDA (what PyTorch's
    /// `allow_tf32 = True`, set by nanoGPT, gives); the same as `fp32` on the CPU.
    Tf32,
}

/// How the gradient norm is clipped when `grad_clip > 0`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClipMode {
    /// The norm of the whole update's gradient (the sum over all micro-batches and ranks).
    #[default]
    Global,
    /// Each rank's gradient (the mean over its micro-batches) before they are averaged, as
    /// `train_ddp.py` clips before its all-reduce. The same as `global` with one rank.
    PerRank,
}

/// A fully resolved run.
///
/// Fields added after the first release (`ranks`, `clip_mode`, `precision`) are written only
/// when they differ from their default, so the runs that predate them keep their ids.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// Label shown in tables and figures (e.g. "MADA").
    pub label: String,
    pub task: Task,
    pub optimizer: OptimizerSpec,
    pub schedule: Schedule,
    /// Optimizer updates.
    pub updates: u64,
    /// Examples (sequences or images) per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per update, over all ranks together.
    #[serde(default = "one")]
    pub grad_accum: u64,
    /// The data-parallel world this run is (or emulates on one device): each update's
    /// `grad_accum` micro-batches are shared out as `grad_accum / ranks` per rank, rank r
    /// drawing its windows from its own r-th shard of the training data; the hyper-gradient is
    /// the official `train_ddp.py` one, from the first micro-batch of every rank (see
    /// [`crate::run::trainer`]).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub ranks: u64,
    /// Decoupled weight decay on tensors of dimension ≥ 2 (p ← p − lr·wd·p).
    #[serde(default)]
    pub weight_decay: f64,
    /// Gradient-norm clip (0 = none).
    #[serde(default)]
    pub grad_clip: f64,
    /// What the clip applies to (default: the whole update's gradient).
    #[serde(default, skip_serializing_if = "is_default")]
    pub clip_mode: ClipMode,
    pub seed: u64,
    /// Evaluate every this many updates (and at the end).
    pub eval_interval: u64,
    /// Checkpoint every this many updates (and at the end).
    pub checkpoint_interval: u64,
    /// Device: "cpu" or "cuda" (needs the `cuda` feature).
    #[serde(default)]
    pub device: DeviceKind,
    /// fp32 or tf32 matrix products.
    #[serde(default, skip_serializing_if = "is_default")]
    pub precision: Precision,
}

fn one() -> u64 {
    1
}

fn is_one(x: &u64) -> bool {
    *x == 1
}

fn is_default<T: Default + PartialEq>(x: &T) -> bool {
    *x == T::default()
}

/// Largest sizes a spec may name before anything is allocated: beyond these a typo (an extra
/// zero) would otherwise take the machine's memory or run for years.
const MAX_UPDATES: u64 = 100_000_000;
const MAX_GRAD_ACCUM: u64 = 1 << 16;
const MAX_BATCH: usize = 1 << 24;

impl RunSpec {
    /// The run's identity: the first 16 hex digits of SHA-256 of its canonical JSON. The label
    /// is part of it (two labels for one configuration are two runs).
    pub fn id(&self) -> String {
        let json = serde_json::to_string(self).expect("spec serializes");
        let digest = Sha256::digest(json.as_bytes());
        digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    /// Micro-batches per rank and update.
    pub fn micro_batches_per_rank(&self) -> u64 {
        self.grad_accum / self.ranks.max(1)
    }

    /// Check every field that can be checked without the data: ranges, finiteness, sizes and
    /// the optimizer's settings. Errors name the key.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("updates", self.updates),
            ("batch_size", self.batch_size as u64),
            ("grad_accum", self.grad_accum),
            ("ranks", self.ranks),
            ("eval_interval", self.eval_interval),
            ("checkpoint_interval", self.checkpoint_interval),
        ];
        for (key, v) in positive {
            if v == 0 {
                bail!("{key} must be positive");
            }
        }
        if self.updates > MAX_UPDATES {
            bail!("updates = {} exceeds {MAX_UPDATES}", self.updates);
        }
        if self.batch_size > MAX_BATCH {
            bail!("batch_size = {} exceeds {MAX_BATCH}", self.batch_size);
        }
        if self.grad_accum > MAX_GRAD_ACCUM {
            bail!("grad_accum = {} exceeds {MAX_GRAD_ACCUM} micro-batches per update", self.grad_accum);
        }
        if !self.grad_accum.is_multiple_of(self.ranks) {
            bail!("grad_accum = {} is not a multiple of ranks = {}", self.grad_accum, self.ranks);
        }
        let s = &self.schedule;
        for (key, v) in [("schedule.lr", s.lr), ("schedule.min_lr", s.min_lr)] {
            if !v.is_finite() || v < 0.0 {
                bail!("{key} = {v} must be a finite non-negative number");
            }
        }
        if s.lr == 0.0 || s.min_lr > s.lr {
            bail!("schedule: need 0 ≤ min_lr ≤ lr and lr > 0 (got lr {}, min_lr {})", s.lr, s.min_lr);
        }
        if s.decay_until != 0 && s.decay_until < s.warmup {
            bail!("schedule: decay_until {} is before the end of warm-up {}", s.decay_until, s.warmup);
        }
        if !(self.weight_decay.is_finite() && (0.0..=1.0).contains(&self.weight_decay)) {
            bail!("weight_decay = {} must lie in [0, 1]", self.weight_decay);
        }
        if !(self.grad_clip.is_finite() && self.grad_clip >= 0.0) {
            bail!("grad_clip = {} must be a finite number ≥ 0 (0 turns clipping off)", self.grad_clip);
        }
        // Building the optimizer checks every optimizer setting.
        mada::AnyOptimizer::<f32>::from_spec(&self.optimizer).context("optimizer")?;
        match &self.task {
            Task::Lm { model, eval_chunks, eval_batch, .. } => {
                model.validate().context("task.model")?;
                if *eval_chunks == 0 || *eval_batch == 0 {
                    bail!("task.eval_chunks and task.eval_batch must be positive");
                }
            }
            Task::Vision { model, .. } => model.validate().context("task.model")?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_nanogpts() {
        let s = Schedule { lr: 6e-4, min_lr: 6e-5, warmup: 100, decay_until: 1000, in_micro_steps: false };
        assert_eq!(s.at(0, 1), 0.0);
        assert!((s.at(50, 1) - 3e-4).abs() < 1e-15);
        assert!((s.at(100, 1) - 6e-4).abs() < 1e-15);
        assert!((s.at(550, 1) - (6e-5 + 0.5 * 5.4e-4)).abs() < 1e-12);
        assert_eq!(s.at(2000, 1), 6e-5);
        let m = Schedule { in_micro_steps: true, ..s.clone() };
        assert_eq!(m.at(10, 5), s.at(50, 1));
        let c = Schedule { lr: 1e-3, min_lr: 0.0, warmup: 0, decay_until: 0, in_micro_steps: false };
        assert_eq!(c.at(7, 1), 1e-3);
    }
}
