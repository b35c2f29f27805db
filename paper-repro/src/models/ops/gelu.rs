//! The exact (erf) GELU, x·Φ(x), fused forward and backward.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::softmax::exp_nonpositive;
use super::{f32_slice, on_fused_path, Result};

struct Gelu;

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;

/// erf(x) by Abramowitz & Stegun 7.1.26: absolute error ≤ 1.5e-7 in exact arithmetic and
/// ≤ 5e-7 evaluated in f32 (a few f32 ulps of GELU's output); branch-free, so the GELU loops
/// vectorize, unlike `libm::erff`.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    (1.0 - poly * exp_nonpositive(-a * a)).copysign(x)
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l)?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(1 << 14).zip(x.par_chunks(1 << 14)).for_each(|(o, xs)| {
            for (ov, &v) in o.iter_mut().zip(xs) {
                *ov = 0.5 * v * (1.0 + erf(v * FRAC_1_SQRT_2));
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &GeluBackward)?))
    }
}

/// dx = g·(Φ(x) + x·φ(x)).
struct GeluBackward;

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "gelu-erf-backward"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (f32_slice(xs, xl)?, f32_slice(gs, gl)?);
        let inv_sqrt_2pi = 1.0 / (2.0 * std::f32::consts::PI).sqrt();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(1 << 14).zip(x.par_chunks(1 << 14).zip(g.par_chunks(1 << 14))).for_each(|(o, (xc, gc))| {
            for ((ov, &v), &gv) in o.iter_mut().zip(xc).zip(gc) {
                let cdf = 0.5 * (1.0 + erf(v * FRAC_1_SQRT_2));
                let pdf = exp_nonpositive(-0.5 * v * v) * inv_sqrt_2pi;
                *ov = gv * (cdf + v * pdf);
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// The exact GELU, x·Φ(x).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if on_fused_path(x) {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        x.gelu_erf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ops::testing::check;

    #[test]
    fn fast_erf_is_accurate() {
        for i in -4000..=4000 {
            let x = i as f32 / 1000.0;
            assert!((erf(x) - libm::erff(x)).abs() <= 5e-7, "erf({x})");
        }
    }

    #[test]
    fn gelu_matches_candle() {
        check(&[3, 50], |x| gelu(x).unwrap(), |x| x.gelu_erf().unwrap());
    }
}
