//! LayerNorm over the last axis with a gain and no bias (the bias is a separate broadcast add),
//! fused forward and backward.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::{f32_slice, on_fused_path, Result, ROWS_PER_TASK};

const LN_EPS: f32 = 1e-5;

/// y = (x − mean)/√(var + ε) ⊙ w over the last axis (biased variance, as PyTorch).
struct LayerNormOp;

fn row_stats(row: &[f32]) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + LN_EPS).sqrt())
}

impl CustomOp2 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (f32_slice(xs, xl)?, f32_slice(ws, wl)?);
        let c = w.len();
        if xl.dims().last() != Some(&c) {
            candle_core::bail!("layer-norm: weight of {c} for input {:?}", xl.dims());
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(c * ROWS_PER_TASK).zip(x.par_chunks(c * ROWS_PER_TASK)).for_each(|(o, xc)| {
            for (orow, xrow) in o.chunks_mut(c).zip(xc.chunks(c)) {
                let (mean, rstd) = row_stats(xrow);
                for ((ov, &xv), &wv) in orow.iter_mut().zip(xrow).zip(w) {
                    *ov = (xv - mean) * rstd * wv;
                }
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let packed =
            x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &LayerNormBackward { w: w.contiguous()? })?;
        let (n, c) = (x.elem_count(), w.elem_count());
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, c)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// [dx (flattened) | dw]: with x̂ = (x − mean)·rstd and h = g ⊙ w,
/// dx = rstd·(h − mean(h) − x̂·mean(h ⊙ x̂)), dw = Σ_rows g ⊙ x̂ (summed per task, then in
/// task order: deterministic).
struct LayerNormBackward {
    w: Tensor,
}

impl CustomOp2 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "layer-norm-backward"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (f32_slice(xs, xl)?, f32_slice(gs, gl)?);
        let (wst, wl) = self.w.storage_and_layout();
        let candle_core::Storage::Cpu(wcpu) = &*wst else {
            candle_core::bail!("layer-norm-backward: weight not on CPU")
        };
        let w = f32_slice(wcpu, wl)?;
        let c = w.len();
        let mut out = vec![0f32; x.len() + c];
        let (dx, dw_total) = out.split_at_mut(x.len());
        let partial_dw: Vec<Vec<f32>> = dx
            .par_chunks_mut(c * ROWS_PER_TASK)
            .zip(x.par_chunks(c * ROWS_PER_TASK).zip(g.par_chunks(c * ROWS_PER_TASK)))
            .map(|(dxc, (xc, gc))| {
                let mut dw = vec![0f32; c];
                let mut xhat = vec![0f32; c];
                for ((dxrow, xrow), grow) in dxc.chunks_mut(c).zip(xc.chunks(c)).zip(gc.chunks(c)) {
                    let (mean, rstd) = row_stats(xrow);
                    let (mut mh, mut mhx) = (0f32, 0f32);
                    for j in 0..c {
                        xhat[j] = (xrow[j] - mean) * rstd;
                        let h = grow[j] * w[j];
                        mh += h;
                        mhx += h * xhat[j];
                        dw[j] += grow[j] * xhat[j];
                    }
                    let (mh, mhx) = (mh / c as f32, mhx / c as f32);
                    for j in 0..c {
                        dxrow[j] = rstd * (grow[j] * w[j] - mh - xhat[j] * mhx);
                    }
                }
                dw
            })
            .collect();
        for p in partial_dw {
            for (t, v) in dw_total.iter_mut().zip(p) {
                *t += v;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(x.len() + c)))
    }
}

/// LayerNorm over the last axis with gain `w` (ε = 1e-5); add a bias separately.
pub fn layer_norm(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if on_fused_path(x) {
        x.contiguous()?.apply_op2(w, LayerNormOp)
    } else {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + LN_EPS as f64)?.sqrt()?)?.broadcast_mul(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ops::testing::{check, close};
    use candle_core::{Device, Var};

    #[test]
    fn layer_norm_matches_composed_ops_including_the_gain_gradient() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.5, 24, &dev).unwrap()).unwrap();
        let reference = |x: &Tensor| {
            let mean = x.mean_keepdim(D::Minus1).unwrap();
            let xc = x.broadcast_sub(&mean).unwrap();
            let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            xc.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(w.as_tensor()).unwrap()
        };
        check(&[5, 70, 24], |x| layer_norm(x, w.as_tensor()).unwrap(), reference);
        let x = Tensor::randn(0f32, 1.0, (130, 24), &dev).unwrap();
        let r = Tensor::randn(0f32, 1.0, (130, 24), &dev).unwrap();
        let gf = (layer_norm(&x, w.as_tensor()).unwrap() * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (reference(&x) * &r).unwrap().sum_all().unwrap().backward().unwrap();
        close(gf.get(w.as_tensor()).unwrap(), gr.get(w.as_tensor()).unwrap(), 1e-4);
    }
}
