//! Data-parallel training through MPI (feature `mpi`; `just test` enables it and installs
//! OpenMPI): N processes, one rank each, train the run one process trains with `ranks = N`.
//!
//! With 2 processes the all-reduce adds two summands, which IEEE addition does exactly as one
//! process does, so the runs are compared bit for bit: every logged loss, gradient norm,
//! coefficient and hyper-gradient, every evaluation, the final parameters and optimizer state.
#![cfg(feature = "mpi")]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use paper_repro::run::checkpoint;
use paper_repro::run::spec::{ClipMode, RunSpec, Schedule};
use paper_repro::run::RunDir;

mod common;
use common::{corpus, lm_spec, spec_file};

const BIN: &str = env!("CARGO_BIN_EXE_paper-repro");

/// [`lm_spec`] as a data-parallel run: MADA learning every coefficient from ρ = 0.5, 2 ranks of
/// 2 micro-batches each.
fn spec(data: &Path, updates: u64) -> RunSpec {
    let mut s = lm_spec(data, updates);
    s.label = "dp".into();
    s.optimizer = serde_json::from_str(
        r#"{"name": "mada", "coefficients": {"beta1": 0.9, "beta2": 0.95, "beta3": 0.0, "rho": 0.5, "c": 1.0, "gamma": 1.0},
            "hyper": {"preset": "train_ddp", "start": 1}}"#,
    )
    .unwrap();
    s.grad_accum = 4;
    s.ranks = 2;
    s.seed = 5;
    s
}

fn paper_repro(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env("RAYON_NUM_THREADS", "1").output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// One process computing both ranks.
fn train_one(file: &Path, out: &Path) {
    let o = paper_repro(&["train", file.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
}

/// Two MPI processes, through `launch`.
fn launch(file: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["launch", "--processes", "2", file.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    paper_repro(&args)
}

/// Everything of a run that does not measure time: log.csv and eval.csv without their
/// wall-clock columns, the final parameters and optimizer state, result.json's metrics.
fn run_contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let log = std::fs::read_to_string(dir.join("log.csv")).unwrap();
    let header: Vec<&str> = log.lines().next().unwrap().split(',').collect();
    let keep: Vec<usize> = (0..header.len()).filter(|&i| !matches!(header[i], "items_per_s" | "elapsed_s")).collect();
    let log: Vec<String> = log
        .lines()
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            keep.iter().map(|&i| cells[i]).collect::<Vec<_>>().join(",")
        })
        .collect();
    out.push(("log.csv".into(), log.join("\n").into_bytes()));
    out.push(("eval.csv".into(), std::fs::read(dir.join("eval.csv")).unwrap()));
    for f in ["model.safetensors", "optimizer.bin"] {
        out.push((f.into(), std::fs::read(dir.join("checkpoint").join(f)).unwrap()));
    }
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("result.json")).unwrap()).unwrap();
    for k in ["final_eval_loss", "best_eval_loss", "final_train_loss", "final_coefficients", "updates", "ranks"] {
        out.push((k.into(), r[k].to_string().into_bytes()));
    }
    out
}

fn execution(dir: &Path) -> serde_json::Value {
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("result.json")).unwrap()).unwrap();
    r["execution"].clone()
}

fn assert_same_run(a: &Path, b: &Path) {
    let (a, b) = (run_contents(a), run_contents(b));
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x == y, "{name} differs:\n{}\n---\n{}", String::from_utf8_lossy(x), String::from_utf8_lossy(y));
    }
}

