//! A run's folder and the one schema of the files in it.
//!
//! ```text
//! <run>/spec.json      the resolved spec (its hash is the run's id)
//!       log.csv        one row per update            ([`LogRow`])
//!       eval.csv       one row per evaluation        ([`EvalRow`])
//!       result.json    written last, when the run finished ([`RunResult`])
//!       failed.json    why the last attempt stopped (removed when a new attempt starts)
//!       checkpoint/    model, optimizer and loop state (see [`crate::run::checkpoint`])
//!       .lock          held by the one process writing the run
//! ```
//!
//! Each CSV has one writer ([`CsvLog::append`]) and one reader ([`read_rows`]), both driven by
//! the row type's column list: the reader finds columns by name and refuses, naming the file and
//! line, a header that lacks a column, a row with the wrong number of cells, a cell that is not
//! a number, and a last line without its end (a row cut by a kill). Updates are numbered from 1
//! everywhere (the row of update t says `step = t`).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use mada::{Coef, HyperStep};
use serde::{Deserialize, Serialize};

use outputs::write_atomically;

use crate::run::spec::RunSpec;

/// One row of a run's CSV file.
pub trait Row: Sized {
    /// The columns, in file order.
    fn columns() -> Vec<String>;
    /// The cells, in the order of [`columns`](Self::columns).
    fn cells(&self) -> Vec<String>;
    /// The row from its cells, found by column name.
    fn parse(cells: &Cells<'_>) -> Result<Self, String>;
}

/// The cells of one CSV line, addressed by column name.
pub struct Cells<'a> {
    index: &'a HashMap<String, usize>,
    values: Vec<&'a str>,
}

impl Cells<'_> {
    fn raw(&self, column: &str) -> Result<&str, String> {
        self.index.get(column).map(|&i| self.values[i]).ok_or_else(|| format!("no column {column}"))
    }

    /// A number (`NaN` and empty cells read as NaN).
    pub fn f64(&self, column: &str) -> Result<f64, String> {
        let v = self.raw(column)?;
        if v.is_empty() {
            return Ok(f64::NAN);
        }
        v.parse().map_err(|_| format!("column {column}: {v:?} is not a number"))
    }

    /// A count.
    pub fn u64(&self, column: &str) -> Result<u64, String> {
        let v = self.raw(column)?;
        v.parse().map_err(|_| format!("column {column}: {v:?} is not a whole number"))
    }

    /// A yes/no cell (`1`, `0`, or empty for "does not apply").
    pub fn flag(&self, column: &str) -> Result<Option<bool>, String> {
        match self.raw(column)? {
            "" => Ok(None),
            "1" => Ok(Some(true)),
            "0" => Ok(Some(false)),
            v => Err(format!("column {column}: {v:?} is not 0, 1 or empty")),
        }
    }

    /// Six numbers, one per coefficient, in columns `{prefix}{name}`.
    pub fn coefficients(&self, prefix: &str) -> Result<[f64; 6], String> {
        let mut out = [f64::NAN; 6];
        for c in Coef::ALL {
            out[c.index()] = self.f64(&format!("{prefix}{}", c.name()))?;
        }
        Ok(out)
    }
}

fn coefficient_columns(prefix: &str) -> impl Iterator<Item = String> + '_ {
    Coef::ALL.into_iter().map(move |c| format!("{prefix}{}", c.name()))
}

fn number(v: f64) -> String {
    format!("{v}")
}

/// What the hyper-optimizer did before one update (MADA-family runs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HyperRecord {
    /// The hyper-gradient, before clipping.
    pub gradient: [f64; 6],
    /// Whether it reached its clip bound (None: not learned, or no hyper-step).
    pub clipped: [Option<bool>; 6],
    /// The change of each coefficient, projection included.
    pub step: [f64; 6],
}

impl HyperRecord {
    /// Nothing (a baseline optimizer, the first update, or the hyper warm-up).
    pub const NONE: HyperRecord = HyperRecord { gradient: [f64::NAN; 6], clipped: [None; 6], step: [f64::NAN; 6] };

    /// The record of a hyper-step along `gradient` (`taken` is None during the warm-up).
    pub fn new(gradient: [f64; 6], taken: Option<&HyperStep>, clip: Option<f64>, learned: [bool; 6]) -> Self {
        let Some(step) = taken else { return Self { gradient, ..Self::NONE } };
        let (before, after) = (step.before.to_array(), step.after.to_array());
        Self {
            gradient,
            clipped: std::array::from_fn(|i| learned[i].then(|| clip.is_some_and(|c| gradient[i].abs() >= c))),
            step: std::array::from_fn(|i| after[i] - before[i]),
        }
    }
}

