//! The element types the kernels run on (`f32`, `f64`).

use std::fmt::Debug;

/// A floating-point element type of parameters, gradients and optimizer state.
///
/// Coefficients, learning rates and hyper-gradients are always `f64` (they are a handful of
/// global scalars); per-element arithmetic runs in `Self`, so an `f64` run is exact to the
/// references and an `f32` run costs what an `f32` Adam step costs.
pub trait Float:
    num_traits::Float + Copy + Default + Debug + Send + Sync + serde::Serialize + serde::de::DeserializeOwned + 'static
{
    /// Bytes of one element.
    const BYTES: usize;
    /// Type name, for messages and benchmarks.
    const NAME: &'static str;
    /// Cast from `f64` (rounds to nearest for `f32`).
    fn of(x: f64) -> Self;
    /// Cast to `f64` (exact).
    fn f64(self) -> f64;
    /// Cast from a stored sign (−1, 0, +1).
    fn of_i8(x: i8) -> Self;
}

impl Float for f32 {
    const BYTES: usize = 4;
    const NAME: &'static str = "f32";
    #[inline(always)]
    fn of(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn of_i8(x: i8) -> Self {
        x as f32
    }
}

impl Float for f64 {
    const BYTES: usize = 8;
    const NAME: &'static str = "f64";
    #[inline(always)]
    fn of(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn of_i8(x: i8) -> Self {
        x as f64
    }
}

/// `torch.sign`: −1, 0 or +1, with `sign(±0) = 0`.
///
/// Deliberately not `f32::signum`, which returns `1.0` for `+0.0`: the official code's Lion
/// direction and Yogi switch use `torch.sign`, and a zero gradient element must give a zero
/// sign step. (NaN maps to 0; NaN inputs are rejected before an update anyway.)
#[inline(always)]
pub fn sign<T: Float>(x: T) -> T {
    let zero = T::zero();
    if x > zero {
        T::one()
    } else if x < zero {
        -T::one()
    } else {
        zero
    }
}

/// [`sign`] as a stored byte.
#[inline(always)]
pub fn sign_i8<T: Float>(x: T) -> i8 {
    let zero = T::zero();
    (x > zero) as i8 - (x < zero) as i8
}
