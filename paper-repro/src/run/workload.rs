//! What a run trains: the model and its data, a micro-batch's loss, and the evaluation.
//!
//! [`Workload::build`] checks every size against the data and a memory estimate against the
//! machine before it allocates the model, so a block size longer than the corpus or a batch
//! larger than the machine ends in one error naming the key, not in the kernel's OOM killer.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use crate::data::text::Corpus;
use crate::data::vision::{epoch_order, ImageSet};
use crate::models::gpt::{hf_config, Gpt, GptConfig};
use crate::models::nn::ParamStore;
use crate::models::vision::{VisionModel, VisionModelConfig};
use crate::paths::resolve;
use crate::run::spec::{DeviceKind, Precision, RunSpec, Task};
use mada::Optimizer as _;

/// The device a spec names; an error (before any work) when this build cannot reach it.
pub fn device(kind: DeviceKind) -> Result<Device> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda => {
            #[cfg(feature = "cuda")]
            {
                Device::new_cuda(0).context("device \"cuda\": no usable CUDA device")
            }
            #[cfg(not(feature = "cuda"))]
            {
                bail!("device \"cuda\" needs paper-repro built with `--features cuda` (this build has only the CPU)")
            }
        }
    }
}

/// Turn TF32 matrix products on or off for the process (CUDA; a no-op on the CPU).
pub fn set_precision(precision: Precision) {
    #[cfg(feature = "cuda")]
    candle_core::cuda::set_gemm_reduced_precision_f32(precision == Precision::Tf32);
    #[cfg(not(feature = "cuda"))]
    let _ = precision;
}

/// Which micro-batch of an update: rank `rank` of `ranks`, its `local`-th micro-batch. The
/// data of a micro-batch is a function of (seed, rank, update, local) alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MicroBatch {
    /// The update, from 0.
    pub step: u64,
    pub rank: u64,
    pub ranks: u64,
    pub local: u64,
}

impl MicroBatch {
    /// The position of this micro-batch among the update's `grad_accum` (rank-interleaved:
    /// micro-batches 0..ranks are every rank's first).
    pub fn index(&self) -> u64 {
        self.local * self.ranks + self.rank
    }
}

/// What a run trains: a model, its data, and how to get a micro-batch loss and evaluate.
pub enum Workload {
    Lm {
        model: Gpt,
        corpus: Corpus,
        eval_chunks: usize,
        eval_batch: usize,
        batch: usize,
        seed: u64,
        device: Device,
    },
    Vision {
        model: VisionModel,
        train: ImageSet,
        test: ImageSet,
        stats: Vec<(f32, f32)>,
        augment: bool,
        batch: usize,
        seed: u64,
        device: Device,
    },
}

/// Bytes the machine can still give (`MemAvailable`), if the kernel says.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// A rough upper estimate of a GPT run's memory: parameters, gradients (two stores while they
/// are summed) and optimizer state, plus the activations of one micro-batch kept for the
/// backward pass (≈ 24 values per token and layer per embedding dimension, and the logits with
/// their softmax and gradient).
pub fn gpt_memory_estimate(c: &GptConfig, batch: usize, state_bytes_per_param: usize) -> f64 {
    let params = c.num_params(false) as f64;
    let tokens = batch as f64 * c.block_size as f64;
    let activations = tokens * (24.0 * c.n_embd as f64 * c.n_layer as f64 + 4.0 * c.vocab_size as f64) * 4.0;
    params * (12.0 + state_bytes_per_param as f64) + activations
}

/// The same for a vision model: its parameters (with gradients and optimizer state) and every
/// layer's output (and its gradient, and the im2col columns) at the input resolution, a
/// generous bound.
pub fn vision_memory_estimate(m: &VisionModelConfig, batch: usize, pixels: usize, state_bytes_per_param: usize) -> f64 {
    let f = |x: usize| x as f64;
    let (channels, params) = match m {
        VisionModelConfig::Cnn { c1, c2, hidden, .. } => {
            (f(c1 + c2 + hidden), 9.0 * f(*c1) * (1.0 + f(*c2)) + f(*c2) * f(pixels) / 16.0 * f(*hidden))
        }
        VisionModelConfig::Resnet { blocks, widths, .. } => (
            f(widths[0]) + blocks.iter().zip(widths).map(|(b, w)| 3.0 * f(*b) * f(*w)).sum::<f64>(),
            blocks.iter().zip(widths).map(|(b, w)| 18.0 * f(*b) * f(*w) * f(*w)).sum::<f64>(),
        ),
    };
    params * (12.0 + state_bytes_per_param as f64) + f(batch) * f(pixels) * channels * 4.0 * 12.0
}