/// One row of `log.csv`: an update.
#[derive(Clone, Debug, PartialEq)]
pub struct LogRow {
    /// The update (1, 2, …).
    pub step: u64,
    pub lr: f64,
    /// Training loss of the update (mean over its micro-batches).
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Coefficients after the update's hyper-step (NaN for baselines).
    pub coefficients: [f64; 6],
    pub hyper: HyperRecord,
    pub items_per_s: f64,
    pub elapsed_s: f64,
}

impl Row for LogRow {
    fn columns() -> Vec<String> {
        let mut c: Vec<String> = ["step", "lr", "loss", "grad_norm"].map(String::from).into();
        c.extend(coefficient_columns(""));
        c.extend(coefficient_columns("h_"));
        c.extend(coefficient_columns("hclip_"));
        c.extend(coefficient_columns("dq_"));
        c.extend(["items_per_s", "elapsed_s"].map(String::from));
        c
    }

    fn cells(&self) -> Vec<String> {
        let flag = |f: Option<bool>| match f {
            None => String::new(),
            Some(b) => (b as u8).to_string(),
        };
        let mut c = vec![self.step.to_string(), number(self.lr), number(self.loss), number(self.grad_norm)];
        c.extend(self.coefficients.map(number));
        c.extend(self.hyper.gradient.map(number));
        c.extend(self.hyper.clipped.map(flag));
        c.extend(self.hyper.step.map(number));
        c.extend([format!("{:.1}", self.items_per_s), format!("{:.3}", self.elapsed_s)]);
        c
    }

    fn parse(cells: &Cells<'_>) -> Result<Self, String> {
        let mut clipped = [None; 6];
        for c in Coef::ALL {
            clipped[c.index()] = cells.flag(&format!("hclip_{}", c.name()))?;
        }
        Ok(Self {
            step: cells.u64("step")?,
            lr: cells.f64("lr")?,
            loss: cells.f64("loss")?,
            grad_norm: cells.f64("grad_norm")?,
            coefficients: cells.coefficients("")?,
            hyper: HyperRecord { gradient: cells.coefficients("h_")?, clipped, step: cells.coefficients("dq_")? },
            items_per_s: cells.f64("items_per_s")?,
            elapsed_s: cells.f64("elapsed_s")?,
        })
    }
}

/// One row of `eval.csv`: an evaluation after update `step`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalRow {
    pub step: u64,
    /// LM: the loss on fixed training windows; vision: the mean training loss since the last
    /// evaluation.
    pub train_loss: f64,
    /// Validation (LM) or test (vision) loss.
    pub eval_loss: f64,
    /// Test accuracy (vision; NaN for LMs).
    pub eval_accuracy: f64,
}

impl Row for EvalRow {
    fn columns() -> Vec<String> {
        ["step", "train_loss", "eval_loss", "eval_accuracy"].map(String::from).into()
    }

    fn cells(&self) -> Vec<String> {
        vec![self.step.to_string(), number(self.train_loss), number(self.eval_loss), number(self.eval_accuracy)]
    }

    fn parse(cells: &Cells<'_>) -> Result<Self, String> {
        Ok(Self {
            step: cells.u64("step")?,
            train_loss: cells.f64("train_loss")?,
            eval_loss: cells.f64("eval_loss")?,
            eval_accuracy: cells.f64("eval_accuracy")?,
        })
    }
}

/// One row of the `--dump-batches` file: which training sequence (its start offset in
/// `train.bin`, or the image index for vision) filled row `row` of micro-batch `micro_batch` of
/// update `update`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchRow {
    pub update: u64,
    pub micro_batch: u64,
    pub row: u64,
    pub offset: u64,
}

impl Row for BatchRow {
    fn columns() -> Vec<String> {
        ["update", "micro_batch", "row", "offset"].map(String::from).into()
    }

    fn cells(&self) -> Vec<String> {
        [self.update, self.micro_batch, self.row, self.offset].map(|v| v.to_string()).into()
    }

    fn parse(cells: &Cells<'_>) -> Result<Self, String> {
        Ok(Self {
            update: cells.u64("update")?,
            micro_batch: cells.u64("micro_batch")?,
            row: cells.u64("row")?,
            offset: cells.u64("offset")?,
        })
    }
}

