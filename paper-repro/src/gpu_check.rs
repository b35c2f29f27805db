//! `paper-repro gpu-check` (`just gpu-check`): the one short check of the GPU path that needs a
//! GPU. On the first CUDA device, against the CPU of the same machine:
//!
//! 1. the device and its driver;
//! 2. a 2-layer GPT's loss and every parameter's gradient (CUDA runs the composed candle
//!    operators, the CPU its fused kernels), in fp32 and with TF32 matrix products;
//! 3. 20 updates of every optimizer of [`mada::candle::EVERY_OPTIMIZER`] (MADA learning all six
//!    coefficients among them) on CUDA (the device-resident path) against the CPU's fused
//!    kernels, over parameters that include one tensor of GPT-2's embedding size (50304 × 768 =
//!    38.6M elements), with identical gradients uploaded to both;
//! 4. GPT-2 124M: one 12 × 1024-token micro-batch forward+backward in fp32 and TF32, the MADA
//!    step over all its parameters, the projected time of one official update (40 micro-batches:
//!    train_ddp's 8 GPUs × 5 accumulation steps on one GPU) and of a 100K-update paper run;
//!    the peak device memory seen.
//!
//! 5. with the `nccl` feature, the NCCL data-parallel path in a world of one process: the
//!    gradients' all-reduce on the device (the sum of one rank, which must return the input
//!    exactly) and the parameter-checksum agreement.
//!
//! It writes `gpu-check.json` into the output folder, prints a summary, and fails (exit 1) when
//! a comparison exceeds its stated tolerance. Built without `cuda`, or on a machine without a
//! usable CUDA device, it says so in one line and succeeds.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer as _;
use mada::candle::{gradient_store, VarOptimizer, EVERY_OPTIMIZER};
use mada::{AnyOptimizer, OptimizerSpec};
use serde::Serialize;

use crate::models::gpt::{Gpt, GptConfig};
use crate::run::spec::Precision;
use crate::run::workload::set_precision;

/// Tolerances, as relative norms ‖a − b‖₂ / ‖a‖₂ per tensor (CPU result `a`, CUDA result `b`).
/// fp32: both sides round every product and sum to f32, in different orders (blocked GEMMs,
/// tree reductions), so ~1e-6 is the expected level; TF32 rounds matrix-product inputs to 10
/// mantissa bits (relative 2⁻¹¹ ≈ 4.9e-4 per input), so the loss moves by ~1e-4 and the
/// gradients, products of several such matrices, by ~1e-3.
pub const GPT_FP32: Tolerance = Tolerance { loss: 1e-5, grad: 1e-4 };
/// See [`GPT_FP32`].
pub const GPT_TF32: Tolerance = Tolerance { loss: 2e-3, grad: 2e-2 };
/// The optimizers: elementwise formulas in the same order on both sides (nvcc without fast
/// math rounds +, ×, ÷, √ as IEEE does, but may contract x·a + b into one FMA), so after 20
/// updates the parameters differ by a few ulps where the coefficients are fixed. MADA's
/// hyper-gradient sums are reduced in f64 on both sides, in different orders, and its learned
/// coefficients feed back into every element: 1e-5 covers both (f32's ulp is 1.2e-7). Each
/// tensor's difference is measured against the larger of its norm and its initial norm
/// ([`difference_at_scale`]), so a parameter carried close to zero is not judged by a vanishing
/// denominator.
pub const OPTIMIZER_REL: f64 = 1e-5;

/// The updates each optimizer runs in the check.
pub const OPTIMIZER_UPDATES: usize = 20;

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Tolerance {
    pub loss: f64,
    pub grad: f64,
}

#[derive(Debug, Serialize)]
pub struct DeviceFacts {
    pub name: String,
    pub compute_capability: String,
    pub total_memory_bytes: u64,
    /// `cuDriverGetVersion`, as major.minor.
    pub driver_cuda_version: String,
}

#[derive(Debug, Serialize)]
pub struct GptComparison {
    pub precision: Precision,
    pub loss_reference: f64,
    pub loss_relative_difference: f64,
    /// The largest per-parameter ‖Δgrad‖/‖grad‖, and which parameter.
    pub grad_max_relative_difference: f64,
    pub grad_worst_parameter: String,
    pub tolerance: Tolerance,
    pub pass: bool,
}

