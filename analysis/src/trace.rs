//! `analysis trace SPEC.json --out OUT.csv`: run one optimizer on a small deterministic problem
//! in f64 and write its trajectory (format: `tests/data/reference-traces/README.md`).

use std::path::Path;

use anyhow::{bail, Context, Result};
use mada::{AnyOptimizer, Coef, Optimizer, OptimizerSpec};
use serde::Deserialize;

use outputs::write_atomically;

/// The most steps a trace may take (its rows are kept in memory until written).
pub const MAX_STEPS: u64 = 10_000_000;

/// A trace spec: problem, optimizer (with a constant `lr`), number of steps.
#[derive(Debug, Clone)]
pub struct TraceSpec {
    pub problem: Quadratic,
    pub optimizer: OptimizerSpec,
    pub lr: f64,
    pub steps: u64,
}

/// f(x) = ½ xᵀAx − bᵀx with gradient Ax − b.
#[derive(Debug, Clone, PartialEq)]
pub struct Quadratic {
    pub a: Vec<Vec<f64>>,
    pub b: Vec<f64>,
    pub x0: Vec<f64>,
}

impl Quadratic {
    pub fn dim(&self) -> usize {
        self.b.len()
    }

    pub fn loss(&self, x: &[f64]) -> f64 {
        let mut quad = 0.0;
        for (i, row) in self.a.iter().enumerate() {
            let ax: f64 = row.iter().zip(x).map(|(a, x)| a * x).sum();
            quad += x[i] * ax;
        }
        0.5 * quad - self.b.iter().zip(x).map(|(b, x)| b * x).sum::<f64>()
    }

    pub fn grad(&self, x: &[f64]) -> Vec<f64> {
        self.a.iter().zip(&self.b).map(|(row, b)| row.iter().zip(x).map(|(a, x)| a * x).sum::<f64>() - b).collect()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    problem: RawProblem,
    optimizer: serde_json::Map<String, serde_json::Value>,
    steps: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "lowercase")]
enum RawProblem {
    Quadratic { a: Vec<Vec<f64>>, b: Vec<f64>, x0: Vec<f64> },
}

impl TraceSpec {
    /// Parse and validate a spec; errors name the key or the mismatching dimension.
    pub fn parse(text: &str) -> Result<Self> {
        let raw: RawSpec = serde_json::from_str(text)?;
        let RawProblem::Quadratic { a, b, x0 } = raw.problem;
        let d = b.len();
        if d == 0 {
            bail!("problem.b is empty");
        }
        if x0.len() != d {
            bail!("problem.x0 has {} entries but problem.b has {d}", x0.len());
        }
        if a.len() != d {
            bail!("problem.a has {} rows but problem.b has {d} entries", a.len());
        }
        for (i, row) in a.iter().enumerate() {
            if row.len() != d {
                bail!("problem.a row {i} has {} entries, expected {d}", row.len());
            }
        }
        if a.iter().flatten().chain(&b).chain(&x0).any(|v| !v.is_finite()) {
            bail!("problem has a non-finite entry");
        }
        // The trajectory is held in memory (a row of d + 8 numbers per step): bound it.
        if raw.steps == 0 || raw.steps > MAX_STEPS {
            bail!("steps = {} must lie in 1..={MAX_STEPS}", raw.steps);
        }
        let mut opt = raw.optimizer;
        let lr = match opt.remove("lr") {
            Some(v) => v.as_f64().context("optimizer.lr must be a number")?,
            None => bail!("optimizer.lr is missing"),
        };
        if !(lr.is_finite() && lr >= 0.0) {
            bail!("optimizer.lr = {lr} must be a finite non-negative number");
        }
        let optimizer: OptimizerSpec =
            serde_json::from_value(serde_json::Value::Object(opt)).context("in the optimizer object")?;
        // Build once now so a coefficient outside its box is reported while parsing.
        AnyOptimizer::<f64>::from_spec(&optimizer).context("in the optimizer object")?;
        Ok(Self { problem: Quadratic { a, b, x0 }, optimizer, lr, steps: raw.steps })
    }

    /// Read and parse a spec file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid trace spec {}", path.display()))
    }
}

/// The trajectory: a header and one row per update.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub header: Vec<String>,
    pub rows: Vec<Vec<f64>>,
}

impl Trace {
    pub fn to_csv(&self) -> String {
        let mut s = self.header.join(",");
        s.push('\n');
        for row in &self.rows {
            let cells: Vec<String> = row.iter().map(|v| format!("{v:?}")).collect();
            s.push_str(&cells.join(","));
            s.push('\n');
        }
        s
    }

    /// Parse a trace CSV (as written by [`to_csv`](Self::to_csv) or the reference tool).
    pub fn from_csv(text: &str) -> Result<Self> {
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let header: Vec<String> = lines.next().context("empty CSV")?.split(',').map(|s| s.trim().to_string()).collect();
        let mut rows = Vec::new();
        for (i, line) in lines.enumerate() {
            let row: Vec<f64> = line
                .split(',')
                .map(|c| c.trim().parse::<f64>())
                .collect::<std::result::Result<_, _>>()
                .with_context(|| format!("CSV row {} is not numeric", i + 2))?;
            if row.len() != header.len() {
                bail!("CSV row {} has {} cells, header has {}", i + 2, row.len(), header.len());
            }
            rows.push(row);
        }
        Ok(Self { header, rows })
    }
}

