//! Optimizers as data: a serde description (`{"name": "adam", "beta1": 0.9, …}`) shared by the
//! `trace` command's JSON specs and the experiment catalog's TOML files, and [`AnyOptimizer`],
//! the optimizer it builds.
//!
//! Unknown keys are errors (every struct denies them), so a typo in a config never silently
//! falls back to a default.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::baselines::{AdamConfig, AdanConfig, LionConfig, SgdConfig, YogiConfig};
use crate::hyper::OfficialHyper;
use crate::{
    Adam, Adan, AmsGrad, AvGrad, Coef, Coefficients, Float, HyperConfig, Lion, Mada, MadaConfig, OptimError, Optimizer,
    RunningMoment, Semantics, Sgd, Yogi,
};

/// Which optimizer, with its settings (the learning rate is not part of it: it is a schedule).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum OptimizerSpec {
    Sgd(SgdConfig),
    Adam(AdamConfig),
    Amsgrad(AdamConfig),
    Avgrad(AdamConfig),
    Yogi(YogiConfig),
    Adan(AdanConfig),
    Lion(LionConfig),
    Mada(MadaSpec),
}

impl OptimizerSpec {
    /// The spec's `name`.
    pub fn name(&self) -> &'static str {
        match self {
            OptimizerSpec::Sgd(_) => "sgd",
            OptimizerSpec::Adam(_) => "adam",
            OptimizerSpec::Amsgrad(_) => "amsgrad",
            OptimizerSpec::Avgrad(_) => "avgrad",
            OptimizerSpec::Yogi(_) => "yogi",
            OptimizerSpec::Adan(_) => "adan",
            OptimizerSpec::Lion(_) => "lion",
            OptimizerSpec::Mada(_) => "mada",
        }
    }
}

/// A MADA optimizer as data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MadaSpec {
    /// ε outside the square root (default 1e-6).
    #[serde(default = "default_mada_eps")]
    pub eps: f64,
    /// `official_code` (default) or `textbook`.
    #[serde(default)]
    pub semantics: Semantics,
    /// Initial coefficients (default: the Adam corner with β = (0.9, 0.95)).
    #[serde(default)]
    pub coefficients: Coefficients,
    /// The hyper-optimizer (default: nothing learned).
    #[serde(default)]
    pub hyper: HyperSpec,
    /// What ρ interpolates v_t with: `mean` (AVGrad; default, the official code) or `max`
    /// (AMSGrad's running maximum).
    #[serde(default, skip_serializing_if = "is_mean")]
    pub running: RunningMoment,
}

fn is_mean(r: &RunningMoment) -> bool {
    *r == RunningMoment::Mean
}

fn default_mada_eps() -> f64 {
    1e-6
}

/// The hyper-optimizer as data: a coefficient is learned iff it has a hyper-learning-rate.
///
/// It is written with explicit values, and can be read from an official preset instead:
/// `{"preset": "train_py"}` is `train.py`'s hyper-optimizer ([`OfficialHyper`]); beside
/// `preset`, `learn = ["beta1", "beta2"]` keeps only those coefficients learned (HyperAdam),
/// `lr_scale` multiplies every hyper-learning-rate, and any explicit key (`lr`, `momentum`,
/// `clip`, `start`, `monitor`) overrides the preset's value for what it names.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawHyperSpec")]
pub struct HyperSpec {
    /// Hyper-learning-rate per learned coefficient.
    pub lr: BTreeMap<Coef, f64>,
    /// Heavy-ball momentum per coefficient (absent = 0).
    pub momentum: BTreeMap<Coef, f64>,
    /// Clamp hyper-gradients to [−clip, clip] (absent: no clipping).
    pub clip: Option<f64>,
    /// No hyper-step at updates t ≤ start.
    pub start: u64,
    /// Compute hyper-gradients even if nothing is learned.
    pub monitor: bool,
}

