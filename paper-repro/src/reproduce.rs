//! `just reproduce [tier]`: run every experiment of the tier that has no finished run yet
//! (interrupted runs resume from their checkpoint), then regenerate the tier's tables, figures
//! and report. `just tables`, `just figures` and `just report` regenerate from existing runs.
//!
//! Everything is planned and checked first (the catalog, every spec, the devices the runs
//! need), so a mistake stops before any run folder exists. One `reproduce` at a time holds the
//! runs root (an exclusive lock). Training runs are shared out over `jobs` worker processes
//! (`paper-repro train`, one thread each when the runs are CPU runs: small models train
//! faster one per core than one on all cores, and the results are bit-identical), a run that
//! starts from another (`init_from = "@artifact:key:seed"`) waiting for it. With
//! `--data-parallel mpi|nccl` a run of `ranks` = N > 1 is trained by N processes instead
//! (`paper-repro launch`), one run at a time, with the emulation's folder and results. The
//! analysis experiments (Reddi, bounds) run in this process afterwards.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use outputs::FolderLock;

use crate::catalog::{self, Experiment, Kind, PlannedRun, Tier};
use crate::data::embedded::ensure_embedded_data;
use crate::parallel::{launch, Backend};
use crate::paths::Paths;
use crate::results::report;
use crate::run::spec::{DeviceKind, Task};
use crate::run::workload::device;
use crate::run::{train, Diverged, RunDir, Start, TrainOptions};

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).expect("valid template").progress_chars("=> ")
}

/// The exit code of a `paper-repro train` whose run diverged.
pub const DIVERGED_EXIT: u8 = 3;

/// What `reproduce` did.
pub struct Outcome {
    pub runs_total: usize,
    /// Runs with a result: finished, or diverged (a result too, in a robustness grid).
    pub runs_finished: usize,
    pub runs_diverged: usize,
    pub failures: Vec<String>,
}

/// Finished, diverged, and the failures of some runs.
#[derive(Default)]
struct Tally {
    finished: usize,
    diverged: usize,
    failures: Vec<String>,
}

/// How `reproduce` runs the training runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Only this artifact.
    pub only: Option<String>,
    /// Worker processes (1: every run in this process, one after the other).
    pub jobs: usize,
    /// The `paper-repro` binary the workers run (default: this executable).
    pub exe: Option<PathBuf>,
    /// Train the runs of ranks = N > 1 as N processes of this backend (`paper-repro launch`),
    /// one run at a time; None: every rank in one process (the same results).
    pub data_parallel: Option<Backend>,
}

impl Default for Options {
    fn default() -> Self {
        Self { only: None, jobs: 1, exe: None, data_parallel: None }
    }
}

/// The number of cores, the default `--jobs` of CPU tiers.
pub fn default_jobs(tier_devices: &[DeviceKind]) -> usize {
    if tier_devices.iter().any(|d| *d != DeviceKind::Cpu) {
        1
    } else {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    }
}