#[test]
fn two_mpi_processes_train_the_one_process_run_of_ranks_2_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    corpus(&data);
    for clip in [ClipMode::Global, ClipMode::PerRank] {
        let mut s = spec(&data, 7);
        s.clip_mode = clip;
        // Small enough that every update clips.
        s.grad_clip = 0.05;
        let file = spec_file(dir.path(), &s);
        let (one, two) = (dir.path().join(format!("one-{clip:?}")), dir.path().join(format!("two-{clip:?}")));
        train_one(&file, &one);
        let o = launch(&file, &two, &[]);
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.contains("final eval loss")).count(), 1);
        assert_same_run(&one, &two);
        assert_eq!(execution(&two), serde_json::json!({"processes": 2, "backend": "mpi"}));
        assert_eq!(execution(&one), serde_json::json!({"processes": 1, "backend": "single-process"}));
        // The coefficients moved: the hyper-gradient, summed over the processes, was applied.
        let log = std::fs::read_to_string(two.join("log.csv")).unwrap();
        let rows: Vec<&str> = log.lines().collect();
        assert_ne!(rows[1].split(',').nth(4), rows[rows.len() - 1].split(',').nth(4), "{log}");
    }
}

/// The processes of `out`'s job, by their command lines: (pid, MPI rank).
fn job_processes(out: &Path) -> Vec<(u32, u32)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if !cmd.contains("--data-parallel") || !cmd.contains(out.to_str().unwrap()) {
            continue;
        }
        let Ok(env) = std::fs::read(e.path().join("environ")) else { continue };
        let rank = String::from_utf8_lossy(&env)
            .split('\0')
            .find_map(|v| v.strip_prefix("OMPI_COMM_WORLD_RANK=").and_then(|r| r.parse().ok()));
        if let Some(rank) = rank {
            found.push((pid, rank));
        }
    }
    found
}

fn logged_rows(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("log.csv")).map(|t| t.lines().count().saturating_sub(1)).unwrap_or(0)
}

/// Updates of the kill test's run.
const UPDATES: u64 = 2000;

