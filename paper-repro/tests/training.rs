//! The training loop on tiny data the tests write: it learns, MADA's coefficients move and are
//! logged, a paused run resumes bit-identically, NaN stops the run naming the update and keeps
//! the last good checkpoint, and vision runs report per-evaluation accuracy.

use std::path::Path;

use indicatif::ProgressBar;
use mada::OptimizerSpec;
use paper_repro::data::vision::{write_idx_pair, VisionData};
use paper_repro::models::gpt::GptConfig;
use paper_repro::models::ops::ConvAlgorithm;
use paper_repro::models::vision::VisionModelConfig;
use paper_repro::run::log::{read_rows, LogRow};
use paper_repro::run::spec::{ClipMode, DeviceKind, Precision, RunSpec, Schedule, Task, TextData};
use paper_repro::run::{Outcome, RunResult, Start, TrainOptions};

mod common;
use common::corpus;

fn lm_spec(data: &Path, optimizer: &str, updates: u64) -> RunSpec {
    RunSpec {
        label: "test".into(),
        task: Task::Lm {
            data: TextData { dir: data.to_path_buf() },
            model: GptConfig {
                block_size: 16,
                vocab_size: 32,
                n_layer: 2,
                n_head: 2,
                n_embd: 32,
                dropout: 0.0,
                bias: false,
            },
            init_from: None,
            init_from_hf: false,
            eval_chunks: 4,
            eval_batch: 4,
        },
        optimizer: serde_json::from_str::<OptimizerSpec>(optimizer).unwrap(),
        schedule: Schedule { lr: 3e-3, min_lr: 3e-4, warmup: 2, decay_until: updates, in_micro_steps: false },
        updates,
        batch_size: 8,
        grad_accum: 2,
        weight_decay: 0.1,
        grad_clip: 1.0,
        seed: 5,
        eval_interval: 4,
        checkpoint_interval: 3,
        device: DeviceKind::Cpu,
        ranks: 1,
        clip_mode: ClipMode::Global,
        precision: Precision::Fp32,
    }
}

/// Train (or continue) a run; `pause_after` stops early. None when paused.
fn train(spec: &RunSpec, dir: &Path, pause_after: Option<u64>) -> anyhow::Result<Option<RunResult>> {
    let bar = ProgressBar::hidden();
    let mut opts = TrainOptions::new(Start::Auto, &bar);
    opts.pause_after = pause_after;
    Ok(match paper_repro::run::train(spec, dir, &opts)? {
        Outcome::Finished(r) => Some(*r),
        Outcome::Paused { .. } => None,
    })
}

const MADA: &str = r#"{"name": "mada", "eps": 1e-6,
    "coefficients": {"beta1": 0.9, "beta2": 0.95, "beta3": 0.0, "rho": 0.0, "c": 1.0, "gamma": 1.0},
    "hyper": {"lr": {"beta1": 0.05, "beta2": 0.05, "beta3": 0.5, "rho": 0.5, "c": 0.5, "gamma": 0.5}, "clip": 10.0, "start": 1}}"#;

#[test]
fn a_tiny_gpt_learns_and_mada_coefficients_move() {
    let dir = tempfile::tempdir().unwrap();
    corpus(&dir.path().join("data"));
    let spec = lm_spec(&dir.path().join("data"), MADA, 12);
    let r = train(&spec, &dir.path().join("run"), None).unwrap().unwrap();
    let rows: Vec<LogRow> = read_rows(&dir.path().join("run/log.csv")).unwrap();
    assert_eq!(rows.len(), 12);
    assert!(rows[11].loss < rows[0].loss, "loss {} → {}", rows[0].loss, rows[11].loss);
    let q = r.final_coefficients.unwrap();
    assert_ne!(q, [0.9, 0.95, 0.0, 0.0, 1.0, 1.0], "the coefficients were learned");
    // No hyper-gradient at the first update, one from the second on; the hyper-step is logged.
    assert!(rows[0].hyper.gradient[0].is_nan() && rows[5].hyper.gradient[0].is_finite());
    assert!(rows[5].hyper.step.iter().any(|d| *d != 0.0) && rows[5].hyper.clipped[3].is_some());
    assert_eq!(rows[5].coefficients[3], rows[4].coefficients[3] + rows[5].hyper.step[3]);
    assert!(r.final_eval_loss.is_finite() && r.best_eval_loss <= r.final_eval_loss);
    // Finished runs are not trained again.
    let again = train(&spec, &dir.path().join("run"), None).unwrap().unwrap();
    assert_eq!(again.spec_id, r.spec_id);
}

