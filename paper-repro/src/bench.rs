//! `just bench-train`: throughput of a training step (forward, backward, the optimizer) for the
//! CPU-tier models, with Adam and with MADA (all six coefficients learned), and where the time
//! goes. Printed lines include `baby-gpt tokens/s (adam): X`, `baby-gpt tokens/s (mada): X`,
//! `cnn images/s (adam): X`, … as the issue asks.

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
    for (name, opt) in [("adam", ADAM), ("mada", MADA)] {
        let spec = base(lm(), opt, 8);
        let (tps, model, optim) = measure(&spec, steps)?;
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
            println!("{model_name} images/s ({name}): {ips:.0}");
            println!("  batch 128: forward+backward {:.0} ms, optimizer {:.1} ms", m * 1e3, o * 1e3);
        }
    }
    println!("(PyTorch reference on the same machine: paper-repro/bench/pytorch_baby_gpt.py)");
    Ok(())
}
