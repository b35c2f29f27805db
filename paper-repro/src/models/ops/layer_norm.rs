//! LayerNorm over the last axis with a gain and no bias (the bias is a separate broadcast add),
//! fused forward and backward.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor, D};

use super::timing::{timer, OpFamily, Pass};
use super::{f32_slice, on_fused_path, par_fill, par_fill_chunks, Result, ROWS_PER_TASK, ROW_GROUP};

const LN_EPS: f32 = 1e-5;

/// y = (x − mean)/√(var + ε) ⊙ w over the last axis (biased variance, as PyTorch).
struct LayerNormOp;

/// (mean, 1/√(var + ε)) of each of the ≤ [`ROW_GROUP`] rows of length c in `rows` (biased
/// variance); each row's sums run from −0 in element order, as `Iterator::sum` does.
fn group_stats(rows: &[f32], c: usize) -> ([f32; ROW_GROUP], [f32; ROW_GROUP]) {
    let k = rows.len() / c;
    debug_assert!(k <= ROW_GROUP && k * c == rows.len());
    let n = c as f32;
    let mut sum = [-0.0f32; ROW_GROUP];
    for j in 0..c {
        for r in 0..k {
            sum[r] += rows[r * c + j];
        }
    }
    let mean = sum.map(|s| s / n);
    let mut squares = [-0.0f32; ROW_GROUP];
    for j in 0..c {
        for r in 0..k {
            let d = rows[r * c + j] - mean[r];
            squares[r] += d * d;
        }
    }
    (mean, squares.map(|s| 1.0 / (s / n + LN_EPS).sqrt()))
}

/// y = (x − mean)·rstd·w for the whole rows of x (rows of w's length) that fit in `out`;
/// returns the count written.
fn forward_rows(x: &[f32], w: &[f32], out: &mut [MaybeUninit<f32>]) -> usize {
    let c = w.len();
    let n = x.len().min(out.len()) / c * c;
    for (xg, og) in x[..n].chunks(c * ROW_GROUP).zip(out[..n].chunks_mut(c * ROW_GROUP)) {
        let (mean, rstd) = group_stats(xg, c);
        for (r, (xrow, orow)) in xg.chunks(c).zip(og.chunks_mut(c)).enumerate() {
            for ((o, &xv), &wv) in orow.iter_mut().zip(xrow).zip(w) {
                o.write((xv - mean[r]) * rstd[r] * wv);
            }
        }
    }
    n
}

/// dx for the whole rows of x and g that fit in `dx` (returns the count written), and this
/// chunk's Σ_rows g ⊙ x̂ (rows in order).
fn backward_rows(x: &[f32], g: &[f32], w: &[f32], dx: &mut [MaybeUninit<f32>]) -> (usize, Vec<f32>) {
    let c = w.len();
    let n = x.len().min(g.len()).min(dx.len()) / c * c;
    let mut dw = vec![0f32; c];
    let mut xhat = vec![0f32; c * ROW_GROUP];
    let groups = x[..n].chunks(c * ROW_GROUP).zip(g[..n].chunks(c * ROW_GROUP)).zip(dx[..n].chunks_mut(c * ROW_GROUP));
    for ((xg, gg), dxg) in groups {
        let k = xg.len() / c;
        let (mean, rstd) = group_stats(xg, c);
        let (mut mh, mut mhx) = ([0f32; ROW_GROUP], [0f32; ROW_GROUP]);
        for j in 0..c {
            for r in 0..k {
                let xh = (xg[r * c + j] - mean[r]) * rstd[r];
                xhat[r * c + j] = xh;
                let h = gg[r * c + j] * w[j];
                mh[r] += h;
                mhx[r] += h * xh;
                dw[j] += gg[r * c + j] * xh;
            }
        }
        for r in 0..k {
            let (mh, mhx) = (mh[r] / c as f32, mhx[r] / c as f32);
            let row = r * c..(r + 1) * c;
            for ((d, &gv), (&xh, &wv)) in dxg[row.clone()].iter_mut().zip(&gg[row.clone()]).zip(xhat[row].iter().zip(w))
            {
                d.write(rstd[r] * (gv * wv - mh - xh * mhx));
            }
        }
    }
    (n, dw)
}

