//! `just bench-train`: throughput of a training step (forward, backward, the optimizer) for the
//! CPU-tier models, with Adam and with MADA (all six coefficients learned), and where the time
//! goes. Printed lines include `baby-gpt tokens/s (adam): X`, `baby-gpt tokens/s (mada): X`,
//! `cnn images/s (adam): X`, … and, when a Python with torch is found (`MADA_TORCH_PYTHON`, else
//! `python3`), the same models' steps in PyTorch on the same threads, timed in the same run, as
//! `baby-gpt ours/pytorch: R`, `cnn ours/pytorch: R`, `resnet ours/pytorch: R` (ours with Adam).
//! The PyTorch scripts are `paper-repro/bench/*.py`, embedded in the binary.

use std::path::Path;

use anyhow::Result;

use crate::data::text::{prepare, Tokenizer};
use crate::data::vision::VisionData;
use crate::models::gpt::GptConfig;
use crate::models::vision::VisionModelConfig;
use crate::run::spec::{ClipMode, DeviceKind, Precision, RunSpec, Schedule, Task, TextData};
use crate::run::Trainer;

const ADAM: &str = r#"{"name": "adam", "beta1": 0.9, "beta2": 0.99, "eps": 1e-8}"#;
const MADA: &str = r#"{"name": "mada", "eps": 1e-8, "coefficients": {"beta1": 0.9, "beta2": 0.99, "beta3": 0.0, "rho": 1.0, "c": 1.0, "gamma": 1.0},
    "hyper": {"lr": {"beta1": 0.0025, "beta2": 0.0025, "beta3": 0.0025, "rho": 0.0025, "c": 0.0025, "gamma": 0.0025}, "momentum": {"beta1": 0.5, "beta2": 0.5, "beta3": 0.5, "rho": 0.5, "c": 0.5}, "clip": 10.0}}"#;

fn base(task: Task, optimizer: &str, batch: usize) -> RunSpec {
    RunSpec {
        label: "bench".into(),
        task,
        optimizer: serde_json::from_str(optimizer).expect("valid optimizer"),
        schedule: Schedule { lr: 1e-3, min_lr: 1e-4, warmup: 0, decay_until: 0, in_micro_steps: false },
        updates: 1000,
        batch_size: batch,
        grad_accum: 1,
        weight_decay: 0.1,
        grad_clip: 1.0,
        seed: 1,
        eval_interval: 1000,
        checkpoint_interval: 1000,
        device: DeviceKind::Cpu,
        ranks: 1,
        clip_mode: ClipMode::Global,
        precision: Precision::Fp32,
    }
}

/// Median over `steps` updates (after one warm-up update) of items/s, model and optimizer time.
fn measure(spec: &RunSpec, steps: u64) -> Result<(f64, f64, f64)> {
    let mut tr = Trainer::new(spec)?;
    tr.step(0)?;
    let mut samples = Vec::new();
    for s in 1..=steps {
        let t = std::time::Instant::now();
        let out = tr.step(s)?;
        samples.push((out.items as f64 / t.elapsed().as_secs_f64(), out.model_s, out.optimizer_s));
    }
    samples.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(samples[samples.len() / 2])
}

/// The forward matrix products of one baby-GPT layer at batch 8 × 256 tokens (q|k|v, attention
/// output, MLP in, MLP out): (rows, inner, cols).
const BABY_GPT_MATMULS: [(usize, usize, usize); 4] =
    [(2048, 384, 1152), (2048, 384, 384), (2048, 384, 1536), (2048, 1536, 384)];

/// GFLOP/s of candle's CPU matmul (the `gemm` crate) on the baby GPT's layer shapes, median of
/// `reps`: the ceiling the rest of a training step is measured against.
fn matmul_gflops(reps: usize) -> Result<f64> {
    use candle_core::{Device, Tensor};
    let dev = Device::Cpu;
    let pairs: Vec<(Tensor, Tensor)> = BABY_GPT_MATMULS
        .iter()
        .map(|&(m, k, n)| Ok((Tensor::randn(0f32, 1.0, (m, k), &dev)?, Tensor::randn(0f32, 1.0, (k, n), &dev)?)))
        .collect::<Result<_>>()?;
    let flops: f64 = BABY_GPT_MATMULS.iter().map(|&(m, k, n)| 2.0 * (m * k * n) as f64).sum();
    let mut rates = Vec::with_capacity(reps);
    for _ in 0..=reps {
        let t = std::time::Instant::now();
        for (a, b) in &pairs {
            std::hint::black_box(a.matmul(b)?);
        }
        rates.push(flops / t.elapsed().as_secs_f64() / 1e9);
    }
    rates.remove(0); // warm-up
    rates.sort_by(f64::total_cmp);
    Ok(rates[rates.len() / 2])
}

