//! The training loop, shared by the GPT-2 and vision experiments: updates ([`Trainer`]),
//! evaluations, checkpoints, and the run folder's files ([`crate::run::log`]).
//!
//! A run started again continues from its last complete checkpoint, bit-identically on the CPU
//! (data batches are functions of (seed, rank, update, micro-batch); the optimizer state is
//! saved exactly). One process at a time writes a run folder (an exclusive lock); a folder that
//! holds another spec's run is refused before anything in it changes. A non-finite loss or
//! gradient stops the run naming the update (counted from 1, as in log.csv) and what went
//! non-finite; the last good checkpoint is kept and `failed.json` says why. `result.json` is
//! written last: a folder without it is an unfinished run.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use mada::Optimizer;

use outputs::{remove_stale_temporaries, write_atomically, FolderLock};

use crate::parallel::{is_shared_failure, Collective, SingleProcess};
use crate::run::checkpoint::{self, LoopState, SaveStep};
use crate::run::log::Failure;
use crate::run::log::{
    code_version, read_rows, BatchRow, CsvLog, EvalRow, Execution, LogRow, RunDir, RunResult, RunState,
};
use crate::run::spec::RunSpec;
use crate::run::trainer::{Diverged, Trainer};
use crate::run::workload::{device, Workload};

/// How `train` treats a folder that holds an unfinished run of the same spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Refuse it (`paper-repro train` without `--resume`).
    Fresh,
    /// Continue it, which needs a checkpoint (`--resume`).
    Resume,
    /// Continue it from its checkpoint if it has one, else start over (`reproduce`).
    Auto,
}

/// What to do besides training.
pub struct TrainOptions<'a> {
    pub start: Start,
    /// Stop (resumably, after a checkpoint) once this many updates were done in this call.
    pub pause_after: Option<u64>,
    /// Write the corpus offset of every training sequence used ([`BatchRow`]) to this file.
    pub dump_batches: Option<&'a Path>,
    pub progress: &'a ProgressBar,
    /// Fault injection for the tests: the checkpoint save of this update stops after this step
    /// (as a kill there would) and the call returns an error.
    #[doc(hidden)]
    pub interrupt_save: Option<(u64, SaveStep)>,
}

impl<'a> TrainOptions<'a> {
    pub fn new(start: Start, progress: &'a ProgressBar) -> Self {
        Self { start, pause_after: None, dump_batches: None, progress, interrupt_save: None }
    }
}

/// How a call to [`train`] ended.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// The run is finished (now, or it already was).
    Finished(Box<RunResult>),
    /// `pause_after` updates were done; the run resumes from the checkpoint written then.
    Paused { step: u64 },
}

impl Outcome {
    pub fn result(&self) -> Option<&RunResult> {
        match self {
            Outcome::Finished(r) => Some(r),
            Outcome::Paused { .. } => None,
        }
    }
}

/// Train (or resume) the run of `spec` in `dir` with one process computing every rank.
pub fn train(spec: &RunSpec, dir: &Path, opts: &TrainOptions<'_>) -> Result<Outcome> {
    train_with(spec, dir, opts, Box::new(SingleProcess))
}

/// What the writing process found in the run folder before training.
enum Prepared {
    Finished(Box<RunResult>),
    Train { saved: Option<LoopState>, lock: FolderLock },
}

/// [`train`] as one process of a data-parallel run (or the only one). Only the process computing
/// rank 0 locks and writes the folder; the others wait until it has settled the folder, then
/// read the same checkpoint and follow.
pub fn train_with(
    spec: &RunSpec,
    dir: &Path,
    opts: &TrainOptions<'_>,
    collective: Box<dyn Collective>,
) -> Result<Outcome> {
    spec.validate()?;
    // Reach the device before anything is created.
    device(spec.device)?;
    let run = RunDir::new(dir);
    let id = spec.id();
    let writer = collective.writes();
    if writer && collective.processes() > 1 && opts.dump_batches.is_some() {
        bail!(
            "--dump-batches with several processes: the batches are those of the one-process run of the same spec; \
             dump them there"
        );
    }
    let existed = dir.exists();
    let prepared = if writer { Some(prepare(&run, &id, dir, opts)?) } else { None };
    collective.barrier()?;
    let (saved, lock) = match prepared {
        Some(Prepared::Finished(r)) => return Ok(Outcome::Finished(r)),
        Some(Prepared::Train { saved, lock }) => (saved, Some(lock)),
        // The writer has settled the folder and holds it: read what it found.
        None => match run.state(&id)? {
            RunState::Finished(r) => return Ok(Outcome::Finished(r)),
            _ => (checkpoint::settled(&run)?, None),
        },
    };
    let mut trainer = match Trainer::with_collective(spec, collective) {
        Ok(t) => t,
        Err(e) => {
            // Nothing of the run was written: leave no folder that looks like one.
            drop(lock);
            if writer && !existed {
                let _ = std::fs::remove_dir_all(dir);
            }
            return Err(e);
        }
    };
    if writer {
        write_atomically(&run.spec(), serde_json::to_string_pretty(spec)?.as_bytes())?;
        let _ = std::fs::remove_file(run.failed());
    }
    let outcome = train_loop(&mut trainer, spec, &run, &id, saved, opts, writer);
    if let Err(e) = &outcome {
        let diverged = e.downcast_ref::<Diverged>().map(|d| d.update);
        if writer {
            let why = Failure { spec_id: id.clone(), error: format!("{e:#}"), diverged_at: diverged };
            let _ = write_atomically(&run.failed(), serde_json::to_string_pretty(&why)?.as_bytes());
        }
        // An error every process finds alike: the others wait until failed.json is written
        // before they exit. Any other error is this process's alone, and ends the job (the
        // caller aborts it).
        if is_shared_failure(e) {
            trainer.collective().barrier()?;
        }
    }
    drop(lock);
    outcome
}