/// Run the tier, then regenerate everything.
pub fn reproduce(paths: &Paths, tier: Tier, opts: &Options) -> Result<Outcome> {
    let experiments: Vec<Experiment> = catalog::load(&paths.experiments)?
        .into_iter()
        .filter(|e| opts.only.as_ref().is_none_or(|o| *o == e.artifact))
        .collect();
    if experiments.is_empty() {
        bail!("no experiment in {} matches", paths.experiments.display());
    }
    // Plan and check everything before any work: catalog, specs, devices.
    let plans: Vec<(Experiment, Vec<PlannedRun>)> =
        experiments.into_iter().map(|e| e.plan(tier, &paths.runs).map(|p| (e, p))).collect::<Result<_>>()?;
    let mut devices: Vec<DeviceKind> = plans.iter().flat_map(|(_, p)| p.iter().map(|r| r.spec.device)).collect();
    devices.sort_by_key(|d| d.name());
    devices.dedup();
    for d in &devices {
        device(*d).with_context(|| format!("tier {tier} needs the device \"{}\"", d.name()))?;
    }
    let data_parallel = opts.data_parallel.filter(|b| *b != Backend::SingleProcess);
    if let Some(backend) = data_parallel {
        let ranked: Vec<&PlannedRun> = plans.iter().flat_map(|(_, p)| p).filter(|r| r.spec.ranks > 1).collect();
        if !ranked.is_empty() {
            launch::preflight(backend)?;
        }
        for r in ranked {
            launch::check_spec(&r.spec, r.spec.ranks, backend)
                .with_context(|| format!("{} (--data-parallel {})", r.dir.display(), backend.name()))?;
        }
    }
    ensure_embedded_data()?;
    std::fs::create_dir_all(&paths.runs).with_context(|| format!("cannot create {}", paths.runs.display()))?;
    let _lock = FolderLock::acquire(&paths.runs, "runs root")?;

    let runs: Vec<PlannedRun> = plans
        .iter()
        .filter(|(e, _)| matches!(e.kind, Kind::Training | Kind::Grid))
        .flat_map(|(_, p)| p.clone())
        .collect();
    let multi = MultiProgress::new();
    if !std::io::stderr().is_terminal() {
        multi.set_draw_target(ProgressDrawTarget::hidden());
    }
    let Tally { finished: runs_finished, diverged: runs_diverged, mut failures } =
        if opts.jobs <= 1 && data_parallel.is_none() {
            train_here(&runs, &multi)
        } else {
            let exe = match &opts.exe {
                Some(e) => e.clone(),
                None => std::env::current_exe().context("cannot find this executable to start workers")?,
            };
            // A data-parallel run takes the whole machine (its processes, or every GPU): one
            // run at a time.
            let jobs = if data_parallel.is_some() { 1 } else { opts.jobs };
            let threads = (std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) / jobs).max(1);
            train_in_workers(&runs, &exe, jobs, threads, data_parallel, &multi)?
        };
    for (e, _) in &plans {
        let Some(t) = e.tiers.get(&tier) else { continue };
        let failed = |err: anyhow::Error| format!("{}: {err:#}", e.artifact);
        match e.kind {
            Kind::Training | Kind::Grid => {}
            Kind::Reddi => {
                let steps = t.steps.unwrap_or(2_000_000);
                let Some(settings) = &e.reddi else {
                    failures.push(format!("{}: the experiment has no [reddi] settings", e.artifact));
                    continue;
                };
                if let Err(err) =
                    analysis::report::reddi_outputs(&paths.analysis(tier), settings, steps, (steps / 2000).max(1))
                {
                    failures.push(failed(err));
                }
            }
            Kind::Bounds => {
                let Some(settings) = &t.bounds else {
                    failures.push(format!("{}: tier {tier} has no bounds settings", e.artifact));
                    continue;
                };
                let slots = paths.reference().join("paper-bounds.toml");
                let regression = paths.experiments.join("bounds-worst.json");
                match multi.suspend(|| analysis::report::run(&paths.analysis(tier), settings, &slots, &regression)) {
                    Ok(o) => {
                        println!("bounds: {} instances, {} violations", o.instances, o.violations);
                        println!("mutants: {} of {} detected", o.mutants_detected, o.mutants);
                        if o.violations > 0 {
                            failures.push(format!("{}: {} bound violations", e.artifact, o.violations))
                        }
                    }
                    Err(err) => failures.push(failed(err)),
                }
            }
        }
    }
    report::regenerate(paths, tier, &failures)?;
    Ok(Outcome { runs_total: runs.len(), runs_finished, runs_diverged, failures })
}

fn run_bar(multi: &MultiProgress, run: &PlannedRun) -> ProgressBar {
    let bar = multi.add(
        ProgressBar::new(run.spec.updates)
            .with_style(style("  {prefix} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")),
    );
    bar.set_prefix(format!("{} {} s{}", run.artifact, run.spec.label, run.seed));
    bar
}

