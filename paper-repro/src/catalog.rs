//! The experiment catalog (`experiments/*.toml`): one file per paper artifact, each with
//! `smoke`, `cpu` and `paper` tiers, expanded here into fully resolved runs.
//!
//! A tier's `run` table holds the [`RunSpec`] fields but `label`, `optimizer` and `seed`, on top
//! of the experiment's own `[run]` defaults (merged key by key, tables included, the tier's
//! value winning), so a tier lists only what it changes. Expansion adds the label, optimizer and
//! seed from the experiment's named optimizers × the tier's seeds (× the grid, and its replicate
//! seeds, for robustness grids). An optimizer's `hyper` may name an official preset
//! (`hyper = { preset = "train_py" }`, see [`mada::HyperSpec`]). Unknown keys anywhere are errors
//! naming the file. A run's folder is `runs/<artifact>/<tier>/<label>-s<seed>-<spec id>`, so a
//! changed spec is a new run and a finished run is never repeated.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use mada::{Coefficients, OptimizerSpec, RunningMoment};
use serde::{Deserialize, Serialize};

use crate::run::spec::{DeviceKind, RunSpec, Task};

/// A tier of the catalog.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Every experiment at toy size on the embedded data (CI).
    Smoke,
    /// The comparisons at reduced scale on a laptop.
    Cpu,
    /// The paper's settings, on GPUs.
    Paper,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Smoke, Tier::Cpu, Tier::Paper];

    pub fn name(self) -> &'static str {
        match self {
            Tier::Smoke => "smoke",
            Tier::Cpu => "cpu",
            Tier::Paper => "paper",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What an experiment produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Optimizers × seeds on one task: curves, a table, coefficient trajectories.
    Training,
    /// Optimizers × a grid of initial (β1, β2): heat maps of the final losses.
    Grid,
    /// The Reddi et al. counterexample (analysis crate).
    Reddi,
    /// The convergence-bound checks (analysis crate).
    Bounds,
}

/// The quantity an experiment is judged on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Final validation (LM) or test (vision) loss; lower is better.
    EvalLoss,
    /// Final test accuracy; higher is better.
    EvalAccuracy,
    /// Final training loss; lower is better.
    TrainLoss,
}

impl Metric {
    pub fn higher_is_better(self) -> bool {
        self == Metric::EvalAccuracy
    }

    /// +1 when higher is better, −1 when lower is: `sign · (x − y) > 0` means x is better.
    pub fn sign(self) -> f64 {
        if self.higher_is_better() {
            1.0
        } else {
            -1.0
        }
    }

    /// The column name (`eval_loss`, …).
    pub fn name(self) -> &'static str {
        match self {
            Metric::EvalLoss => "eval_loss",
            Metric::EvalAccuracy => "eval_accuracy",
            Metric::TrainLoss => "train_loss",
        }
    }

    /// For axes and prose.
    pub fn label(self) -> &'static str {
        match self {
            Metric::EvalLoss => "validation loss",
            Metric::EvalAccuracy => "test accuracy",
            Metric::TrainLoss => "train loss",
        }
    }
}

/// What an optimizer is in the comparisons of the claims ledger.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The reference every gain is measured from.
    Adam,
    /// The MADA the claims are about.
    Mada,
    /// MADA from another start, or with other hyper-settings (shown, not a competitor).
    MadaVariant,
    /// MADA with AMSGrad's running maximum instead of AVGrad's mean (claim 5).
    MadaMax,
    /// A competitor ("other popular optimizers"; HyperAdam included).
    #[default]
    Other,
}

impl Role {
    /// MADA itself or one of its variants.
    pub fn is_mada_family(self) -> bool {
        matches!(self, Role::Mada | Role::MadaVariant | Role::MadaMax)
    }
}

/// A named optimizer of an experiment.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedOptimizer {
    pub label: String,
    #[serde(default)]
    pub role: Role,
    pub spec: OptimizerSpec,
    /// Multiplies the schedule's lr and min_lr (e.g. Lion's customary smaller step).
    #[serde(default = "unit")]
    pub lr_scale: f64,
    /// MADA-family: the key of the fixed optimizer at MADA's starting point (a MADA that never
    /// leaves its start gains what that optimizer gains).
    #[serde(default)]
    pub starts_at: Option<String>,
    /// How these settings follow from the official ones (printed in the report).
    #[serde(default)]
    pub rule: Option<String>,
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

