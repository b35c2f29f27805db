//! The experiment catalog (`experiments/*.toml`): one file per paper artifact, each with
//! `smoke`, `cpu` and `paper` tiers, expanded here into fully resolved runs.
//!
//! A tier's `run` table holds every [`RunSpec`] field but `label`, `optimizer` and `seed`;
//! expansion adds those from the experiment's named optimizers × the tier's seeds (× the grid
//! for robustness grids). Unknown keys anywhere are errors naming the file. A run's folder is
//! `runs/<artifact>/<tier>/<label>-s<seed>-<spec id>`, so a changed spec is a new run and a
//! finished run is never repeated.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use mada::{Coefficients, OptimizerSpec};
use serde::{Deserialize, Serialize};

use crate::run::spec::{RunSpec, Task};

/// What an experiment produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Optimizers × seeds on one task: curves, a table, coefficient trajectories.
    Training,
    /// Optimizers × a grid of initial (β1, β2): heat maps of the final train loss.
    Grid,
    /// The Reddi et al. counterexample (analysis crate).
    Reddi,
    /// The convergence-bound checks (analysis crate).
    Bounds,
}

/// A named optimizer of an experiment.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedOptimizer {
    pub label: String,
    pub spec: OptimizerSpec,
    /// Multiplies the schedule's lr and min_lr (e.g. Lion's customary smaller step).
    #[serde(default = "unit")]
    pub lr_scale: f64,
}

fn unit() -> f64 {
    1.0
}

/// Reference numbers beside ours in the report.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    /// Where the numbers come from.
    pub source: String,
    /// What they are (e.g. "final validation loss").
    pub quantity: String,
    /// label → value.
    #[serde(default)]
    pub values: BTreeMap<String, f64>,
}

/// The grid of a robustness experiment.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grid {
    pub beta1: Vec<f64>,
    pub beta2: Vec<f64>,
}

/// One tier of an experiment.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// Keys of `optimizers` to run.
    #[serde(default)]
    pub optimizers: Vec<String>,
    /// Seeds for every optimizer …
    #[serde(default)]
    pub seeds: Vec<u64>,
    /// … unless overridden per optimizer key.
    #[serde(default)]
    pub optimizer_seeds: BTreeMap<String, Vec<u64>>,
    /// RunSpec fields other than label, optimizer and seed.
    #[serde(default)]
    pub run: Option<toml::Table>,
    #[serde(default)]
    pub grid: Option<Grid>,
    /// Analysis experiments: steps of the Reddi sequence, or `quick` bound checks.
    #[serde(default)]
    pub steps: Option<u64>,
    #[serde(default)]
    pub quick: Option<bool>,
    /// Overrides the hyper-optimizer warm-up (`hyper.start`) of every MADA-family optimizer
    /// at this tier (short runs cannot wait the paper's 50 updates).
    #[serde(default)]
    pub hyper_start: Option<u64>,
}

/// One experiment file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    pub artifact: String,
    pub title: String,
    /// Which paper artifact this reproduces, and what is known of it.
    pub paper: String,
    pub kind: Kind,
    /// The headline metric: "eval_loss" (lower is better) or "eval_accuracy".
    #[serde(default = "default_metric")]
    pub metric: String,
    /// Settings chosen here because the paper's are unknown (flagged in the report).
    #[serde(default)]
    pub chosen: Vec<String>,
    #[serde(default)]
    pub reference: Option<Reference>,
    #[serde(default)]
    pub optimizers: BTreeMap<String, NamedOptimizer>,
    pub tiers: BTreeMap<String, Tier>,
    /// Order in `reproduce` (dependencies first).
    #[serde(default)]
    pub order: i64,
    #[serde(skip)]
    pub file: PathBuf,
}

fn default_metric() -> String {
    "eval_loss".into()
}

/// A run of an experiment, resolved.
#[derive(Clone, Debug)]
pub struct PlannedRun {
    pub artifact: String,
    pub tier: String,
    /// Optimizer key in the experiment.
    pub key: String,
    pub seed: u64,
    /// (β1, β2) of a grid point.
    pub grid_point: Option<(f64, f64)>,
    pub spec: RunSpec,
    pub dir: PathBuf,
}

pub const TIERS: [&str; 3] = ["smoke", "cpu", "paper"];