/// [`HyperSpec`] as written: explicit values, an official preset, or a preset with changes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHyperSpec {
    preset: Option<OfficialHyper>,
    learn: Option<Vec<Coef>>,
    lr_scale: Option<f64>,
    lr: Option<BTreeMap<Coef, f64>>,
    momentum: Option<BTreeMap<Coef, f64>>,
    clip: Option<f64>,
    start: Option<u64>,
    monitor: Option<bool>,
}

impl TryFrom<RawHyperSpec> for HyperSpec {
    type Error = String;

    fn try_from(raw: RawHyperSpec) -> Result<Self, String> {
        if raw.preset.is_none() && (raw.learn.is_some() || raw.lr_scale.is_some()) {
            return Err("`learn` and `lr_scale` change a `preset`; give one".into());
        }
        let mut spec = raw.preset.map(|p| HyperSpec::from_config(&HyperConfig::official(p))).unwrap_or_default();
        if let Some(learn) = &raw.learn {
            spec.lr.retain(|c, _| learn.contains(c));
            spec.momentum.retain(|c, _| learn.contains(c));
            if let Some(c) = learn.iter().find(|c| !spec.lr.contains_key(c)) {
                return Err(format!("`learn` names {c}, which the preset does not learn"));
            }
        }
        if let Some(scale) = raw.lr_scale {
            if !(scale.is_finite() && scale >= 0.0) {
                return Err(format!("lr_scale = {scale} must be a finite non-negative number"));
            }
            spec.lr.values_mut().for_each(|lr| *lr *= scale);
        }
        spec.lr.extend(raw.lr.unwrap_or_default());
        spec.momentum.extend(raw.momentum.unwrap_or_default());
        spec.clip = raw.clip.or(spec.clip);
        spec.start = raw.start.unwrap_or(spec.start);
        spec.monitor = raw.monitor.unwrap_or(spec.monitor);
        Ok(spec)
    }
}

impl HyperSpec {
    /// The data form of hyper-optimizer settings (a coefficient with a zero momentum is written
    /// without one).
    pub fn from_config(c: &HyperConfig) -> Self {
        let mut lr = BTreeMap::new();
        let mut momentum = BTreeMap::new();
        for coef in Coef::ALL {
            let i = coef.index();
            if c.learned[i] {
                lr.insert(coef, c.lr[i]);
                if c.momentum[i] != 0.0 {
                    momentum.insert(coef, c.momentum[i]);
                }
            }
        }
        Self { lr, momentum, clip: c.clip, start: c.warmup, monitor: c.monitor }
    }

    /// The hyper-optimizer settings; errors if a momentum is given for a coefficient that is
    /// not learned.
    pub fn to_config(&self) -> Result<HyperConfig, OptimError> {
        let mut cfg = HyperConfig::frozen();
        for (&c, &lr) in &self.lr {
            cfg.learned[c.index()] = true;
            cfg.lr[c.index()] = lr;
        }
        for (&c, &mu) in &self.momentum {
            if !cfg.learned[c.index()] {
                return Err(OptimError::Unsupported(format!(
                    "hyper.momentum is given for {c}, which is not learned (it has no hyper.lr)"
                )));
            }
            cfg.momentum[c.index()] = mu;
        }
        cfg.clip = self.clip;
        cfg.warmup = self.start;
        cfg.monitor = self.monitor;
        Ok(cfg)
    }
}

impl MadaSpec {
    /// The optimizer this spec describes.
    pub fn build<T: Float>(&self) -> Result<Mada<T>, OptimError> {
        let config =
            MadaConfig { eps: self.eps, semantics: self.semantics, running: self.running, ..MadaConfig::default() };
        Mada::new(config, self.hyper.to_config()?, self.coefficients)
    }
}