#[test]
fn a_paused_run_resumes_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    corpus(&dir.path().join("data"));
    let spec = lm_spec(&dir.path().join("data"), MADA, 9);
    train(&spec, &dir.path().join("straight"), None).unwrap().unwrap();
    // Pause after 4 updates (checkpoint at 4), then again after 2 more, then finish.
    assert!(train(&spec, &dir.path().join("paused"), Some(4)).unwrap().is_none());
    assert!(train(&spec, &dir.path().join("paused"), Some(2)).unwrap().is_none());
    train(&spec, &dir.path().join("paused"), None).unwrap().unwrap();
    for f in ["checkpoint/model.safetensors", "checkpoint/optimizer.bin"] {
        let a = std::fs::read(dir.path().join("straight").join(f)).unwrap();
        let b = std::fs::read(dir.path().join("paused").join(f)).unwrap();
        assert!(a == b, "{f} differs after resume");
    }
    // Logs equal except the wall-clock columns.
    let strip = |p: &Path| -> Vec<String> {
        std::fs::read_to_string(p).unwrap().lines().map(|l| l.rsplitn(3, ',').nth(2).unwrap().to_string()).collect()
    };
    assert_eq!(strip(&dir.path().join("straight/log.csv")), strip(&dir.path().join("paused/log.csv")));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("straight/eval.csv")).unwrap(),
        std::fs::read_to_string(dir.path().join("paused/eval.csv")).unwrap()
    );
}

