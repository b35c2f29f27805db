//! Checkpoints: the model, the optimizer and the loop state, so that a run resumes exactly.
//!
//! A checkpoint is a folder of three files; `state.json` is written last and carries the SHA-256
//! of the other two, so a folder is *complete* exactly when its `state.json` parses and both
//! checksums match (a half-written folder, or a zeroed or truncated file, is not). Saving writes
//! `.checkpoint.tmp/` completely, then swaps it in with two renames:
//!
//! ```text
//! 1. write .checkpoint.tmp/{model.safetensors, optimizer.bin, state.json}
//! 2. rename checkpoint/      → .checkpoint.old/
//! 3. rename .checkpoint.tmp/ → checkpoint/
//! 4. remove .checkpoint.old/
//! ```
//!
//! A kill can stop this between any two steps; at each point at least one complete checkpoint
//! exists (before step 3 the old one, from step 1 on the new one). [`find`] takes the complete
//! candidate with the most updates among the three folders, and [`settle`] moves it to
//! `checkpoint/` and removes the others, so every later step starts from a clean folder.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use mada::AnyOptimizer;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use outputs::write_atomically;

use crate::run::log::RunDir;
use crate::run::trainer::Opt;
use crate::run::workload::Workload;

/// The loop state saved with each checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
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

/// `state.json`: the loop state and the checksums that make the folder complete.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    state: LoopState,
    model_sha256: String,
    optimizer_sha256: String,
}

const MODEL: &str = "model.safetensors";
const OPTIMIZER: &str = "optimizer.bin";
const STATE: &str = "state.json";

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn tmp_dir(run: &RunDir) -> PathBuf {
    run.dir.join(".checkpoint.tmp")
}

fn old_dir(run: &RunDir) -> PathBuf {
    run.dir.join(".checkpoint.old")
}

/// The loop state of a complete checkpoint folder, or why it is not one.
fn check(dir: &Path) -> Result<LoopState, String> {
    let text = std::fs::read_to_string(dir.join(STATE)).map_err(|_| format!("{} has no {STATE}", dir.display()))?;
    let state: StateFile = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", dir.join(STATE).display()))?;
    for (name, want) in [(MODEL, &state.model_sha256), (OPTIMIZER, &state.optimizer_sha256)] {
        let bytes = std::fs::read(dir.join(name)).map_err(|_| format!("{} is missing", dir.join(name).display()))?;
        if sha256_hex(&bytes) != *want {
            return Err(format!("{} does not match its checksum in {STATE} (corrupt)", dir.join(name).display()));
        }
    }
    Ok(state.state)
}

/// The loop state of a complete checkpoint folder; `None` if incomplete or missing.
fn complete(dir: &Path) -> Option<LoopState> {
    check(dir).ok()
}

/// The complete checkpoint with the most updates among `checkpoint/`, `.checkpoint.tmp/` and
/// `.checkpoint.old/` (ties go to `checkpoint/`), with its loop state.
pub fn find(run: &RunDir) -> Option<(PathBuf, LoopState)> {
    [run.checkpoint(), tmp_dir(run), old_dir(run)].into_iter().filter_map(|d| complete(&d).map(|s| (d, s))).fold(
        None,
        |best: Option<(PathBuf, LoopState)>, c| match best {
            Some(b) if b.1.step >= c.1.step => Some(b),
            _ => Some(c),
        },
    )
}

/// The loop state of `checkpoint/` as [`settle`] left it, without changing anything (the other
/// processes of a data-parallel run, after rank 0 has settled the folder).
pub fn settled(run: &RunDir) -> Result<Option<LoopState>> {
    let target = run.checkpoint();
    if !target.exists() {
        return Ok(None);
    }
    check(&target).map(Some).map_err(|e| anyhow!("{} is not a complete checkpoint: {e}", target.display()))
}

