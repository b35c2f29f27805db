//! `just bench-train`: throughput of a training step (forward, backward, the optimizer) for the
//! CPU-tier models, with Adam and with MADA (all six coefficients learned), and where the time
//! goes. Printed lines include `baby-gpt tokens/s (adam): X`, `baby-gpt tokens/s (mada): X`,
//! `cnn images/s (adam): X`, … and, when a Python with torch is found (`MADA_TORCH_PYTHON`, else
//! `python3`), the same models' steps in PyTorch on the same threads, timed in the same run in
//! `--rounds` alternating pairs (ours, then PyTorch's right after), as `baby-gpt ours/pytorch: R`,
//! `cnn ours/pytorch: R`, `resnet ours/pytorch: R` (ours with Adam; R the median of the pairs'
//! ratios, each pair's ratio on the line below it). Each baby-GPT round also times the layer
//! shapes' matrix products, ours and PyTorch's (`matmul GFLOP/s ours/pytorch (baby-gpt layer
//! shapes): R`), so a run shows whether the step's gap is the products' (which of the two
//! libraries' GEMM is faster depends on the host's instruction set) or the rest's. Below each
//! model's line, the median update's forward and backward time is split by fused-operator family
//! ([`OpTimes`]) and the rest. The PyTorch scripts are `paper-repro/bench/*.py`, embedded in the
//! binary.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::data::text::{prepare, Tokenizer};
use crate::data::vision::VisionData;
use crate::models::gpt::GptConfig;
use crate::models::ops::timing::OpTimes;
use crate::models::ops::ConvAlgorithm;
use crate::models::vision::VisionModelConfig;
use crate::run::spec::{ClipMode, DeviceKind, Precision, RunSpec, Schedule, Task, TextData};
use crate::run::Trainer;

const ADAM: &str = r#"{"name": "adam", "beta1": 0.9, "beta2": 0.99, "eps": 1e-8}"#;
const MADA: &str = r#"{"name": "mada", "eps": 1e-8, "coefficients": {"beta1": 0.9, "beta2": 0.99, "beta3": 0.0, "rho": 1.0, "c": 1.0, "gamma": 1.0},
    "hyper": {"lr": {"beta1": 0.0025, "beta2": 0.0025, "beta3": 0.0025, "rho": 0.0025, "c": 0.0025, "gamma": 0.0025}, "momentum": {"beta1": 0.5, "beta2": 0.5, "beta3": 0.5, "rho": 0.5, "c": 0.5}, "clip": 10.0}}"#;

/// The models `bench` times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchModel {
    BabyGpt,
    Cnn,
    Resnet,
}

impl BenchModel {
    /// The model's name in the printed lines (and the PyTorch vision script's argument).
    fn name(self) -> &'static str {
        match self {
            BenchModel::BabyGpt => "baby-gpt",
            BenchModel::Cnn => "cnn",
            BenchModel::Resnet => "resnet",
        }
    }
}

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

/// One timed update.
struct Sample {
    items_per_s: f64,
    model_s: f64,
    optimizer_s: f64,
    collective_s: f64,
    update_s: f64,
    /// The fused operators' forward and backward time in this update.
    ops: OpTimes,
}

/// `steps` timed updates of `tr`, after one warm-up update.
fn samples(tr: &mut Trainer, steps: u64) -> Result<Vec<Sample>> {
    tr.step(0)?;
    (1..=steps)
        .map(|s| {
            let ops_before = OpTimes::now();
            let t = std::time::Instant::now();
            let out = tr.step(s)?;
            let update_s = t.elapsed().as_secs_f64();
            Ok(Sample {
                ops: OpTimes::now().since(&ops_before, 1.0),
                items_per_s: out.items as f64 / update_s,
                model_s: out.model_s,
                optimizer_s: out.optimizer_s,
                collective_s: out.collective_s,
                update_s,
            })
        })
        .collect()
}

/// The median of one measure over the samples.
fn median(samples: &[Sample], of: impl Fn(&Sample) -> f64) -> f64 {
    median_of(samples.iter().map(of).collect())
}

