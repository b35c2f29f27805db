//! Nothing lost, nothing silently wrong: every mistake a user can make with a spec, a data
//! file or a run folder ends in one clear error before any work, and no interruption loses or
//! corrupts a run. Each test here failed before the fix it covers.

use std::path::{Path, PathBuf};
use std::process::Command;

use indicatif::ProgressBar;
use paper_repro::data::vision::{write_idx_pair, VisionData};
use paper_repro::models::ops::ConvAlgorithm;
use paper_repro::models::vision::VisionModelConfig;
use paper_repro::run::checkpoint::{self, SaveStep};
use paper_repro::run::spec::{RunSpec, Schedule, Task};
use paper_repro::run::{Outcome, RunDir, Start, TrainOptions};

mod common;
use common::{corpus, lm_spec, spec_file};

const BIN: &str = env!("CARGO_BIN_EXE_paper-repro");

fn train(spec: &RunSpec, dir: &Path, start: Start, pause_after: Option<u64>) -> anyhow::Result<Outcome> {
    let bar = ProgressBar::hidden();
    let mut opts = TrainOptions::new(start, &bar);
    opts.pause_after = pause_after;
    paper_repro::run::train(spec, dir, &opts)
}

fn err(r: anyhow::Result<Outcome>) -> String {
    format!("{:#}", r.expect_err("an error"))
}

#[test]
fn sizes_the_data_or_the_machine_cannot_hold_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    corpus(&dir.path().join("data"));
    let mut spec = lm_spec(&dir.path().join("data"), 3);
    let Task::Lm { model, .. } = &mut spec.task else { unreachable!() };
    model.block_size = 200_000;
    let t = std::time::Instant::now();
    let e = err(train(&spec, &dir.path().join("run"), Start::Fresh, None));
    assert!(e.contains("block_size = 200000") && e.contains("train.bin"), "{e}");
    assert!(t.elapsed().as_secs() < 5, "refused only after {:?}", t.elapsed());
    assert!(!dir.path().join("run").exists(), "a refused run leaves no folder");
    // The validation split is checked too.
    let Task::Lm { model, .. } = &mut spec.task else { unreachable!() };
    model.block_size = 2000;
    let e = err(train(&spec, &dir.path().join("run"), Start::Fresh, None));
    assert!(e.contains("val.bin") && e.contains("block_size = 2000"), "{e}");
    // A model the machine cannot hold (memory estimate against MemAvailable).
    let Task::Lm { model, .. } = &mut spec.task else { unreachable!() };
    (model.block_size, model.n_embd, model.n_layer, model.vocab_size) = (16, 65_536, 4_000, 32);
    let e = err(train(&spec, &dir.path().join("run"), Start::Fresh, None));
    assert!(e.contains("GB"), "{e}");

    let images = dir.path().join("idx");
    write_idx_pair(&images, "train", 40, 8, 8, true, |i, y, _| ((i + y) % 255) as u8, |i| (i % 2) as u8).unwrap();
    write_idx_pair(&images, "t10k", 10, 8, 8, true, |i, y, _| ((i + y) % 255) as u8, |i| (i % 2) as u8).unwrap();
    let mut v = lm_spec(&dir.path().join("data"), 3);
    v.task = Task::Vision {
        data: VisionData::Mnist { dir: images },
        model: VisionModelConfig::Cnn { c1: 4, c2: 4, hidden: 8, conv: ConvAlgorithm::Im2col },
        train_subset: 0,
        test_subset: 0,
    };
    v.optimizer = serde_json::from_str(r#"{"name": "adam"}"#).unwrap();
    v.batch_size = 100_000;
    let e = err(train(&v, &dir.path().join("vision"), Start::Fresh, None));
    assert!(e.contains("batch_size = 100000") && e.contains("40 training images"), "{e}");
}