const PYTORCH_BABY_GPT: &str = include_str!("../bench/pytorch_baby_gpt.py");
const PYTORCH_VISION: &str = include_str!("../bench/pytorch_vision.py");

/// A Python that imports torch: `MADA_TORCH_PYTHON`, else `python3` (None: PyTorch's side is
/// skipped, with a line saying so).
fn torch_python() -> Option<String> {
    let python = std::env::var("MADA_TORCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = std::process::Command::new(&python)
        .args(["-c", "import torch"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(python)
}

/// Run one embedded PyTorch script on `threads` threads and read the number after `key: ` in
/// its output.
fn pytorch_rate(python: &str, scratch: &Path, script: &str, args: &[&str], key: &str, threads: usize) -> Result<f64> {
    use anyhow::Context;
    let path = scratch.join("bench.py");
    std::fs::write(&path, script)?;
    let out = std::process::Command::new(python)
        .arg(&path)
        .args(args)
        .env("OMP_NUM_THREADS", threads.to_string())
        .env("MKL_NUM_THREADS", threads.to_string())
        .output()
        .with_context(|| format!("cannot run {python}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        anyhow::bail!("the PyTorch benchmark failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    text.lines()
        .find_map(|l| l.split_once(key).and_then(|(_, v)| v.trim_start_matches(':').trim().parse::<f64>().ok()))
        .with_context(|| format!("no `{key}` line in the PyTorch benchmark's output: {text}"))
}

/// Run the benchmark; `data` is a scratch folder for the benchmark's corpus.
pub fn run(scratch: &Path, steps: u64) -> Result<()> {
    let macbeth = crate::data::embedded::MACBETH.to_string();
    let corpus = scratch.join("bench-char");
    let meta = prepare(&[macbeth], Tokenizer::Char, &corpus, "macbeth")?;
    let threads = rayon::current_num_threads();
    println!("training-step benchmark: {threads} threads, median of {steps} updates");
    println!("matmul GFLOP/s (baby-gpt layer shapes): {:.0}", matmul_gflops(20)?);
    // The baby GPT of nanoGPT's shakespeare_char (its 65 characters; Macbeth has a few more).
    let mut baby = GptConfig::baby_char(meta.vocab.size());
    baby.dropout = 0.0;
    let lm = || Task::Lm {
        data: TextData { dir: corpus.clone() },
        model: baby.clone(),
        init_from: None,
        init_from_hf: false,
        eval_chunks: 1,
        eval_batch: 1,
    };
    let mut ours = Vec::new();
    for (name, opt) in [("adam", ADAM), ("mada", MADA)] {
        let spec = base(lm(), opt, 8);
        let (tps, model, optim) = measure(&spec, steps)?;
        if name == "adam" {
            ours.push(("baby-gpt", tps));
        }
        println!("baby-gpt tokens/s ({name}): {tps:.0}");
        println!("  batch 8 × 256 tokens: forward+backward {:.0} ms, optimizer (hyper-gradient, clip, decay, update) {:.1} ms", model * 1e3, optim * 1e3);
    }
    let fashion = scratch.join("fashion-mnist-mini");
    crate::data::embedded::write_fashion_mnist_mini(&fashion)?;
    for (model_name, model) in [
        ("cnn", VisionModelConfig::cnn()),
        ("resnet", VisionModelConfig::Resnet { blocks: vec![1, 1, 1], widths: vec![16, 32, 64] }),
    ] {
        for (name, opt) in [("adam", ADAM), ("mada", MADA)] {
            let task = Task::Vision {
                data: VisionData::FashionMnist { dir: fashion.clone() },
                model: model.clone(),
                train_subset: 0,
                test_subset: 0,
            };
            let (ips, m, o) = measure(&base(task, opt, 128), steps)?;
            if name == "adam" {
                ours.push((model_name, ips));
            }
            println!("{model_name} images/s ({name}): {ips:.0}");
            println!("  batch 128: forward+backward {:.0} ms, optimizer {:.1} ms", m * 1e3, o * 1e3);
        }
    }
    let Some(python) = torch_python() else {
        println!("pytorch: not importable (set MADA_TORCH_PYTHON to a Python with torch); no ratios");
        return Ok(());
    };
    let steps_arg = steps.max(3).to_string();
    for (model_name, rate) in ours {
        let theirs = match model_name {
            "baby-gpt" => {
                pytorch_rate(&python, scratch, PYTORCH_BABY_GPT, &["8", &steps_arg], "tokens/s (adamw)", threads)?
            }
            m => pytorch_rate(&python, scratch, PYTORCH_VISION, &[m, "128", &steps_arg], "images/s (adam)", threads)?,
        };
        println!("{model_name} pytorch: {theirs:.0}");
        println!("{model_name} ours/pytorch: {:.2}", rate / theirs);
    }
    Ok(())
}
