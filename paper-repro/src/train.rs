//! The training loop, shared by the GPT-2 and vision experiments; faithful to the official
//! `train_ddp.py` / `train.py` (digest §5.3–5.5) on one device:
//!
//! per update t: `grad_accum` micro-batches, each loss divided by `grad_accum`; the
//! hyper-gradient (MADA/HyperAdam) is taken from the **first micro-batch after an update**,
//! before any clipping, and the hyper-step (hyper-gradients clamped to ±10, no step during the
//! hyper warm-up) is applied at once; the micro-batch gradients are summed; the global gradient
//! norm is clipped; decoupled weight decay p ← p − lr·wd·p on tensors of dimension ≥ 2; then the
//! optimizer update with the scheduled lr. (Single device: the official per-rank clipping before
//! the all-reduce and its 2-micro-batch first update are not reproduced.)
//!
//! Every run writes into its folder: `spec.json`, `log.csv` (one row per update), `eval.csv`,
//! `checkpoint/` (model, optimizer and loop state; replaced atomically) and, when it finishes,
//! `result.json`. A run started again with `resume` continues from its last checkpoint,
//! bit-identically on the CPU (data batches are functions of (seed, update, micro-batch); the
//! optimizer state is saved exactly). A non-finite loss or gradient stops the run with the
//! update and tensor named; the last good checkpoint is kept and `failed.json` says why.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use indicatif::ProgressBar;
use mada::candle::VarOptimizer;
use mada::{AnyOptimizer, Optimizer};
use serde::{Deserialize, Serialize};

use analysis::io::write_atomically;

use crate::data::text::Corpus;
use crate::data::vision::{epoch_order, ImageSet};
use crate::gpt::{hf_config, Gpt};
use crate::nn::ParamStore;
use crate::spec::{RunSpec, Task};
use crate::vision::VisionModel;

/// The root folder of relative data paths: `MADA_DATA`, or `.cache/data`.
pub fn data_root() -> PathBuf {
    std::env::var_os("MADA_DATA").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".cache/data"))
}

fn resolve(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        data_root().join(p)
    }
}

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
    Lm { model: Gpt, corpus: Corpus, eval_chunks: usize, eval_batch: usize, batch: usize, seed: u64, device: Device },
    Vision { model: VisionModel, train: ImageSet, test: ImageSet, stats: Vec<(f32, f32)>, augment: bool, batch: usize, seed: u64, device: Device },
}