#[test]
fn a_killed_rank_ends_the_job_naming_it_and_the_resumed_run_equals_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    corpus(&data);
    // Long enough (about 5 s of training here) that the job is still running when rank 1 is
    // killed after 25 updates: with 400 it finished in about 1 s, a race on a fast machine.
    let mut s = spec(&data, UPDATES);
    s.eval_interval = 50;
    s.checkpoint_interval = 10;
    let file = spec_file(dir.path(), &s);
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    train_one(&file, &one);

    let job = Command::new(BIN)
        .args(["launch", "--processes", "2", file.to_str().unwrap(), "--out", two.to_str().unwrap()])
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while logged_rows(&two) < 25 {
        assert!(t.elapsed() < Duration::from_secs(120), "the job made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    let victims = job_processes(&two);
    let &(pid, _) = victims.iter().find(|(_, rank)| *rank == 1).unwrap_or_else(|| panic!("no rank 1 in {victims:?}"));
    Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    let o = job.wait_with_output().unwrap();
    assert!(!o.status.success());
    let said = text(&o);
    assert!(said.contains("rank 1") && said.contains("failed"), "{said}");
    assert!(logged_rows(&two) < UPDATES as usize, "the job went on after its rank died");
    // The last complete checkpoint is intact (a multiple of the interval, within the log).
    let state = checkpoint::settled(&RunDir::new(&two)).unwrap().expect("a checkpoint");
    assert!(
        state.step.is_multiple_of(10) && state.step > 0 && state.step as usize <= logged_rows(&two),
        "{}",
        state.step
    );
    assert!(!two.join("result.json").exists());

    let o = launch(&file, &two, &["--resume"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_same_run(&one, &two);
}

#[test]
fn a_divergence_ends_every_process_with_its_exit_code_and_failed_json() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    corpus(&data);
    let mut s = spec(&data, 30);
    s.optimizer = serde_json::from_str(r#"{"name": "sgd"}"#).unwrap();
    s.grad_clip = 0.0;
    s.schedule = Schedule { lr: 1e4, min_lr: 1e4, warmup: 0, decay_until: 0, in_micro_steps: false };
    let file = spec_file(dir.path(), &s);
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let single = paper_repro(&["train", file.to_str().unwrap(), "--out", one.to_str().unwrap()]);
    let o = paper_repro(&["launch", "--processes", "2", file.to_str().unwrap(), "--out", two.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(i32::from(paper_repro::reproduce::DIVERGED_EXIT)), "{}", text(&o));
    assert!(text(&o).contains("diverged"), "{}", text(&o));
    let failure = RunDir::new(&two).read_failure().unwrap().expect("failed.json");
    let single_failure = RunDir::new(&one).read_failure().unwrap().unwrap();
    assert_eq!(failure.diverged_at, single_failure.diverged_at, "{}\n{}", text(&o), text(&single));
    assert_eq!(failure.error, single_failure.error);
    assert_eq!(text(&o).matches(&failure.error).count(), 1, "rank 0 alone reports it: {}", text(&o));
}

#[test]
fn what_can_be_known_before_the_processes_start_is_refused_before() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    corpus(&data);
    let mut s = spec(&data, 3);
    s.ranks = 1;
    let file = spec_file(dir.path(), &s);
    let out = dir.path().join("run");
    let o = paper_repro(&["launch", "--processes", "2", file.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(!o.status.success() && text(&o).contains("ranks = 1 but 2 processes"), "{}", text(&o));
    assert!(!out.exists());

    // Started by mpirun without --data-parallel, each process would train the whole run.
    let s = spec(&data, 3);
    let file = spec_file(dir.path(), &s);
    let o = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-n", "2", BIN, "train", file.to_str().unwrap(), "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success() && text(&o).contains("without --data-parallel mpi"), "{}", text(&o));
    assert!(!out.exists());

    // reproduce with a backend the build lacks, or one the runs' device cannot use: refused
    // before the runs root exists.
    let experiments = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments");
    let runs = dir.path().join("runs");
    let expected = if cfg!(feature = "nccl") { "the NCCL backend trains on GPUs" } else { "no nccl backend" };
    let o = paper_repro(&[
        "reproduce",
        "smoke",
        "--only",
        "gpt2-124m",
        "--data-parallel",
        "nccl",
        "--experiments",
        experiments.to_str().unwrap(),
        "--runs",
        runs.to_str().unwrap(),
    ]);
    assert!(!o.status.success() && text(&o).contains(expected), "{}", text(&o));
    assert!(!runs.exists());
}

/// `reproduce --data-parallel mpi` trains the runs of ranks = 2 (the smoke GPT-2 runs) as two
/// processes each, into the folders and with the results of the one-process emulation, and the
/// report says how each was executed.
#[test]
fn reproduce_trains_ranked_runs_as_processes_with_the_results_of_the_emulation() {
    let dir = tempfile::tempdir().unwrap();
    let experiments = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments");
    let mut roots = Vec::new();
    for (name, extra) in [("emulated", &[][..]), ("processes", &["--data-parallel", "mpi"][..])] {
        let (runs, reports) = (dir.path().join(name).join("runs"), dir.path().join(name).join("reports"));
        let mut args = vec!["reproduce", "smoke", "--only", "gpt2-124m", "--jobs", "1"];
        args.extend_from_slice(extra);
        args.extend(["--experiments", experiments.to_str().unwrap()]);
        args.extend(["--runs", runs.to_str().unwrap(), "--reports", reports.to_str().unwrap()]);
        let o = Command::new(BIN).args(&args).env("MADA_DATA", dir.path().join("data")).output().unwrap();
        assert!(o.status.success(), "{name}: {}", text(&o));
        roots.push((runs, reports));
    }
    let folders: Vec<_> = std::fs::read_dir(roots[0].0.join("gpt2-124m/smoke"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|f| !f.to_string_lossy().starts_with('.'))
        .collect();
    assert!(!folders.is_empty());
    for f in &folders {
        let (a, b) = (roots[0].0.join("gpt2-124m/smoke").join(f), roots[1].0.join("gpt2-124m/smoke").join(f));
        assert_same_run(&a, &b);
        assert_eq!(execution(&a), serde_json::json!({"processes": 1, "backend": "single-process"}));
        assert_eq!(execution(&b), serde_json::json!({"processes": 2, "backend": "mpi"}), "{}", b.display());
    }
    let report = std::fs::read_to_string(roots[1].1.join("smoke/REPORT.md")).unwrap();
    assert!(report.contains(&format!("executed as {} runs of 2 ranks as 2 mpi processes", folders.len())), "{report}");
}
