//! A run's folder and the files in it: `spec.json`, `log.csv`, `eval.csv`, `result.json`,
//! `failed.json`, `checkpoint/`.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use outputs::write_atomically;

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

/// The final result of a run (`result.json`; metrics that do not apply are null).
#[derive(Clone, Debug, Serialize, Deserialize)]
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
}

pub(crate) const LOG_HEADER: &str = "step,lr,loss,grad_norm,beta1,beta2,beta3,rho,c,gamma,h_beta1,h_beta2,h_beta3,h_rho,h_c,h_gamma,items_per_s,elapsed_s";
pub(crate) const EVAL_HEADER: &str = "step,train_loss,eval_loss,eval_accuracy";

/// Keep the header and the first `rows` data rows of a CSV (for resume).
pub(crate) fn truncate_csv(path: &Path, header: &str, rows: usize) -> Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let kept: Vec<&str> = std::iter::once(header).chain(text.lines().skip(1).take(rows)).collect();
    write_atomically(path, (kept.join("\n") + "\n").as_bytes())
}

pub(crate) fn append(path: &Path, line: &str) -> Result<()> {
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .with_context(|| format!("cannot append to {}", path.display()))?;
    writeln!(f, "{line}").with_context(|| format!("cannot append to {}", path.display()))
}

/// Where a run lives.
pub struct RunDir {
    pub dir: PathBuf,
}

impl RunDir {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf() }
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("log.csv")
    }
    pub fn eval(&self) -> PathBuf {
        self.dir.join("eval.csv")
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
    pub fn finished(&self) -> bool {
        self.result().exists()
    }
    pub fn read_result(&self) -> Result<RunResult> {
        let p = self.result();
        serde_json::from_str(&std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?)
            .with_context(|| format!("invalid {}", p.display()))
    }
}