impl CustomOp2 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let _timer = timer(OpFamily::LayerNorm, Pass::Forward);
        let (x, w) = (f32_slice(xs, xl)?, f32_slice(ws, wl)?);
        let c = w.len();
        if xl.dims().last() != Some(&c) {
            candle_core::bail!("layer-norm: weight of {c} for input {:?}", xl.dims());
        }
        // SAFETY: forward_rows writes the first n elements of its chunk and returns n.
        let out =
            unsafe { par_fill(x.len(), c * ROWS_PER_TASK, |i, o| forward_rows(&x[i * c * ROWS_PER_TASK..], w, o)) }?;
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _timer = timer(OpFamily::LayerNorm, Pass::Backward);
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
        if c == 0 || g.len() != x.len() || x.len() % c != 0 {
            candle_core::bail!("layer-norm-backward: {} inputs, {} gradients, weight of {c}", x.len(), g.len());
        }
        let task = c * ROWS_PER_TASK;
        let mut out = Vec::with_capacity(x.len() + c);
        let (dx, dw_total) = out.spare_capacity_mut()[..x.len() + c].split_at_mut(x.len());
        // SAFETY: backward_rows writes the first n elements of its chunk and returns n.
        let partial_dw =
            unsafe { par_fill_chunks(dx, task, |i, d| backward_rows(&x[i * task..], &g[i * task..], w, d)) }?;
        // dw: the tasks' sums in task order, from 0.
        for (j, t) in dw_total.iter_mut().enumerate() {
            t.write(partial_dw.iter().fold(0f32, |acc, p| acc + p[j]));
        }
        // SAFETY: par_fill_chunks wrote all of dx, and the loop above every element of dw.
        unsafe { out.set_len(x.len() + c) };
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

    /// The kernels one row at a time, as they were before the rows' sums were interleaved.
    fn one_row_at_a_time(x: &[f32], g: &[f32], w: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let c = w.len();
        let stats = |row: &[f32]| {
            let n = c as f32;
            let mean = row.iter().sum::<f32>() / n;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
            (mean, 1.0 / (var + LN_EPS).sqrt())
        };
        let (mut y, mut dx, mut dw) = (vec![], vec![], vec![0f32; c]);
        let mut task_dw = vec![0f32; c];
        for (i, (xrow, grow)) in x.chunks(c).zip(g.chunks(c)).enumerate() {
            let (mean, rstd) = stats(xrow);
            y.extend(xrow.iter().zip(w).map(|(&xv, &wv)| (xv - mean) * rstd * wv));
            let xhat: Vec<f32> = xrow.iter().map(|&v| (v - mean) * rstd).collect();
            let (mut mh, mut mhx) = (0f32, 0f32);
            for j in 0..c {
                let h = grow[j] * w[j];
                mh += h;
                mhx += h * xhat[j];
                task_dw[j] += grow[j] * xhat[j];
            }
            let (mh, mhx) = (mh / c as f32, mhx / c as f32);
            dx.extend((0..c).map(|j| rstd * (grow[j] * w[j] - mh - xhat[j] * mhx)));
            if (i + 1) % ROWS_PER_TASK == 0 || i + 1 == x.len() / c {
                for (t, p) in dw.iter_mut().zip(&task_dw) {
                    *t += p;
                }
                task_dw = vec![0f32; c];
            }
        }
        (y, dx, dw)
    }

    #[test]
    fn the_interleaved_rows_give_the_bits_of_one_row_at_a_time() {
        let dev = Device::Cpu;
        // 150 rows: two tasks of 64 and one of 22, groups of 8 with a tail of 6; one row of −0s.
        let (rows, c) = (150, 24);
        let mut xv: Vec<f32> = Tensor::randn(0f32, 2.0, rows * c, &dev).unwrap().to_vec1().unwrap();
        xv[3 * c..4 * c].iter_mut().for_each(|v| *v = -0.0);
        let gv: Vec<f32> = Tensor::randn(0f32, 1.0, rows * c, &dev).unwrap().to_vec1().unwrap();
        let wv: Vec<f32> = Tensor::randn(1f32, 0.5, c, &dev).unwrap().to_vec1().unwrap();
        let (y_want, dx_want, dw_want) = one_row_at_a_time(&xv, &gv, &wv);
        let x = Tensor::from_vec(xv, (rows, c), &dev).unwrap();
        let g = Tensor::from_vec(gv, (rows, c), &dev).unwrap();
        let w = Tensor::from_vec(wv, c, &dev).unwrap();
        let bits = |t: &Tensor| {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        let y = x.apply_op2_no_bwd(&w, &LayerNormOp).unwrap();
        assert_eq!(bits(&y), y_want.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        let packed = x.apply_op2_no_bwd(&g, &LayerNormBackward { w }).unwrap();
        let want: Vec<u32> = dx_want.iter().chain(&dw_want).map(|v| v.to_bits()).collect();
        assert_eq!(bits(&packed), want);
    }
}