#[test]
fn no_spec_field_at_its_edge_panics() {
    // Every numeric field of the spec at 0, 1 and a huge value, one at a time: validation or
    // training ends in an error, never a panic or an abort.
    let dir = tempfile::tempdir().unwrap();
    corpus(&dir.path().join("data"));
    let base = serde_json::to_value(lm_spec(&dir.path().join("data"), 2)).unwrap();
    let mut paths = Vec::new();
    fn numeric_paths(v: &serde_json::Value, at: String, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => m.iter().for_each(|(k, x)| numeric_paths(x, format!("{at}/{k}"), out)),
            serde_json::Value::Number(_) => out.push(at),
            _ => {}
        }
    }
    numeric_paths(&base, String::new(), &mut paths);
    assert!(paths.len() > 15, "{paths:?}");
    for path in &paths {
        for edge in [serde_json::json!(0), serde_json::json!(1), serde_json::json!(1e300), serde_json::json!(u64::MAX)]
        {
            let mut v = base.clone();
            *v.pointer_mut(path).unwrap() = edge.clone();
            let Ok(spec) = serde_json::from_value::<RunSpec>(v) else { continue };
            let run = dir.path().join("edge");
            let outcome = std::panic::catch_unwind(|| {
                let _ = std::fs::remove_dir_all(&run);
                let _ = train(&spec, &run, Start::Fresh, None);
            });
            assert!(outcome.is_ok(), "{path} = {edge} panicked");
        }
    }
    // The cases that used to panic, each with its message.
    let mut spec = lm_spec(&dir.path().join("data"), 2);
    let Task::Lm { model, .. } = &mut spec.task else { unreachable!() };
    model.n_embd = 0;
    assert!(err(train(&spec, &dir.path().join("a"), Start::Fresh, None)).contains("n_embd must be positive"));
    for (model, needle) in [
        (VisionModelConfig::Cnn { c1: 0, c2: 4, hidden: 8, conv: ConvAlgorithm::Im2col }, "c1 = 0"),
        (VisionModelConfig::Cnn { c1: 4, c2: 4, hidden: 0, conv: ConvAlgorithm::Im2col }, "hidden = 0"),
        (VisionModelConfig::Resnet { blocks: vec![1], widths: vec![0], conv: ConvAlgorithm::Im2col }, "width 0"),
    ] {
        assert!(model.validate().unwrap_err().to_string().contains(needle), "{model:?}");
    }
}

#[test]
fn mistakes_that_used_to_surface_during_training_are_found_with_the_spec() {
    let dir = tempfile::tempdir().unwrap();
    corpus(&dir.path().join("data"));
    let base = lm_spec(&dir.path().join("data"), 6);
    type Change = Box<dyn Fn(&mut RunSpec)>;
    let cases: Vec<(Change, &str)> = vec![
        (
            Box::new(|s| {
                if let Task::Lm { eval_chunks, .. } = &mut s.task {
                    *eval_chunks = 0
                }
            }),
            "eval_chunks",
        ),
        (
            Box::new(|s| {
                if let Task::Lm { eval_batch, .. } = &mut s.task {
                    *eval_batch = 0
                }
            }),
            "eval_batch",
        ),
        (Box::new(|s| s.schedule.min_lr = f64::NAN), "schedule.min_lr"),
        (Box::new(|s| s.grad_clip = f64::NAN), "grad_clip"),
        (Box::new(|s| s.weight_decay = f64::NAN), "weight_decay"),
        (Box::new(|s| s.ranks = 3), "multiple of ranks"),
    ];
    for (change, needle) in cases {
        let mut spec = base.clone();
        change(&mut spec);
        let e = format!("{:#}", spec.validate().unwrap_err());
        assert!(e.contains(needle), "{needle}: {e}");
    }
}