/// `each_variant!(value, o => expr)`: `expr` with `o` bound to the optimizer inside any variant.
macro_rules! each_variant {
    ($v:expr, $o:ident => $e:expr) => {
        match $v {
            AnyOptimizer::Sgd($o) => $e,
            AnyOptimizer::Adam($o) => $e,
            AnyOptimizer::AmsGrad($o) => $e,
            AnyOptimizer::AvGrad($o) => $e,
            AnyOptimizer::Yogi($o) => $e,
            AnyOptimizer::Adan($o) => $e,
            AnyOptimizer::Lion($o) => $e,
            AnyOptimizer::Mada($o) => $e,
        }
    };
}

/// Any optimizer of this crate, chosen at run time (and saved with serde as one value).
/// (One value per model: the size difference between variants does not matter.)
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(bound(serialize = "T: Float", deserialize = "T: Float"))]
pub enum AnyOptimizer<T> {
    Sgd(Sgd<T>),
    Adam(Adam<T>),
    AmsGrad(AmsGrad<T>),
    AvGrad(AvGrad<T>),
    Yogi(Yogi<T>),
    Adan(Adan<T>),
    Lion(Lion<T>),
    Mada(Mada<T>),
}

impl<T: Float> AnyOptimizer<T> {
    /// Build from a spec, validating every setting.
    pub fn from_spec(spec: &OptimizerSpec) -> Result<Self, OptimError> {
        Ok(match spec {
            OptimizerSpec::Sgd(c) => Self::Sgd(Sgd::new(*c)?),
            OptimizerSpec::Adam(c) => Self::Adam(Adam::new(*c)?),
            OptimizerSpec::Amsgrad(c) => Self::AmsGrad(AmsGrad::new(*c)?),
            OptimizerSpec::Avgrad(c) => Self::AvGrad(AvGrad::new(*c)?),
            OptimizerSpec::Yogi(c) => Self::Yogi(Yogi::new(*c)?),
            OptimizerSpec::Adan(c) => Self::Adan(Adan::new(*c)?),
            OptimizerSpec::Lion(c) => Self::Lion(Lion::new(*c)?),
            OptimizerSpec::Mada(s) => Self::Mada(s.build()?),
        })
    }

    /// The MADA optimizer inside, if it is one.
    pub fn as_mada(&self) -> Option<&Mada<T>> {
        match self {
            Self::Mada(m) => Some(m),
            _ => None,
        }
    }

    /// The MADA optimizer inside, mutably.
    pub fn as_mada_mut(&mut self) -> Option<&mut Mada<T>> {
        match self {
            Self::Mada(m) => Some(m),
            _ => None,
        }
    }

    fn inner(&self) -> &dyn Optimizer<T> {
        each_variant!(self, o => o)
    }

    fn inner_mut(&mut self) -> &mut dyn Optimizer<T> {
        each_variant!(self, o => o)
    }
}