#[derive(Debug, Serialize)]
pub struct OptimizerComparison {
    pub spec: serde_json::Value,
    pub updates: usize,
    pub elements: usize,
    /// The largest per-tensor ‖Δp‖/‖p‖ after any update.
    pub max_relative_difference: f64,
    /// MADA: the largest |Δq| over the six learned coefficients after any update.
    pub coefficient_max_difference: Option<f64>,
    pub pass: bool,
}

#[derive(Debug, Serialize)]
pub struct Gpt2Timing {
    pub micro_batch_tokens: usize,
    pub forward_backward_s_fp32: f64,
    pub forward_backward_s_tf32: f64,
    /// The MADA step (hyper-gradient, coefficient update and parameter update) over all 124M
    /// parameters, state on the device.
    pub optimizer_step_s: f64,
    pub micro_batches_per_update: usize,
    pub projected_update_s_fp32: f64,
    pub projected_update_s_tf32: f64,
    pub projected_100k_updates_h_fp32: f64,
    pub projected_100k_updates_h_tf32: f64,
}

#[derive(Debug, Serialize)]
pub struct GpuCheck {
    pub device: DeviceFacts,
    pub gpt: Vec<GptComparison>,
    pub optimizers: Vec<OptimizerComparison>,
    pub gpt2_124m: Gpt2Timing,
    /// The NCCL path in a world of one: what it did, or why it did not run.
    pub nccl: NcclCheck,
    /// Total minus the least free memory sampled during the check (other processes included).
    pub peak_memory_bytes: u64,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct NcclCheck {
    pub ran: bool,
    /// Elements all-reduced (in two tensors) and whether the sum of one rank returned them
    /// bit for bit.
    pub elements: usize,
    pub exact: bool,
    pub note: String,
}

/// Step 5: the NCCL backend's collectives in a world of one on `device`.
#[cfg(feature = "nccl")]
fn check_nccl(device: &Device) -> Result<NcclCheck> {
    use crate::parallel::{nccl::Nccl, Collective};
    let nccl = Nccl::alone(device)?;
    let a = Tensor::randn(0f32, 1.0, (1024, 768), device)?;
    let b = Tensor::randn(0f32, 1.0, 4097, device)?;
    let summed = nccl.sum_tensors(&[a.clone(), b.clone()])?;
    let same = |x: &Tensor, y: &Tensor| -> Result<bool> {
        Ok(x.flatten_all()?.to_vec1::<f32>()? == y.flatten_all()?.to_vec1::<f32>()?)
    };
    let exact = same(&a, &summed[0])? && same(&b, &summed[1])? && nccl.agree(0x1234_5678_9abc_def0)?;
    let mut host = [1.5f64, -2.0];
    nccl.sum_f64(&mut host)?;
    Ok(NcclCheck {
        ran: true,
        elements: a.elem_count() + b.elem_count(),
        exact: exact && host == [1.5, -2.0],
        note: "world of one".into(),
    })
}

#[cfg(not(feature = "nccl"))]
fn check_nccl(_: &Device) -> Result<NcclCheck> {
    Ok(NcclCheck {
        ran: false,
        elements: 0,
        exact: false,
        note: "not built (feature nccl, which links libnccl)".into(),
    })
}

/// ‖a − b‖₂ / ‖a‖₂ (0 when both are 0), in f64 on `b`'s device (`a` is copied there: on a
/// GPU the 38.6M-element comparison takes milliseconds instead of seconds on the host).
pub fn relative_difference(a: &Tensor, b: &Tensor) -> Result<f64> {
    difference_at_scale(a, b, 0.0)
}

/// ‖a − b‖₂ / max(‖a‖₂, `scale`): [`relative_difference`], measured against at least the
/// tensor's own scale (its initial norm) when `a` has moved close to zero.
pub fn difference_at_scale(a: &Tensor, b: &Tensor, scale: f64) -> Result<f64> {
    let a = a.to_device(b.device())?.to_dtype(DType::F64)?.flatten_all()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?;
    let diff = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let norm = a.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(if diff == 0.0 { 0.0 } else { diff / norm.max(scale).max(f64::MIN_POSITIVE) })
}

/// The small GPT both devices run: 2 layers, 4 heads, 128 wide, 64 tokens of a 256-symbol
/// vocabulary, no dropout.
pub fn small_gpt() -> GptConfig {
    GptConfig { block_size: 64, vocab_size: 256, n_layer: 2, n_head: 4, n_embd: 128, dropout: 0.0, bias: true }
}

fn tokens(batch: usize, len: usize, vocab: usize, salt: usize, device: &Device) -> Result<Tensor> {
    let ids: Vec<u32> = (0..batch * len).map(|i| ((i * 7919 + salt * 104729) % vocab) as u32).collect();
    Ok(Tensor::from_vec(ids, (batch, len), device)?)
}

/// The loss and gradients of one micro-batch of [`small_gpt`] on `reference` and `target`
/// (parameters from one seed, initialised on the host), compared.
pub fn compare_gpt(reference: &Device, target: &Device, precision: Precision) -> Result<GptComparison> {
    let tolerance = match precision {
        Precision::Fp32 => GPT_FP32,
        Precision::Tf32 => GPT_TF32,
    };
    let run = |device: &Device| -> Result<(f64, Vec<(String, Tensor)>)> {
        let gpt = Gpt::new(small_gpt(), device, 7)?;
        let (idx, targets) = (tokens(4, 64, 256, 1, device)?, tokens(4, 64, 256, 2, device)?);
        let loss = gpt.loss(&idx, &targets, true)?;
        let grads = loss.backward()?;
        let named = gpt
            .params
            .params()
            .iter()
            .map(|(name, v)| {
                let g = grads.get(v.as_tensor()).with_context(|| format!("no gradient for {name}"))?;
                Ok((name.clone(), g.clone()))
            })
            .collect::<Result<_>>()?;
        Ok((loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, named))
    };
    set_precision(Precision::Fp32);
    let (loss_a, grads_a) = run(reference)?;
    set_precision(precision);
    let outcome = run(target);
    set_precision(Precision::Fp32);
    let (loss_b, grads_b) = outcome?;
    let mut worst = (0.0, String::new());
    for ((name, a), (_, b)) in grads_a.iter().zip(&grads_b) {
        let d = relative_difference(a, b)?;
        if d >= worst.0 {
            worst = (d, name.clone());
        }
    }
    let loss_relative_difference = (loss_a - loss_b).abs() / loss_a.abs();
    Ok(GptComparison {
        precision,
        loss_reference: loss_a,
        loss_relative_difference,
        grad_max_relative_difference: worst.0,
        grad_worst_parameter: worst.1,
        tolerance,
        pass: loss_relative_difference <= tolerance.loss && worst.0 <= tolerance.grad,
    })
}

/// The check's parameters: initial values and four gradient sets cycled through the updates
/// (host tensors, uploaded to each device). `big` elements make the first tensor (GPT-2's
/// embedding size in the real check); one gradient set has exact zeros.
pub struct OptimizerProblem {
    pub initial: Vec<Tensor>,
    pub gradients: [Vec<Tensor>; 4],
}

impl OptimizerProblem {
    pub fn new(big: usize) -> Result<Self> {
        let cpu = Device::Cpu;
        let shapes: Vec<Vec<usize>> = vec![vec![big], vec![64, 48], vec![257], vec![1]];
        let initial =
            shapes.iter().map(|s| Ok(Tensor::randn(0f32, 0.5, s.as_slice(), &cpu)?)).collect::<Result<_>>()?;
        let set = |k: usize| -> Result<Vec<Tensor>> {
            shapes
                .iter()
                .map(|s| {
                    let g = Tensor::randn(0f32, 1.0, s.as_slice(), &cpu)?.affine(0.1 * (k + 1) as f64, 0.0)?;
                    // Set 3: every other element exactly zero (sign(0) = 0 and v's floor matter).
                    Ok(if k == 3 { g.relu()? } else { g })
                })
                .collect()
        };
        Ok(Self { initial, gradients: [set(0)?, set(1)?, set(2)?, set(3)?] })
    }