/// Read every `*.toml` of `dir`, sorted by (order, artifact).
pub fn load(dir: &Path) -> Result<Vec<Experiment>> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot list the catalog {}", dir.display()))?;
    for e in entries {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "toml") {
            out.push(read(&path)?);
        }
    }
    out.sort_by(|a, b| (a.order, &a.artifact).cmp(&(b.order, &b.artifact)));
    Ok(out)
}

/// Read and check one experiment file.
pub fn read(path: &Path) -> Result<Experiment> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut e: Experiment = toml::from_str(&text).with_context(|| format!("invalid experiment {}", path.display()))?;
    e.file = path.to_path_buf();
    for (name, tier) in &e.tiers {
        if !TIERS.contains(&name.as_str()) {
            bail!("{}: unknown tier `{name}` (tiers: smoke, cpu, paper)", path.display());
        }
        for k in tier.optimizers.iter().chain(tier.optimizer_seeds.keys()) {
            if !e.optimizers.contains_key(k) {
                bail!("{}: tier `{name}` names optimizer `{k}`, which [optimizers] does not define", path.display());
            }
        }
        if matches!(e.kind, Kind::Training | Kind::Grid) && tier.run.is_none() {
            bail!("{}: tier `{name}` has no [tiers.{name}.run] table", path.display());
        }
        if e.kind == Kind::Grid && tier.grid.is_none() {
            bail!("{}: grid experiment tier `{name}` has no grid", path.display());
        }
    }
    if !matches!(e.metric.as_str(), "eval_loss" | "eval_accuracy" | "train_loss") {
        bail!("{}: metric must be eval_loss, eval_accuracy or train_loss, not `{}`", path.display(), e.metric);
    }
    Ok(e)
}

/// Set a grid point's (β1, β2) as the optimizer's initial values.
fn at_grid_point(spec: &OptimizerSpec, b1: f64, b2: f64) -> Result<OptimizerSpec> {
    let mut s = spec.clone();
    match &mut s {
        OptimizerSpec::Mada(m) => {
            m.coefficients = Coefficients { beta1: b1, beta2: b2, ..m.coefficients };
        }
        OptimizerSpec::Adam(c) | OptimizerSpec::Amsgrad(c) | OptimizerSpec::Avgrad(c) => {
            c.beta1 = b1;
            c.beta2 = b2;
        }
        other => bail!("grid over (beta1, beta2) is not defined for {}", other.name()),
    }
    Ok(s)
}

fn dir_label(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect()
}

impl Experiment {
    /// The runs of `tier` (empty for analysis experiments and missing tiers).
    pub fn plan(&self, tier: &str, runs_root: &Path) -> Result<Vec<PlannedRun>> {
        let Some(t) = self.tiers.get(tier) else { return Ok(Vec::new()) };
        let Some(base) = &t.run else { return Ok(Vec::new()) };
        let points: Vec<Option<(f64, f64)>> = match &t.grid {
            Some(g) => g.beta1.iter().flat_map(|&b1| g.beta2.iter().map(move |&b2| Some((b1, b2)))).collect(),
            None => vec![None],
        };
        let mut out = Vec::new();
        for key in &t.optimizers {
            let named = &self.optimizers[key];
            let seeds = t.optimizer_seeds.get(key).unwrap_or(&t.seeds);
            if seeds.is_empty() {
                bail!("{}: tier `{tier}` gives no seed for `{key}`", self.file.display());
            }
            for &seed in seeds {
                for point in &points {
                    let (mut optimizer, label) = match point {
                        Some((b1, b2)) => {
                            (at_grid_point(&named.spec, *b1, *b2)?, format!("{} b1={b1} b2={b2}", named.label))
                        }
                        None => (named.spec.clone(), named.label.clone()),
                    };
                    if let (Some(start), OptimizerSpec::Mada(m)) = (t.hyper_start, &mut optimizer) {
                        m.hyper.start = start;
                    }
                    let mut table = base.clone();
                    table.insert("label".into(), toml::Value::String(label.clone()));
                    table.insert("seed".into(), toml::Value::Integer(seed as i64));
                    table.insert("optimizer".into(), toml::Value::try_from(&optimizer)?);
                    let mut spec: RunSpec = table.try_into().with_context(|| {
                        format!("{}: tier `{tier}`: the run table does not make a valid run", self.file.display())
                    })?;
                    spec.schedule.lr *= named.lr_scale;
                    spec.schedule.min_lr *= named.lr_scale;
                    self.resolve_references(&mut spec, tier, runs_root)?;
                    spec.validate()
                        .with_context(|| format!("{}: tier `{tier}`, optimizer `{key}`", self.file.display()))?;
                    let dir = runs_root.join(&self.artifact).join(tier).join(format!(
                        "{}-s{seed}-{}",
                        dir_label(&label),
                        spec.id()
                    ));
                    out.push(PlannedRun {
                        artifact: self.artifact.clone(),
                        tier: tier.into(),
                        key: key.clone(),
                        seed,
                        grid_point: *point,
                        spec,
                        dir,
                    });
                }
            }
        }
        Ok(out)
    }

