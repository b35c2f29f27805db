//! The paper tier cannot run here (it needs a GPU and OpenWebText), but its specs must be valid
//! and its models must train: every paper-tier run of the catalog resolves and validates, and a
//! GPT-2 124M training step (the paper's model, on a short sequence) runs on the CPU.

use std::path::Path;

use paper_repro::catalog;
use paper_repro::run::spec::{Task, TextData};
use paper_repro::run::Trainer;

#[test]
fn every_paper_tier_spec_resolves_and_a_gpt2_124m_step_runs_on_the_cpu() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let experiments = catalog::load(&root.join("../experiments")).unwrap();
    let mut total = 0;
    let mut gpt2 = None;
    for e in &experiments {
        let runs = e.plan(catalog::Tier::Paper, Path::new("runs")).unwrap();
        total += runs.len();
        if e.artifact == "gpt2-124m" {
            gpt2 = runs.into_iter().find(|r| r.key == "mada");
        }
    }
    assert!(total > 900, "{total} paper-tier runs");
    let mut spec = gpt2.expect("gpt2-124m has a MADA run").spec;
    let Task::Lm { model, .. } = &spec.task else { panic!() };
    assert_eq!(model.num_params(false), 124_373_760);

    // The same model and optimizer at a tiny batch on the CPU, on a small corpus.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root.join("data/macbeth.txt")).unwrap();
    paper_repro::data::text::prepare(&[text], paper_repro::data::text::Tokenizer::Bpe, dir.path(), "t").unwrap();
    let Task::Lm { data, model, .. } = &mut spec.task else { panic!() };
    *data = TextData { dir: dir.path().to_path_buf() };
    model.block_size = 32;
    spec.device = paper_repro::run::spec::DeviceKind::Cpu;
    spec.batch_size = 1;
    spec.grad_accum = 2;
    spec.ranks = 2;
    let mut tr = Trainer::new(&spec).unwrap();
    let a = tr.step(0).unwrap();
    let b = tr.step(1).unwrap();
    assert!(a.loss.is_finite() && (a.loss - 50304f64.ln()).abs() < 1.0, "initial loss {}", a.loss);
    assert!(b.hyper.gradient.iter().all(|h| h.is_finite()), "MADA's hyper-gradient at the second update");
}
