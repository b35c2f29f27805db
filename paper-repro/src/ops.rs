//! Fused CPU operators with their backward passes: scaled causal softmax, LayerNorm (without
//! bias; the bias is a separate broadcast add) and the exact (erf) GELU.
//!
//! Composed from candle's elementwise operators, each of these costs 5–20 passes over its
//! tensor and as many allocations, forward and backward; profiling the baby GPT's training step
//! put those passes above the matrix products (see `just bench-train`). Each fused operator is
//! one pass forward and one pass backward, parallel over rows, with per-row arithmetic in f32
//! like candle's own. Other devices fall back to the composed form (see [`causal_softmax`],
//! [`layer_norm`], [`gelu`]).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, D};
use rayon::prelude::*;

type Result<T> = candle_core::Result<T>;

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused op: input is not contiguous"),
    }
}

/// Rows of work per rayon task.
const ROWS_PER_TASK: usize = 64;

// ---------------------------------------------------------------------------------------------
// Causal softmax

/// softmax(scale·x + causal mask) over the last axis of x (…, T, T): row i keeps columns j ≤ i.
struct CausalSoftmax {
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l)?;
        let dims = l.dims();
        let t = dims[dims.len() - 1];
        if dims.len() < 2 || dims[dims.len() - 2] != t {
            candle_core::bail!("causal-softmax expects (…, T, T), got {dims:?}");
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(t * ROWS_PER_TASK).zip(x.par_chunks(t * ROWS_PER_TASK)).enumerate().for_each(|(chunk, (o, xs))| {
            for (r, (orow, xrow)) in o.chunks_mut(t).zip(xs.chunks(t)).enumerate() {
                let i = (chunk * ROWS_PER_TASK + r) % t;
                let live = &xrow[..=i];
                let max = live.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * self.scale;
                let mut sum = 0f32;
                for (ov, &xv) in orow[..=i].iter_mut().zip(live) {
                    *ov = (xv * self.scale - max).exp();
                    sum += *ov;
                }
                let inv = 1.0 / sum;
                orow[..=i].iter_mut().for_each(|v| *v *= inv);
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward { scale: self.scale })?))
    }
}

/// dx = scale·y ⊙ (g − Σ_j g_j y_j), row by row (masked entries have y = 0).
struct SoftmaxBackward {
    scale: f32,
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "causal-softmax-backward"
    }

    fn cpu_fwd(&self, ys: &CpuStorage, yl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (f32_slice(ys, yl)?, f32_slice(gs, gl)?);
        let t = yl.dims()[yl.dims().len() - 1];
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(t * ROWS_PER_TASK).zip(y.par_chunks(t * ROWS_PER_TASK).zip(g.par_chunks(t * ROWS_PER_TASK))).for_each(|(o, (yc, gc))| {
            for ((orow, yrow), grow) in o.chunks_mut(t).zip(yc.chunks(t)).zip(gc.chunks(t)) {
                let dot: f32 = yrow.iter().zip(grow).map(|(a, b)| a * b).sum();
                for ((ov, &yv), &gv) in orow.iter_mut().zip(yrow).zip(grow) {
                    *ov = self.scale * yv * (gv - dot);
                }
            }
        });
        Ok((CpuStorage::F32(out), yl.shape().clone()))
    }
}

/// softmax(scale·x + causal mask) over the last axis of (…, T, T).
pub fn causal_softmax(x: &Tensor, scale: f64, mask: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        x.contiguous()?.apply_op1(CausalSoftmax { scale: scale as f32 })
    } else {
        candle_nn::ops::softmax(&(x * scale)?.broadcast_add(mask)?, D::Minus1)
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm (no bias)

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
        let packed = x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &LayerNormBackward { w: w.contiguous()? })?;
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
        let candle_core::Storage::Cpu(wcpu) = &*wst else { candle_core::bail!("layer-norm-backward: weight not on CPU") };
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
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        x.contiguous()?.apply_op2(w, LayerNormOp)
    } else {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + LN_EPS as f64)?.sqrt()?)?.broadcast_mul(w)
    }
}

// ---------------------------------------------------------------------------------------------
// GELU (erf)

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
    (1.0 - poly * (-a * a).exp()).copysign(x)
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
                let pdf = (-0.5 * v * v).exp() * inv_sqrt_2pi;
                *ov = gv * (cdf + v * pdf);
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// The exact GELU, x·Φ(x).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        x.gelu_erf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let (a, b) = (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "element {i}: {x} vs {y}");
        }
    }

    /// Forward values and gradients (of Σ r⊙f(x) for a random r) of a fused operator against
    /// the composed candle reference.
    fn check(shape: &[usize], fused: impl Fn(&Tensor) -> Tensor, reference: impl Fn(&Tensor) -> Tensor) {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap();
        let r = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let (yf, yr) = (fused(x.as_tensor()), reference(x.as_tensor()));
        close(&yf, &yr, 1e-5);
        let gf = (yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
        close(gf.get(x.as_tensor()).unwrap(), gr.get(x.as_tensor()).unwrap(), 1e-4);
    }

    #[test]
    fn causal_softmax_matches_composed_ops() {
        let t = 7;
        let mask: Vec<f32> = (0..t * t).map(|k| if k % t > k / t { f32::NEG_INFINITY } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
        check(&[2, 3, t, t], |x| causal_softmax(x, 0.3, &mask).unwrap(), |x| candle_nn::ops::softmax(&(x * 0.3).unwrap().broadcast_add(&mask).unwrap(), D::Minus1).unwrap());
    }

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