/// Make the best complete checkpoint `checkpoint/` and remove every other checkpoint folder;
/// returns its loop state. `None` when no checkpoint was ever completed (an interrupted first
/// save is removed); an error when `checkpoint/` exists but is damaged and nothing replaces it.
pub fn settle(run: &RunDir) -> Result<Option<LoopState>> {
    let best = find(run);
    let target = run.checkpoint();
    if best.is_none() && target.exists() {
        bail!("the run's checkpoint cannot be resumed: {}", check(&target).err().unwrap_or_default());
    }
    if let Some((dir, _)) = &best {
        if *dir != target {
            if target.exists() {
                std::fs::remove_dir_all(&target).with_context(|| format!("cannot remove {}", target.display()))?;
            }
            std::fs::rename(dir, &target).with_context(|| format!("cannot move {} into place", dir.display()))?;
        }
    } else if target.exists() {
        std::fs::remove_dir_all(&target).with_context(|| format!("cannot remove {}", target.display()))?;
    }
    for d in [tmp_dir(run), old_dir(run)] {
        if d.exists() {
            std::fs::remove_dir_all(&d).with_context(|| format!("cannot remove {}", d.display()))?;
        }
    }
    Ok(best.map(|b| b.1))
}

/// The steps of a save, in order; [`save_until`] stops after any of them (tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SaveStep {
    WriteTemporary,
    MoveOldAside,
    MoveNewInPlace,
    RemoveOld,
}

/// Save a checkpoint (see the module docs).
pub fn save(run: &RunDir, work: &Workload, opt: &mut Opt, state: &LoopState) -> Result<()> {
    save_until(run, work, opt, state, SaveStep::RemoveOld)
}

/// [`save`], stopping after step `last` as a kill would (the tests' fault injection).
pub fn save_until(run: &RunDir, work: &Workload, opt: &mut Opt, state: &LoopState, last: SaveStep) -> Result<()> {
    // Optimizer state kept on a device comes back to the host format first (it moves back at
    // the next update): a checkpoint written on a GPU resumes on the CPU and back.
    opt.sync_to_host()?;
    let tmp = tmp_dir(run);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    work.params().save(&tmp.join(MODEL))?;
    let model =
        std::fs::read(tmp.join(MODEL)).with_context(|| format!("cannot read back {}", tmp.join(MODEL).display()))?;
    let optimizer = bincode::serde::encode_to_vec(opt.optimizer(), bincode::config::standard())
        .map_err(|e| anyhow!("encoding the optimizer state: {e}"))?;
    write_atomically(&tmp.join(OPTIMIZER), &optimizer)?;
    let file =
        StateFile { state: state.clone(), model_sha256: sha256_hex(&model), optimizer_sha256: sha256_hex(&optimizer) };
    write_atomically(&tmp.join(STATE), serde_json::to_string_pretty(&file)?.as_bytes())?;
    if last == SaveStep::WriteTemporary {
        return Ok(());
    }
    let (ck, old) = (run.checkpoint(), old_dir(run));
    if old.exists() {
        std::fs::remove_dir_all(&old).with_context(|| format!("cannot remove {}", old.display()))?;
    }
    if ck.exists() {
        std::fs::rename(&ck, &old).with_context(|| format!("cannot move {} aside", ck.display()))?;
    }
    if last == SaveStep::MoveOldAside {
        return Ok(());
    }
    std::fs::rename(&tmp, &ck).with_context(|| format!("cannot move {} into place", tmp.display()))?;
    if last == SaveStep::MoveNewInPlace {
        return Ok(());
    }
    if old.exists() {
        std::fs::remove_dir_all(&old).with_context(|| format!("cannot remove {}", old.display()))?;
    }
    Ok(())
}

/// Restore the model and optimizer from `checkpoint/` (after [`settle`]); errors name the file.
pub fn load(run: &RunDir, work: &Workload, opt: &mut Opt, spec_id: &str) -> Result<LoopState> {
    let ck = run.checkpoint();
    let state = complete(&ck).with_context(|| format!("{} is not a complete checkpoint", ck.display()))?;
    if state.spec_id != spec_id {
        bail!("{} belongs to run {}, not {spec_id}", ck.display(), state.spec_id);
    }
    work.params().load(&ck.join(MODEL))?;
    let p = ck.join(OPTIMIZER);
    let bytes = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let (restored, _): (AnyOptimizer<f32>, usize) =
        bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
            .map_err(|e| anyhow!("{}: corrupt optimizer state: {e}", p.display()))?;
    opt.set_optimizer(restored);
    Ok(state)
}