impl Workload {
    pub fn build(spec: &RunSpec) -> Result<Self> {
        let device = device(&spec.device)?;
        match &spec.task {
            Task::Lm { data, model, init_from, init_from_hf, eval_chunks, eval_batch } => {
                let corpus = Corpus::open(&resolve(&data.dir))?;
                let vocab = corpus.meta.vocab.size();
                if model.vocab_size < vocab {
                    bail!("model vocab_size {} is smaller than the corpus vocabulary {vocab} ({})", model.vocab_size, corpus.dir.display());
                }
                let gpt = Gpt::new(model.clone(), &device, spec.seed)?;
                if let Some(init) = init_from {
                    // Run folders named by the catalog are relative to the working directory;
                    // user-supplied weights usually live under the data root.
                    let path = if init.is_relative() && init.exists() { init.clone() } else { resolve(init) };
                    if *init_from_hf {
                        let cfg = hf_config(&path)?;
                        if cfg.n_layer != model.n_layer || cfg.n_embd != model.n_embd || cfg.vocab_size != model.vocab_size || !model.bias {
                            bail!("{}: checkpoint is {cfg:?}, the run's model is {model:?}", path.display());
                        }
                        gpt.load_hf_safetensors(&path)?;
                    } else {
                        let file = if path.is_dir() { path.join("checkpoint/model.safetensors") } else { path };
                        gpt.params.load(&file).with_context(|| format!("initializing from {}", file.display()))?;
                    }
                }
                Ok(Workload::Lm { model: gpt, corpus, eval_chunks: *eval_chunks, eval_batch: *eval_batch, batch: spec.batch_size, seed: spec.seed, device })
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
                let m = VisionModel::new(model.clone(), train.channels, (train.height, train.width), train.classes, &device, spec.seed)?;
                Ok(Workload::Vision { model: m, train, test, stats, augment: data.augments(), batch: spec.batch_size, seed: spec.seed, device })
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
    fn micro_loss(&self, step: u64, micro: u64, grad_accum: u64) -> Result<(Tensor, usize)> {
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
    fn evaluate(&self) -> Result<(f64, f64)> {
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
    fn train_estimate(&self) -> Result<Option<f64>> {
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

/// The loop state saved with each checkpoint.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoopState {
    pub spec_id: String,
    /// Completed updates.
    pub step: u64,
    /// Rows in log.csv / eval.csv belonging to the checkpoint (extra rows are dropped on resume).
    pub log_rows: usize,
    pub eval_rows: usize,
    pub items: u64,
    pub elapsed_s: f64,
    /// Sum and count of training losses since the last evaluation (vision "train loss").
    pub loss_sum: f64,
    pub loss_count: u64,
}

/// JSON has no NaN: write it as null and read null back as NaN.
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// The final result of a run (`result.json`; metrics that do not apply are null).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunResult {
    pub spec_id: String,
    pub label: String,
    pub updates: u64,
    #[serde(with = "nan_as_null")]
    pub final_eval_loss: f64,
    #[serde(with = "nan_as_null")]
    pub best_eval_loss: f64,
    #[serde(with = "nan_as_null")]
    pub final_eval_accuracy: f64,
    #[serde(with = "nan_as_null")]
    pub best_eval_accuracy: f64,
    #[serde(with = "nan_as_null")]
    pub final_train_loss: f64,
    pub final_coefficients: Option<[f64; 6]>,
    pub items_per_s: f64,
    pub elapsed_s: f64,
    pub params: usize,
    pub optimizer_state_bytes_per_param: usize,
}

const LOG_HEADER: &str = "step,lr,loss,grad_norm,beta1,beta2,beta3,rho,c,gamma,h_beta1,h_beta2,h_beta3,h_rho,h_c,h_gamma,items_per_s,elapsed_s";
const EVAL_HEADER: &str = "step,train_loss,eval_loss,eval_accuracy";

/// Keep the header and the first `rows` data rows of a CSV (for resume).
fn truncate_csv(path: &Path, header: &str, rows: usize) -> Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let kept: Vec<&str> = std::iter::once(header).chain(text.lines().skip(1).take(rows)).collect();
    write_atomically(path, (kept.join("\n") + "\n").as_bytes())
}

fn append(path: &Path, line: &str) -> Result<()> {
    let mut f = OpenOptions::new().append(true).create(true).open(path).with_context(|| format!("cannot append to {}", path.display()))?;
    writeln!(f, "{line}").with_context(|| format!("cannot append to {}", path.display()))
}

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

/// Where a run lives.
pub struct RunDir {
    pub dir: PathBuf,
}

impl RunDir {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf() }
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("log.csv")
    }
    pub fn eval(&self) -> PathBuf {
        self.dir.join("eval.csv")
    }
    pub fn result(&self) -> PathBuf {
        self.dir.join("result.json")
    }
    pub fn failed(&self) -> PathBuf {
        self.dir.join("failed.json")
    }
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join("checkpoint")
    }
    pub fn finished(&self) -> bool {
        self.result().exists()
    }
    pub fn read_result(&self) -> Result<RunResult> {
        let p = self.result();
        serde_json::from_str(&std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?).with_context(|| format!("invalid {}", p.display()))
    }
}

type Opt = VarOptimizer<f32, AnyOptimizer<f32>>;

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
        let decayed = work.params().params().iter().enumerate().filter(|(_, (_, v))| v.rank() >= 2).map(|(i, _)| i).collect();
        let opt = VarOptimizer::with_optimizer(vars.clone(), AnyOptimizer::from_spec(&spec.optimizer)?, spec.schedule.lr)?;
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

fn save_checkpoint(run: &RunDir, work: &Workload, opt: &Opt, state: &LoopState) -> Result<()> {
    let tmp = run.dir.join(".checkpoint.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    work.params().save(&tmp.join("model.safetensors"))?;
    let cfg = bincode::config::standard();
    let bytes = bincode::serde::encode_to_vec(opt.optimizer(), cfg).map_err(|e| anyhow!("encoding optimizer state: {e}"))?;
    write_atomically(&tmp.join("optimizer.bin"), &bytes)?;
    write_atomically(&tmp.join("state.json"), serde_json::to_string_pretty(state)?.as_bytes())?;
    // Swap: the old checkpoint stays complete until the new one is in place.
    let ck = run.checkpoint();
    let old = run.dir.join(".checkpoint.old");
    let _ = std::fs::remove_dir_all(&old);
    if ck.exists() {
        std::fs::rename(&ck, &old)?;
    }
    std::fs::rename(&tmp, &ck)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

fn load_checkpoint(run: &RunDir, work: &Workload, opt: &mut Opt, spec_id: &str) -> Result<Option<LoopState>> {
    let ck = run.checkpoint();
    let state_path = ck.join("state.json");
    if !state_path.exists() {
        return Ok(None);
    }
    let state: LoopState = serde_json::from_str(&std::fs::read_to_string(&state_path)?).with_context(|| format!("invalid {}", state_path.display()))?;
    if state.spec_id != spec_id {
        bail!("{} belongs to run {}, not {spec_id}", ck.display(), state.spec_id);
    }
    work.params().load(&ck.join("model.safetensors"))?;
    let p = ck.join("optimizer.bin");
    let bytes = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let (restored, _): (AnyOptimizer<f32>, usize) =
        bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).map_err(|e| anyhow!("{}: corrupt optimizer state: {e}", p.display()))?;
    *opt.optimizer_mut() = restored;
    Ok(Some(state))
}

/// Train (or resume) the run described by `spec` in `dir`. Returns its result — `None` if
/// `pause_after` updates were done in this call before the run finished (it stays resumable
/// from the checkpoint written then); an already finished run returns its saved result.
pub fn train(spec: &RunSpec, dir: &Path, bar: &ProgressBar, pause_after: Option<u64>) -> Result<Option<RunResult>> {
    spec.validate()?;
    let run = RunDir::new(dir);
    if run.finished() {
        return run.read_result().map(Some);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let id = spec.id();
    write_atomically(&dir.join("spec.json"), serde_json::to_string_pretty(spec)?.as_bytes())?;
    let _ = std::fs::remove_file(run.failed());
    let outcome = train_inner(spec, &run, &id, bar, pause_after);
    if let Err(e) = &outcome {
        let why = serde_json::json!({ "spec_id": id, "error": format!("{e:#}") });
        let _ = write_atomically(&run.failed(), serde_json::to_string_pretty(&why)?.as_bytes());
    }
    outcome
}

fn train_inner(spec: &RunSpec, run: &RunDir, id: &str, bar: &ProgressBar, pause_after: Option<u64>) -> Result<Option<RunResult>> {
    let mut tr = Trainer::new(spec)?;
    let mut state = match load_checkpoint(run, &tr.work, &mut tr.opt, id)? {
        Some(s) => {
            truncate_csv(&run.log(), LOG_HEADER, s.log_rows)?;
            truncate_csv(&run.eval(), EVAL_HEADER, s.eval_rows)?;
            s
        }
        None => {
            write_atomically(&run.log(), format!("{LOG_HEADER}\n").as_bytes())?;
            write_atomically(&run.eval(), format!("{EVAL_HEADER}\n").as_bytes())?;
            LoopState { spec_id: id.to_string(), ..Default::default() }
        }
    };
    bar.set_length(spec.updates);
    bar.set_position(state.step);
    let mut last_eval = (f64::NAN, f64::NAN, f64::NAN);
    let (mut best_loss, mut best_acc) = (f64::INFINITY, f64::NEG_INFINITY);
    // Best-so-far survives a resume: recompute from eval.csv.
    if let Ok(text) = std::fs::read_to_string(run.eval()) {
        for line in text.lines().skip(1) {
            let cells: Vec<f64> = line.split(',').map(|c| c.parse().unwrap_or(f64::NAN)).collect();
            if cells.len() == 4 {
                best_loss = best_loss.min(cells[2]);
                best_acc = best_acc.max(cells[3]);
                last_eval = (cells[1], cells[2], cells[3]);
            }
        }
    }
    let unit = if matches!(tr.work, Workload::Lm { .. }) { "tok" } else { "img" };
    let mut done_here = 0u64;
    while state.step < spec.updates {
        if pause_after.is_some_and(|p| done_here >= p) {
            save_checkpoint(run, &tr.work, &tr.opt, &state)?;
            return Ok(None);
        }
        done_here += 1;
        let t0 = Instant::now();
        let out = tr.step(state.step)?;
        let dt = t0.elapsed().as_secs_f64();
        state.elapsed_s += dt;
        state.items += out.items as u64;
        state.step += 1;
        state.loss_sum += out.loss;
        state.loss_count += 1;
        let fmt = |a: &[f64; 6]| a.iter().map(|v| format!("{v:e}")).collect::<Vec<_>>().join(",");
        let row = format!(
            "{},{:e},{},{},{},{},{:.1},{:.3}",
            state.step,
            out.lr,
            out.loss,
            out.grad_norm,
            fmt(&out.coefficients),
            fmt(&out.hypergradient),
            out.items as f64 / dt,
            state.elapsed_s
        );
        append(&run.log(), &row)?;
        state.log_rows += 1;
        bar.set_position(state.step);
        bar.set_message(format!("loss {:.4} {:.0} {unit}/s", out.loss, out.items as f64 / dt));

        let last = state.step == spec.updates;
        if state.step % spec.eval_interval == 0 || last {
            let (eval_loss, acc_v) = tr.work.evaluate()?;
            let train_loss = match tr.work.train_estimate()? {
                Some(t) => t,
                None => state.loss_sum / state.loss_count.max(1) as f64,
            };
            state.loss_sum = 0.0;
            state.loss_count = 0;
            if !eval_loss.is_finite() {
                bail!("update {}: the evaluation loss is {eval_loss}", state.step);
            }
            append(&run.eval(), &format!("{},{train_loss},{eval_loss},{acc_v}", state.step))?;
            state.eval_rows += 1;
            best_loss = best_loss.min(eval_loss);
            best_acc = best_acc.max(acc_v);
            last_eval = (train_loss, eval_loss, acc_v);
        }
        if state.step % spec.checkpoint_interval == 0 || last {
            save_checkpoint(run, &tr.work, &tr.opt, &state)?;
        }
    }
    let result = RunResult {
        spec_id: id.to_string(),
        label: spec.label.clone(),
        updates: state.step,
        final_eval_loss: last_eval.1,
        best_eval_loss: best_loss,
        final_eval_accuracy: last_eval.2,
        best_eval_accuracy: if best_acc.is_finite() { best_acc } else { f64::NAN },
        final_train_loss: last_eval.0,
        final_coefficients: tr.opt.optimizer().as_mada().map(|m| m.coefficients().to_array()),
        items_per_s: state.items as f64 / state.elapsed_s.max(1e-9),
        elapsed_s: state.elapsed_s,
        params: tr.work.params().num_params(),
        optimizer_state_bytes_per_param: tr.opt.optimizer().state_bytes_per_param(),
    };
    write_atomically(&run.result(), serde_json::to_string_pretty(&result)?.as_bytes())?;
    Ok(Some(result))
}
