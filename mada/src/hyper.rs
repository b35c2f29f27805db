//! The hyper-optimizer: one projected SGD step (with optional heavy-ball momentum) on the
//! coefficients after each model update (official code: `gdtuo.SGDPerParamMo` and the loops of
//! `train.py` / `train_ddp.py`, repository amazon-science/mada_optimizer_search at 2beded8).

use serde::{Deserialize, Serialize};

use crate::coefficients::{Coef, CoefficientBox, Coefficients};
use crate::error::check_range;
use crate::OptimError;

/// Settings of the hyper-optimizer.
///
/// Per coefficient c that is learned, at each hyper-step with hyper-gradient h:
/// `h ← clamp(h, −clip, clip)`; momentum buffer `b ← h` at its first step, then
/// `b ← μ_c·b + h` (heavy ball, no dampening); `q_c ← q_c − lr_c·b`; then q is projected onto
/// the box. No hyper-step is taken before updates 1..=`warmup` (the official
/// `hypergrad_init_iter`, counted in updates); the first hyper-step is therefore the one before
/// update `warmup + 1` (and never before update 1, which has no previous update).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct HyperConfig {
    /// Hyper-learning-rate per coefficient ([`Coef`] order).
    pub lr: [f64; 6],
    /// Which coefficients are learned (MADA: all; HyperAdam: β1, β2; frozen: none).
    pub learned: [bool; 6],
    /// Heavy-ball momentum per coefficient (0 = plain SGD).
    pub momentum: [f64; 6],
    /// Clamp each hyper-gradient to [−clip, clip] before the momentum (official: 10).
    pub clip: Option<f64>,
    /// Number of updates before the first hyper-step.
    pub warmup: u64,
    /// Compute the hyper-gradient even when nothing is learned (for logging; costs the
    /// tracking buffers and one pass).
    pub monitor: bool,
}

impl HyperConfig {
    /// Nothing learned: a fixed point of the family (Adam, AVGrad, … as configured).
    pub const fn frozen() -> Self {
        Self { lr: [0.0; 6], learned: [false; 6], momentum: [0.0; 6], clip: None, warmup: 0, monitor: false }
    }

    /// MADA: all six coefficients learned with these hyper-learning-rates.
    pub const fn mada(lr: [f64; 6]) -> Self {
        Self { lr, learned: [true; 6], ..Self::frozen() }
    }

    /// HyperAdam: only β1 and β2 learned.
    pub const fn hyperadam(lr_beta1: f64, lr_beta2: f64) -> Self {
        Self {
            lr: [lr_beta1, lr_beta2, 0.0, 0.0, 0.0, 0.0],
            learned: [true, true, false, false, false, false],
            ..Self::frozen()
        }
    }

    /// Learn exactly the listed coefficients, with the given hyper-learning-rates.
    pub fn learn(learned: &[(Coef, f64)]) -> Self {
        let mut s = Self::frozen();
        for &(c, lr) in learned {
            s.learned[c.index()] = true;
            s.lr[c.index()] = lr;
        }
        s
    }

    /// One of the official scripts' hyper-optimizers (`train_ddp.py`, `train.py`, `amsgrad_toy.py`
    /// at 2beded8) — the one definition the
    /// experiment catalog refers to by name (`hyper = { preset = "train_ddp" }`).
    pub const fn official(preset: OfficialHyper) -> Self {
        match preset {
            // lr (5e-4, 5e-4, 0.1, 0.1, 0.1, 0.1), no momentum, clip 10, `hypergrad_init_iter`
            // = 250 micro-steps = 50 updates of warm-up.
            OfficialHyper::TrainDdp => {
                Self { clip: Some(10.0), warmup: 50, ..Self::mada([5e-4, 5e-4, 0.1, 0.1, 0.1, 0.1]) }
            }
            // lr 2.5e-3 for all six, momentum 0.5 except γ (0), clip 10, no warm-up.
            OfficialHyper::TrainPy => {
                Self { momentum: [0.5, 0.5, 0.5, 0.5, 0.5, 0.0], clip: Some(10.0), ..Self::mada([2.5e-3; 6]) }
            }
            // β3, ρ, c learned with lr 0.1 and momentum 0.9 (the β1/β2 gradients are zeroed and
            // γ has hyper-lr 0), no clipping.
            OfficialHyper::AmsgradToy => Self {
                lr: [0.0, 0.0, 0.1, 0.1, 0.1, 0.0],
                learned: [false, false, true, true, true, false],
                momentum: [0.0, 0.0, 0.9, 0.9, 0.9, 0.0],
                ..Self::frozen()
            },
        }
    }