    /// `init_from = "@artifact:key:seed"` names a run of another experiment of the same tier.
    fn resolve_references(&self, spec: &mut RunSpec, tier: &str, runs_root: &Path) -> Result<()> {
        if let Task::Lm { init_from: Some(p), .. } = &mut spec.task {
            if let Some(r) = p.to_str().and_then(|s| s.strip_prefix('@')) {
                let parts: Vec<&str> = r.split(':').collect();
                let [artifact, key, seed] = parts[..] else {
                    bail!("{}: init_from `@{r}` must be @artifact:optimizer-key:seed", self.file.display());
                };
                let catalog_dir = self.file.parent().unwrap_or(Path::new("."));
                let other = read(&catalog_dir.join(format!("{artifact}.toml")))?;
                let seed: u64 = seed.parse().with_context(|| format!("{}: bad seed in @{r}", self.file.display()))?;
                let run = other
                    .plan(tier, runs_root)?
                    .into_iter()
                    .find(|pr| pr.key == key && pr.seed == seed && pr.grid_point.is_none())
                    .with_context(|| {
                        format!("{}: @{r} names no run of {artifact} at tier {tier}", self.file.display())
                    })?;
                *p = run.dir;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
artifact = "demo"
title = "Demo"
paper = "none"
kind = "grid"

[optimizers.adam]
label = "Adam"
spec = { name = "mada", eps = 1e-8, coefficients = { beta1 = 0.9, beta2 = 0.95, beta3 = 0.0, rho = 1.0, c = 1.0, gamma = 1.0 } }

[tiers.smoke]
optimizers = ["adam"]
seeds = [1, 2]
grid = { beta1 = [0.5, 0.9], beta2 = [0.9, 0.99] }

[tiers.smoke.run]
updates = 3
batch_size = 2
eval_interval = 3
checkpoint_interval = 3
schedule = { lr = 1e-3 }
task = { kind = "lm", data = { dir = "x" }, model = { block_size = 8, vocab_size = 10, n_layer = 1, n_head = 1, n_embd = 8 }, eval_chunks = 1, eval_batch = 1 }
"#;

    #[test]
    fn expands_optimizers_seeds_and_grid_points() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("demo.toml");
        std::fs::write(&p, EXAMPLE).unwrap();
        let e = read(&p).unwrap();
        let runs = e.plan("smoke", Path::new("runs")).unwrap();
        assert_eq!(runs.len(), 8);
        let ids: std::collections::BTreeSet<String> = runs.iter().map(|r| r.spec.id()).collect();
        assert_eq!(ids.len(), 8, "every run has its own id");
        let OptimizerSpec::Mada(m) = &runs[1].spec.optimizer else { panic!() };
        assert_eq!((m.coefficients.beta1, m.coefficients.beta2), (0.5, 0.99));
        assert!(e.plan("cpu", Path::new("runs")).unwrap().is_empty());
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("demo.toml");
        std::fs::write(&p, EXAMPLE.replace("updates = 3", "updates = 3\nupdatez = 4")).unwrap();
        let e = format!("{:#}", read(&p).unwrap().plan("smoke", Path::new("r")).unwrap_err());
        assert!(e.contains("demo.toml") && e.contains("updatez"), "{e}");
        std::fs::write(&p, EXAMPLE.replace("optimizers = [\"adam\"]", "optimizers = [\"adamw\"]")).unwrap();
        let e = format!("{:#}", read(&p).unwrap_err());
        assert!(e.contains("adamw"), "{e}");
        std::fs::write(&p, EXAMPLE.replace("rho = 1.0", "rho = 1.5")).unwrap();
        let e = format!("{:#}", read(&p).unwrap().plan("smoke", Path::new("r")).unwrap_err());
        assert!(e.contains("rho"), "{e}");
    }
}