#[test]
fn the_loss_going_non_finite_names_the_update_counted_as_log_csv_counts_and_what_went_wrong() {
    let dir = tempfile::tempdir().unwrap();
    corpus(&dir.path().join("data"));
    let mut spec = lm_spec(&dir.path().join("data"), 30);
    spec.optimizer = serde_json::from_str(r#"{"name": "sgd"}"#).unwrap();
    spec.grad_clip = 0.0;
    spec.schedule = Schedule { lr: 1e4, min_lr: 1e4, warmup: 0, decay_until: 0, in_micro_steps: false };
    let run = dir.path().join("run");
    let e = err(train(&spec, &run, Start::Fresh, None));
    let logged = std::fs::read_to_string(run.join("log.csv")).unwrap().lines().count() - 1;
    assert!(e.contains(&format!("update {}", logged + 1)), "{logged} rows logged: {e}");
    assert!(e.contains("parameter") || e.contains("gradient of") || e.contains("activation"), "{e}");
    // It is recorded as a divergence (a result for a robustness grid), and not trained again.
    let failure = RunDir::new(&run).read_failure().unwrap().unwrap();
    assert_eq!(failure.diverged_at, Some(logged as u64 + 1));
    let t = std::time::Instant::now();
    let again = err(train(&spec, &run, Start::Auto, None));
    assert!(again.contains("diverged in an earlier attempt") && t.elapsed().as_secs() < 2, "{again}");
    let o = Command::new(BIN)
        .args(["train", spec_file(dir.path(), &spec).to_str().unwrap(), "--out"])
        .arg(dir.path().join("cli"))
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(paper_repro::reproduce::DIVERGED_EXIT as i32),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn two_processes_never_write_one_run_or_one_runs_root() {
    let dir = tempfile::tempdir().unwrap();
    corpus(&dir.path().join("data"));
    let spec = lm_spec(&dir.path().join("data"), 4);
    let run = dir.path().join("run");
    let held = outputs::FolderLock::acquire(&run, "run folder").unwrap();
    let e = err(train(&spec, &run, Start::Fresh, None));
    assert!(e.contains("in use by process") && e.contains(&std::process::id().to_string()), "{e}");
    assert!(!run.join("spec.json").exists() && !run.join("log.csv").exists(), "the refused process wrote nothing");
    drop(held);
    assert!(matches!(train(&spec, &run, Start::Fresh, None).unwrap(), Outcome::Finished(_)));

    // Two `train` processes started at once: exactly one trains, the other names the holder.
    let data = dir.path().join("data");
    let spec = lm_spec(&data, 60);
    let file = spec_file(dir.path(), &spec);
    let out = dir.path().join("race");
    let spawn = || Command::new(BIN).args(["train", file.to_str().unwrap(), "--out", out.to_str().unwrap()]).output();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(spawn);
        let b = s.spawn(spawn);
        (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
    });
    let ok = [a.status.success(), b.status.success()];
    let refused = [&a, &b].iter().filter(|o| String::from_utf8_lossy(&o.stderr).contains("in use by process")).count();
    // Either one refused while the other trained, or the second came after the first finished.
    assert!(ok.iter().any(|x| *x), "{a:?} {b:?}");
    assert!(refused == 1 || ok == [true, true], "{a:?} {b:?}");
    let rows = std::fs::read_to_string(out.join("log.csv")).unwrap().lines().count() - 1;
    assert_eq!(rows, 60, "log rows of one run only");
    assert!(!out.join("failed.json").exists());

    // A reproduce holds its runs root.
    let root = dir.path().join("runs");
    let _held = outputs::FolderLock::acquire(&root, "runs root").unwrap();
    let paths = paper_repro::paths::Paths {
        experiments: Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments"),
        runs: root,
        reports: dir.path().join("reports"),
    };
    let opts = paper_repro::reproduce::Options { only: Some("vision-cnn".into()), ..Default::default() };
    let e = format!(
        "{:#}",
        paper_repro::reproduce::reproduce(&paths, paper_repro::catalog::Tier::Smoke, &opts).err().unwrap()
    );
    assert!(e.contains("runs root") && e.contains("in use"), "{e}");
}

#[test]
fn a_folder_of_another_spec_is_refused_before_anything_in_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    corpus(&dir.path().join("data"));
    let a = lm_spec(&dir.path().join("data"), 4);
    let mut b = a.clone();
    b.seed = 9;
    let run = dir.path().join("run");
    train(&a, &run, Start::Fresh, None).unwrap();
    let before: Vec<(PathBuf, Vec<u8>)> = walk(&run);
    for start in [Start::Fresh, Start::Resume, Start::Auto] {
        let e = err(train(&b, &run, start, None));
        assert!(e.contains(&a.id()) && e.contains(&b.id()), "{e}");
    }
    // An unfinished run of another spec, too.
    let paused = dir.path().join("paused");
    assert!(matches!(train(&a, &paused, Start::Fresh, Some(2)).unwrap(), Outcome::Paused { step: 2 }));
    let e = err(train(&b, &paused, Start::Resume, None));
    assert!(e.contains(&a.id()) && e.contains(&b.id()), "{e}");
    assert_eq!(walk(&run), before, "nothing changed in the refused folder");
    let held: RunSpec = serde_json::from_str(&std::fs::read_to_string(paused.join("spec.json")).unwrap()).unwrap();
    assert_eq!(held.id(), a.id());
}