fn check_memory(needed: f64, what: &str, device: &Device) -> Result<()> {
    if !device.is_cpu() {
        return Ok(());
    }
    if let Some(avail) = available_memory() {
        if needed > avail as f64 {
            bail!(
                "{what} needs about {:.1} GB, and the machine has {:.1} GB available: make it smaller",
                needed / 1e9,
                avail as f64 / 1e9
            );
        }
    }
    Ok(())
}

impl Workload {
    /// The model and data of `spec`, every size checked before the model is allocated.
    pub fn build(spec: &RunSpec) -> Result<Self> {
        let device = device(spec.device)?;
        set_precision(spec.precision);
        let state_bytes = mada::AnyOptimizer::<f32>::from_spec(&spec.optimizer)?.state_bytes_per_param();
        match &spec.task {
            Task::Lm { data, model, init_from, init_from_hf, eval_chunks, eval_batch } => {
                let corpus = Corpus::open(&resolve(&data.dir))?;
                let vocab = corpus.meta.vocab.size();
                if model.vocab_size < vocab {
                    bail!(
                        "task.model.vocab_size = {} is smaller than the vocabulary of {} ({vocab}, {})",
                        model.vocab_size,
                        corpus.dir.display(),
                        corpus.vocab_source()
                    );
                }
                let shard = corpus.train.len() / spec.ranks as usize;
                let block = model.block_size;
                if shard <= block + 1 {
                    bail!(
                        "task.model.block_size = {block} does not fit the training data: {} has {} tokens{}, a window \
                         needs block_size + 1",
                        corpus.train.path().display(),
                        corpus.train.len(),
                        if spec.ranks > 1 { format!(" ({shard} per rank's shard)") } else { String::new() }
                    );
                }
                if corpus.val.len() <= block + 1 {
                    bail!(
                        "task.model.block_size = {block} does not fit the validation data: {} has {} tokens",
                        corpus.val.path().display(),
                        corpus.val.len()
                    );
                }
                let windows = corpus.val.len() - block - 1;
                if *eval_chunks > windows {
                    bail!(
                        "task.eval_chunks = {eval_chunks} exceeds the {windows} validation windows of {}",
                        corpus.val.path().display()
                    );
                }
                let per_micro = spec.batch_size.max(*eval_batch);
                check_memory(
                    gpt_memory_estimate(model, per_micro, state_bytes),
                    "this GPT (block_size × batch_size)",
                    &device,
                )?;
                let gpt = Gpt::new(model.clone(), &device, spec.seed)?;
                if let Some(init) = init_from {
                    // Run folders named by the catalog are relative to the working directory;
                    // user-supplied weights usually live under the data root.
                    let path = if init.is_relative() && init.exists() { init.clone() } else { resolve(init) };
                    if *init_from_hf {
                        let cfg = hf_config(&path)?;
                        if cfg.n_layer != model.n_layer
                            || cfg.n_embd != model.n_embd
                            || cfg.vocab_size != model.vocab_size
                            || !model.bias
                        {
                            bail!("{}: checkpoint is {cfg:?}, the run's model is {model:?}", path.display());
                        }
                        gpt.load_hf_safetensors(&path)?;
                    } else {
                        let file = if path.is_dir() { path.join("checkpoint/model.safetensors") } else { path };
                        gpt.params.load(&file).with_context(|| format!("task.init_from: {}", file.display()))?;
                    }
                }
                Ok(Workload::Lm {
                    model: gpt,
                    corpus,
                    eval_chunks: *eval_chunks,
                    eval_batch: *eval_batch,
                    batch: spec.batch_size,
                    seed: spec.seed,
                    device,
                })
            }
            Task::Vision { data, model, train_subset, test_subset } => {
                let data = data.resolved(resolve);
                let (mut train, mut test) = data.load()?;
                if *train_subset > 0 {
                    train = train.take(*train_subset);
                }
                if *test_subset > 0 {
                    test = test.take(*test_subset);
                }
                if spec.batch_size > train.len() {
                    bail!("batch_size = {} exceeds the {} training images", spec.batch_size, train.len());
                }
                check_memory(
                    vision_memory_estimate(model, spec.batch_size.max(500), train.height * train.width, state_bytes),
                    "this vision model at this batch_size",
                    &device,
                )?;
                let stats = train.channel_stats();
                let size = (train.height, train.width);
                let m = VisionModel::new(model.clone(), train.channels, size, train.classes, &device, spec.seed)?;
                Ok(Workload::Vision {
                    model: m,
                    train,
                    test,
                    stats,
                    augment: data.augments(),
                    batch: spec.batch_size,
                    seed: spec.seed,
                    device,
                })
            }
        }
    }