/// The writer's checks and recovery before training: another spec's folder is refused, a
/// finished run is reported, an unfinished one continued (or refused without `--resume`), an
/// interrupted checkpoint save settled; the folder is locked from here on.
fn prepare(run: &RunDir, id: &str, dir: &Path, opts: &TrainOptions<'_>) -> Result<Prepared> {
    // Refuse a folder of another spec before touching it (checked again under the lock).
    if let RunState::Finished(r) = run.state(id)? {
        return Ok(Prepared::Finished(r));
    }
    let lock = FolderLock::acquire(dir, "run folder")?;
    let resumable = match run.state(id)? {
        RunState::Finished(r) => return Ok(Prepared::Finished(r)),
        RunState::Unfinished => true,
        RunState::Absent => false,
    };
    if resumable && opts.start == Start::Auto {
        // A run that diverged diverges again from its last checkpoint (every batch and update is
        // deterministic): report it without training again.
        if let Some(update) = run.read_failure()?.and_then(|f| f.diverged_at) {
            return Err(Diverged { update, what: "diverged in an earlier attempt (see failed.json)".into() }.into());
        }
    }
    if resumable && opts.start == Start::Fresh {
        bail!("{} holds an unfinished run; pass --resume to continue it or choose another --out", dir.display());
    }
    if !resumable && opts.start == Start::Resume {
        bail!("--resume: {} holds no run to continue", dir.display());
    }
    remove_stale_temporaries(dir)?;
    // A run stopped before its first checkpoint has nothing to continue from: it starts again
    // (nothing is lost, its logs are rewritten from update 1).
    let saved = checkpoint::settle(run)?;
    Ok(Prepared::Train { saved, lock })
}

/// The batch dump: rows of updates up to `done` are kept from an earlier call, later ones are
/// written again.
fn open_dump(path: &Path, done: u64) -> Result<CsvLog<BatchRow>> {
    let log = CsvLog::<BatchRow>::new(path.to_path_buf());
    let kept: Vec<BatchRow> = if done > 0 && path.exists() {
        read_rows::<BatchRow>(path)?.into_iter().filter(|r| r.update <= done).collect()
    } else {
        Vec::new()
    };
    log.create()?;
    for r in &kept {
        log.append(r)?;
    }
    Ok(log)
}