/// Every file of a folder (but the lock) with its bytes, sorted.
fn walk(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.file_name().unwrap() != ".lock" {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

/// The run's log without the wall-clock columns.
fn log_without_times(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("log.csv"))
        .unwrap()
        .lines()
        .map(|l| l.rsplitn(3, ',').nth(2).unwrap().to_string())
        .collect()
}

#[test]
fn a_save_interrupted_after_any_step_resumes_from_a_complete_checkpoint_and_ends_identically() {
    let dir = tempfile::tempdir().unwrap();
    corpus(&dir.path().join("data"));
    let spec = lm_spec(&dir.path().join("data"), 8);
    let straight = dir.path().join("straight");
    train(&spec, &straight, Start::Fresh, None).unwrap();
    for stop in [SaveStep::WriteTemporary, SaveStep::MoveOldAside, SaveStep::MoveNewInPlace] {
        let run = dir.path().join(format!("{stop:?}"));
        // The save of update 6 stops after `stop`, as a kill there would.
        let bar = ProgressBar::hidden();
        let mut opts = TrainOptions::new(Start::Fresh, &bar);
        opts.interrupt_save = Some((6, stop));
        let e = format!("{:#}", paper_repro::run::train(&spec, &run, &opts).unwrap_err());
        assert!(e.contains("interrupted"), "{e}");
        // Whatever the stop, a complete checkpoint is found: the new one once it is complete.
        let (_, found) = checkpoint::find(&RunDir::new(&run)).expect("a complete checkpoint");
        assert_eq!(found.step, 6, "{stop:?}");
        // The run resumes from it (the logs are cut back to what it covers) and ends exactly
        // as the uninterrupted run.
        assert!(matches!(train(&spec, &run, Start::Resume, None).unwrap(), Outcome::Finished(_)));
        assert!(!run.join(".checkpoint.old").exists() && !run.join(".checkpoint.tmp").exists());
        for f in ["checkpoint/model.safetensors", "checkpoint/optimizer.bin", "eval.csv"] {
            assert!(std::fs::read(straight.join(f)).unwrap() == std::fs::read(run.join(f)).unwrap(), "{stop:?}: {f}");
        }
        assert_eq!(log_without_times(&straight), log_without_times(&run), "{stop:?}");
    }
}

#[test]
fn a_damaged_checkpoint_is_an_error_never_a_silent_restart() {
    let dir = tempfile::tempdir().unwrap();
    corpus(&dir.path().join("data"));
    let spec = lm_spec(&dir.path().join("data"), 6);
    let run = dir.path().join("run");
    train(&spec, &run, Start::Fresh, Some(4)).unwrap();
    let opt = run.join("checkpoint/optimizer.bin");
    let mut bytes = std::fs::read(&opt).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid..mid + 8].fill(0);
    std::fs::write(&opt, &bytes).unwrap();
    let e = err(train(&spec, &run, Start::Auto, None));
    assert!(e.contains("optimizer.bin") && e.contains("checksum"), "{e}");
    assert!(opt.exists(), "the damaged checkpoint is kept for the user");
}

