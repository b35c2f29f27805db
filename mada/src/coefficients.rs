//! The six global coefficients q = (β1, β2, β3, ρ, c, γ) of the MADA family, their box, and
//! the named points (corners) of the family.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::OptimError;

/// One of the six coefficients. The order is the order of every `[f64; 6]` in this crate
/// (coefficient vectors, hyper-gradients, hyper-learning-rates).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Coef {
    /// First-moment decay.
    Beta1,
    /// Second-moment decay.
    Beta2,
    /// Adan-like gradient-difference weight and decay.
    Beta3,
    /// Adam (1) ↔ AVGrad (0) interpolation of the second moment.
    Rho,
    /// Adam (1) ↔ Yogi (0) interpolation of the second-moment increment.
    C,
    /// Adaptive step (1) ↔ Lion sign step (0) interpolation.
    Gamma,
}

impl Coef {
    /// All six, in storage order.
    pub const ALL: [Coef; 6] = [Coef::Beta1, Coef::Beta2, Coef::Beta3, Coef::Rho, Coef::C, Coef::Gamma];

    /// Index into `[f64; 6]` arrays.
    #[inline]
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The name used in spec files, CSV headers and logs (`beta1`, …, `gamma`).
    pub const fn name(self) -> &'static str {
        match self {
            Coef::Beta1 => "beta1",
            Coef::Beta2 => "beta2",
            Coef::Beta3 => "beta3",
            Coef::Rho => "rho",
            Coef::C => "c",
            Coef::Gamma => "gamma",
        }
    }

    /// Parse a spec-file name.
    pub fn from_name(name: &str) -> Option<Coef> {
        Coef::ALL.into_iter().find(|c| c.name() == name)
    }
}

impl fmt::Display for Coef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The box every coefficient is projected onto after each hyper-step (`gdtuo.Meta.step`, the
/// official code's clamps): β1 ∈ [0.01, 0.99], β2 ∈ [0.501, 0.99], β3 ∈ [0, 0.99],
/// ρ, c, γ ∈ [0, 1].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CoefficientBox {
    /// Lower bounds, in [`Coef`] order.
    pub lo: [f64; 6],
    /// Upper bounds, in [`Coef`] order.
    pub hi: [f64; 6],
}

impl CoefficientBox {
    /// The official code's box.
    pub const OFFICIAL: CoefficientBox =
        CoefficientBox { lo: [0.01, 0.501, 0.0, 0.0, 0.0, 0.0], hi: [0.99, 0.99, 0.99, 1.0, 1.0, 1.0] };

    /// Clamp a coefficient vector into the box (the projection of the hyper-step).
    pub fn project(&self, q: Coefficients) -> Coefficients {
        let mut a = q.to_array();
        for (i, x) in a.iter_mut().enumerate() {
            *x = x.clamp(self.lo[i], self.hi[i]);
        }
        Coefficients::from_array(a)
    }

    /// `Ok` when every coefficient is finite and inside the box; otherwise an error naming the
    /// first offending coefficient, its value and its range.
    pub fn check(&self, q: &Coefficients) -> Result<(), OptimError> {
        for c in Coef::ALL {
            let x = q.get(c);
            let (lo, hi) = (self.lo[c.index()], self.hi[c.index()]);
            if !(x.is_finite() && x >= lo && x <= hi) {
                return Err(OptimError::CoefficientOutOfBox { coef: c, value: x, lo, hi });
            }
        }
        Ok(())
    }
}

/// The coefficients q = (β1, β2, β3, ρ, c, γ), global scalars shared by every tensor.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Coefficients {
    pub beta1: f64,
    pub beta2: f64,
    pub beta3: f64,
    pub rho: f64,
    pub c: f64,
    pub gamma: f64,
}

impl Coefficients {
    /// Adam (bias-corrected, ε outside the square root): β3 = 0, ρ = 1, c = 1, γ = 1.
    pub const fn adam(beta1: f64, beta2: f64) -> Self {
        Self { beta1, beta2, beta3: 0.0, rho: 1.0, c: 1.0, gamma: 1.0 }
    }

