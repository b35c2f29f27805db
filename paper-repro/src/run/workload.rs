//! What a run trains: the model and its data, a micro-batch's loss, and the evaluation.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use crate::data::text::Corpus;
use crate::data::vision::{epoch_order, ImageSet};
use crate::models::gpt::{hf_config, Gpt};
use crate::models::nn::ParamStore;
use crate::models::vision::VisionModel;
use crate::paths::resolve;
use crate::run::spec::{RunSpec, Task};

/// The device a spec names.
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            #[cfg(feature = "cuda")]
            {
                Ok(Device::new_cuda(0)?)
            }
            #[cfg(not(feature = "cuda"))]
            {
                bail!("device \"cuda\" needs paper-repro built with `--features cuda`")
            }
        }
        other => bail!("unknown device {other:?}"),
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

impl Workload {
    pub fn build(spec: &RunSpec) -> Result<Self> {
        let device = device(&spec.device)?;
        match &spec.task {
            Task::Lm { data, model, init_from, init_from_hf, eval_chunks, eval_batch } => {
                let corpus = Corpus::open(&resolve(&data.dir))?;
                let vocab = corpus.meta.vocab.size();
                if model.vocab_size < vocab {
                    bail!(
                        "model vocab_size {} is smaller than the corpus vocabulary {vocab} ({})",
                        model.vocab_size,
                        corpus.dir.display()
                    );
                }
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
                        gpt.params.load(&file).with_context(|| format!("initializing from {}", file.display()))?;
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
                let stats = train.channel_stats();
                let m = VisionModel::new(
                    model.clone(),
                    train.channels,
                    (train.height, train.width),
                    train.classes,
                    &device,
                    spec.seed,
                )?;
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

    /// Training loss of micro-batch `micro` of update `step`, and its size (tokens or images).
    pub(crate) fn micro_loss(&self, step: u64, micro: u64, grad_accum: u64) -> Result<(Tensor, usize)> {
        match self {
            Workload::Lm { model, corpus, batch, seed, device, .. } => {
                let block = model.config.block_size;
                let (x, y) = corpus.train_batch(*batch, block, *seed, step, micro, device)?;
                Ok((model.loss(&x, &y, true)?, batch * block))
            }
            Workload::Vision { model, train, stats, augment, batch, seed, device, .. } => {
                // Walk through epochs of shuffled indices: example k of the run is position
                // k mod n of the permutation of epoch k / n.
                let n = train.len();
                let first = ((step * grad_accum + micro) as usize) * batch;
                let mut order = (usize::MAX, Vec::new());
                let idx: Vec<usize> = (first..first + batch)
                    .map(|k| {
                        if order.0 != k / n {
                            order = (k / n, epoch_order(n, *seed, (k / n) as u64));
                        }
                        order.1[k % n]
                    })
                    .collect();
                let mut rng = rand::SeedableRng::seed_from_u64(seed ^ (step << 8) ^ micro);
                let (x, y) = train.batch(&idx, stats, if *augment { Some(&mut rng) } else { None }, device)?;
                let (loss, _) = model.loss_and_correct(&x, &y, true)?;
                Ok((loss, *batch))
            }
        }
    }

    /// Evaluation metrics: LM — loss on the deterministic validation chunks and on as many
    /// fixed training windows; vision — test loss and accuracy (running batch-norm statistics).
    pub(crate) fn evaluate(&self) -> Result<(f64, f64)> {
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
        match self {
            Workload::Lm { model, corpus, eval_chunks, eval_batch, device, .. } => {
                let block = model.config.block_size;
                let mut total = 0.0;
                for k in 0..*eval_chunks as u64 {
                    let (x, y) = corpus.train_batch(*eval_batch, block, 0xE7A1, k, 0, device)?;
                    total += model.loss(&x, &y, false)?.to_scalar::<f32>()? as f64;
                }
                Ok(Some(total / *eval_chunks as f64))
            }
            Workload::Vision { .. } => Ok(None),
        }
    }
}