#[test]
fn nan_stops_the_run_naming_the_update_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    corpus(&dir.path().join("data"));
    let mut spec = lm_spec(&dir.path().join("data"), r#"{"name": "sgd"}"#, 20);
    spec.grad_clip = 0.0;
    spec.schedule = Schedule { lr: 1e3, min_lr: 1e3, warmup: 0, decay_until: 0, in_micro_steps: false };
    spec.checkpoint_interval = 1;
    let e = format!("{:#}", train(&spec, &dir.path().join("run"), None).unwrap_err());
    assert!(e.contains("update") && (e.contains("NaN") || e.contains("inf") || e.contains("not finite")), "{e}");
    let failed = std::fs::read_to_string(dir.path().join("run/failed.json")).unwrap();
    assert!(failed.contains("update"));
    assert!(!dir.path().join("run/result.json").exists());
    // The checkpoint that survives holds finite parameters.
    let t =
        candle_core::safetensors::load(dir.path().join("run/checkpoint/model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    for (name, v) in t {
        let s = v.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(s.is_finite(), "{name} is not finite in the kept checkpoint");
    }
}

#[test]
fn vision_runs_on_idx_files_and_report_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("idx");
    // Two easy classes: bright top half vs bright bottom half.
    let pixel = |i: usize, y: usize, _x: usize| if i.is_multiple_of(2) == (y < 6) { 220 } else { 20 };
    write_idx_pair(&data, "train", 64, 12, 12, true, pixel, |i| (i % 2) as u8).unwrap();
    write_idx_pair(&data, "t10k", 32, 12, 12, true, pixel, |i| (i % 2) as u8).unwrap();
    let spec = RunSpec {
        label: "cnn".into(),
        task: Task::Vision {
            data: VisionData::Mnist { dir: data },
            // The second convolution (4 channels in) takes the implicit form.
            model: VisionModelConfig::Cnn { c1: 4, c2: 8, hidden: 16, conv: ConvAlgorithm::ImplicitGemm },
            train_subset: 0,
            test_subset: 0,
        },
        optimizer: serde_json::from_str(r#"{"name": "adam"}"#).unwrap(),
        schedule: Schedule { lr: 3e-3, min_lr: 0.0, warmup: 0, decay_until: 0, in_micro_steps: false },
        updates: 16,
        batch_size: 16,
        grad_accum: 1,
        weight_decay: 0.0,
        grad_clip: 0.0,
        seed: 1,
        eval_interval: 4,
        checkpoint_interval: 8,
        device: DeviceKind::Cpu,
        ranks: 1,
        clip_mode: ClipMode::Global,
        precision: Precision::Fp32,
    };
    let r = train(&spec, &dir.path().join("run"), None).unwrap().unwrap();
    assert!(r.final_eval_accuracy > 0.9, "accuracy {}", r.final_eval_accuracy);
    let eval = std::fs::read_to_string(dir.path().join("run/eval.csv")).unwrap();
    assert_eq!(eval.lines().count(), 5);
}

#[test]
fn a_spec_with_a_bad_setting_is_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    corpus(&dir.path().join("data"));
    let mut spec = lm_spec(&dir.path().join("data"), r#"{"name": "adam", "beta1": 1.5}"#, 3);
    let e = format!("{:#}", train(&spec, &dir.path().join("run"), None).unwrap_err());
    assert!(e.contains("beta1"), "{e}");
    spec.optimizer = serde_json::from_str(r#"{"name": "adam"}"#).unwrap();
    spec.task = Task::Lm {
        data: TextData { dir: dir.path().join("missing") },
        model: GptConfig {
            block_size: 16,
            vocab_size: 32,
            n_layer: 1,
            n_head: 2,
            n_embd: 16,
            dropout: 0.0,
            bias: false,
        },
        init_from: None,
        init_from_hf: false,
        eval_chunks: 2,
        eval_batch: 2,
    };
    let e = format!("{:#}", train(&spec, &dir.path().join("run2"), None).unwrap_err());
    assert!(e.contains("missing/train.bin"), "{e}");
}

/// The official `train_ddp.py` hyper-gradient, built by brute force: every rank's first
/// micro-batch after update 1, each rank's hyper-gradient of its own per-rank-mean loss
/// (1/(grad_accum/ranks) of the micro-batch's), then the mean over the ranks. The training loop
/// (ranks emulated on one device) must take exactly this hyper-step.
#[test]
fn the_emulated_ranks_take_the_official_hyper_gradient() {
    use paper_repro::run::workload::MicroBatch;
    use paper_repro::run::Trainer;
    let dir = tempfile::tempdir().unwrap();
    corpus(&dir.path().join("data"));
    for (ranks, grad_accum) in [(1u64, 1u64), (1, 2), (2, 4), (4, 8)] {
        let mut spec = lm_spec(&dir.path().join("data"), MADA, 4);
        (spec.ranks, spec.grad_accum) = (ranks, grad_accum);
        // Update 1 has lr 0 (warm-up): the hyper-gradient taken before update 3 is of update 2.
        let mut looped = Trainer::new(&spec).unwrap();
        looped.step(0).unwrap();
        looped.step(1).unwrap();
        let h_loop = looped.step(2).unwrap().hyper.gradient;

        let mut brute = Trainer::new(&spec).unwrap();
        brute.step(0).unwrap();
        brute.step(1).unwrap();
        let per_rank = (grad_accum / ranks) as f64;
        let mut official = [0.0f64; 6];
        for rank in 0..ranks {
            let mb = MicroBatch { step: 2, rank, ranks, local: 0 };
            let (loss, _, _) = brute.work.micro_loss(mb, grad_accum).unwrap();
            let grads = loss.backward().unwrap();
            let h = brute
                .opt
                .with_gradients(&grads, |o, g| o.as_mada().unwrap().hypergradient(g))
                .unwrap()
                .unwrap()
                .unwrap();
            for (o, x) in official.iter_mut().zip(h) {
                *o += x / per_rank / ranks as f64;
            }
        }
        for i in 0..6 {
            let (a, b) = (h_loop[i], official[i]);
            assert!(
                (a - b).abs() <= 1e-12 * b.abs().max(1e-300),
                "ranks {ranks}, grad_accum {grad_accum}, coefficient {i}: {a} vs {b}"
            );
        }
        assert!(official.iter().any(|h| *h != 0.0));
    }
}

/// Per-rank clipping (`clip_mode = "per-rank"`): each rank's mean gradient is clipped before
/// the ranks are averaged, as `train_ddp.py` clips before its all-reduce — checked through the
/// update SGD takes (x ← x − lr·g).
#[test]
fn per_rank_clipping_clips_each_rank_before_the_average() {
    use candle_core::backprop::GradStore;
    use paper_repro::run::spec::ClipMode;
    use paper_repro::run::workload::MicroBatch;
    use paper_repro::run::Trainer;
    let dir = tempfile::tempdir().unwrap();
    corpus(&dir.path().join("data"));
    let mut spec = lm_spec(&dir.path().join("data"), r#"{"name": "sgd"}"#, 2);
    (spec.ranks, spec.grad_accum, spec.clip_mode, spec.grad_clip, spec.weight_decay) =
        (2, 4, ClipMode::PerRank, 0.05, 0.0);
    spec.schedule = Schedule { lr: 0.5, min_lr: 0.5, warmup: 0, decay_until: 0, in_micro_steps: false };
    let mut tr = Trainer::new(&spec).unwrap();
    let vars = tr.work.params().vars();
    let before: Vec<Vec<f32>> = vars.iter().map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()).collect();
    let mut expected: Vec<Vec<f64>> = before.iter().map(|b| vec![0.0; b.len()]).collect();
    for rank in 0..2 {
        // The rank's mean gradient over its two micro-batches.
        let mut sum: Vec<Vec<f64>> = before.iter().map(|b| vec![0.0; b.len()]).collect();
        for local in 0..2 {
            let (loss, _, _) = tr.work.micro_loss(MicroBatch { step: 0, rank, ranks: 2, local }, 4).unwrap();
            let g: GradStore = loss.backward().unwrap();
            for (s, v) in sum.iter_mut().zip(&vars) {
                let gv: Vec<f32> = g.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                s.iter_mut().zip(gv).for_each(|(a, b)| *a += b as f64 / 2.0);
            }
        }
        let norm = sum.iter().flatten().map(|x| x * x).sum::<f64>().sqrt();
        assert!(norm > spec.grad_clip, "the test needs clipping to act ({norm})");
        let scale = spec.grad_clip / (norm + 1e-6);
        for (e, s) in expected.iter_mut().zip(&sum) {
            e.iter_mut().zip(s).for_each(|(a, b)| *a += b * scale / 2.0);
        }
    }
    tr.step(0).unwrap();
    let mut worst = 0.0f64;
    let expected_norm = expected.iter().flatten().map(|x| x * x).sum::<f64>().sqrt();
    for ((v, b), e) in vars.iter().zip(&before).zip(&expected) {
        let after: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for ((x, y), g) in after.iter().zip(b).zip(e) {
            let taken = (*y as f64 - *x as f64) / 0.5;
            worst = worst.max((taken - g).abs());
        }
    }
    // The update is read back from f32 parameters: compare against the update's own scale.
    assert!(worst <= 1e-4 * expected_norm, "worst |taken − expected| {worst:e}, ‖expected‖ {expected_norm:e}");
}

#[test]
fn bench_pairs_ours_with_pytorch_round_by_round_and_prints_the_median_ratio() {
    // A stand-in for a Python with torch: it imports "torch" and reports a fixed rate, so the
    // pairing and the printed lines are checked without PyTorch installed.
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let python = dir.path().join("python");
    std::fs::write(&python, "#!/bin/sh\nif [ \"$1\" = -c ]; then exit 0; fi\necho 'images/s (adam): 1000'\n").unwrap();
    std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_paper-repro"))
        .args(["bench", "--model", "cnn", "--steps", "1", "--rounds", "2"])
        .env("MADA_TORCH_PYTHON", &python)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let value = |key: &str| -> f64 {
        let line = text.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no {key:?} in:\n{text}"));
        line[key.len()..].trim().parse().unwrap()
    };
    assert_eq!(value("cnn pytorch:"), 1000.0);
    // Two pairs whose ratios are ours/1000: the printed ratio is their median (the upper one).
    let ratios: Vec<f64> = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("2 rounds, ours then pytorch: ratios "))
        .unwrap_or_else(|| panic!("no rounds line in:\n{text}"))
        .split(", ")
        .map(|r| r.parse().unwrap())
        .collect();
    assert_eq!(ratios.len(), 2);
    assert_eq!(value("cnn ours/pytorch:"), ratios.iter().copied().fold(f64::MIN, f64::max));
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_paper-repro"))
        .args(["bench", "--rounds", "0"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
}

#[test]
fn bench_times_the_models_asked_for_and_only_those() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_paper-repro"))
        .args(["bench", "--model", "cnn", "--steps", "1"])
        // No PyTorch: the run must still print ours, and say why no ratio follows.
        .env("MADA_TORCH_PYTHON", "/nonexistent/python")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for line in ["cnn images/s (adam): ", "cnn images/s (mada): ", "pytorch: not importable"] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }
    assert!(!text.lines().any(|l| l.starts_with("baby-gpt") || l.starts_with("resnet")), "{text}");
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_paper-repro"))
        .args(["bench", "--model", "vgg"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("vgg"));
}