    /// AVGrad: the Adam point with ρ = 0 (second moment = running mean of the EMAs v_1..v_t).
    pub const fn avgrad(beta1: f64, beta2: f64) -> Self {
        Self { rho: 0.0, ..Self::adam(beta1, beta2) }
    }

    /// Yogi (with Adam-style bias correction): c = 0.
    pub const fn yogi(beta1: f64, beta2: f64) -> Self {
        Self { c: 0.0, ..Self::adam(beta1, beta2) }
    }

    /// The Adan-like point: Adam with the gradient-difference terms weighted by β3.
    pub const fn adan_like(beta1: f64, beta2: f64, beta3: f64) -> Self {
        Self { beta3, ..Self::adam(beta1, beta2) }
    }

    /// Lion: γ = 0 (the other coefficients do not enter the update; they keep Adam's values so
    /// that learning γ starts from a well-defined adaptive branch).
    pub const fn lion() -> Self {
        Self { gamma: 0.0, ..Self::adam(0.9, 0.95) }
    }

    /// HyperAdam's starting point (Adam with β1, β2 to be learned): the GPT-2 Adam defaults.
    pub const fn hyperadam_start() -> Self {
        Self::adam(0.9, 0.95)
    }

    /// In [`Coef`] order.
    pub const fn to_array(self) -> [f64; 6] {
        [self.beta1, self.beta2, self.beta3, self.rho, self.c, self.gamma]
    }

    /// From [`Coef`] order.
    pub const fn from_array(a: [f64; 6]) -> Self {
        Self { beta1: a[0], beta2: a[1], beta3: a[2], rho: a[3], c: a[4], gamma: a[5] }
    }

    /// One coefficient.
    pub fn get(&self, c: Coef) -> f64 {
        self.to_array()[c.index()]
    }

    /// Set one coefficient.
    pub fn set(&mut self, c: Coef, value: f64) {
        let mut a = self.to_array();
        a[c.index()] = value;
        *self = Self::from_array(a);
    }
}

impl Default for Coefficients {
    /// The Adam corner with the GPT-2 betas (0.9, 0.95).
    fn default() -> Self {
        Self::adam(0.9, 0.95)
    }
}

impl fmt::Display for Coefficients {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "beta1={:.4} beta2={:.4} beta3={:.4} rho={:.4} c={:.4} gamma={:.4}",
            self.beta1, self.beta2, self.beta3, self.rho, self.c, self.gamma
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corners_are_inside_the_official_box() {
        let b = CoefficientBox::OFFICIAL;
        for q in [
            Coefficients::adam(0.9, 0.95),
            Coefficients::avgrad(0.9, 0.95),
            Coefficients::yogi(0.9, 0.95),
            Coefficients::adan_like(0.9, 0.95, 0.9),
            Coefficients::lion(),
            Coefficients::hyperadam_start(),
        ] {
            b.check(&q).unwrap();
        }
    }

    #[test]
    fn check_names_the_offending_coefficient() {
        let mut q = Coefficients::adam(0.9, 0.5);
        let e = CoefficientBox::OFFICIAL.check(&q).unwrap_err().to_string();
        assert!(e.contains("beta2") && e.contains("0.501"), "{e}");
        q.beta2 = 0.9;
        q.rho = f64::NAN;
        let e = CoefficientBox::OFFICIAL.check(&q).unwrap_err().to_string();
        assert!(e.contains("rho"), "{e}");
    }

    #[test]
    fn projection_clamps_each_coefficient() {
        let q = Coefficients::from_array([1.5, 0.1, -0.2, 0.5, 2.0, -1.0]);
        let p = CoefficientBox::OFFICIAL.project(q);
        assert_eq!(p.to_array(), [0.99, 0.501, 0.0, 0.5, 1.0, 0.0]);
    }

    #[test]
    fn names_round_trip() {
        for c in Coef::ALL {
            assert_eq!(Coef::from_name(c.name()), Some(c));
        }
        assert_eq!(Coef::from_name("beta4"), None);
    }
}