/// A line per finished run when the progress bars are not drawn (not a terminal).
fn announce(multi: &MultiProgress, run: &PlannedRun, done: usize, total: usize, outcome: &str) {
    if multi.is_hidden() {
        println!("[{done}/{total}] {} {} seed {}: {outcome}", run.artifact, run.spec.label, run.seed);
        let _ = std::io::stdout().flush();
    }
}

fn failure(run: &PlannedRun, err: impl std::fmt::Display) -> String {
    format!("{} ({}, seed {}): {err}", run.artifact, run.spec.label, run.seed)
}

/// Every run in this process, in order.
fn train_here(runs: &[PlannedRun], multi: &MultiProgress) -> Tally {
    let mut tally = Tally::default();
    for (i, run) in runs.iter().enumerate() {
        let bar = run_bar(multi, run);
        match train(&run.spec, &run.dir, &TrainOptions::new(Start::Auto, &bar)) {
            Ok(_) => {
                tally.finished += 1;
                announce(multi, run, i + 1, runs.len(), "finished");
            }
            Err(err) if err.downcast_ref::<Diverged>().is_some() => {
                tally.diverged += 1;
                announce(multi, run, i + 1, runs.len(), &format!("diverged ({err:#})"));
            }
            Err(err) => {
                announce(multi, run, i + 1, runs.len(), "failed");
                tally.failures.push(failure(run, format!("{err:#}")));
            }
        }
        bar.finish_and_clear();
        multi.remove(&bar);
    }
    tally
}

/// The run folders a run starts from (its `init_from` when that is a run of the catalog).
fn dependencies(run: &PlannedRun, all: &[PlannedRun]) -> Vec<PathBuf> {
    match &run.spec.task {
        Task::Lm { init_from: Some(p), .. } => all.iter().filter(|r| r.dir == *p).map(|r| r.dir.clone()).collect(),
        _ => Vec::new(),
    }
}

struct Worker {
    index: usize,
    child: Child,
    bar: ProgressBar,
    stderr: Arc<Mutex<String>>,
    /// The spec file a data-parallel launch's processes read, removed when the worker ends.
    spec_file: Option<PathBuf>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(f) = &self.spec_file {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Start `paper-repro train - --out DIR --auto --progress-lines` for one run (its spec on
/// stdin), its progress lines feeding the run's bar. With a data-parallel backend, a run of
/// ranks = N > 1 starts as `paper-repro launch --processes N --backend B SPEC --out DIR --auto
/// --progress-lines` instead (every process reads the spec from a file), the N processes
/// sharing the worker's threads.
fn start_worker(
    exe: &Path,
    run: &PlannedRun,
    index: usize,
    threads: usize,
    data_parallel: Option<Backend>,
    multi: &MultiProgress,
) -> Result<Worker> {
    let ranks = run.spec.ranks;
    let (mut cmd, spec_file) = match data_parallel {
        Some(backend) if ranks > 1 => {
            let file = std::env::temp_dir().join(format!("paper-repro-launch-{}-{index}.json", std::process::id()));
            std::fs::write(&file, serde_json::to_string(&run.spec)?)
                .with_context(|| format!("cannot write {}", file.display()))?;
            let mut cmd = Command::new(exe);
            cmd.args(["launch", "--processes", &ranks.to_string(), "--backend", backend.name()])
                .arg(&file)
                .arg("--out")
                .arg(&run.dir)
                .env("RAYON_NUM_THREADS", (threads / ranks as usize).max(1).to_string());
            (cmd, Some(file))
        }
        _ => {
            let mut cmd = Command::new(exe);
            cmd.args(["train", "-", "--out"]).arg(&run.dir).env("RAYON_NUM_THREADS", threads.to_string());
            (cmd, None)
        }
    };
    let mut child = cmd
        .args(["--auto", "--progress-lines"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            if let Some(f) = &spec_file {
                let _ = std::fs::remove_file(f);
            }
            anyhow::Error::new(e).context(format!("cannot start the worker {}", exe.display()))
        })?;
    let mut stdin = child.stdin.take().context("worker stdin")?;
    if spec_file.is_none() {
        stdin.write_all(serde_json::to_string(&run.spec)?.as_bytes())?;
    }
    drop(stdin);
    let bar = run_bar(multi, run);
    let out = child.stdout.take().context("worker stdout")?;
    let b = bar.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
            if let Some(rest) = line.strip_prefix("progress ") {
                let mut parts = rest.split_whitespace();
                if let Some(step) = parts.next().and_then(|s| s.parse::<u64>().ok()) {
                    b.set_position(step);
                }
                b.set_message(parts.collect::<Vec<_>>().join(" "));
            }
        }
    });
    let stderr = Arc::new(Mutex::new(String::new()));
    let (err, sink) = (child.stderr.take().context("worker stderr")?, stderr.clone());
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(err), &mut text);
        *sink.lock().expect("stderr sink") = text;
    });
    Ok(Worker { index, child, bar, stderr, spec_file })
}

