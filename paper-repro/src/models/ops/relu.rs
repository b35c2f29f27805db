//! ReLU, forward and backward in one parallel pass each.
//!
//! **Why.** Candle's ReLU backward is composed: `zeros_like`, `ge`, a cast of the mask to f32 and a
//! product, four full-size passes and allocations (the mask's on one thread) where one suffices.
//!
//! **Bit for bit candle's.** The forward is candle's `v.max(0)`; the gradient is candle's
//! g · [x ≥ 0] with the mask as 1.0 or 0.0 — so ReLU′(0) = 1 (PyTorch's is 0, a choice that only
//! shows at exact zeros), a NaN input passes no gradient, and a negative gradient times 0 keeps
//! its −0, as candle's product does.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use super::timing::{timer, OpFamily, Pass};
use super::{f32_slice, on_fused_path, par_collect, Result};

/// max(v, 0) as candle's ReLU computes it (`f32::max`: a NaN gives 0).
#[inline(always)]
pub(super) fn relu_value(v: f32) -> f32 {
    v.max(0f32)
}

/// The gradient g reaching ReLU's input v: g · [v ≥ 0], the mask as 1.0 or 0.0 (see the module
/// comment).
#[inline(always)]
pub(super) fn relu_gradient(g: f32, v: f32) -> f32 {
    g * if v >= 0.0 { 1f32 } else { 0f32 }
}

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _timer = timer(OpFamily::Relu, Pass::Forward);
        let x = f32_slice(s, l)?;
        let out = par_collect(x.len(), CHUNK, |i| x[i * CHUNK..].iter().take(CHUNK).map(|&v| relu_value(v)))?;
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _timer = timer(OpFamily::Relu, Pass::Backward);
        Ok(Some(arg.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &ReluBackward)?))
    }
}

/// dx = g · [x ≥ 0].
struct ReluBackward;

impl CustomOp2 for ReluBackward {
    fn name(&self) -> &'static str {
        "relu-backward"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (f32_slice(xs, xl)?, f32_slice(gs, gl)?);
        if g.len() != x.len() {
            candle_core::bail!("relu backward: {} gradients for {} inputs", g.len(), x.len());
        }
        let out = par_collect(x.len(), CHUNK, |i| {
            let (xc, gc) = (&x[i * CHUNK..], &g[i * CHUNK..]);
            xc.iter().zip(gc).take(CHUNK).map(|(&v, &gv)| relu_gradient(gv, v))
        })?;
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// max(x, 0): the fused kernel for f32 on the CPU, candle's `relu` elsewhere.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if on_fused_path(x) {
        x.contiguous()?.apply_op1(Relu)
    } else {
        x.relu()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ops::testing::bits;
    use candle_core::{Device, Var};

    #[test]
    fn relu_forward_and_gradient_are_candles_bit_for_bit() {
        let dev = Device::Cpu;
        // Random values (over several tasks' chunks) with zeros of both signs, a NaN and
        // infinities among them, and gradients of both signs.
        let mut values = Tensor::randn(0f32, 1.0, 40_000, &dev).unwrap().to_vec1::<f32>().unwrap();
        values[..6].copy_from_slice(&[0.0, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-40]);
        let x = Var::from_tensor(&Tensor::from_vec(values, (8, 5000), &dev).unwrap()).unwrap();
        let r = Tensor::randn(0f32, 1.0, (8, 5000), &dev).unwrap();
        let (fused, composed) = (relu(x.as_tensor()).unwrap(), x.as_tensor().relu().unwrap());
        assert_eq!(bits(&fused), bits(&composed));
        let gf = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (composed * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let (df, dc) = (gf.get(x.as_tensor()).unwrap(), gc.get(x.as_tensor()).unwrap());
        assert_eq!(bits(df), bits(dc));
        // The convention at the edges: ReLU′(±0) = 1, and a NaN passes nothing.
        let (d, g) =
            (df.flatten_all().unwrap().to_vec1::<f32>().unwrap(), r.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_eq!((d[0], d[1], d[2]), (g[0], g[1], 0.0));
    }
}
