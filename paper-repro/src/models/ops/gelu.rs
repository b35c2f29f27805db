//! The exact (erf) GELU, x·Φ(x), fused forward and backward.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use mada::simd_kernel;

use super::softmax::exp_nonpositive;
use super::timing::{timer, OpFamily, Pass};
use super::{f32_slice, on_fused_path, par_fill, Result};

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
        let _timer = timer(OpFamily::Gelu, Pass::Forward);
        let x = f32_slice(s, l)?;
        // SAFETY: the kernel writes its chunk's first n elements and returns n.
        let out = unsafe { par_fill(x.len(), CHUNK, |i, o| gelu_chunk(&x[i * CHUNK..], o)) }?;
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _timer = timer(OpFamily::Gelu, Pass::Backward);
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
        if g.len() != x.len() {
            candle_core::bail!("gelu backward: {} gradients for {} inputs", g.len(), x.len());
        }
        // SAFETY: the kernel writes its chunk's first n elements and returns n.
        let out = unsafe { par_fill(x.len(), CHUNK, |i, o| gelu_backward_chunk(&x[i * CHUNK..], &g[i * CHUNK..], o)) }?;
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

// The loops below are compiled per instruction set (a 4-lane baseline build spent 7.8% of a
// baby-GPT step in them); every operation is IEEE, so each twin gives the same bits.
simd_kernel!(fn gelu_chunk[](x: &[f32], out: &mut [MaybeUninit<f32>]) -> usize = gelu_kernel[]);
simd_kernel!(fn gelu_backward_chunk[](x: &[f32], g: &[f32], out: &mut [MaybeUninit<f32>]) -> usize
    = gelu_backward_kernel[]);

/// out = x·Φ(x) over the first n = min(|x|, |out|) elements; returns n.
#[inline(always)]
fn gelu_kernel(x: &[f32], out: &mut [MaybeUninit<f32>]) -> usize {
    let n = x.len().min(out.len());
    let (x, out) = (&x[..n], &mut out[..n]);
    for (o, &v) in out.iter_mut().zip(x) {
        o.write(0.5 * v * (1.0 + erf(v * FRAC_1_SQRT_2)));
    }
    n
}

/// out = g·(Φ(x) + x·φ(x)) over the first n = min(|x|, |g|, |out|) elements; returns n.
#[inline(always)]
fn gelu_backward_kernel(x: &[f32], g: &[f32], out: &mut [MaybeUninit<f32>]) -> usize {
    let inv_sqrt_2pi = 1.0 / (2.0 * std::f32::consts::PI).sqrt();
    let n = x.len().min(g.len()).min(out.len());
    let (x, g, out) = (&x[..n], &g[..n], &mut out[..n]);
    for ((o, &v), &gv) in out.iter_mut().zip(x).zip(g) {
        let cdf = 0.5 * (1.0 + erf(v * FRAC_1_SQRT_2));
        let pdf = exp_nonpositive(-0.5 * v * v) * inv_sqrt_2pi;
        o.write(gv * (cdf + v * pdf));
    }
    n
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
    fn the_kernels_give_the_same_bits_whichever_instruction_set_runs_them() {
        // The dispatched twins run as AVX-512 or AVX2 where the CPU has them; the kernels called
        // directly are compiled for the test's own (baseline) target. 70 values cover the
        // vector bodies and a tail, over |x| ≤ 7 (both of erf's saturations).
        let x: Vec<f32> = (0..70).map(|i| (i as f32 - 35.0) * 0.2 + 0.013).collect();
        let g: Vec<f32> = (0..70).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
        let run = |f: &dyn Fn(&mut [MaybeUninit<f32>]) -> usize| {
            let mut out = vec![MaybeUninit::new(f32::NAN); x.len()];
            assert_eq!(f(&mut out), x.len());
            out.iter().map(|v| unsafe { v.assume_init() }.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(run(&|o| gelu_chunk(&x, o)), run(&|o| gelu_kernel(&x, o)));
        assert_eq!(run(&|o| gelu_backward_chunk(&x, &g, o)), run(&|o| gelu_backward_kernel(&x, &g, o)));
    }

    #[test]
    fn gelu_matches_candle() {
        check(&[3, 50], |x| gelu(x).unwrap(), |x| x.gelu_erf().unwrap());
        // Two tasks' chunks, the second one short.
        check(&[3, 7000], |x| gelu(x).unwrap(), |x| x.gelu_erf().unwrap());
    }
}