    pub fn params(&self) -> &ParamStore {
        match self {
            Workload::Lm { model, .. } => &model.params,
            Workload::Vision { model, .. } => &model.params,
        }
    }

    /// The training loss of one micro-batch, its size (tokens or images), and where its rows
    /// came from (window starts in `train.bin`, or image indices).
    pub fn micro_loss(&self, mb: MicroBatch, grad_accum: u64) -> Result<(Tensor, usize, Vec<usize>)> {
        match self {
            Workload::Lm { model, corpus, batch, seed, device, .. } => {
                let block = model.config.block_size;
                let starts = corpus.train_starts(*batch, block, *seed, mb);
                let (x, y) = corpus.train_windows(&starts, block, device)?;
                Ok((model.loss(&x, &y, true)?, batch * block, starts))
            }
            Workload::Vision { model, train, stats, augment, batch, seed, device, .. } => {
                // Walk through epochs of shuffled indices: example k of the run is position
                // k mod n of the permutation of epoch k / n.
                let n = train.len();
                let micro = mb.index();
                let first = ((mb.step * grad_accum + micro) as usize) * batch;
                let mut order = (usize::MAX, Vec::new());
                let idx: Vec<usize> = (first..first + batch)
                    .map(|k| {
                        if order.0 != k / n {
                            order = (k / n, epoch_order(n, *seed, (k / n) as u64));
                        }
                        order.1[k % n]
                    })
                    .collect();
                let mut rng = rand::SeedableRng::seed_from_u64(seed ^ (mb.step << 8) ^ micro);
                let (x, y) = train.batch(&idx, stats, if *augment { Some(&mut rng) } else { None }, device)?;
                let (loss, _) = model.loss_and_correct(&x, &y, true)?;
                Ok((loss, *batch, idx))
            }
        }
    }

    /// Evaluation metrics: LM — loss on the deterministic validation chunks and on as many
    /// fixed training windows; vision — test loss and accuracy (running batch-norm statistics).
    ///
    /// Without recording the graph ([`candle_core::backprop::no_grad`]): the parameters are
    /// variables, so a recorded forward pass keeps every activation alive until its loss is
    /// dropped — a vision chunk of 500 images held 4× a training batch's activations. The same
    /// operations run, so the metrics are the same.
    pub(crate) fn evaluate(&self) -> Result<(f64, f64)> {
        candle_core::backprop::no_grad(|| self.evaluate_recorded())
    }

    fn evaluate_recorded(&self) -> Result<(f64, f64)> {
        match self {
            Workload::Lm { model, corpus, eval_chunks, eval_batch, device, .. } => {
                let block = model.config.block_size;
                let mut total = 0.0;
                let batches = corpus.val_batches(*eval_chunks, block, *eval_batch)?;
                for starts in &batches {
                    let (x, y) = corpus.val_batch(starts, block, device)?;
                    total += model.loss(&x, &y, false)?.to_scalar::<f32>()? as f64;
                }
                Ok((total / batches.len() as f64, f64::NAN))
            }
            Workload::Vision { model, test, stats, device, .. } => {
                let (mut loss, mut correct) = (0.0, 0usize);
                let all: Vec<usize> = (0..test.len()).collect();
                for chunk in all.chunks(500) {
                    let (x, y) = test.batch(chunk, stats, None, device)?;
                    let (l, c) = model.loss_and_correct(&x, &y, false)?;
                    loss += l.to_scalar::<f32>()? as f64 * chunk.len() as f64;
                    correct += c;
                }
                Ok((loss / test.len() as f64, correct as f64 / test.len() as f64))
            }
        }
    }

    /// LM only: the training-split loss on fixed windows (nanoGPT's `estimate_loss` "train").
    pub(crate) fn train_estimate(&self) -> Result<Option<f64>> {
        candle_core::backprop::no_grad(|| self.train_estimate_recorded())
    }

    fn train_estimate_recorded(&self) -> Result<Option<f64>> {
        match self {
            Workload::Lm { model, corpus, eval_chunks, eval_batch, device, .. } => {
                let block = model.config.block_size;
                let mut total = 0.0;
                for k in 0..*eval_chunks as u64 {
                    let fixed = MicroBatch { step: k, rank: 0, ranks: 1, local: 0 };
                    let starts = corpus.train_starts(*eval_batch, block, 0xE7A1, fixed);
                    let (x, y) = corpus.train_windows(&starts, block, device)?;
                    total += model.loss(&x, &y, false)?.to_scalar::<f32>()? as f64;
                }
                Ok(Some(total / *eval_chunks as f64))
            }
            Workload::Vision { .. } => Ok(None),
        }
    }
}