    pub fn elements(&self) -> usize {
        self.initial.iter().map(|t| t.elem_count()).sum()
    }
}

fn optimizer_on(
    device: &Device,
    problem: &OptimizerProblem,
    spec: &OptimizerSpec,
    device_path_on_cpu: bool,
) -> Result<VarOptimizer<f32, AnyOptimizer<f32>>> {
    let vars = problem.initial.iter().map(|t| Ok(Var::from_tensor(&t.to_device(device)?)?)).collect::<Result<_>>()?;
    let opt = VarOptimizer::with_optimizer(vars, AnyOptimizer::<f32>::from_spec(spec)?, 1e-2)?;
    Ok(if device_path_on_cpu { opt.with_device_path_on_cpu() } else { opt })
}

/// [`OPTIMIZER_UPDATES`] updates of `spec` on `reference` (fused kernels when it is the CPU)
/// and on `target` (the device path; forced onto the CPU device with `device_path_on_cpu`, which
/// is how the tests run this check without a GPU), parameters compared after every update.
pub fn compare_optimizer(
    reference: &Device,
    target: &Device,
    device_path_on_cpu: bool,
    problem: &OptimizerProblem,
    spec_json: &str,
) -> Result<OptimizerComparison> {
    let spec: OptimizerSpec = serde_json::from_str(spec_json).context("optimizer spec")?;
    let mut a = optimizer_on(reference, problem, &spec, false)?;
    let mut b = optimizer_on(target, problem, &spec, device_path_on_cpu)?;
    // The four gradient sets, uploaded once to each device.
    let on = |device: &Device| -> Result<Vec<Vec<Tensor>>> {
        problem.gradients.iter().map(|set| set.iter().map(|g| Ok(g.to_device(device)?)).collect()).collect()
    };
    let (grads_a, grads_b) = (on(reference)?, on(target)?);
    // Each tensor's scale: its initial norm. A parameter that an update carries near zero (the
    // 1-element tensor can land at 1e-3) would otherwise turn f32 rounding of the same size as
    // everywhere else into a large relative difference (a 1–2% spurious failure rate).
    let scales: Vec<f64> = problem
        .initial
        .iter()
        .map(|t| Ok(t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt()))
        .collect::<Result<_>>()?;
    let (mut worst, mut worst_q): (f64, Option<f64>) = (0.0, None);
    for update in 0..OPTIMIZER_UPDATES {
        let sa = gradient_store(a.vars(), &grads_a[update % 4])?;
        let sb = gradient_store(b.vars(), &grads_b[update % 4])?;
        let ha = a.mada_hypergradient(&sa)?;
        let hb = b.mada_hypergradient(&sb)?;
        // As the trainer takes an update: the hyper-gradient on the new gradients, the
        // coefficient step, then the parameter update; each side from its own hyper-gradient.
        if let (Some(ha), Some(hb)) = (ha, hb) {
            a.apply_mada_hypergradient(ha)?;
            b.apply_mada_hypergradient(hb)?;
        }
        let lr = 1e-2 * (1.0 + 0.05 * update as f64);
        a.set_learning_rate(lr);
        b.set_learning_rate(lr);
        a.update(&sa)?;
        b.update(&sb)?;
        for ((va, vb), &scale) in a.vars().iter().zip(b.vars()).zip(&scales) {
            worst = worst.max(difference_at_scale(va.as_tensor(), vb.as_tensor(), scale)?);
        }
        if let (AnyOptimizer::Mada(ma), AnyOptimizer::Mada(mb)) = (a.optimizer(), b.optimizer()) {
            let (qa, qb) = (ma.coefficients().to_array(), mb.coefficients().to_array());
            let d = qa.iter().zip(qb).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
            worst_q = Some(worst_q.unwrap_or(0.0).max(d));
        }
    }
    Ok(OptimizerComparison {
        spec: serde_json::from_str(spec_json)?,
        updates: OPTIMIZER_UPDATES,
        elements: problem.elements(),
        max_relative_difference: worst,
        coefficient_max_difference: worst_q,
        pass: worst <= OPTIMIZER_REL && worst_q.unwrap_or(0.0) <= OPTIMIZER_REL,
    })
}

/// Where the check runs: CUDA device 0 and its facts, or why not.
#[cfg(feature = "cuda")]
fn cuda_device() -> std::result::Result<(Device, DeviceFacts), String> {
    let device = Device::new_cuda(0).map_err(|e| format!("no usable CUDA device ({e})"))?;
    let facts = (|| -> Result<DeviceFacts> {
        let cuda = device.as_cuda_device()?;
        let stream = cuda.cuda_stream();
        let ctx = stream.context();
        let (major, minor) = ctx.compute_capability()?;
        let mut version = 0i32;
        // SAFETY: cuDriverGetVersion writes one int through the pointer it is given.
        unsafe { candle_core::cuda_backend::cudarc::driver::sys::cuDriverGetVersion(&mut version) }.result()?;
        Ok(DeviceFacts {
            name: ctx.name()?,
            compute_capability: format!("{major}.{minor}"),
            total_memory_bytes: ctx.total_mem()? as u64,
            driver_cuda_version: format!("{}.{}", version / 1000, (version % 1000) / 10),
        })
    })()
    .map_err(|e| format!("cannot read the CUDA device's facts ({e})"))?;
    Ok((device, facts))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> std::result::Result<(Device, DeviceFacts), String> {
    Err("this build has no CUDA (build with `--features cuda`: `just gpu-bundle`)".into())
}

/// Least free device memory seen so far (CUDA; nothing elsewhere).
struct MemoryWatch {
    least_free: u64,
    total: u64,
}

impl MemoryWatch {
    fn sample(&mut self, device: &Device) {
        #[cfg(feature = "cuda")]
        if let Ok(cuda) = device.as_cuda_device() {
            if let Ok((free, total)) = cuda.cuda_stream().context().mem_get_info() {
                self.least_free = self.least_free.min(free as u64);
                self.total = total as u64;
            }
        }
        #[cfg(not(feature = "cuda"))]
        let _ = device;
    }

    fn peak_used(&self) -> u64 {
        self.total.saturating_sub(self.least_free)
    }
}

/// Median seconds of `reps` runs of `f` after one warm-up, the device synchronised around each.
fn time(device: &Device, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    device.synchronize()?;
    let mut samples = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        device.synchronize()?;
        samples.push(t.elapsed().as_secs_f64());
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[reps / 2])
}

/// The official single-GPU-equivalent update: 8 ranks × 5 accumulation steps of 12 × 1024.
const MICRO_BATCHES_PER_UPDATE: usize = 40;

fn time_gpt2(device: &Device, watch: &mut MemoryWatch) -> Result<Gpt2Timing> {
    let cfg = GptConfig::gpt2_124m();
    let gpt = Gpt::new(cfg.clone(), device, 1)?;
    let (b, t) = (12, cfg.block_size);
    let idx = tokens(b, t, cfg.vocab_size, 3, device)?;
    let targets = tokens(b, t, cfg.vocab_size, 4, device)?;
    let mut last_grads = None;
    let fwd_bwd = |precision: Precision, watch: &mut MemoryWatch, last: &mut Option<GradStore>| {
        set_precision(precision);
        let s = time(device, 3, || {
            let loss = gpt.loss(&idx, &targets, true)?;
            watch.sample(device);
            *last = Some(loss.backward()?);
            watch.sample(device);
            Ok(())
        });
        set_precision(Precision::Fp32);
        s
    };
    let fp32 = fwd_bwd(Precision::Fp32, watch, &mut last_grads)?;
    let tf32 = fwd_bwd(Precision::Tf32, watch, &mut last_grads)?;
    let grads = last_grads.context("no gradients")?;
    // MADA learning all six coefficients (the first MADA spec with a hyper-optimizer).
    let mada = EVERY_OPTIMIZER.iter().find(|s| s.contains(r#""mada""#) && s.contains(r#""hyper""#));
    let spec: OptimizerSpec = serde_json::from_str(mada.context("no learning MADA spec")?)?;
    let mut opt = VarOptimizer::with_optimizer(gpt.params.vars(), AnyOptimizer::<f32>::from_spec(&spec)?, 6e-4)?;
    let step = time(device, 5, || {
        if let Some(h) = opt.mada_hypergradient(&grads)? {
            opt.apply_mada_hypergradient(h)?;
        }
        opt.update(&grads)?;
        watch.sample(device);
        Ok(())
    })?;
    let per_update = |fb: f64| MICRO_BATCHES_PER_UPDATE as f64 * fb + step;
    Ok(Gpt2Timing {
        micro_batch_tokens: b * t,
        forward_backward_s_fp32: fp32,
        forward_backward_s_tf32: tf32,
        optimizer_step_s: step,
        micro_batches_per_update: MICRO_BATCHES_PER_UPDATE,
        projected_update_s_fp32: per_update(fp32),
        projected_update_s_tf32: per_update(tf32),
        projected_100k_updates_h_fp32: per_update(fp32) * 1e5 / 3600.0,
        projected_100k_updates_h_tf32: per_update(tf32) * 1e5 / 3600.0,
    })
}

/// GPT-2's token embedding: the largest tensor the paper's optimizer steps.
pub const BIG_TENSOR: usize = 50304 * 768;

/// The whole check; see the module documentation. Returns whether every comparison passed.
pub fn run(out: &Path) -> Result<bool> {
    let (device, facts) = match cuda_device() {
        Ok(found) => found,
        Err(why) => {
            println!("gpu-check: skipped: {why}");
            return Ok(true);
        }
    };
    let started = Instant::now();
    let mut watch = MemoryWatch { least_free: u64::MAX, total: 0 };
    watch.sample(&device);
    println!(
        "gpu-check: {} (compute capability {}, {:.1} GiB, driver CUDA {})",
        facts.name,
        facts.compute_capability,
        facts.total_memory_bytes as f64 / (1u64 << 30) as f64,
        facts.driver_cuda_version
    );
    let mut gpt = Vec::new();
    for precision in [Precision::Fp32, Precision::Tf32] {
        let c = compare_gpt(&Device::Cpu, &device, precision)?;
        println!(
            "gpu-check: gpt 2-layer {:?}: loss rel diff {:.2e} (≤ {:.0e}), grads max rel diff {:.2e} at {} (≤ {:.0e}): {}",
            precision,
            c.loss_relative_difference,
            c.tolerance.loss,
            c.grad_max_relative_difference,
            c.grad_worst_parameter,
            c.tolerance.grad,
            verdict(c.pass)
        );
        gpt.push(c);
    }
    watch.sample(&device);
    let problem = OptimizerProblem::new(BIG_TENSOR)?;
    let mut optimizers = Vec::new();
    for spec in EVERY_OPTIMIZER {
        let c = compare_optimizer(&Device::Cpu, &device, false, &problem, spec)?;
        watch.sample(&device);
        println!(
            "gpu-check: optimizer {}: {} updates over {} elements: max rel diff {:.2e}{} (≤ {:.0e}): {}",
            c.spec,
            c.updates,
            c.elements,
            c.max_relative_difference,
            c.coefficient_max_difference.map(|d| format!(", coefficients {d:.2e}")).unwrap_or_default(),
            OPTIMIZER_REL,
            verdict(c.pass)
        );
        optimizers.push(c);
    }
    drop(problem);
    let gpt2_124m = time_gpt2(&device, &mut watch)?;
    println!(
        "gpu-check: gpt2-124m micro-batch {} tokens fwd+bwd: fp32 {:.3} s, tf32 {:.3} s; MADA step {:.4} s",
        gpt2_124m.micro_batch_tokens,
        gpt2_124m.forward_backward_s_fp32,
        gpt2_124m.forward_backward_s_tf32,
        gpt2_124m.optimizer_step_s
    );
    println!(
        "gpu-check: projected per update ({} micro-batches): fp32 {:.2} s, tf32 {:.2} s; per 100K updates: fp32 {:.0} h, tf32 {:.0} h",
        gpt2_124m.micro_batches_per_update,
        gpt2_124m.projected_update_s_fp32,
        gpt2_124m.projected_update_s_tf32,
        gpt2_124m.projected_100k_updates_h_fp32,
        gpt2_124m.projected_100k_updates_h_tf32
    );
    let nccl = check_nccl(&device)?;
    if nccl.ran {
        println!("gpu-check: nccl world of one: {} elements all-reduced: {}", nccl.elements, verdict(nccl.exact));
    } else {
        println!("gpu-check: nccl: {}", nccl.note);
    }
    let report = GpuCheck {
        device: facts,
        nccl,
        peak_memory_bytes: watch.peak_used(),
        gpt,
        optimizers,
        gpt2_124m,
        seconds: started.elapsed().as_secs_f64(),
    };
    let pass = report.gpt.iter().all(|c| c.pass)
        && report.optimizers.iter().all(|c| c.pass)
        && (!report.nccl.ran || report.nccl.exact);
    println!("gpu-check: peak device memory {:.1} GiB", report.peak_memory_bytes as f64 / (1u64 << 30) as f64);
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let path = out.join("gpu-check.json");
    outputs::write_atomically(&path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    println!("gpu-check: {} in {:.0} s; wrote {}", verdict(pass), report.seconds, path.display());
    Ok(pass)
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "pass"
    } else {
        "FAIL"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The optimizer comparison, run where the tests run: the device path on the CPU device
    /// against the fused kernels — every optimizer within the tolerance the GPU must meet.
    #[test]
    fn every_optimizer_passes_on_the_cpu_device_path() {
        let problem = OptimizerProblem::new(1000).unwrap();
        for spec in EVERY_OPTIMIZER {
            let c = compare_optimizer(&Device::Cpu, &Device::Cpu, true, &problem, spec).unwrap();
            assert!(c.pass, "{spec}: {c:?}");
            assert_eq!(c.elements, 1000 + 64 * 48 + 257 + 1);
            assert_eq!(c.coefficient_max_difference.is_some(), spec.contains("mada"), "{spec}");
        }
    }

    /// The comparison can fail: a different learning rate schedule on one side is detected.
    #[test]
    fn the_optimizer_comparison_detects_a_different_optimizer() {
        let problem = OptimizerProblem::new(100).unwrap();
        let spec: OptimizerSpec = serde_json::from_str(EVERY_OPTIMIZER[2]).unwrap();
        let other: OptimizerSpec = serde_json::from_str(r#"{"name": "adam", "beta1": 0.9, "beta2": 0.999}"#).unwrap();
        let a = optimizer_on(&Device::Cpu, &problem, &spec, false).unwrap();
        let b = optimizer_on(&Device::Cpu, &problem, &other, true).unwrap();
        let (mut a, mut b) = (a, b);
        for u in 0..5 {
            let g = &problem.gradients[u % 4];
            a.step(&gradient_store(a.vars(), g).unwrap()).unwrap();
            b.step(&gradient_store(b.vars(), g).unwrap()).unwrap();
        }
        let d = relative_difference(a.vars()[1].as_tensor(), b.vars()[1].as_tensor()).unwrap();
        assert!(d > OPTIMIZER_REL, "{d}");
    }

    #[test]
    fn gpt_comparison_on_one_device_is_exact() {
        let c = compare_gpt(&Device::Cpu, &Device::Cpu, Precision::Fp32).unwrap();
        assert!(c.pass && c.loss_relative_difference == 0.0 && c.grad_max_relative_difference == 0.0, "{c:?}");
        assert!((c.loss_reference - (256f64).ln()).abs() < 0.5, "{c:?}");
    }

    #[test]
    fn relative_difference_is_a_relative_norm() {
        let a = Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap();
        let b = Tensor::new(&[3f32, 4.5], &Device::Cpu).unwrap();
        assert!((relative_difference(&a, &b).unwrap() - 0.1).abs() < 1e-12);
        assert_eq!(relative_difference(&a, &a).unwrap(), 0.0);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_cuda_the_check_says_so_and_writes_nothing() {
        let dir = std::env::temp_dir().join(format!("gpu-check-test-{}", std::process::id()));
        assert!(run(&dir).unwrap());
        assert!(!dir.exists());
    }
}