/// Kill a `train` process with SIGKILL at its n-th rename (strace's fault injection), for every
/// rename of a short run, then resume: the result is the uninterrupted run's, bit for bit.
#[test]
fn a_kill_at_every_rename_loses_nothing() {
    let strace = Command::new("strace").arg("-V").output();
    assert!(strace.is_ok_and(|o| o.status.success()), "this test needs strace (`just test` installs it)");
    let dir = tempfile::tempdir().unwrap();
    corpus(&dir.path().join("data"));
    let spec = lm_spec(&dir.path().join("data"), 6);
    let file = spec_file(dir.path(), &spec);
    let train_cmd = |out: &Path, extra: &[&str]| {
        let mut c = Command::new(BIN);
        c.args(["train", file.to_str().unwrap(), "--out", out.to_str().unwrap()]).args(extra);
        c
    };
    let straight = dir.path().join("straight");
    assert!(train_cmd(&straight, &[]).status().unwrap().success());
    // How many renames a whole run makes.
    let trace = dir.path().join("trace");
    let counted = dir.path().join("counted");
    let status = Command::new("strace")
        .args([
            "-f",
            "-e",
            "trace=rename",
            "-o",
            trace.to_str().unwrap(),
            BIN,
            "train",
            file.to_str().unwrap(),
            "--out",
        ])
        .arg(&counted)
        .status()
        .unwrap();
    assert!(status.success());
    let renames = std::fs::read_to_string(&trace).unwrap().lines().filter(|l| l.contains("rename(")).count();
    assert!(renames > 10, "{renames} renames");
    for n in 1..=renames {
        let run = dir.path().join(format!("kill{n}"));
        let status = Command::new("strace")
            .args([
                "-f",
                "-qq",
                "-o",
                "/dev/null",
                "-e",
                "trace=rename",
                "-e",
                &format!("inject=rename:signal=KILL:when={n}"),
            ])
            .arg(BIN)
            .args(["train", file.to_str().unwrap(), "--out"])
            .arg(&run)
            .status()
            .unwrap();
        assert!(!status.success(), "rename {n}: the process was not killed");
        // Killed before its spec was written there is no run to resume: it starts again.
        let resumed = if run.join("spec.json").exists() {
            train_cmd(&run, &["--resume"]).output().unwrap()
        } else {
            train_cmd(&run, &[]).output().unwrap()
        };
        assert!(resumed.status.success(), "rename {n}: {}", String::from_utf8_lossy(&resumed.stderr));
        for f in ["checkpoint/model.safetensors", "checkpoint/optimizer.bin", "eval.csv"] {
            assert!(std::fs::read(straight.join(f)).unwrap() == std::fs::read(run.join(f)).unwrap(), "rename {n}: {f}");
        }
        assert_eq!(log_without_times(&straight), log_without_times(&run), "rename {n}");
        let leftovers: Vec<_> = std::fs::read_dir(&run)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.contains(".tmp") || n == ".checkpoint.old")
            .collect();
        assert!(leftovers.is_empty(), "rename {n}: {leftovers:?}");
    }
}