fn train_loop(
    tr: &mut Trainer,
    spec: &RunSpec,
    run: &RunDir,
    id: &str,
    saved: Option<LoopState>,
    opts: &TrainOptions<'_>,
    writer: bool,
) -> Result<Outcome> {
    let (log, eval) = (run.log(), run.eval());
    let mut state = match saved {
        Some(_) => {
            let s = checkpoint::load(run, &tr.work, &mut tr.opt, id)?;
            if writer {
                log.truncate(s.log_rows)?;
                eval.truncate(s.eval_rows)?;
            }
            s
        }
        None => {
            if writer {
                log.create()?;
                eval.create()?;
            }
            LoopState { spec_id: id.to_string(), ..Default::default() }
        }
    };
    let dump = match (opts.dump_batches, writer) {
        (Some(p), true) => Some(open_dump(p, state.step)?),
        _ => None,
    };
    let bar = opts.progress;
    bar.set_length(spec.updates);
    bar.set_position(state.step);
    // Best-so-far survives a resume: recomputed from eval.csv.
    let evals: Vec<EvalRow> = if writer && state.eval_rows > 0 { read_rows(eval.path())? } else { Vec::new() };
    let mut last_eval = evals.last().copied();
    let mut best_loss = evals.iter().map(|e| e.eval_loss).fold(f64::INFINITY, f64::min);
    let mut best_acc = evals.iter().map(|e| e.eval_accuracy).fold(f64::NEG_INFINITY, f64::max);
    let unit = if matches!(tr.work, Workload::Lm { .. }) { "tok" } else { "img" };
    let mut done_here = 0u64;
    while state.step < spec.updates {
        if opts.pause_after.is_some_and(|p| done_here >= p) {
            if writer {
                checkpoint::save(run, &tr.work, &mut tr.opt, &state)?;
            }
            return Ok(Outcome::Paused { step: state.step });
        }
        done_here += 1;
        let t0 = Instant::now();
        let out = tr.step(state.step)?;
        let dt = t0.elapsed().as_secs_f64();
        state.elapsed_s += dt;
        state.items += out.items as u64;
        state.step += 1;
        state.loss_sum += out.loss;
        state.loss_count += 1;
        if let Some(d) = &dump {
            for (micro, rows) in &out.batches {
                for (row, &offset) in rows.iter().enumerate() {
                    let r = BatchRow {
                        update: state.step,
                        micro_batch: micro + 1,
                        row: row as u64 + 1,
                        offset: offset as u64,
                    };
                    d.append(&r)?;
                }
            }
        }
        if writer {
            log.append(&LogRow {
                step: state.step,
                lr: out.lr,
                loss: out.loss,
                grad_norm: out.grad_norm,
                coefficients: out.coefficients,
                hyper: out.hyper,
                items_per_s: out.items as f64 / dt,
                elapsed_s: state.elapsed_s,
            })?;
        }
        state.log_rows += 1;
        bar.set_position(state.step);
        bar.set_message(format!("loss {:.4} {:.0} {unit}/s", out.loss, out.items as f64 / dt));

        let last = state.step == spec.updates;
        if state.step % spec.eval_interval == 0 || last {
            // Every process evaluates (the writer alone records it; the others would only
            // wait): the decisions taken on an evaluation are every process's.
            tr.check_processes_agree(state.step)?;
            let (eval_loss, eval_accuracy) = tr.work.evaluate()?;
            let train_loss = match tr.work.train_estimate()? {
                Some(t) => t,
                None => state.loss_sum / state.loss_count.max(1) as f64,
            };
            state.loss_sum = 0.0;
            state.loss_count = 0;
            if !eval_loss.is_finite() {
                return Err(Diverged { update: state.step, what: format!("the evaluation loss is {eval_loss}") }.into());
            }
            let row = EvalRow { step: state.step, train_loss, eval_loss, eval_accuracy };
            if writer {
                eval.append(&row)?;
            }
            state.eval_rows += 1;
            best_loss = best_loss.min(eval_loss);
            best_acc = best_acc.max(eval_accuracy);
            last_eval = Some(row);
        }
        if writer && (state.step % spec.checkpoint_interval == 0 || last) {
            match opts.interrupt_save {
                Some((at, stop)) if at == state.step => {
                    checkpoint::save_until(run, &tr.work, &mut tr.opt, &state, stop)?;
                    bail!("update {at}: the checkpoint save was interrupted after {stop:?} (fault injection)");
                }
                _ => checkpoint::save(run, &tr.work, &mut tr.opt, &state)?,
            }
        }
    }
    let e = last_eval.context("a finished run has no evaluation")?;
    let result = RunResult {
        spec_id: id.to_string(),
        label: spec.label.clone(),
        updates: state.step,
        final_eval_loss: e.eval_loss,
        best_eval_loss: best_loss,
        final_eval_accuracy: e.eval_accuracy,
        best_eval_accuracy: if best_acc.is_finite() { best_acc } else { f64::NAN },
        final_train_loss: e.train_loss,
        final_coefficients: tr.opt.optimizer().as_mada().map(|m| m.coefficients().to_array()),
        items_per_s: state.items as f64 / state.elapsed_s.max(1e-9),
        elapsed_s: state.elapsed_s,
        params: tr.work.params().num_params(),
        optimizer_state_bytes_per_param: tr.opt.optimizer().state_bytes_per_param(),
        ranks: spec.ranks,
        execution: Execution {
            processes: tr.collective().processes(),
            backend: tr.collective().backend().name().into(),
        },
        commit: code_version(),
    };
    if writer {
        write_atomically(&run.result(), serde_json::to_string_pretty(&result)?.as_bytes())?;
    }
    Ok(Outcome::Finished(Box::new(result)))
}