/// The update of median items/s over `steps` updates (after one warm-up update).
fn measure(spec: &RunSpec, steps: u64) -> Result<Sample> {
    let mut s = samples(&mut Trainer::new(spec)?, steps)?;
    s.sort_by(|a, b| a.items_per_s.total_cmp(&b.items_per_s));
    Ok(s.swap_remove(s.len() / 2))
}

/// Where one update's forward and backward time went: the fused operators' families
/// (forward/backward) and the rest (candle's own operators and the backward's bookkeeping).
fn print_breakdown(update: &Sample) {
    println!(
        "  of which fused operators, forward/backward ms: {}; the rest {:.1} ms",
        update.ops.describe(),
        (update.model_s - update.ops.total()) * 1e3
    );
}

/// nanoGPT shakespeare_char's baby GPT (no dropout) on Macbeth, character-level, prepared into
/// `scratch` (its 65 characters; Macbeth has a few more).
fn baby_gpt_task(scratch: &Path) -> Result<Task> {
    let macbeth = crate::data::embedded::MACBETH.to_string();
    let corpus = scratch.join("bench-char");
    let meta = prepare(&[macbeth], Tokenizer::Char, &corpus, "macbeth")?;
    let mut baby = GptConfig::baby_char(meta.vocab.size());
    baby.dropout = 0.0;
    Ok(Task::Lm {
        data: TextData { dir: corpus },
        model: baby,
        init_from: None,
        init_from_hf: false,
        eval_chunks: 1,
        eval_batch: 1,
    })
}

/// The line (ours and the PyTorch script's) that gives the products' GFLOP/s.
const MATMUL_LINE: &str = "matmul GFLOP/s (baby-gpt layer shapes)";

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

/// Run one embedded PyTorch script on `threads` threads and read the number after each of `keys`
/// in its output, in the order of `keys`.
fn pytorch_rates<const K: usize>(
    python: &str,
    scratch: &Path,
    script: &str,
    args: &[&str],
    keys: [&str; K],
    threads: usize,
) -> Result<[f64; K]> {
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
    let mut rates = [0.0; K];
    for (rate, key) in rates.iter_mut().zip(keys) {
        *rate = number_after(&text, key)
            .with_context(|| format!("no `{key}` line in the PyTorch benchmark's output: {text}"))?;
    }
    Ok(rates)
}

/// The number after `key` (and an optional colon) on the first line of `text` that has one.
fn number_after(text: &str, key: &str) -> Option<f64> {
    text.lines().find_map(|l| l.split_once(key).and_then(|(_, v)| v.trim_start_matches(':').trim().parse::<f64>().ok()))
}

/// Ours against PyTorch in `rounds` alternating pairs: per round, ours and then PyTorch's step
/// right after it, so the host's drift (up to 2× over minutes on a shared machine, ±20% within
/// one) falls between the two of a pair as little as it can. `ours()` and `theirs()` each give
/// one measurement (items/s); the result holds the per-round pairs.
fn paired(
    rounds: usize,
    mut ours: impl FnMut() -> Result<f64>,
    mut theirs: impl FnMut() -> Result<f64>,
) -> Result<Vec<(f64, f64)>> {
    (0..rounds.max(1)).map(|_| Ok((ours()?, theirs()?))).collect()
}

