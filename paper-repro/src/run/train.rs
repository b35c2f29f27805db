//! The training loop, shared by the GPT-2 and vision experiments; faithful to the official
//! `train_ddp.py` / `train.py` (digest §5.3–5.5) on one device:
//!
//! per update t: `grad_accum` micro-batches, each loss divided by `grad_accum`; the
//! hyper-gradient (MADA/HyperAdam) is taken from the **first micro-batch after an update**,
//! before any clipping, and the hyper-step (hyper-gradients clamped to ±10, no step during the
//! hyper warm-up) is applied at once; the micro-batch gradients are summed; the global gradient
//! norm is clipped; decoupled weight decay p ← p − lr·wd·p on tensors of dimension ≥ 2; then the
//! optimizer update with the scheduled lr. (Single device: the official per-rank clipping before
//! the all-reduce and its 2-micro-batch first update are not reproduced.)
//!
//! Every run writes into its folder: `spec.json`, `log.csv` (one row per update), `eval.csv`,
//! `checkpoint/` (model, optimizer and loop state; replaced atomically) and, when it finishes,
//! `result.json`. A run started again with `resume` continues from its last checkpoint,
//! bit-identically on the CPU (data batches are functions of (seed, update, micro-batch); the
//! optimizer state is saved exactly). A non-finite loss or gradient stops the run with the
//! update and tensor named; the last good checkpoint is kept and `failed.json` says why.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use mada::Optimizer;

use outputs::write_atomically;

use crate::run::checkpoint::{load_checkpoint, save_checkpoint, LoopState};
use crate::run::log::{append, truncate_csv, RunDir, RunResult, EVAL_HEADER, LOG_HEADER};
use crate::run::spec::RunSpec;
use crate::run::trainer::Trainer;
use crate::run::workload::Workload;

/// Train (or resume) the run described by `spec` in `dir`. Returns its result — `None` if
/// `pause_after` updates were done in this call before the run finished (it stays resumable
/// from the checkpoint written then); an already finished run returns its saved result.
pub fn train(spec: &RunSpec, dir: &Path, bar: &ProgressBar, pause_after: Option<u64>) -> Result<Option<RunResult>> {
    spec.validate()?;
    let run = RunDir::new(dir);
    if run.finished() {
        return run.read_result().map(Some);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let id = spec.id();
    write_atomically(&dir.join("spec.json"), serde_json::to_string_pretty(spec)?.as_bytes())?;
    let _ = std::fs::remove_file(run.failed());
    let outcome = train_inner(spec, &run, &id, bar, pause_after);
    if let Err(e) = &outcome {
        let why = serde_json::json!({ "spec_id": id, "error": format!("{e:#}") });
        let _ = write_atomically(&run.failed(), serde_json::to_string_pretty(&why)?.as_bytes());
    }
    outcome
}

fn train_inner(
    spec: &RunSpec,
    run: &RunDir,
    id: &str,
    bar: &ProgressBar,
    pause_after: Option<u64>,
) -> Result<Option<RunResult>> {
    let mut tr = Trainer::new(spec)?;
    let mut state = match load_checkpoint(run, &tr.work, &mut tr.opt, id)? {
        Some(s) => {
            truncate_csv(&run.log(), LOG_HEADER, s.log_rows)?;
            truncate_csv(&run.eval(), EVAL_HEADER, s.eval_rows)?;
            s
        }
        None => {
            write_atomically(&run.log(), format!("{LOG_HEADER}\n").as_bytes())?;
            write_atomically(&run.eval(), format!("{EVAL_HEADER}\n").as_bytes())?;
            LoopState { spec_id: id.to_string(), ..Default::default() }
        }
    };
    bar.set_length(spec.updates);
    bar.set_position(state.step);
    let mut last_eval = (f64::NAN, f64::NAN, f64::NAN);
    let (mut best_loss, mut best_acc) = (f64::INFINITY, f64::NEG_INFINITY);
    // Best-so-far survives a resume: recompute from eval.csv.
    if let Ok(text) = std::fs::read_to_string(run.eval()) {
        for line in text.lines().skip(1) {
            let cells: Vec<f64> = line.split(',').map(|c| c.parse().unwrap_or(f64::NAN)).collect();
            if cells.len() == 4 {
                best_loss = best_loss.min(cells[2]);
                best_acc = best_acc.max(cells[3]);
                last_eval = (cells[1], cells[2], cells[3]);
            }
        }
    }
    let unit = if matches!(tr.work, Workload::Lm { .. }) { "tok" } else { "img" };
    let mut done_here = 0u64;
    while state.step < spec.updates {
        if pause_after.is_some_and(|p| done_here >= p) {
            save_checkpoint(run, &tr.work, &tr.opt, &state)?;
            return Ok(None);
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
        let fmt = |a: &[f64; 6]| a.iter().map(|v| format!("{v:e}")).collect::<Vec<_>>().join(",");
        let row = format!(
            "{},{:e},{},{},{},{},{:.1},{:.3}",
            state.step,
            out.lr,
            out.loss,
            out.grad_norm,
            fmt(&out.coefficients),
            fmt(&out.hypergradient),
            out.items as f64 / dt,
            state.elapsed_s
        );
        append(&run.log(), &row)?;
        state.log_rows += 1;
        bar.set_position(state.step);
        bar.set_message(format!("loss {:.4} {:.0} {unit}/s", out.loss, out.items as f64 / dt));

        let last = state.step == spec.updates;
        if state.step % spec.eval_interval == 0 || last {
            let (eval_loss, acc_v) = tr.work.evaluate()?;
            let train_loss = match tr.work.train_estimate()? {
                Some(t) => t,
                None => state.loss_sum / state.loss_count.max(1) as f64,
            };
            state.loss_sum = 0.0;
            state.loss_count = 0;
            if !eval_loss.is_finite() {
                bail!("update {}: the evaluation loss is {eval_loss}", state.step);
            }
            append(&run.eval(), &format!("{},{train_loss},{eval_loss},{acc_v}", state.step))?;
            state.eval_rows += 1;
            best_loss = best_loss.min(eval_loss);
            best_acc = best_acc.max(acc_v);
            last_eval = (train_loss, eval_loss, acc_v);
        }
        if state.step % spec.checkpoint_interval == 0 || last {
            save_checkpoint(run, &tr.work, &tr.opt, &state)?;
        }
    }
    let result = RunResult {
        spec_id: id.to_string(),
        label: spec.label.clone(),
        updates: state.step,
        final_eval_loss: last_eval.1,
        best_eval_loss: best_loss,
        final_eval_accuracy: last_eval.2,
        best_eval_accuracy: if best_acc.is_finite() { best_acc } else { f64::NAN },
        final_train_loss: last_eval.0,
        final_coefficients: tr.opt.optimizer().as_mada().map(|m| m.coefficients().to_array()),
        items_per_s: state.items as f64 / state.elapsed_s.max(1e-9),
        elapsed_s: state.elapsed_s,
        params: tr.work.params().num_params(),
        optimizer_state_bytes_per_param: tr.opt.optimizer().state_bytes_per_param(),
    };
    write_atomically(&run.result(), serde_json::to_string_pretty(&result)?.as_bytes())?;
    Ok(Some(result))
}
