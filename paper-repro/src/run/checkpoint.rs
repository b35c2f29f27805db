//! Checkpoints: model, optimizer and loop state, written to a temporary folder and swapped in.

use anyhow::{anyhow, bail, Context, Result};
use mada::AnyOptimizer;
use serde::{Deserialize, Serialize};

use outputs::write_atomically;

use crate::run::log::RunDir;
use crate::run::trainer::Opt;
use crate::run::workload::Workload;

/// The loop state saved with each checkpoint.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoopState {
    pub spec_id: String,
    /// Completed updates.
    pub step: u64,
    /// Rows in log.csv / eval.csv belonging to the checkpoint (extra rows are dropped on resume).
    pub log_rows: usize,
    pub eval_rows: usize,
    pub items: u64,
    pub elapsed_s: f64,
    /// Sum and count of training losses since the last evaluation (vision "train loss").
    pub loss_sum: f64,
    pub loss_count: u64,
}

pub(crate) fn save_checkpoint(run: &RunDir, work: &Workload, opt: &Opt, state: &LoopState) -> Result<()> {
    let tmp = run.dir.join(".checkpoint.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    work.params().save(&tmp.join("model.safetensors"))?;
    let cfg = bincode::config::standard();
    let bytes =
        bincode::serde::encode_to_vec(opt.optimizer(), cfg).map_err(|e| anyhow!("encoding optimizer state: {e}"))?;
    write_atomically(&tmp.join("optimizer.bin"), &bytes)?;
    write_atomically(&tmp.join("state.json"), serde_json::to_string_pretty(state)?.as_bytes())?;
    // Swap: the old checkpoint stays complete until the new one is in place.
    let ck = run.checkpoint();
    let old = run.dir.join(".checkpoint.old");
    let _ = std::fs::remove_dir_all(&old);
    if ck.exists() {
        std::fs::rename(&ck, &old)?;
    }
    std::fs::rename(&tmp, &ck)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

pub(crate) fn load_checkpoint(
    run: &RunDir,
    work: &Workload,
    opt: &mut Opt,
    spec_id: &str,
) -> Result<Option<LoopState>> {
    let ck = run.checkpoint();
    let state_path = ck.join("state.json");
    if !state_path.exists() {
        return Ok(None);
    }
    let state: LoopState = serde_json::from_str(&std::fs::read_to_string(&state_path)?)
        .with_context(|| format!("invalid {}", state_path.display()))?;
    if state.spec_id != spec_id {
        bail!("{} belongs to run {}, not {spec_id}", ck.display(), state.spec_id);
    }
    work.params().load(&ck.join("model.safetensors"))?;
    let p = ck.join("optimizer.bin");
    let bytes = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let (restored, _): (AnyOptimizer<f32>, usize) =
        bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
            .map_err(|e| anyhow!("{}: corrupt optimizer state: {e}", p.display()))?;
    *opt.optimizer_mut() = restored;
    Ok(Some(state))
}