/// The median of `v` (the upper one of an even count).
fn median_of(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Print ours, PyTorch's and the ratio for one model with Adam: the ratio is the median of the
/// rounds' own ratios (matched pairs), not a ratio of medians.
fn print_versus(model_name: &str, unit: &str, pairs: &[(f64, f64)]) {
    println!("{model_name} {unit} (adam): {:.0}", median_of(pairs.iter().map(|p| p.0).collect()));
    println!("{model_name} pytorch: {:.0}", median_of(pairs.iter().map(|p| p.1).collect()));
    println!("{model_name} ours/pytorch: {:.2}", median_of(pairs.iter().map(|p| p.0 / p.1).collect()));
    print_rounds(pairs);
}

/// The rounds' own ratios, on the line below a median of them.
fn print_rounds(pairs: &[(f64, f64)]) {
    let each: Vec<String> = pairs.iter().map(|p| format!("{:.2}", p.0 / p.1)).collect();
    println!("  {} rounds, ours then pytorch: ratios {}", pairs.len(), each.join(", "));
}

/// Print PyTorch's products' GFLOP/s on the baby GPT's layer shapes and ours against them, the
/// median of the rounds' own ratios as in [`print_versus`].
fn print_products_versus(pairs: &[(f64, f64)]) {
    println!("pytorch {MATMUL_LINE}: {:.0}", median_of(pairs.iter().map(|p| p.1).collect()));
    println!(
        "matmul GFLOP/s ours/pytorch (baby-gpt layer shapes): {:.2}",
        median_of(pairs.iter().map(|p| p.0 / p.1).collect())
    );
    print_rounds(pairs);
}

/// Run the benchmark of the `models` (all three when empty); `scratch` is a folder for the
/// benchmark's corpus and images. With PyTorch, Adam's step is timed against PyTorch's in
/// `rounds` alternating pairs.
pub fn run(scratch: &Path, steps: u64, rounds: usize, models: &[BenchModel], conv: ConvAlgorithm) -> Result<()> {
    let wanted = |m: BenchModel| models.is_empty() || models.contains(&m);
    let threads = rayon::current_num_threads();
    println!("training-step benchmark: {threads} threads, median of {steps} updates");
    println!("{MATMUL_LINE}: {:.0}", matmul_gflops(20)?);
    let python = torch_python();
    if python.is_none() {
        println!("pytorch: not importable (set MADA_TORCH_PYTHON to a Python with torch); no ratios");
    }
    let steps_arg = steps.max(3).to_string();
    // One optimizer's line for one model: ours alone, or, for Adam with torch found, paired with
    // PyTorch's in rounds.
    let timed = |bench_model: BenchModel, unit: &str, optimizer: &str, spec: &RunSpec| -> Result<Sample> {
        let model_name = bench_model.name();
        let mut detail = None;
        let mut ours = || {
            let update = measure(spec, steps)?;
            let ips = update.items_per_s;
            detail = Some(update);
            Ok(ips)
        };
        match (&python, optimizer) {
            (Some(python), "adam") if bench_model == BenchModel::BabyGpt => {
                // Each round also times the layer shapes' products, ours right before our step
                // and PyTorch's in its step's process: whether a gap is the products' or the rest's.
                let (mut our_products, mut their_products) = (Vec::new(), Vec::new());
                let ours_and_products = || {
                    our_products.push(matmul_gflops(10)?);
                    ours()
                };
                let theirs = || {
                    let [tokens, products] = pytorch_rates(
                        python,
                        scratch,
                        PYTORCH_BABY_GPT,
                        &["8", &steps_arg],
                        ["tokens/s (adamw)", MATMUL_LINE],
                        threads,
                    )?;
                    their_products.push(products);
                    Ok(tokens)
                };
                let pairs = paired(rounds, ours_and_products, theirs)?;
                print_versus(model_name, unit, &pairs);
                let products: Vec<(f64, f64)> = our_products.into_iter().zip(their_products).collect();
                print_products_versus(&products);
            }
            (Some(python), "adam") => {
                let theirs = || {
                    let [images] = pytorch_rates(
                        python,
                        scratch,
                        PYTORCH_VISION,
                        &[model_name, "128", &steps_arg],
                        ["images/s (adam)"],
                        threads,
                    )?;
                    Ok(images)
                };
                let pairs = paired(rounds, ours, theirs)?;
                print_versus(model_name, unit, &pairs);
            }
            _ => println!("{model_name} {unit} ({optimizer}): {:.0}", ours()?),
        }
        detail.context("no update was timed")
    };
    if wanted(BenchModel::BabyGpt) {
        let baby = baby_gpt_task(scratch)?;
        for (name, opt) in [("adam", ADAM), ("mada", MADA)] {
            let spec = base(baby.clone(), opt, 8);
            let update = timed(BenchModel::BabyGpt, "tokens/s", name, &spec)?;
            println!("  batch 8 × 256 tokens: forward+backward {:.0} ms, optimizer (hyper-gradient, clip, decay, update) {:.1} ms", update.model_s * 1e3, update.optimizer_s * 1e3);
            print_breakdown(&update);
        }
    }
    let fashion = scratch.join("fashion-mnist-mini");
    crate::data::embedded::write_fashion_mnist_mini(&fashion)?;
    for (bench_model, model) in [
        (BenchModel::Cnn, VisionModelConfig::Cnn { c1: 32, c2: 64, hidden: 128, conv }),
        (BenchModel::Resnet, VisionModelConfig::Resnet { blocks: vec![1, 1, 1], widths: vec![16, 32, 64], conv }),
    ]
    .into_iter()
    .filter(|(m, _)| wanted(*m))
    {
        println!("{}: convolutions by {}", bench_model.name(), conv.name());
        for (name, opt) in [("adam", ADAM), ("mada", MADA)] {
            let task = Task::Vision {
                data: VisionData::FashionMnist { dir: fashion.clone() },
                model: model.clone(),
                train_subset: 0,
                test_subset: 0,
            };
            let spec = base(task, opt, 128);
            let update = timed(bench_model, "images/s", name, &spec)?;
            println!(
                "  batch 128: forward+backward {:.0} ms, optimizer {:.1} ms",
                update.model_s * 1e3,
                update.optimizer_s * 1e3
            );
            print_breakdown(&update);
        }
    }
    Ok(())
}

/// The data-parallel benchmark's run: the baby GPT with MADA, 2 ranks of one micro-batch of 8
/// sequences each (the one-process run computes both).
fn data_parallel_spec(scratch: &Path) -> Result<RunSpec> {
    let mut spec = base(baby_gpt_task(scratch)?, MADA, 8);
    spec.ranks = 2;
    spec.grad_accum = 2;
    Ok(spec)
}

/// Medians over `steps` updates (after one warm-up update) of items/s, collective seconds and
/// update seconds, each taken on its own.
fn measure_with(tr: &mut Trainer, steps: u64) -> Result<(f64, f64, f64)> {
    let s = samples(tr, steps)?;
    Ok((median(&s, |x| x.items_per_s), median(&s, |x| x.collective_s), median(&s, |x| x.update_s)))
}

/// `just bench-dp`: the baby GPT with MADA trained by one process computing both ranks (all
/// cores) and by 2 MPI processes of one rank each (half the cores each), measured in this one
/// run; prints `data-parallel all-reduce per update (mpi, 2 processes): X ms` and
/// `data-parallel 2 processes / 1 process throughput: R`.
pub fn data_parallel(scratch: &Path, steps: u64) -> Result<()> {
    if !cfg!(feature = "mpi") {
        bail!("this build has no MPI backend: build paper-repro with --features mpi (`just bench-dp` does)");
    }
    let spec = data_parallel_spec(scratch)?;
    let threads = rayon::current_num_threads();
    let mut one = Trainer::new(&spec)?;
    let params = one.work.params().num_params();
    let (one_rate, _, _) = measure_with(&mut one, steps)?;
    drop(one);
    println!("data-parallel benchmark: baby GPT ({params} parameters) with MADA, 2 ranks × 8 sequences × 256 tokens, median of {steps} updates");
    println!("data-parallel one process ({threads} threads) tokens/s: {one_rate:.0}");
    let file = scratch.join("bench-dp-spec.json");
    std::fs::write(&file, serde_json::to_string(&spec)?)?;
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let mut cmd = crate::parallel::launch::mpirun_command(2)?;
    cmd.arg(&exe).arg("bench-dp-worker").arg(&file).args(["--steps", &steps.to_string()]);
    let o = cmd.output().context("cannot start mpirun")?;
    if !o.status.success() {
        bail!(
            "the 2-process benchmark failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let out = String::from_utf8_lossy(&o.stdout);
    let field = |key: &str| -> Result<f64> {
        out.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok()))
            .with_context(|| format!("the worker printed no `{key}`: {out}"))
    };
    let (rate, reduce_s, update_s) =
        (field("worker tokens/s:")?, field("worker all-reduce s:")?, field("worker update s:")?);
    println!("data-parallel two processes ({} threads each) tokens/s: {rate:.0}", (threads / 2).max(1));
    println!(
        "data-parallel all-reduce per update (mpi, 2 processes): {:.1} ms ({:.1}% of the update; {:.1} MB of f32 gradients)",
        reduce_s * 1e3,
        100.0 * reduce_s / update_s,
        params as f64 * 4.0 / 1e6
    );
    println!("data-parallel 2 processes / 1 process throughput: {:.2}", rate / one_rate);
    Ok(())
}

/// One process of [`data_parallel`]'s 2-process measurement (under mpirun); rank 0 prints.
#[cfg(feature = "mpi")]
pub fn data_parallel_worker(spec_file: &Path, steps: u64) -> Result<()> {
    use crate::parallel::Collective;
    let mpi = crate::parallel::mpi::Mpi::init()?;
    let world = mpi.world();
    let first = world.process() == 0;
    let spec: RunSpec = serde_json::from_str(&std::fs::read_to_string(spec_file)?)?;
    let mut tr = Trainer::with_collective(&spec, Box::new(world))?;
    let (rate, reduce_s, update_s) = measure_with(&mut tr, steps)?;
    if first {
        println!("worker tokens/s: {rate}\nworker all-reduce s: {reduce_s}\nworker update s: {update_s}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_is_the_median_of_the_rounds_own_ratios() {
        // A host that changes speed between rounds: each pair still reads 0.5, where ours of one
        // round against theirs of another would read anything from 0.17 to 1.5.
        let (mut o, mut t) = (vec![10.0, 20.0, 30.0].into_iter(), vec![20.0, 40.0, 60.0].into_iter());
        let pairs = paired(3, || Ok(o.next().unwrap()), || Ok(t.next().unwrap())).unwrap();
        assert_eq!(pairs, [(10.0, 20.0), (20.0, 40.0), (30.0, 60.0)]);
        assert_eq!(median_of(pairs.iter().map(|p| p.0 / p.1).collect()), 0.5);
        // Ours, theirs, ours, theirs: the calls alternate.
        let order = std::cell::RefCell::new(String::new());
        let step = |c: char| {
            order.borrow_mut().push(c);
            Ok(1.0)
        };
        paired(2, || step('o'), || step('t')).unwrap();
        assert_eq!(order.into_inner(), "otot");
        assert_eq!(median_of(vec![3.0, 1.0, 2.0, 10.0]), 3.0);
    }

    #[test]
    fn the_pytorch_scripts_numbers_are_read_by_their_keys() {
        // The baby-GPT script's last two lines, as it prints them.
        let out = "matmul GFLOP/s (baby-gpt layer shapes): 131\n\
                   pytorch 2.15.0 threads=2 batch=8: baby-gpt tokens/s (adamw): 1389\n";
        assert_eq!(number_after(out, MATMUL_LINE), Some(131.0));
        assert_eq!(number_after(out, "tokens/s (adamw)"), Some(1389.0));
        assert_eq!(number_after(out, "images/s (adam)"), None);
        // A key whose line has no number after it is not read as one.
        assert_eq!(number_after("tokens/s (adamw): n/a\n", "tokens/s (adamw)"), None);
        // The embedded scripts print the keys the benchmark reads.
        for key in [MATMUL_LINE, "tokens/s (adamw)"] {
            assert!(PYTORCH_BABY_GPT.contains(&format!("{key}: {{")), "{key}");
        }
        assert!(PYTORCH_VISION.contains("images/s (adam): {"));
    }
}