    /// The `train_ddp.py` (GPT-2) setting, [`OfficialHyper::TrainDdp`].
    pub const fn official_gpt2() -> Self {
        Self::official(OfficialHyper::TrainDdp)
    }

    /// The `train.py` (Shakespeare grid) setting, [`OfficialHyper::TrainPy`].
    pub const fn official_shakespeare() -> Self {
        Self::official(OfficialHyper::TrainPy)
    }

    /// With heavy-ball momentum μ per coefficient.
    pub const fn with_momentum(self, momentum: [f64; 6]) -> Self {
        Self { momentum, ..self }
    }

    /// With hyper-gradient clipping.
    pub const fn with_clip(self, clip: f64) -> Self {
        Self { clip: Some(clip), ..self }
    }

    /// With a warm-up of `updates` updates without hyper-steps.
    pub const fn with_warmup(self, updates: u64) -> Self {
        Self { warmup: updates, ..self }
    }

    /// Also compute hyper-gradients of coefficients that are not learned.
    pub const fn monitored(self) -> Self {
        Self { monitor: true, ..self }
    }

    /// Whether any coefficient is learned.
    pub fn learns_any(&self) -> bool {
        self.learned.iter().any(|&l| l)
    }

    /// Whether hyper-gradients are computed (something learned or monitored).
    pub fn tracks(&self) -> bool {
        self.monitor || self.learns_any()
    }

    /// Whether the hyper-step before update `completed + 1` is taken.
    pub fn active_at(&self, completed: u64) -> bool {
        self.learns_any() && completed >= 1 && completed >= self.warmup
    }

    pub(crate) fn validate(&self) -> Result<(), OptimError> {
        for c in Coef::ALL {
            check_range("hyper lr", self.lr[c.index()], 0.0, f64::MAX)?;
            check_range("hyper momentum", self.momentum[c.index()], 0.0, 1.0)?;
        }
        if let Some(clip) = self.clip {
            if !(clip.is_finite() && clip > 0.0) {
                return Err(OptimError::InvalidSetting { name: "hyper clip", value: clip, why: "must be positive" });
            }
        }
        Ok(())
    }
}

impl Default for HyperConfig {
    fn default() -> Self {
        Self::frozen()
    }
}

/// The hyper-optimizers of the official scripts (repository amazon-science/mada_optimizer_search).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OfficialHyper {
    /// `train_ddp.py` (GPT-2 on OpenWebText, 8 GPUs).
    TrainDdp,
    /// `train.py` (the Shakespeare-char grid, one GPU).
    TrainPy,
    /// `amsgrad_toy.py` (the Reddi counterexample).
    AmsgradToy,
}

/// What one hyper-step did.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct HyperStep {
    /// The hyper-gradient after clipping (0 for coefficients not learned).
    pub clipped: [f64; 6],
    /// Coefficients before the step.
    pub before: Coefficients,
    /// Coefficients after the step and the projection.
    pub after: Coefficients,
}

/// The hyper-optimizer's state: the current coefficients and the momentum buffers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HyperOptimizer {
    config: HyperConfig,
    coefficients: Coefficients,
    momentum_buffer: [Option<f64>; 6],
}

impl HyperOptimizer {
    pub(crate) fn new(config: HyperConfig, coefficients: Coefficients) -> Result<Self, OptimError> {
        config.validate()?;
        Ok(Self { config, coefficients, momentum_buffer: [None; 6] })
    }