/// Every row of a CSV file written by [`CsvLog`], checked as the module docs say.
pub fn read_rows<R: Row>(path: &Path) -> Result<Vec<R>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    if text.is_empty() {
        bail!("{} is empty (not even a header)", path.display());
    }
    if !text.ends_with('\n') {
        bail!("{}: line {} is cut off (no line end): the file is truncated", path.display(), text.lines().count());
    }
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let index: HashMap<String, usize> = header.iter().enumerate().map(|(i, c)| (c.to_string(), i)).collect();
    if let Some(missing) = R::columns().into_iter().find(|c| !index.contains_key(c)) {
        bail!("{}: the header has no column {missing}", path.display());
    }
    let mut rows = Vec::new();
    for (i, line) in lines.enumerate() {
        let values: Vec<&str> = line.split(',').collect();
        if values.len() != header.len() {
            bail!("{}: line {} has {} cells, the header {}", path.display(), i + 2, values.len(), header.len());
        }
        let cells = Cells { index: &index, values };
        rows.push(R::parse(&cells).map_err(|e| anyhow::anyhow!("{}: line {}: {e}", path.display(), i + 2))?);
    }
    Ok(rows)
}

/// An append-only CSV file of rows `R`.
pub struct CsvLog<R> {
    path: PathBuf,
    _row: std::marker::PhantomData<R>,
}

impl<R: Row> CsvLog<R> {
    pub fn new(path: PathBuf) -> Self {
        Self { path, _row: std::marker::PhantomData }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Start the file afresh with its header.
    pub fn create(&self) -> Result<()> {
        write_atomically(&self.path, format!("{}\n", R::columns().join(",")).as_bytes())
    }

    /// Keep the header and the first `rows` rows (the ones a checkpoint covers).
    pub fn truncate(&self, rows: usize) -> Result<()> {
        let kept: Vec<R> = read_rows(&self.path)?.into_iter().take(rows).collect();
        if kept.len() < rows {
            bail!("{} has {} rows, its checkpoint covers {rows}", self.path.display(), kept.len());
        }
        let mut text = format!("{}\n", R::columns().join(","));
        for r in &kept {
            text.push_str(&r.cells().join(","));
            text.push('\n');
        }
        write_atomically(&self.path, text.as_bytes())
    }

    /// Append one row (one `write` of the whole line).
    pub fn append(&self, row: &R) -> Result<()> {
        let mut f = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot append to {}", self.path.display()))?;
        f.write_all(format!("{}\n", row.cells().join(",")).as_bytes())
            .with_context(|| format!("cannot append to {}", self.path.display()))
    }
}

/// JSON has no NaN: write it as null and read null back as NaN.
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// How a run was executed: in one process (a data-parallel world of `ranks` emulated on one
/// device), or by several processes through a collective backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Execution {
    /// Processes that trained it.
    pub processes: u64,
    /// `single-process`, `mpi` or `nccl`.
    pub backend: String,
}

impl Execution {
    pub fn single_process() -> Self {
        Self { processes: 1, backend: "single-process".into() }
    }
}

/// The final result of a run (`result.json`, written last; metrics that do not apply are null).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunResult {
    pub spec_id: String,
    pub label: String,
    pub updates: u64,
    #[serde(with = "nan_as_null")]
    pub final_eval_loss: f64,
    #[serde(with = "nan_as_null")]
    pub best_eval_loss: f64,
    #[serde(with = "nan_as_null")]
    pub final_eval_accuracy: f64,
    #[serde(with = "nan_as_null")]
    pub best_eval_accuracy: f64,
    #[serde(with = "nan_as_null")]
    pub final_train_loss: f64,
    pub final_coefficients: Option<[f64; 6]>,
    pub items_per_s: f64,
    pub elapsed_s: f64,
    pub params: usize,
    pub optimizer_state_bytes_per_param: usize,
    /// The data-parallel world of the spec (1 without data parallelism).
    pub ranks: u64,
    pub execution: Execution,
    /// `git describe` of the code that trained it (`unknown` outside a checkout).
    pub commit: String,
}

/// Why a run's last attempt stopped (`failed.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Failure {
    pub spec_id: String,
    pub error: String,
    /// The update at which its loss, gradient or hyper-gradient went non-finite, if that is why.
    #[serde(default)]
    pub diverged_at: Option<u64>,
}

/// The checkout's commit (`git describe --always --dirty`), or `unknown`.
pub fn code_version() -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Where a run lives, and what its files say.
#[derive(Clone, Debug)]
pub struct RunDir {
    pub dir: PathBuf,
}

/// What a run folder holds.
#[derive(Clone, Debug)]
pub enum RunState {
    /// Nothing of a run (missing or empty folder).
    Absent,
    /// A run of this spec that has not finished (it may be resumable).
    Unfinished,
    /// A finished run of this spec.
    Finished(Box<RunResult>),
}