#[test]
fn the_command_line_names_the_parser_the_tier_and_the_missing_meta() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("spec.toml");
    std::fs::write(&p, "{\"label\": \"x\"}").unwrap();
    let o = Command::new(BIN).args(["train", p.to_str().unwrap(), "--out", "x"]).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("read as TOML because of its .toml extension"), "{e}");
    for cmd in ["tables", "figures", "report", "reproduce"] {
        let o = Command::new(BIN).args([cmd, "nonsense"]).output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains("nonsense") && e.contains("smoke"), "{cmd}: {e}");
    }
    // A report of a tier without runs refuses instead of replacing the report.
    let reports = dir.path().join("reports");
    std::fs::create_dir_all(reports.join("cpu")).unwrap();
    std::fs::write(reports.join("cpu/REPORT.md"), "committed").unwrap();
    let experiments = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments");
    let o = Command::new(BIN)
        .args(["report", "cpu", "--runs", dir.path().join("runs").to_str().unwrap()])
        .args(["--reports", reports.to_str().unwrap(), "--experiments", experiments.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no run of tier cpu"));
    assert_eq!(std::fs::read_to_string(reports.join("cpu/REPORT.md")).unwrap(), "committed");
    // A corpus without meta.json: the vocabulary message says what was assumed.
    let data = dir.path().join("data");
    corpus(&data);
    std::fs::remove_file(data.join("meta.json")).unwrap();
    let mut spec = lm_spec(&data, 2);
    spec.optimizer = serde_json::from_str(r#"{"name": "adam"}"#).unwrap();
    let e = err(train(&spec, &dir.path().join("run"), Start::Fresh, None));
    assert!(e.contains("no meta.json"), "{e}");
}

#[test]
fn a_tier_whose_device_this_build_lacks_fails_before_any_run_folder() {
    if cfg!(feature = "cuda") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let paths = paper_repro::paths::Paths {
        experiments: Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments"),
        runs: dir.path().join("runs"),
        reports: dir.path().join("reports"),
    };
    let e = format!(
        "{:#}",
        paper_repro::reproduce::reproduce(&paths, paper_repro::catalog::Tier::Paper, &Default::default())
            .err()
            .unwrap()
    );
    assert!(e.contains("cuda"), "{e}");
    assert!(!paths.runs.exists() && !paths.reports.exists(), "nothing was created");
}

#[test]
fn dumped_batches_name_every_training_sequence_and_survive_a_resume() {
    let dir = tempfile::tempdir().unwrap();
    corpus(&dir.path().join("data"));
    let mut spec = lm_spec(&dir.path().join("data"), 6);
    (spec.grad_accum, spec.ranks) = (4, 2);
    let bar = ProgressBar::hidden();
    let dump = |run: &Path, file: &Path, pause: Option<u64>| {
        let mut opts = TrainOptions::new(Start::Auto, &bar);
        opts.dump_batches = Some(file);
        opts.pause_after = pause;
        paper_repro::run::train(&spec, run, &opts).unwrap()
    };
    let (a, b) = (dir.path().join("a.csv"), dir.path().join("b.csv"));
    dump(&dir.path().join("straight"), &a, None);
    dump(&dir.path().join("paused"), &b, Some(3));
    dump(&dir.path().join("paused"), &b, None);
    let text = std::fs::read_to_string(&a).unwrap();
    assert_eq!(text, std::fs::read_to_string(&b).unwrap());
    let rows: Vec<paper_repro::run::log::BatchRow> = paper_repro::run::log::read_rows(&a).unwrap();
    assert_eq!(rows.len(), 6 * 4 * 4, "updates × micro-batches × rows");
    assert_eq!((rows[0].update, rows[0].micro_batch, rows[0].row), (1, 1, 1));
    // Rank 1's micro-batches (2 and 4 of each update) draw from the second half of train.bin.
    let half = (std::fs::metadata(dir.path().join("data/train.bin")).unwrap().len() / 4) as u64;
    assert!(rows.iter().filter(|r| r.micro_batch % 2 == 0).all(|r| r.offset >= half));
    assert!(rows.iter().filter(|r| r.micro_batch % 2 == 1).all(|r| r.offset < half));
}

/// A one-experiment catalog over the test corpus: Adam and MADA, seeds 1 and 2.
fn tiny_catalog(dir: &Path, data: &Path) -> paper_repro::paths::Paths {
    let experiments = dir.join("experiments");
    std::fs::create_dir_all(&experiments).unwrap();
    let toml = format!(
        r#"
artifact = "tiny"
title = "tiny"
paper = "none"
kind = "training"
claims = [2]

[optimizers.adam]
label = "Adam"
role = "adam"
spec = {{ name = "adam" }}

[optimizers.mada]
label = "MADA"
role = "mada"
spec = {{ name = "mada", coefficients = {{ beta1 = 0.9, beta2 = 0.95, beta3 = 0.0, rho = 1.0, c = 1.0, gamma = 1.0 }}, hyper = {{ preset = "train_py" }} }}

[tiers.smoke]
optimizers = ["adam", "mada"]
seeds = [1, 2]

[tiers.smoke.run]
updates = 10
batch_size = 4
eval_interval = 5
checkpoint_interval = 5
schedule = {{ lr = 3e-3 }}
task = {{ kind = "lm", data = {{ dir = "{}" }}, model = {{ block_size = 16, vocab_size = 32, n_layer = 1, n_head = 2, n_embd = 16 }}, eval_chunks = 2, eval_batch = 4 }}
"#,
        data.display()
    );
    std::fs::write(experiments.join("tiny.toml"), toml).unwrap();
    paper_repro::paths::Paths { experiments, runs: dir.join("runs"), reports: dir.join("reports") }
}

#[test]
fn reports_count_only_finished_runs_and_refuse_corrupt_logs() {
    use paper_repro::catalog::Tier;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    corpus(&data);
    let paths = tiny_catalog(dir.path(), &data);
    let e = paper_repro::catalog::read(&paths.experiments.join("tiny.toml")).unwrap();
    let runs = e.plan(Tier::Smoke, &paths.runs).unwrap();
    // Three runs finish; MADA seed 2 stops at update 5 of 10.
    for r in &runs {
        let pause = (r.key == "mada" && r.seed == 2).then_some(5);
        train(&r.spec, &r.dir, Start::Auto, pause).unwrap();
    }
    paper_repro::results::report::regenerate(&paths, Tier::Smoke, &[]).unwrap();
    let report = std::fs::read_to_string(paths.report(Tier::Smoke)).unwrap();
    assert!(report.contains("3/4 runs finished"), "{report}");
    assert!(report.contains("MADA seed 2: unfinished at update 5"), "{report}");
    let table = std::fs::read_to_string(paths.tables(Tier::Smoke).join("tiny.md")).unwrap();
    let mada = table.lines().find(|l| l.starts_with("| MADA |")).unwrap();
    assert!(mada.contains("| 1/2 |") && mada.contains("(1 seed)"), "{mada}");
    // A cut, header-only or non-numeric eval.csv, and a missing log, are errors naming the file.
    let finished = runs.iter().find(|r| r.key == "adam" && r.seed == 1).unwrap();
    let eval = finished.dir.join("eval.csv");
    let good = std::fs::read_to_string(&eval).unwrap();
    for (bad, needle) in [
        (good.trim_end().to_string(), "cut off"),
        ("step,train_loss,eval_loss,eval_accuracy\n".to_string(), "eval.csv ends at update –"),
        (good.replace("NaN\n10,", "NaN\n10x,"), "not a whole number"),
    ] {
        std::fs::write(&eval, &bad).unwrap();
        let e = format!("{:#}", paper_repro::results::report::regenerate(&paths, Tier::Smoke, &[]).unwrap_err());
        assert!(e.contains("eval.csv") || e.contains(&finished.dir.display().to_string()), "{e}");
        assert!(e.contains(needle), "{needle}: {e}");
    }
    std::fs::write(&eval, &good).unwrap();
    std::fs::remove_file(finished.dir.join("log.csv")).unwrap();
    let e = format!("{:#}", paper_repro::results::report::regenerate(&paths, Tier::Smoke, &[]).unwrap_err());
    assert!(e.contains("log.csv has 0 rows"), "{e}");
}

#[test]
fn a_moved_binary_has_its_embedded_data() {
    let dir = tempfile::tempdir().unwrap();
    let moved = dir.path().join("paper-repro");
    std::fs::copy(BIN, &moved).unwrap();
    let experiments = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments");
    let o = Command::new(&moved)
        .current_dir(dir.path())
        .env("MADA_DATA", dir.path().join("data"))
        .args([
            "reproduce",
            "smoke",
            "--only",
            "vision-cnn",
            "--jobs",
            "1",
            "--experiments",
            experiments.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(dir.path().join("data/fashion-mnist-mini/train-images-idx3-ubyte.gz").exists());
}
