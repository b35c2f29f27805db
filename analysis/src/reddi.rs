//! The Reddi et al. (2018) counterexample with the official MADA settings (digest §7):
//! online linear losses on x ∈ [−1, 1], f_t(x) = 1010·x if t mod 101 = 1, else −10·x (x* = −1),
//! x_0 = 0, lr 1e-3, T = 2,000,000.
//!
//! - Adam and AMSGrad: `torch.optim` conventions, betas (0.9, 0.99), ε = 1e-8.
//! - AVGrad: the same conventions with the mean of v.
//! - MADA: the official update (ε = 1e-6) from the Adam corner (0.9, 0.99, 0, 1, 1, 1) learning
//!   β3, ρ and c with hyper-SGD lr 0.1 and momentum 0.9 (β1, β2 and γ not learned).
//!
//! The box is enforced by projection (clamp) after every update. (The official script instead
//! replaced the parameter object, which froze the torch optimizers' iterate at the first
//! boundary hit; digest §12.15.)

use anyhow::Result;
use mada::baselines::AdamConfig;
use mada::{Adam, AmsGrad, AnyOptimizer, AvGrad, Coef, Coefficients, HyperConfig, Mada, MadaConfig, Optimizer};
use serde::Serialize;

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

/// Run the four optimizers (in parallel) for `steps` steps, recording every `every`.
pub fn run_all(steps: u64, every: u64) -> Result<Vec<Trajectory>> {
    let lr = 1e-3;
    let cfg = AdamConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, ..AdamConfig::default() };
    let hyper = HyperConfig::learn(&[(Coef::Beta3, 0.1), (Coef::Rho, 0.1), (Coef::C, 0.1)])
        .with_momentum([0.0, 0.0, 0.9, 0.9, 0.9, 0.0]);
    let jobs = vec![
        ("Adam", AnyOptimizer::Adam(Adam::new(cfg)?)),
        ("AMSGrad", AnyOptimizer::AmsGrad(AmsGrad::new(cfg)?)),
        ("AVGrad", AnyOptimizer::AvGrad(AvGrad::new(cfg)?)),
        ("MADA", AnyOptimizer::Mada(Mada::new(MadaConfig::default(), hyper, Coefficients::adam(0.9, 0.99))?)),
    ];
    std::thread::scope(|scope| {
        let handles: Vec<_> =
            jobs.into_iter().map(|(name, opt)| scope.spawn(move || run(name, opt, steps, every, lr))).collect();
        handles.into_iter().map(|h| h.join().expect("optimizer thread panicked")).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The qualitative result of the official script: Adam is pushed to the wrong end (x ≈ +1,
    /// dipping after each large gradient), AMSGrad and AVGrad reach x* = −1, and MADA, started
    /// at the Adam corner, learns ρ → 0 (AVGrad) and moves towards −1.
    #[test]
    fn adam_fails_amsgrad_avgrad_converge_and_mada_learns_avgrad() {
        let trs = run_all(2_000_000, 100_000).unwrap();
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