impl RunDir {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf() }
    }
    pub fn spec(&self) -> PathBuf {
        self.dir.join("spec.json")
    }
    pub fn log(&self) -> CsvLog<LogRow> {
        CsvLog::new(self.dir.join("log.csv"))
    }
    pub fn eval(&self) -> CsvLog<EvalRow> {
        CsvLog::new(self.dir.join("eval.csv"))
    }
    pub fn result(&self) -> PathBuf {
        self.dir.join("result.json")
    }
    pub fn failed(&self) -> PathBuf {
        self.dir.join("failed.json")
    }
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join("checkpoint")
    }

    /// The id of the spec this folder holds a run of, if any.
    pub fn held_spec_id(&self) -> Result<Option<String>> {
        let p = self.spec();
        if !p.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        let spec: RunSpec = serde_json::from_str(&text).with_context(|| format!("invalid {}", p.display()))?;
        Ok(Some(spec.id()))
    }

    /// What the folder holds for `spec_id`; an error (naming both ids) if it holds another run.
    pub fn state(&self, spec_id: &str) -> Result<RunState> {
        match self.held_spec_id()? {
            None if !self.result().exists() && !self.checkpoint().exists() => return Ok(RunState::Absent),
            None => bail!("{} holds run files but no spec.json: not a run folder of this project", self.dir.display()),
            Some(held) if held != spec_id => bail!(
                "{} holds run {held}, not run {spec_id} (a different spec): choose another folder",
                self.dir.display()
            ),
            Some(_) => {}
        }
        if !self.result().exists() {
            return Ok(RunState::Unfinished);
        }
        let r = self.read_result()?;
        if r.spec_id != spec_id {
            bail!("{}: result.json belongs to run {}, spec.json to {spec_id}", self.dir.display(), r.spec_id);
        }
        Ok(RunState::Finished(Box::new(r)))
    }

    /// Why the last attempt stopped, if it did.
    pub fn read_failure(&self) -> Result<Option<Failure>> {
        let p = self.failed();
        if !p.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        Ok(Some(serde_json::from_str(&text).with_context(|| format!("invalid {}", p.display()))?))
    }

    pub fn read_result(&self) -> Result<RunResult> {
        let p = self.result();
        let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("invalid {}", p.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(step: u64) -> LogRow {
        let mut hyper = HyperRecord::NONE;
        hyper.gradient[3] = -0.25;
        hyper.clipped[3] = Some(true);
        hyper.step[3] = 0.01;
        LogRow {
            step,
            lr: 1e-3,
            loss: 2.5,
            grad_norm: 0.75,
            coefficients: [0.9, 0.95, 0.0, 0.5, 1.0, 1.0],
            hyper,
            items_per_s: 1234.5,
            elapsed_s: 3.25,
        }
    }

    #[test]
    fn rows_round_trip_through_the_file_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let log = CsvLog::<LogRow>::new(dir.path().join("log.csv"));
        log.create().unwrap();
        log.append(&row(1)).unwrap();
        log.append(&row(2)).unwrap();
        // Rows hold NaN (no hyper-gradient): compare what is written.
        let text = |rows: Vec<LogRow>| rows.iter().map(|r| r.cells().join(",")).collect::<Vec<_>>();
        assert_eq!(text(read_rows::<LogRow>(log.path()).unwrap()), text(vec![row(1), row(2)]));
        log.truncate(1).unwrap();
        assert_eq!(text(read_rows::<LogRow>(log.path()).unwrap()), text(vec![row(1)]));
        assert!(log.truncate(2).unwrap_err().to_string().contains("covers 2"));
    }

    #[test]
    fn malformed_files_are_errors_naming_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("eval.csv");
        let cases = [
            ("step,train_loss,eval_loss,eval_accuracy\n1,2.0,2.5,NaN\n2,1.9,2.4", "line 3 is cut off"),
            ("step,train_loss,eval_loss,eval_accuracy\n1,2.0,2.5\n", "line 2 has 3 cells"),
            ("step,train_loss,eval_loss,eval_accuracy\n1,2.0,abc,NaN\n", "line 2: column eval_loss"),
            ("step,train_loss,eval_accuracy\n", "no column eval_loss"),
            ("", "empty"),
        ];
        for (text, needle) in cases {
            std::fs::write(&p, text).unwrap();
            let e = format!("{:#}", read_rows::<EvalRow>(&p).unwrap_err());
            assert!(e.contains(needle) && e.contains("eval.csv"), "{text:?}: {e}");
        }
        // A header-only file is valid and empty.
        std::fs::write(&p, "step,train_loss,eval_loss,eval_accuracy\n").unwrap();
        assert!(read_rows::<EvalRow>(&p).unwrap().is_empty());
    }
}
