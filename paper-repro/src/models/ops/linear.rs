//! y = x·Wᵀ for a weight stored (out, in), with a backward pass that forms dW in W's own layout.
//!
//! **Why.** Composed as `x.matmul(&w.t())`, candle's backward computes the weight's gradient as
//! xᵀ·dY, (in, out), and the transpose's backward then hands W a transposed view, which the
//! gradient store copies into W's layout: one strided copy of every weight per step (1.8% of a
//! baby-GPT step in a profile). Here dW = dYᵀ·x comes out (out, in) directly. Each element is
//! the same sum over the same rows in the same order (the gemm crate splits the output, never
//! the depth), so the bits are candle's; a test pins that.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::timing::{timer, OpFamily, Pass};
use super::{on_fused_path, Result};

/// y (rows, out) = x (rows, in) · Wᵀ.
struct LinearOp;

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let _timer = timer(OpFamily::Linear, Pass::Forward);
        let (&[m, k], &[n, kw]) = (xl.dims(), wl.dims()) else {
            candle_core::bail!("linear: input {:?} and weight {:?} must be matrices", xl.dims(), wl.dims())
        };
        if k != kw {
            candle_core::bail!("linear: input of width {k} for a weight of width {kw}");
        }
        // The very product `x.matmul(&w.t())` runs: W's transposed view as the right operand.
        let y = xs.matmul(ws, (1, m, n, k), xl, &wl.transpose(0, 1)?)?;
        Ok((y, Shape::from((m, n))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _timer = timer(OpFamily::Linear, Pass::Backward);
        let dx = grad.matmul(w)?;
        let dw = grad.t()?.matmul(x)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// x (rows, in) · Wᵀ for W (out, in).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if on_fused_path(x) && x.rank() == 2 {
        x.contiguous()?.apply_op2(&w.contiguous()?, LinearOp)
    } else {
        x.matmul(&w.t()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ops::testing::bits;
    use candle_core::{Device, Var};

    #[test]
    fn linear_gives_the_composed_product_and_gradients_bit_for_bit() {
        let dev = Device::Cpu;
        // The baby GPT's shapes (8 × 256 rows), a smaller one, and odd ones.
        for (m, k, n) in [(2048, 384, 1152), (2048, 1536, 384), (512, 384, 384), (37, 19, 23)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f32, 0.02, (n, k), &dev).unwrap()).unwrap();
            let r = Tensor::randn(0f32, 1.0, (m, n), &dev).unwrap();
            let fused = linear(x.as_tensor(), w.as_tensor()).unwrap();
            let composed = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
            assert_eq!(bits(&fused), bits(&composed));
            let gf = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (composed * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w] {
                let (a, b) = (gf.get(v.as_tensor()).unwrap(), gc.get(v.as_tensor()).unwrap());
                assert!(a.is_contiguous());
                assert_eq!(bits(a), bits(b), "{m}×{k}×{n}");
            }
        }
    }
}
