//! The Reddi et al. (2018) counterexample with the official MADA settings (`amsgrad_toy.py`):
//! online linear losses on x ∈ [−1, 1], f_t(x) = 1010·x if t mod 101 = 1, else −10·x (x* = −1),
//! x_0 = 0, T = 2,000,000. The optimizers and the learning rate are data ([`Settings`], the
//! `[reddi]` table of `experiments/reddi.toml`): the official script's Adam and AMSGrad
//! (`torch.optim`, betas (0.9, 0.99), ε = 1e-8, lr 1e-3), AVGrad in the same conventions, and MADA
//! from the Adam corner with `amsgrad_toy.py`'s hyper-optimizer — with the running mean (the
//! official code) and with AMSGrad's running maximum (claim 5).
//!
//! The box is enforced by projection (clamp) after every update. (The official script instead
//! replaced the parameter object, which froze the torch optimizers' iterate at the first
//! boundary hit.)

use anyhow::{bail, Context, Result};
use mada::{AnyOptimizer, Optimizer, OptimizerSpec};
use serde::{Deserialize, Serialize};

/// One optimizer of the experiment.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contender {
    pub label: String,
    pub spec: OptimizerSpec,
}

/// What the counterexample runs: one learning rate, several optimizers.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub lr: f64,
    pub optimizers: Vec<Contender>,
}

impl Settings {
    /// The `[reddi]` table of an experiment file (the rest of the file is the catalog's).
    pub fn read(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut table: toml::Table =
            toml::from_str(&text).with_context(|| format!("invalid TOML in {}", path.display()))?;
        let Some(reddi) = table.remove("reddi") else { bail!("{} has no [reddi] table", path.display()) };
        reddi.try_into().with_context(|| format!("{}: [reddi]", path.display()))
    }

    /// The optimizers, built (every setting checked).
    pub fn build(&self) -> Result<Vec<(String, AnyOptimizer<f64>)>> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("reddi.lr = {} must be positive", self.lr);
        }
        self.optimizers
            .iter()
            .map(|c| {
                Ok((
                    c.label.clone(),
                    AnyOptimizer::from_spec(&c.spec).with_context(|| format!("reddi optimizer {}", c.label))?,
                ))
            })
            .collect()
    }
}

/// The loss sequence.
pub fn gradient(t: u64) -> f64 {
    if t % 101 == 1 {
        1010.0
    } else {
        -10.0
    }
}

/// One optimizer's trajectory, recorded every `every` steps.
#[derive(Clone, Debug, Serialize)]
pub struct Trajectory {
    pub name: String,
    pub t: Vec<u64>,
    /// R_t / t.
    pub avg_regret: Vec<f64>,
    pub x: Vec<f64>,
    /// ρ_t (MADA only; NaN otherwise), and β3, c.
    pub rho: Vec<f64>,
    pub beta3: Vec<f64>,
    pub c: Vec<f64>,
}

fn run(name: &str, mut opt: AnyOptimizer<f64>, steps: u64, every: u64, lr: f64) -> Result<Trajectory> {
    let mut x = [0.0f64];
    let mut regret = 0.0;
    let mut tr = Trajectory {
        name: name.into(),
        t: vec![],
        avg_regret: vec![],
        x: vec![],
        rho: vec![],
        beta3: vec![],
        c: vec![],
    };
    for t in 1..=steps {
        let g = gradient(t);
        // f_t(x_t) − f_t(x*) with f_t(x) = g_t·x and the comparator x* = −1.
        regret += g * x[0] + g;
        opt.step(&mut [&mut x[..]], &[&[g][..]], lr)?;
        x[0] = x[0].clamp(-1.0, 1.0);
        if t % every == 0 || t == steps {
            tr.t.push(t);
            tr.avg_regret.push(regret / t as f64);
            tr.x.push(x[0]);
            let q = opt.as_mada().map(|m| m.coefficients());
            tr.rho.push(q.map_or(f64::NAN, |q| q.rho));
            tr.beta3.push(q.map_or(f64::NAN, |q| q.beta3));
            tr.c.push(q.map_or(f64::NAN, |q| q.c));
        }
    }
    Ok(tr)
}

/// Run every optimizer of `settings` (in parallel) for `steps` steps, recording every `every`.
pub fn run_all(settings: &Settings, steps: u64, every: u64) -> Result<Vec<Trajectory>> {
    if steps == 0 || steps > 1_000_000_000 {
        bail!("reddi: steps = {steps} must lie in 1..=1e9");
    }
    let jobs = settings.build()?;
    let lr = settings.lr;
    std::thread::scope(|scope| {
        let handles: Vec<_> =
            jobs.into_iter().map(|(name, opt)| scope.spawn(move || run(&name, opt, steps, every.max(1), lr))).collect();
        handles.into_iter().map(|h| h.join().expect("optimizer thread panicked")).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The qualitative result of the official script: Adam is pushed to the wrong end (x ≈ +1,
    /// dipping after each large gradient), AMSGrad and AVGrad reach x* = −1, and MADA, started
    /// at the Adam corner, learns ρ → 0 (AVGrad) and moves towards −1.
    /// The settings of the catalog's experiment.
    pub fn catalog_settings() -> Settings {
        Settings::read(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/reddi.toml")).unwrap()
    }

    #[test]
    fn adam_fails_amsgrad_avgrad_converge_and_mada_learns_avgrad() {
        let trs = run_all(&catalog_settings(), 2_000_000, 100_000).unwrap();
        let get = |n: &str| trs.iter().find(|t| t.name == n).unwrap();
        let last_x = |n: &str| *get(n).x.last().unwrap();
        assert!(last_x("Adam") > 0.9, "Adam ends at {}", last_x("Adam"));
        assert!(last_x("AMSGrad") < -0.98, "AMSGrad ends at {}", last_x("AMSGrad"));
        assert!(last_x("AVGrad") < -0.98, "AVGrad ends at {}", last_x("AVGrad"));
        let mada = get("MADA");
        assert!(*mada.x.last().unwrap() < -0.5, "MADA ends at {}", mada.x.last().unwrap());
        assert!(*mada.rho.last().unwrap() < 0.1, "MADA's rho ends at {}", mada.rho.last().unwrap());
        let regret = |n: &str| *get(n).avg_regret.last().unwrap();
        assert!(regret("MADA") < regret("Adam") && regret("AMSGrad") < regret("MADA"));
    }
}