/// The grid of a robustness experiment, and the cells rerun with more seeds to measure noise.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grid {
    pub beta1: Vec<f64>,
    pub beta2: Vec<f64>,
    /// (β1, β2) cells run again with `replicate_seeds` for every optimizer.
    #[serde(default)]
    pub replicate_cells: Vec<(f64, f64)>,
    #[serde(default)]
    pub replicate_seeds: Vec<u64>,
}

/// One tier of an experiment.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    /// Keys of `optimizers` to run.
    #[serde(default)]
    pub optimizers: Vec<String>,
    /// Seeds for every optimizer …
    #[serde(default)]
    pub seeds: Vec<u64>,
    /// … unless overridden per optimizer key.
    #[serde(default)]
    pub optimizer_seeds: BTreeMap<String, Vec<u64>>,
    /// RunSpec fields other than label, optimizer and seed (over the experiment's `[run]`).
    #[serde(default)]
    pub run: Option<toml::Table>,
    #[serde(default)]
    pub grid: Option<Grid>,
    /// The Reddi counterexample: steps.
    #[serde(default)]
    pub steps: Option<u64>,
    /// The bound checks: their size.
    #[serde(default)]
    pub bounds: Option<analysis::report::BoundsSettings>,
    /// Overrides the hyper-optimizer warm-up (`hyper.start`) of every MADA-family optimizer
    /// at this tier (short runs cannot wait the paper's 50 updates).
    #[serde(default)]
    pub hyper_start: Option<u64>,
    /// Per optimizer key, spec keys that this tier replaces whole (for example another `hyper`).
    #[serde(default)]
    pub overrides: BTreeMap<String, toml::Table>,
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
    /// The headline metric.
    #[serde(default = "default_metric")]
    pub metric: Metric,
    /// The claims of the ledger (1–6) this experiment's results bear on.
    #[serde(default)]
    pub claims: Vec<u8>,
    /// Settings chosen here because the paper's are unknown (flagged in the report).
    #[serde(default)]
    pub chosen: Vec<String>,
    #[serde(default)]
    pub reference: Option<Reference>,
    #[serde(default)]
    pub optimizers: BTreeMap<String, NamedOptimizer>,
    /// Run fields shared by every tier (a tier's `run` table overrides them key by key).
    #[serde(default)]
    pub run: Option<toml::Table>,
    /// The Reddi counterexample's optimizers and learning rate.
    #[serde(default)]
    pub reddi: Option<analysis::reddi::Settings>,
    pub tiers: BTreeMap<Tier, TierConfig>,
    /// Order in `reproduce` (dependencies first).
    #[serde(default)]
    pub order: i64,
    #[serde(skip)]
    pub file: PathBuf,
}

fn default_metric() -> Metric {
    Metric::EvalLoss
}