/// The runs over `jobs` worker processes, dependencies first.
fn train_in_workers(
    runs: &[PlannedRun],
    exe: &Path,
    jobs: usize,
    threads: usize,
    data_parallel: Option<Backend>,
    multi: &MultiProgress,
) -> Result<Tally> {
    let mut pending: Vec<usize> = (0..runs.len()).collect();
    let mut failed_dirs: BTreeSet<PathBuf> = BTreeSet::new();
    let mut workers: Vec<Worker> = Vec::new();
    let (mut tally, mut done) = (Tally::default(), 0);
    while !pending.is_empty() || !workers.is_empty() {
        // Start what is ready.
        while workers.len() < jobs {
            let ready = pending.iter().position(|&i| {
                dependencies(&runs[i], runs).iter().all(|d| RunDir::new(d).result().exists() || failed_dirs.contains(d))
            });
            let Some(pos) = ready else { break };
            let i = pending.remove(pos);
            if let Some(d) = dependencies(&runs[i], runs).into_iter().find(|d| failed_dirs.contains(d)) {
                failed_dirs.insert(runs[i].dir.clone());
                done += 1;
                tally.failures.push(failure(&runs[i], format!("its start {} failed", d.display())));
                continue;
            }
            workers.push(start_worker(exe, &runs[i], i, threads, data_parallel, multi)?);
        }
        if workers.is_empty() && !pending.is_empty() {
            bail!("the remaining runs wait for runs that are not planned (a cycle of init_from?)");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        let mut still = Vec::new();
        for mut w in workers.drain(..) {
            match w.child.try_wait()? {
                None => still.push(w),
                Some(status) => {
                    let run = &runs[w.index];
                    done += 1;
                    w.bar.finish_and_clear();
                    multi.remove(&w.bar);
                    if status.success() {
                        tally.finished += 1;
                        announce(multi, run, done, runs.len(), "finished");
                    } else if status.code() == Some(DIVERGED_EXIT as i32) {
                        tally.diverged += 1;
                        announce(multi, run, done, runs.len(), "diverged");
                    } else {
                        // The worker's stderr reader may still be draining: give it a moment.
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        let text = w.stderr.lock().expect("stderr").clone();
                        let last = text
                            .lines()
                            .rev()
                            .find(|l| !l.trim().is_empty())
                            .unwrap_or("the worker died")
                            .trim()
                            .to_string();
                        announce(multi, run, done, runs.len(), "failed");
                        failed_dirs.insert(run.dir.clone());
                        tally.failures.push(failure(run, last.trim_start_matches("error: ")));
                    }
                }
            }
        }
        workers = still;
    }
    Ok(tally)
}
