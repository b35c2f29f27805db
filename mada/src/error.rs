use crate::Coef;

/// Everything an optimizer can refuse. Messages name the offending tensor, coefficient or
/// setting so a training loop can pass them straight to the user.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OptimError {
    #[error("coefficient {coef} = {value} is outside its box [{lo}, {hi}]")]
    CoefficientOutOfBox { coef: Coef, value: f64, lo: f64, hi: f64 },
    #[error("invalid setting {name} = {value}: {why}")]
    InvalidSetting { name: &'static str, value: f64, why: &'static str },
    #[error("tensor {index}: parameter has {param} elements but its gradient has {grad}")]
    LengthMismatch { index: usize, param: usize, grad: usize },
    #[error("tensor {index}: optimizer state was created for {state} elements, got {got}")]
    StateMismatch { index: usize, state: usize, got: usize },
    #[error("tensor {index} has no optimizer state yet (it has never been updated)")]
    NoState { index: usize },
    #[error("{params} parameter tensors but {grads} gradients")]
    TensorCountMismatch { params: usize, grads: usize },
    #[error("hyper-gradient of {coef} is {value} (not finite) at update {step}")]
    NonFiniteHypergradient { coef: Coef, value: f64, step: u64 },
    #[error("{0}")]
    Unsupported(String),
}

/// Check a scalar setting: finite and inside `[lo, hi]`.
pub(crate) fn check_range(name: &'static str, value: f64, lo: f64, hi: f64) -> Result<(), OptimError> {
    if value.is_finite() && value >= lo && value <= hi {
        Ok(())
    } else {
        Err(OptimError::InvalidSetting {
            name,
            value,
            why: if value.is_finite() { "out of range" } else { "not finite" },
        })
    }
}

/// Check a decay rate: finite and inside `[0, 1)`.
pub(crate) fn check_beta(name: &'static str, value: f64) -> Result<(), OptimError> {
    if value.is_finite() && (0.0..1.0).contains(&value) {
        Ok(())
    } else {
        Err(OptimError::InvalidSetting { name, value, why: "must lie in [0, 1)" })
    }
}
