//! A run, fully resolved, as data: what the experiment catalog expands to, what a run's folder
//! is named after (a hash of this), and what `paper-repro train` reads.

use std::path::PathBuf;

use anyhow::{bail, Result};
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

/// A fully resolved run.
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
    #[serde(default = "one")]
    pub grad_accum: u64,
    /// Decoupled weight decay on tensors of dimension ≥ 2 (p ← p − lr·wd·p).
    #[serde(default)]
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 = none).
    #[serde(default)]
    pub grad_clip: f64,
    pub seed: u64,
    /// Evaluate every this many updates (and at the end).
    pub eval_interval: u64,
    /// Checkpoint every this many updates (and at the end).
    pub checkpoint_interval: u64,
    /// Device: "cpu" or "cuda" (needs the `cuda` feature).
    #[serde(default = "cpu")]
    pub device: String,
}

fn one() -> u64 {
    1
}

fn cpu() -> String {
    "cpu".into()
}

impl RunSpec {
    /// The run's identity: the first 16 hex digits of SHA-256 of its canonical JSON. The label
    /// is part of it (two labels for one configuration are two runs).
    pub fn id(&self) -> String {
        let json = serde_json::to_string(self).expect("spec serializes");
        let digest = Sha256::digest(json.as_bytes());
        digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    pub fn validate(&self) -> Result<()> {
        if self.updates == 0 || self.batch_size == 0 || self.grad_accum == 0 {
            bail!("updates, batch_size and grad_accum must be positive");
        }
        if self.eval_interval == 0 || self.checkpoint_interval == 0 {
            bail!("eval_interval and checkpoint_interval must be positive");
        }
        if !(self.schedule.lr.is_finite() && self.schedule.lr > 0.0)
            || self.schedule.min_lr < 0.0
            || self.schedule.min_lr > self.schedule.lr
        {
            bail!(
                "schedule: need 0 ≤ min_lr ≤ lr, lr > 0 (got lr {}, min_lr {})",
                self.schedule.lr,
                self.schedule.min_lr
            );
        }
        if self.schedule.decay_until != 0 && self.schedule.decay_until < self.schedule.warmup {
            bail!(
                "schedule: decay_until {} is before the end of warm-up {}",
                self.schedule.decay_until,
                self.schedule.warmup
            );
        }
        if !(0.0..=1.0).contains(&self.weight_decay) || self.grad_clip < 0.0 {
            bail!("weight_decay must lie in [0, 1] and grad_clip be ≥ 0");
        }
        if !matches!(self.device.as_str(), "cpu" | "cuda") {
            bail!("device must be \"cpu\" or \"cuda\", not {:?}", self.device);
        }
        // Building the optimizer checks every optimizer setting.
        mada::AnyOptimizer::<f32>::from_spec(&self.optimizer)?;
        if let Task::Lm { model, .. } = &self.task {
            model.validate()?;
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