impl<T: Float> Optimizer<T> for AnyOptimizer<T> {
    fn name(&self) -> &'static str {
        self.inner().name()
    }
    fn prepare(&mut self, grads: &[&[T]]) -> Result<(), OptimError> {
        self.inner_mut().prepare(grads)
    }
    fn update_tensor(&mut self, index: usize, param: &mut [T], grad: &[T], lr: f64) -> Result<(), OptimError> {
        self.inner_mut().update_tensor(index, param, grad, lr)
    }
    fn state_bytes_per_param(&self) -> usize {
        self.inner().state_bytes_per_param()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_kind_and_fills_defaults() {
        let s: OptimizerSpec = serde_json::from_str(r#"{"name": "adam", "beta2": 0.95}"#).unwrap();
        assert_eq!(s, OptimizerSpec::Adam(AdamConfig { beta2: 0.95, ..AdamConfig::default() }));
        let s: OptimizerSpec = serde_json::from_str(
            r#"{"name": "mada", "coefficients": {"beta1": 0.9, "beta2": 0.95, "beta3": 0, "rho": 0, "c": 1, "gamma": 1},
                "hyper": {"lr": {"rho": 0.1, "beta3": 0.1}, "momentum": {"rho": 0.9}, "clip": 10, "start": 50}}"#,
        )
        .unwrap();
        let OptimizerSpec::Mada(m) = &s else { panic!() };
        let cfg = m.hyper.to_config().unwrap();
        assert_eq!(cfg.learned, [false, false, true, true, false, false]);
        assert_eq!(cfg.momentum[3], 0.9);
        assert_eq!(cfg.warmup, 50);
        assert!(AnyOptimizer::<f32>::from_spec(&s).is_ok());
    }

    #[test]
    fn unknown_keys_and_names_are_errors_naming_them() {
        let e = serde_json::from_str::<OptimizerSpec>(r#"{"name": "adam", "beta_1": 0.9}"#).unwrap_err().to_string();
        assert!(e.contains("beta_1"), "{e}");
        let e = serde_json::from_str::<OptimizerSpec>(r#"{"name": "adamax"}"#).unwrap_err().to_string();
        assert!(e.contains("adamax"), "{e}");
        let e = serde_json::from_str::<OptimizerSpec>(r#"{"name": "mada", "hyper": {"lr": {"beta4": 1}}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("beta4"), "{e}");
        let e = serde_json::from_str::<OptimizerSpec>(r#"{"name": "mada", "coefficients": {"beta1": 0.9}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("beta2"), "{e}");
    }

    #[test]
    fn out_of_box_coefficient_is_an_error() {
        let s: OptimizerSpec = serde_json::from_str(
            r#"{"name": "mada", "coefficients": {"beta1": 0.9, "beta2": 0.4, "beta3": 0, "rho": 1, "c": 1, "gamma": 1}}"#,
        )
        .unwrap();
        let e = AnyOptimizer::<f64>::from_spec(&s).unwrap_err().to_string();
        assert!(e.contains("beta2") && e.contains("0.4"), "{e}");
    }

    #[test]
    fn presets_are_the_official_settings_and_can_be_changed() {
        let read = |json: &str| serde_json::from_str::<HyperSpec>(json).unwrap().to_config().unwrap();
        assert_eq!(read(r#"{"preset": "train_ddp"}"#), HyperConfig::official_gpt2());
        assert_eq!(read(r#"{"preset": "train_py"}"#), HyperConfig::official_shakespeare());
        // HyperAdam from train.py's optimizer: only β1 and β2, with their lr and momentum.
        let h = read(r#"{"preset": "train_py", "learn": ["beta1", "beta2"]}"#);
        assert_eq!(h.learned, [true, true, false, false, false, false]);
        assert_eq!((h.lr[1], h.momentum[1], h.clip), (2.5e-3, 0.5, Some(10.0)));
        // A sensitivity run: every hyper-lr ×10, the warm-up overridden.
        let h = read(r#"{"preset": "train_ddp", "lr_scale": 10, "start": 3}"#);
        assert!((h.lr[2] - 1.0).abs() < 1e-15 && (h.lr[0] - 5e-3).abs() < 1e-15 && h.warmup == 3);
        // Written back, a preset is its explicit values.
        let spec: HyperSpec = serde_json::from_str(r#"{"preset": "train_py"}"#).unwrap();
        let again: HyperSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(spec, again);
        for (bad, needle) in [
            (r#"{"preset": "train_jax"}"#, "train_jax"),
            (r#"{"preset": "train_py", "learn": ["beta4"]}"#, "beta4"),
            (r#"{"learn": ["beta1"]}"#, "preset"),
            (r#"{"preset": "amsgrad_toy", "learn": ["gamma"]}"#, "gamma"),
            (r#"{"preset": "train_py", "lr_scal": 2}"#, "lr_scal"),
        ] {
            let e = serde_json::from_str::<HyperSpec>(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn momentum_for_a_frozen_coefficient_is_an_error() {
        let h = HyperSpec { momentum: [(Coef::Rho, 0.5)].into(), ..HyperSpec::default() };
        assert!(h.to_config().unwrap_err().to_string().contains("rho"));
    }
}