/// A run of an experiment, resolved.
#[derive(Clone, Debug)]
pub struct PlannedRun {
    pub artifact: String,
    pub tier: Tier,
    /// Optimizer key in the experiment.
    pub key: String,
    pub role: Role,
    pub seed: u64,
    /// (β1, β2) of a grid point.
    pub grid_point: Option<(f64, f64)>,
    pub spec: RunSpec,
    pub dir: PathBuf,
}

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
    let p = path.display();
    for (name, tier) in &e.tiers {
        for k in tier.optimizers.iter().chain(tier.optimizer_seeds.keys()) {
            if !e.optimizers.contains_key(k) {
                bail!("{p}: tier `{name}` names optimizer `{k}`, which [optimizers] does not define");
            }
        }
        if matches!(e.kind, Kind::Training | Kind::Grid) && tier.run.is_none() && e.run.is_none() {
            bail!("{p}: tier `{name}` has no [tiers.{name}.run] table and the experiment no [run] defaults");
        }
        if e.kind == Kind::Grid && tier.grid.is_none() {
            bail!("{p}: grid experiment tier `{name}` has no grid");
        }
    }
    if let Some(c) = e.claims.iter().find(|c| !(1..=6).contains(*c)) {
        bail!("{p}: claims lists {c}; the ledger's claims are 1 to 6");
    }
    for (key, o) in &e.optimizers {
        if let Some(start) = &o.starts_at {
            if !o.role.is_mada_family() {
                bail!("{p}: optimizer `{key}` has starts_at but is not a MADA-family optimizer");
            }
            if !e.optimizers.contains_key(start) {
                bail!("{p}: optimizer `{key}` starts_at `{start}`, which [optimizers] does not define");
            }
        }
        let is_max = matches!(&o.spec, OptimizerSpec::Mada(m) if m.running == RunningMoment::Max);
        if (o.role == Role::MadaMax) != is_max {
            bail!(
                "{p}: optimizer `{key}`: role mada-max goes with a MADA spec with running = \"max\", and only with it"
            );
        }
    }
    for role in [Role::Adam, Role::Mada] {
        let n = e.optimizers.values().filter(|o| o.role == role).count();
        if n > 1 {
            bail!("{p}: {n} optimizers have role {role:?}; at most one may");
        }
    }
    if e.optimizers.values().any(|o| o.role.is_mada_family()) && !e.optimizers.values().any(|o| o.role == Role::Adam) {
        bail!("{p}: MADA-family optimizers need an optimizer with role \"adam\" to be compared with");
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

/// `base` with `over` merged in: keys of `over` win, tables are merged recursively.
fn merged(base: &toml::Table, over: &toml::Table) -> toml::Table {
    let mut out = base.clone();
    for (k, v) in over {
        let value = match (out.get(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => toml::Value::Table(merged(b, o)),
            _ => v.clone(),
        };
        out.insert(k.clone(), value);
    }
    out
}

impl Experiment {
    /// The run table of `tier`: the experiment's `[run]` defaults with the tier's changes.
    pub fn run_table(&self, tier: Tier) -> Option<toml::Table> {
        let t = self.tiers.get(&tier)?;
        match (&self.run, &t.run) {
            (Some(d), Some(r)) => Some(merged(d, r)),
            (Some(d), None) => Some(d.clone()),
            (None, Some(r)) => Some(r.clone()),
            (None, None) => None,
        }
    }

    /// The keys and roles of the optimizers, in the order the tiers list them (then any other).
    pub fn optimizer_order(&self) -> Vec<&str> {
        let mut ordered: Vec<&str> = Vec::new();
        for k in self.tiers.values().flat_map(|t| t.optimizers.iter()).chain(self.optimizers.keys()) {
            if !ordered.contains(&k.as_str()) {
                ordered.push(k);
            }
        }
        ordered
    }

    /// The key of the optimizer with `role`, if there is one.
    pub fn key_with_role(&self, role: Role) -> Option<&str> {
        self.optimizers.iter().find(|(_, o)| o.role == role).map(|(k, _)| k.as_str())
    }

    /// The runs of `tier` (empty for analysis experiments and missing tiers).
    pub fn plan(&self, tier: Tier, runs_root: &Path) -> Result<Vec<PlannedRun>> {
        let Some(t) = self.tiers.get(&tier) else { return Ok(Vec::new()) };
        let Some(base) = self.run_table(tier) else { return Ok(Vec::new()) };
        // (grid cell, the cell's own seeds for replicates).
        type Point<'s> = (Option<(f64, f64)>, Option<&'s [u64]>);
        let mut points: Vec<Point> = match &t.grid {
            Some(g) => g.beta1.iter().flat_map(|&b1| g.beta2.iter().map(move |&b2| (Some((b1, b2)), None))).collect(),
            None => vec![(None, None)],
        };
        if let Some(g) = &t.grid {
            points.extend(g.replicate_cells.iter().map(|&c| (Some(c), Some(&g.replicate_seeds[..]))));
        }
        let mut out = Vec::new();
        for key in &t.optimizers {
            let named = &self.optimizers[key];
            let base_spec = match t.overrides.get(key) {
                None => named.spec.clone(),
                Some(over) => {
                    let mut table = toml::Table::try_from(&named.spec)?;
                    table.extend(over.clone());
                    table
                        .try_into()
                        .with_context(|| format!("{}: tier `{tier}`: overrides of `{key}`", self.file.display()))?
                }
            };
            let tier_seeds = t.optimizer_seeds.get(key).unwrap_or(&t.seeds);
            if tier_seeds.is_empty() {
                bail!("{}: tier `{tier}` gives no seed for `{key}`", self.file.display());
            }
            for (point, replicate) in &points {
                for &seed in replicate.unwrap_or(tier_seeds) {
                    let (mut optimizer, label) = match point {
                        Some((b1, b2)) => {
                            (at_grid_point(&base_spec, *b1, *b2)?, format!("{} b1={b1} b2={b2}", named.label))
                        }
                        None => (base_spec.clone(), named.label.clone()),
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
                    let dir = runs_root.join(&self.artifact).join(tier.name()).join(format!(
                        "{}-s{seed}-{}",
                        dir_label(&label),
                        spec.id()
                    ));
                    if out.iter().any(|r: &PlannedRun| r.dir == dir) {
                        continue;
                    }
                    out.push(PlannedRun {
                        artifact: self.artifact.clone(),
                        tier,
                        key: key.clone(),
                        role: named.role,
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

    /// The devices the runs of `tier` need.
    pub fn devices(&self, tier: Tier, runs_root: &Path) -> Result<Vec<DeviceKind>> {
        let mut d: Vec<DeviceKind> = self.plan(tier, runs_root)?.iter().map(|r| r.spec.device).collect();
        d.sort_by_key(|k| k.name());
        d.dedup();
        Ok(d)
    }

    /// `init_from = "@artifact:key:seed"` names a run of another experiment of the same tier.
    fn resolve_references(&self, spec: &mut RunSpec, tier: Tier, runs_root: &Path) -> Result<()> {
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

[run]
batch_size = 2
eval_interval = 3
checkpoint_interval = 3
schedule = { lr = 1e-3 }
task = { kind = "lm", data = { dir = "x" }, model = { block_size = 8, vocab_size = 10, n_layer = 1, n_head = 1, n_embd = 8 }, eval_chunks = 1, eval_batch = 1 }

[optimizers.adam]
label = "Adam"
role = "adam"
spec = { name = "mada", eps = 1e-8, coefficients = { beta1 = 0.9, beta2 = 0.95, beta3 = 0.0, rho = 1.0, c = 1.0, gamma = 1.0 } }

[tiers.smoke]
optimizers = ["adam"]
seeds = [1, 2]
grid = { beta1 = [0.5, 0.9], beta2 = [0.9, 0.99], replicate_cells = [[0.5, 0.9]], replicate_seeds = [2, 3] }

[tiers.smoke.run]
updates = 3
task = { model = { n_embd = 16 } }
"#;

    #[test]
    fn expands_optimizers_seeds_grid_points_and_replicates_over_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("demo.toml");
        std::fs::write(&p, EXAMPLE).unwrap();
        let e = read(&p).unwrap();
        let runs = e.plan(Tier::Smoke, Path::new("runs")).unwrap();
        // 2 seeds × 4 cells, and seed 3 at the replicate cell (its seed 2 is already planned).
        assert_eq!(runs.len(), 9);
        let ids: std::collections::BTreeSet<String> = runs.iter().map(|r| r.spec.id()).collect();
        assert_eq!(ids.len(), 9, "every run has its own id");
        let at = runs.iter().find(|r| r.seed == 1 && r.grid_point == Some((0.5, 0.99))).unwrap();
        let OptimizerSpec::Mada(m) = &at.spec.optimizer else { panic!() };
        assert_eq!((m.coefficients.beta1, m.coefficients.beta2), (0.5, 0.99));
        assert_eq!(
            runs.iter().filter(|r| r.grid_point == Some((0.5, 0.9))).map(|r| r.seed).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        // The tier's run table changed one key of the defaults' nested task table.
        let Task::Lm { model, eval_batch, .. } = &runs[0].spec.task else { panic!() };
        assert_eq!((model.n_embd, model.block_size, *eval_batch, runs[0].spec.updates), (16, 8, 1, 3));
        assert!(e.plan(Tier::Cpu, Path::new("runs")).unwrap().is_empty());
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("demo.toml");
        std::fs::write(&p, EXAMPLE.replace("updates = 3", "updates = 3\nupdatez = 4")).unwrap();
        let e = format!("{:#}", read(&p).unwrap().plan(Tier::Smoke, Path::new("r")).unwrap_err());
        assert!(e.contains("demo.toml") && e.contains("updatez"), "{e}");
        std::fs::write(&p, EXAMPLE.replace("optimizers = [\"adam\"]", "optimizers = [\"adamw\"]")).unwrap();
        let e = format!("{:#}", read(&p).unwrap_err());
        assert!(e.contains("adamw"), "{e}");
        std::fs::write(&p, EXAMPLE.replace("rho = 1.0", "rho = 1.5")).unwrap();
        let e = format!("{:#}", read(&p).unwrap().plan(Tier::Smoke, Path::new("r")).unwrap_err());
        assert!(e.contains("rho"), "{e}");
        std::fs::write(&p, EXAMPLE.replace("[tiers.smoke]\n", "[tiers.smok]\n")).unwrap();
        let e = format!("{:#}", read(&p).unwrap_err());
        assert!(e.contains("smok"), "{e}");
        std::fs::write(&p, EXAMPLE.replace("role = \"adam\"", "role = \"mada-max\"")).unwrap();
        let e = format!("{:#}", read(&p).unwrap_err());
        assert!(e.contains("mada-max"), "{e}");
    }
}