/// Run the spec.
pub fn run(spec: &TraceSpec) -> Result<Trace> {
    let p = &spec.problem;
    let mut opt = AnyOptimizer::<f64>::from_spec(&spec.optimizer)?;
    let is_mada = opt.as_mada().is_some();
    let mut header = vec!["step".to_string(), "loss".to_string()];
    header.extend((0..p.dim()).map(|i| format!("x{i}")));
    if is_mada {
        header.extend(Coef::ALL.iter().map(|c| c.name().to_string()));
    }
    let mut x = p.x0.clone();
    let mut rows = Vec::with_capacity(spec.steps as usize);
    for step in 1..=spec.steps {
        let loss = p.loss(&x);
        let g = p.grad(&x);
        let used = match &mut opt {
            AnyOptimizer::Mada(m) => Some(m.step_with_info(&mut [&mut x[..]], &[&g[..]], spec.lr)?.coefficients),
            other => {
                other.step(&mut [&mut x[..]], &[&g[..]], spec.lr)?;
                None
            }
        };
        let mut row = vec![step as f64, loss];
        row.extend_from_slice(&x);
        if let Some(q) = used {
            row.extend_from_slice(&q.to_array());
        }
        if row.iter().any(|v| !v.is_finite()) {
            bail!("the trajectory became non-finite at step {step}");
        }
        rows.push(row);
    }
    Ok(Trace { header, rows })
}

/// The largest violation of |ours − ref| ≤ atol + rtol·|ref| over all cells, as
/// (excess ratio, row, column name); ≤ 1 means within tolerance.
pub fn compare(ours: &Trace, reference: &Trace, atol: f64, rtol: f64) -> Result<(f64, usize, String)> {
    if ours.header != reference.header {
        bail!("headers differ: {:?} vs {:?}", ours.header, reference.header);
    }
    if ours.rows.len() != reference.rows.len() {
        bail!("{} rows vs {} reference rows", ours.rows.len(), reference.rows.len());
    }
    let mut worst = (0.0, 0, String::new());
    for (r, (a, b)) in ours.rows.iter().zip(&reference.rows).enumerate() {
        for (c, (x, y)) in a.iter().zip(b).enumerate() {
            let ratio = (x - y).abs() / (atol + rtol * y.abs());
            if ratio > worst.0 || ratio.is_nan() {
                worst = (ratio, r + 1, ours.header[c].clone());
            }
        }
    }
    Ok(worst)
}

/// The reference trajectories of `tests/data/reference-traces` (name, spec, trajectory),
/// embedded so that a moved binary still checks them.
pub const REFERENCE_TRACES: [(&str, &str, &str); 11] = [
    (
        "adam",
        include_str!("../tests/data/reference-traces/adam.json"),
        include_str!("../tests/data/reference-traces/adam.csv"),
    ),
    (
        "adamw",
        include_str!("../tests/data/reference-traces/adamw.json"),
        include_str!("../tests/data/reference-traces/adamw.csv"),
    ),
    (
        "adan",
        include_str!("../tests/data/reference-traces/adan.json"),
        include_str!("../tests/data/reference-traces/adan.csv"),
    ),
    (
        "amsgrad",
        include_str!("../tests/data/reference-traces/amsgrad.json"),
        include_str!("../tests/data/reference-traces/amsgrad.csv"),
    ),
    (
        "lion",
        include_str!("../tests/data/reference-traces/lion.json"),
        include_str!("../tests/data/reference-traces/lion.csv"),
    ),
    (
        "mada_adam_frozen",
        include_str!("../tests/data/reference-traces/mada_adam_frozen.json"),
        include_str!("../tests/data/reference-traces/mada_adam_frozen.csv"),
    ),
    (
        "mada_interior",
        include_str!("../tests/data/reference-traces/mada_interior.json"),
        include_str!("../tests/data/reference-traces/mada_interior.csv"),
    ),
    (
        "mada_lion_corner",
        include_str!("../tests/data/reference-traces/mada_lion_corner.json"),
        include_str!("../tests/data/reference-traces/mada_lion_corner.csv"),
    ),
    (
        "mada_momentum_clip_start",
        include_str!("../tests/data/reference-traces/mada_momentum_clip_start.json"),
        include_str!("../tests/data/reference-traces/mada_momentum_clip_start.csv"),
    ),
    (
        "sgd_momentum",
        include_str!("../tests/data/reference-traces/sgd_momentum.json"),
        include_str!("../tests/data/reference-traces/sgd_momentum.csv"),
    ),
    (
        "yogi",
        include_str!("../tests/data/reference-traces/yogi.json"),
        include_str!("../tests/data/reference-traces/yogi.csv"),
    ),
];

/// Tolerance of the reference check: |ours − ref| ≤ atol + rtol·|ref| on every cell.
pub const REFERENCE_TOLERANCE: (f64, f64) = (1e-9, 1e-8);

/// Each embedded reference trajectory rerun: (name, worst |ours − ref| / tolerance; ≤ 1 passes).
pub fn check_references() -> Vec<(&'static str, Result<f64>)> {
    REFERENCE_TRACES
        .iter()
        .map(|(name, spec, csv)| {
            let worst = (|| {
                let ours = run(&TraceSpec::parse(spec)?)?;
                let (atol, rtol) = REFERENCE_TOLERANCE;
                Ok(compare(&ours, &Trace::from_csv(csv)?, atol, rtol)?.0)
            })();
            (*name, worst)
        })
        .collect()
}

/// The `trace` command.
pub fn command(spec_path: &Path, out: &Path) -> Result<()> {
    let spec = TraceSpec::read(spec_path)?;
    let trace = run(&spec).with_context(|| format!("running {}", spec_path.display()))?;
    write_atomically(out, trace.to_csv().as_bytes())?;
    eprintln!("trace: {} steps of {} written to {}", spec.steps, spec.optimizer.name(), out.display());
    Ok(())
}
