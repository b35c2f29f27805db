//! # mada — the MADA optimizer family, exact and fast
//!
//! MADA ("Meta-Adaptive Optimizers through hyper-gradient Descent", Ozkara et al., ICML 2024)
//! parameterizes a family of optimizers by six global coefficients
//! q = (β1, β2, β3, ρ, c, γ) — Adam, AVGrad, Yogi, an Adan-like rule and Lion are points of it —
//! and after each update takes one projected SGD step on q along the one-step hyper-gradient.
//!
//! This crate is the one place the update rule and its derivatives live:
//! - [`Mada`]: the parameterized update with closed-form hyper-gradients computed inside a
//!   fused kernel (no autograd graph), in the official code's semantics
//!   ([`Semantics::OfficialCode`]) or the textbook reading ([`Semantics::Textbook`]); every
//!   convention is documented in [`family`].
//! - [`HyperConfig`]: which coefficients are learned, hyper-learning-rates, momentum, clipping,
//!   warm-up.
//! - Baselines, each its own type: [`Sgd`], [`Adam`] (AdamW), [`AmsGrad`], [`AvGrad`],
//!   [`Yogi`], [`Adan`], [`Lion`].
//! - [`clip`]: gradient-norm clipping and decoupled weight decay, as the paper's loops apply them.
//! - [`spec`]: optimizers as data (JSON/TOML), [`AnyOptimizer`].
//! - `candle` (cargo feature): every optimizer as a `candle_nn::Optimizer` over `Var`s.
//!
//! All optimizers implement [`Optimizer`] over flat `f32`/`f64` slices; their state is
//! `serde`-serializable, and a run restored from saved state continues bit-identically
//! (reductions are split in a fixed tree, so results do not depend on the thread count).

pub mod baselines;
pub mod clip;
pub mod coefficients;
mod error;
pub mod family;
pub mod float;
pub mod hyper;
pub mod optimizer;
pub mod par;
pub mod simd;
pub mod spec;

#[cfg(feature = "candle")]
pub mod candle;

pub use baselines::{
    Adam, AdamConfig, Adan, AdanConfig, AmsGrad, AvGrad, Lion, LionConfig, Sgd, SgdConfig, Yogi, YogiConfig,
};
pub use coefficients::{Coef, CoefficientBox, Coefficients};
pub use error::OptimError;
pub use family::{Mada, MadaConfig, MadaStepInfo, MadaTensorState, RunningMoment, Semantics};
pub use float::Float;
pub use hyper::{HyperConfig, HyperStep, OfficialHyper};
pub use optimizer::Optimizer;
pub use spec::{AnyOptimizer, HyperSpec, MadaSpec, OptimizerSpec};