    pub(crate) fn config(&self) -> &HyperConfig {
        &self.config
    }

    pub(crate) fn coefficients(&self) -> Coefficients {
        self.coefficients
    }

    pub(crate) fn set_coefficients(&mut self, q: Coefficients) {
        self.coefficients = q;
    }

    pub(crate) fn active_at(&self, completed: u64) -> bool {
        self.config.active_at(completed)
    }

    /// One projected step along `h`, if active after `completed` updates.
    pub(crate) fn step(&mut self, h: [f64; 6], completed: u64, bounds: &CoefficientBox) -> Option<HyperStep> {
        if !self.active_at(completed) {
            return None;
        }
        let before = self.coefficients;
        let mut q = before.to_array();
        let mut clipped = [0.0; 6];
        for c in Coef::ALL {
            let i = c.index();
            if !self.config.learned[i] {
                continue;
            }
            let g = match self.config.clip {
                Some(clip) => h[i].clamp(-clip, clip),
                None => h[i],
            };
            clipped[i] = g;
            let b = match self.momentum_buffer[i] {
                None => g,
                Some(b) => self.config.momentum[i] * b + g,
            };
            self.momentum_buffer[i] = Some(b);
            q[i] -= self.config.lr[i] * b;
        }
        self.coefficients = bounds.project(Coefficients::from_array(q));
        Some(HyperStep { clipped, before, after: self.coefficients })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn momentum_buffer_starts_at_the_first_hypergradient() {
        let cfg = HyperConfig::learn(&[(Coef::Rho, 0.1)]).with_momentum([0.0, 0.0, 0.0, 0.5, 0.0, 0.0]);
        let mut h = HyperOptimizer::new(cfg, Coefficients::avgrad(0.9, 0.95)).unwrap();
        let b = CoefficientBox::OFFICIAL;
        h.step([0.0, 0.0, 0.0, -1.0, 0.0, 0.0], 1, &b).unwrap();
        assert!((h.coefficients().rho - 0.1).abs() < 1e-15); // b = −1
        h.step([0.0, 0.0, 0.0, -1.0, 0.0, 0.0], 2, &b).unwrap();
        assert!((h.coefficients().rho - 0.25).abs() < 1e-15); // b = 0.5·(−1) − 1
                                                              // other coefficients untouched
        assert_eq!(h.coefficients().beta1, 0.9);
    }

    #[test]
    fn clip_projection_and_warmup() {
        let cfg = HyperConfig::mada([1.0; 6]).with_clip(10.0).with_warmup(3);
        let mut h = HyperOptimizer::new(cfg, Coefficients::adam(0.9, 0.95)).unwrap();
        let b = CoefficientBox::OFFICIAL;
        assert!(h.step([100.0; 6], 1, &b).is_none());
        assert!(h.step([100.0; 6], 2, &b).is_none());
        let s = h.step([100.0, -100.0, 0.0, 0.0, 0.0, 0.0], 3, &b).unwrap();
        assert_eq!(s.clipped[0], 10.0);
        assert_eq!(s.clipped[1], -10.0);
        assert_eq!(h.coefficients().beta1, 0.01);
        assert_eq!(h.coefficients().beta2, 0.99);
    }

    #[test]
    fn no_hyper_step_before_the_first_update() {
        let cfg = HyperConfig::mada([1.0; 6]);
        assert!(!cfg.active_at(0));
        assert!(cfg.active_at(1));
        assert!(!HyperConfig::frozen().active_at(10));
    }

    #[test]
    fn invalid_settings_are_refused() {
        let mut cfg = HyperConfig::mada([1e-3; 6]);
        cfg.momentum[2] = 1.5;
        assert!(cfg.validate().unwrap_err().to_string().contains("momentum"));
        let cfg = HyperConfig::mada([-1.0; 6]);
        assert!(cfg.validate().is_err());
    }
}
