//! What the integration tests share: a tiny corpus they write, a tiny GPT run spec, and a spec
//! written as a file for the command line. (Each test file includes this module; not every one
//! uses all of it.)
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use mada::OptimizerSpec;
use paper_repro::data::text::{prepare, Tokenizer};
use paper_repro::models::gpt::GptConfig;
use paper_repro::run::spec::{ClipMode, DeviceKind, Precision, RunSpec, Schedule, Task, TextData};

/// A character-level corpus of a repeated line, prepared into `dir`.
pub fn corpus(dir: &Path) {
    let text: String = (0..300).map(|i| format!("to be or not to be {} that is the question. ", i % 7)).collect();
    prepare(&[text], Tokenizer::Char, dir, "test").unwrap();
}

/// A 1-layer GPT on [`corpus`] with MADA (the official hyper-step from update 1), one rank.
pub fn lm_spec(data: &Path, updates: u64) -> RunSpec {
    RunSpec {
        label: "test".into(),
        task: Task::Lm {
            data: TextData { dir: data.to_path_buf() },
            model: GptConfig { block_size: 16, vocab_size: 32, n_layer: 1, n_head: 2, n_embd: 16, dropout: 0.0, bias: false },
            init_from: None,
            init_from_hf: false,
            eval_chunks: 2,
            eval_batch: 4,
        },
        optimizer: serde_json::from_str::<OptimizerSpec>(
            r#"{"name": "mada", "coefficients": {"beta1": 0.9, "beta2": 0.95, "beta3": 0.0, "rho": 0.0, "c": 1.0, "gamma": 1.0},
                "hyper": {"preset": "train_ddp", "start": 1}}"#,
        )
        .unwrap(),
        schedule: Schedule { lr: 3e-3, min_lr: 3e-4, warmup: 1, decay_until: updates, in_micro_steps: false },
        updates,
        batch_size: 4,
        grad_accum: 1,
        ranks: 1,
        weight_decay: 0.1,
        grad_clip: 1.0,
        clip_mode: ClipMode::Global,
        seed: 3,
        eval_interval: 3,
        checkpoint_interval: 2,
        device: DeviceKind::Cpu,
        precision: Precision::Fp32,
    }
}

/// The spec as a file for the command line.
pub fn spec_file(dir: &Path, spec: &RunSpec) -> PathBuf {
    let p = dir.join(format!("spec-{}.json", spec.id()));
    std::fs::write(&p, serde_json::to_string(spec).unwrap()).unwrap();
    p
}
