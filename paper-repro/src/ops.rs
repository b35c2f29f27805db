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
                orow[..=i].iter_mut().zip(&xrow[..=i]).for_each(|(o, &x)| *o = x * self.scale);
                softmax_in_place(&mut orow[..=i]);
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

// ---------------------------------------------------------------------------------------------
// Conv2d (im2col + GEMM, forward and backward)

/// c (m×n, row-major, contiguous) = [c +] a·b, a (m×k) and b (k×n) given as (data, row stride,
/// column stride). Single-threaded: callers parallelize over images or heads.
fn gemm_into(m: usize, n: usize, k: usize, c: &mut [f32], accumulate: bool, a: (&[f32], usize, usize), b: (&[f32], usize, usize)) {
    gemm_strided(m, n, k, (c, n), accumulate, 1.0, a, b)
}

/// c = [c +] scale·a·b with c given as (data, row stride) (unit column stride).
#[allow(clippy::too_many_arguments)]
fn gemm_strided(m: usize, n: usize, k: usize, c: (&mut [f32], usize), accumulate: bool, scale: f32, a: (&[f32], usize, usize), b: (&[f32], usize, usize)) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, (d, rs, cs): (&[f32], usize, usize)| {
        assert!(rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < d.len(), "gemm operand out of bounds");
    };
    last(m, k, a);
    last(k, n, b);
    assert!((m - 1) * c.1 + n <= c.0.len(), "gemm destination too small");
    // SAFETY: every index the product touches was bounds-checked just above; c does not alias
    // a or b (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.0.as_mut_ptr(),
            1,
            c.1 as isize,
            accumulate,
            a.0.as_ptr(),
            a.2 as isize,
            a.1 as isize,
            b.0.as_ptr(),
            b.2 as isize,
            b.1 as isize,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Causal self-attention on the packed projection (B, T, 3C) → (B, T, C)

/// e^x for x ≤ 0, branch-free and inlined so the loops calling it vectorize (libm's `expf` is
/// a scalar call; in the GELU and softmax loops it was ≈ 7% of a baby-GPT step): Cody–Waite
/// reduction x = n·ln2 + r and Cephes' degree-6 polynomial for e^r, relative error ≤ 3e-7;
/// x below −87 gives e^−87 ≈ 1.6e-38.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    // Adding 1.5·2²³ rounds to an integer in the low mantissa bits; +127 is the exponent bias.
    const ROUNDER: f32 = 12_582_912.0 + 127.0;
    let v = x.max(-87.0);
    let shifted = v * std::f32::consts::LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    // Cody–Waite: ln 2 = 0.6933594 (= 355/512, exact in f32) − 2.1219444e-4.
    let r = v - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    // The low 9 bits of `shifted`'s mantissa hold n + 127 ∈ [1, 127]: shifted up by 23 they are
    // the exponent field of 2ⁿ.
    (p * r * r + r + 1.0) * f32::from_bits(shifted.to_bits() << 23)
}

/// softmax of a row's unmasked entries, in place.
fn softmax_in_place(live: &mut [f32]) {
    let max = live.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    live.iter_mut().for_each(|v| *v = exp_nonpositive(*v - max));
    let inv = 1.0 / live.iter().sum::<f32>();
    live.iter_mut().for_each(|v| *v *= inv);
}

/// softmax over columns 0..=i of rows i of a block of rows `first..` of a T×T score matrix
/// (`rows` holds whole rows of length `t`), in place; the masked entries up to `cols` become 0.
fn causal_softmax_rows(rows: &mut [f32], first: usize, t: usize, cols: usize) {
    for (i, row) in (first..).zip(rows.chunks_mut(t)) {
        softmax_in_place(&mut row[..=i]);
        row[i + 1..cols].iter_mut().for_each(|v| *v = 0.0);
    }
}

/// Rows of the attention matrix per block: a block of rows i ∈ [r, r + 64) only needs columns
/// j < r + 64, so the products skip most of the masked upper triangle (≈ 40% of the attention
/// FLOPs at T = 256).
const ATTENTION_ROW_BLOCK: usize = 64;

/// y = softmax(q·kᵀ/√hs + causal mask)·v per head, reading q, k, v straight out of the packed
/// projection (no transposes) and writing heads side by side; the T×T attention matrix never
/// becomes a tensor (recomputed in the backward pass).
struct CausalAttention {
    heads: usize,
    /// Rows per block (`ATTENTION_ROW_BLOCK`; the tests use small blocks).
    block: usize,
}

impl CausalAttention {
    fn dims(&self, l: &Layout) -> Result<(usize, usize, usize, usize)> {
        let &[b, t, c3] = l.dims() else { candle_core::bail!("attention expects (B, T, 3C), got {:?}", l.dims()) };
        if c3 % (3 * self.heads) != 0 {
            candle_core::bail!("attention: {c3} is not 3 × heads × head size");
        }
        Ok((b, t, c3 / 3, c3 / 3 / self.heads))
    }

    /// The row blocks of a T×T matrix: (first row, rows, live columns = first + rows).
    fn blocks(&self, t: usize) -> impl Iterator<Item = (usize, usize, usize)> {
        let block = self.block;
        (0..t).step_by(block).map(move |r| (r, block.min(t - r), r + block.min(t - r)))
    }

    /// Scores of head h of one sequence (qkv slab [T, 3C]) into `s` (T×T), softmaxed; in row
    /// block (r, rows, cols) only columns < cols are written.
    fn probabilities(&self, qkv: &[f32], t: usize, c: usize, hs: usize, h: usize, s: &mut [f32]) {
        let scale = 1.0 / (hs as f32).sqrt();
        let (q, k) = (&qkv[h * hs..], &qkv[c + h * hs..]);
        for (r, rows, cols) in self.blocks(t) {
            gemm_strided(rows, cols, hs, (&mut s[r * t..], t), false, scale, (&q[r * 3 * c..], 3 * c, 1), (k, 1, 3 * c));
            causal_softmax_rows(&mut s[r * t..(r + rows) * t], r, t, cols);
        }
    }
}

impl CustomOp1 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-self-attention"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = f32_slice(st, l)?;
        let (b, t, c, hs) = self.dims(l)?;
        let mut out = vec![0f32; b * t * c];
        out.par_chunks_mut(t * c).zip(qkv.par_chunks(t * 3 * c)).for_each(|(y, x)| {
            let mut p = vec![0f32; t * t];
            for h in 0..self.heads {
                self.probabilities(x, t, c, hs, h, &mut p);
                // y_h [T, hs] (row stride C) = P [T, T] · v_h [T, hs] (row stride 3C), by row block
                for (r, rows, cols) in self.blocks(t) {
                    gemm_strided(rows, hs, cols, (&mut y[r * c + h * hs..], c), false, 1.0, (&p[r * t..], t, 1), (&x[2 * c + h * hs..], 3 * c, 1));
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, t, c))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let backward = CausalAttentionBackward { forward: CausalAttention { heads: self.heads, block: self.block } };
        Ok(Some(arg.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &backward)?))
    }
}

/// d(qkv) from dy: per head, with P recomputed, dV = Pᵀ·dY, dP = dY·Vᵀ,
/// dS = P ⊙ (dP − rowsum(dP ⊙ P))/√hs, dQ = dS·K, dK = dSᵀ·Q — by row block of P, so the
/// masked columns are skipped; dV and dK accumulate over blocks.
struct CausalAttentionBackward {
    forward: CausalAttention,
}

impl CustomOp2 for CausalAttentionBackward {
    fn name(&self) -> &'static str {
        "causal-self-attention-backward"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let fwd = &self.forward;
        let (qkv, dy) = (f32_slice(xs, xl)?, f32_slice(gs, gl)?);
        let (_, t, c, hs) = fwd.dims(xl)?;
        let scale = 1.0 / (hs as f32).sqrt();
        // Zeroed: dV and dK accumulate.
        let mut out = vec![0f32; qkv.len()];
        out.par_chunks_mut(t * 3 * c).zip(qkv.par_chunks(t * 3 * c).zip(dy.par_chunks(t * c))).for_each(|(dx, (x, g))| {
            let (mut p, mut dp) = (vec![0f32; t * t], vec![0f32; t * t]);
            for h in 0..fwd.heads {
                let (qo, ko, vo, yo) = (h * hs, c + h * hs, 2 * c + h * hs, h * hs);
                fwd.probabilities(x, t, c, hs, h, &mut p);
                for (r, rows, cols) in fwd.blocks(t) {
                    let (pb, dpb) = (&p[r * t..], &mut dp[r * t..]);
                    // dV_h[..cols] += P[block, ..cols]ᵀ · dY_h[block]
                    gemm_strided(cols, hs, rows, (&mut dx[vo..], 3 * c), true, 1.0, (pb, 1, t), (&g[r * c + yo..], c, 1));
                    // dP[block, ..cols] = dY_h[block] · V_h[..cols]ᵀ
                    gemm_strided(rows, cols, hs, (&mut *dpb, t), false, 1.0, (&g[r * c + yo..], c, 1), (&x[vo..], 1, 3 * c));
                    for (prow, dprow) in pb.chunks(t).zip(dpb.chunks_mut(t)).take(rows) {
                        let (prow, dprow) = (&prow[..cols], &mut dprow[..cols]);
                        let dot: f32 = prow.iter().zip(dprow.iter()).map(|(a, b)| a * b).sum();
                        for (d, &pv) in dprow.iter_mut().zip(prow) {
                            *d = pv * (*d - dot) * scale;
                        }
                    }
                    // dQ_h[block] = dS[block, ..cols] · K_h[..cols]; dK_h[..cols] += dS[block, ..cols]ᵀ · Q_h[block]
                    gemm_strided(rows, hs, cols, (&mut dx[r * 3 * c + qo..], 3 * c), false, 1.0, (&dp[r * t..], t, 1), (&x[ko..], 3 * c, 1));
                    gemm_strided(cols, hs, rows, (&mut dx[ko..], 3 * c), true, 1.0, (&dp[r * t..], 1, t), (&x[r * 3 * c + qo..], 3 * c, 1));
                }
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// Causal multi-head self-attention from the packed q|k|v projection (B, T, 3C) to (B, T, C)
/// (heads side by side), as nanoGPT's `CausalSelfAttention` between its two linear layers.
pub fn causal_self_attention(qkv: &Tensor, heads: usize, mask: &Tensor) -> Result<Tensor> {
    if qkv.device().is_cpu() && qkv.dtype() == candle_core::DType::F32 {
        return qkv.contiguous()?.apply_op1(CausalAttention { heads, block: ATTENTION_ROW_BLOCK });
    }
    composed_causal_self_attention(qkv, heads, mask, Ok)
}

/// The same attention from composed tensor ops, with the (B, H, T, T) probabilities passed
/// through `probabilities` before they weight v: other devices, and attention dropout.
pub fn composed_causal_self_attention(qkv: &Tensor, heads: usize, mask: &Tensor, probabilities: impl FnOnce(Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let (b, t, c3) = qkv.dims3()?;
    let (c, hs) = (c3 / 3, c3 / 3 / heads);
    let split = |k: usize| qkv.narrow(D::Minus1, k * c, c)?.reshape((b, t, heads, hs))?.transpose(1, 2)?.contiguous();
    let (q, k, v) = (split(0)?, split(1)?, split(2)?);
    let att = probabilities(causal_softmax(&q.matmul(&k.t()?)?, 1.0 / (hs as f64).sqrt(), mask)?)?;
    att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))
}

/// Geometry of a convolution.
#[derive(Clone, Copy, Debug)]
struct ConvShape {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

impl ConvShape {
    fn new(x: &[usize], w: &[usize], stride: usize, pad: usize) -> Result<Self> {
        let (&[n, c, h, wd], &[o, ci, k, k2]) = (x, w) else { candle_core::bail!("conv2d: expected 4-D input and kernel, got {x:?} and {w:?}") };
        if ci != c || k != k2 {
            candle_core::bail!("conv2d: kernel {w:?} does not fit input {x:?}");
        }
        if h + 2 * pad < k || wd + 2 * pad < k {
            candle_core::bail!("conv2d: kernel {k} larger than the padded input {x:?}");
        }
        Ok(Self { n, c, h, w: wd, o, k, stride, pad, ho: (h + 2 * pad - k) / stride + 1, wo: (wd + 2 * pad - k) / stride + 1 })
    }
    fn rows(&self) -> usize {
        self.c * self.k * self.k
    }
    fn positions(&self) -> usize {
        self.ho * self.wo
    }
    /// The (row, position) → input index map, calling `f(row, pos, input_index)` for every
    /// in-bounds tap of one image.
    #[inline]
    fn for_each_tap(&self, mut f: impl FnMut(usize, usize, usize)) {
        let (s, p) = (self.stride as isize, self.pad as isize);
        for ch in 0..self.c {
            for ki in 0..self.k {
                for kj in 0..self.k {
                    let row = (ch * self.k + ki) * self.k + kj;
                    for oy in 0..self.ho {
                        let iy = oy as isize * s - p + ki as isize;
                        if iy < 0 || iy >= self.h as isize {
                            continue;
                        }
                        for ox in 0..self.wo {
                            let ix = ox as isize * s - p + kj as isize;
                            if ix < 0 || ix >= self.w as isize {
                                continue;
                            }
                            f(row, oy * self.wo + ox, (ch * self.h + iy as usize) * self.w + ix as usize);
                        }
                    }
                }
            }
        }
    }
    fn im2col(&self, img: &[f32], cols: &mut [f32]) {
        cols.iter_mut().for_each(|v| *v = 0.0);
        let p = self.positions();
        self.for_each_tap(|row, pos, i| cols[row * p + pos] = img[i]);
    }
}

/// Images per rayon task in the convolution kernels.
const IMAGES_PER_TASK: usize = 4;

struct Conv2dOp {
    stride: usize,
    pad: usize,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "conv2d-im2col"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (f32_slice(xs, xl)?, f32_slice(ws, wl)?);
        let g = ConvShape::new(xl.dims(), wl.dims(), self.stride, self.pad)?;
        let (img, out_img) = (g.c * g.h * g.w, g.o * g.positions());
        let mut out = vec![0f32; g.n * out_img];
        out.par_chunks_mut(out_img * IMAGES_PER_TASK).zip(x.par_chunks(img * IMAGES_PER_TASK)).for_each(|(o, xi)| {
            let mut cols = vec![0f32; g.rows() * g.positions()];
            for (oimg, ximg) in o.chunks_mut(out_img).zip(xi.chunks(img)) {
                g.im2col(ximg, &mut cols);
                // out [O, P] = W [O, K] · cols [K, P]
                gemm_into(g.o, g.positions(), g.rows(), oimg, false, (w, g.rows(), 1), (&cols, g.positions(), 1));
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.o, g.ho, g.wo))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = Conv2dBackward { w: w.contiguous()?, stride: self.stride, pad: self.pad };
        let packed = x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &op)?;
        let (nx, nw) = (x.elem_count(), w.elem_count());
        Ok((Some(packed.narrow(0, 0, nx)?.reshape(x.shape())?), Some(packed.narrow(0, nx, nw)?.reshape(w.shape())?)))
    }
}

/// [dx | dw] of a convolution: per image, dW += dY·colsᵀ and dcols = Wᵀ·dY scattered back
/// (col2im) into dx; the per-task dW partials are summed in task order (deterministic).
struct Conv2dBackward {
    w: Tensor,
    stride: usize,
    pad: usize,
}

impl CustomOp2 for Conv2dBackward {
    fn name(&self) -> &'static str {
        "conv2d-im2col-backward"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (wst, wl) = self.w.storage_and_layout();
        let candle_core::Storage::Cpu(wcpu) = &*wst else { candle_core::bail!("conv2d backward: kernel not on CPU") };
        let (x, dy, w) = (f32_slice(xs, xl)?, f32_slice(gs, gl)?, f32_slice(wcpu, wl)?);
        let g = ConvShape::new(xl.dims(), wl.dims(), self.stride, self.pad)?;
        let (img, out_img, p, kr) = (g.c * g.h * g.w, g.o * g.positions(), g.positions(), g.rows());
        let mut out = vec![0f32; x.len() + w.len()];
        let (dx, dw_total) = out.split_at_mut(x.len());
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(img * IMAGES_PER_TASK)
            .zip(x.par_chunks(img * IMAGES_PER_TASK).zip(dy.par_chunks(out_img * IMAGES_PER_TASK)))
            .map(|(dxi, (xi, dyi))| {
                let mut dw = vec![0f32; w.len()];
                let mut cols = vec![0f32; kr * p];
                let mut dcols = vec![0f32; kr * p];
                for ((dximg, ximg), dyimg) in dxi.chunks_mut(img).zip(xi.chunks(img)).zip(dyi.chunks(out_img)) {
                    g.im2col(ximg, &mut cols);
                    // dW [O, K] += dY [O, P] · colsᵀ [P, K]
                    gemm_into(g.o, kr, p, &mut dw, true, (dyimg, p, 1), (&cols, 1, p));
                    // dcols [K, P] = Wᵀ [K, O] · dY [O, P]
                    gemm_into(kr, p, g.o, &mut dcols, false, (w, 1, kr), (dyimg, p, 1));
                    g.for_each_tap(|row, pos, i| dximg[i] += dcols[row * p + pos]);
                }
                dw
            })
            .collect();
        for part in partials {
            for (t, v) in dw_total.iter_mut().zip(part) {
                *t += v;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(x.len() + w.len())))
    }
}

/// 2-D convolution (NCHW input, (O, C, k, k) kernel), square stride and zero padding.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        x.contiguous()?.apply_op2(&w.contiguous()?, Conv2dOp { stride, pad })
    } else {
        x.conv2d(w, pad, stride, 1, 1)
    }
}

// ---------------------------------------------------------------------------------------------
// Batch normalization (training mode)

const BN_EPS: f32 = 1e-5;

/// Per channel c of x (N, C, H, W): mean and 1/√(var + ε) over (N, H, W) (biased variance).
fn channel_stats(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<(f32, f32)> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let count = (n * hw) as f64;
            let mut sum = 0f64;
            for i in 0..n {
                sum += x[(i * c + ch) * hw..(i * c + ch + 1) * hw].iter().map(|&v| v as f64).sum::<f64>();
            }
            let mean = sum / count;
            let mut var = 0f64;
            for i in 0..n {
                var += x[(i * c + ch) * hw..(i * c + ch + 1) * hw].iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>();
            }
            (mean as f32, 1.0 / ((var / count) as f32 + BN_EPS).sqrt())
        })
        .collect()
}

/// y = (x − mean)·rstd·γ (batch statistics; add β separately).
struct BatchNormOp;

impl CustomOp2 for BatchNormOp {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, gamma) = (f32_slice(xs, xl)?, f32_slice(gs, gl)?);
        let &[n, c, h, w] = xl.dims() else { candle_core::bail!("batch-norm expects NCHW, got {:?}", xl.dims()) };
        let hw = h * w;
        let stats = channel_stats(x, n, c, hw);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(hw).zip(x.par_chunks(hw)).enumerate().for_each(|(plane, (o, xp))| {
            let ch = plane % c;
            let (mean, rstd) = stats[ch];
            let scale = rstd * gamma[ch];
            for (ov, &xv) in o.iter_mut().zip(xp) {
                *ov = (xv - mean) * scale;
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, gamma: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &BatchNormBackward { gamma: gamma.contiguous()? })?;
        let (nx, c) = (x.elem_count(), gamma.elem_count());
        Ok((Some(packed.narrow(0, 0, nx)?.reshape(x.shape())?), Some(packed.narrow(0, nx, c)?)))
    }
}

/// [dx | dγ]: with x̂ = (x − mean)·rstd and M = N·H·W per channel,
/// dx = γ·rstd·(dy − mean(dy) − x̂·mean(dy·x̂)), dγ = Σ dy·x̂.
struct BatchNormBackward {
    gamma: Tensor,
}

impl CustomOp2 for BatchNormBackward {
    fn name(&self) -> &'static str {
        "batch-norm-train-backward"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (gst, gml) = self.gamma.storage_and_layout();
        let candle_core::Storage::Cpu(gcpu) = &*gst else { candle_core::bail!("batch-norm backward: gamma not on CPU") };
        let (x, dy, gamma) = (f32_slice(xs, xl)?, f32_slice(gs, gl)?, f32_slice(gcpu, gml)?);
        let &[n, c, h, w] = xl.dims() else { candle_core::bail!("batch-norm expects NCHW") };
        let hw = h * w;
        let stats = channel_stats(x, n, c, hw);
        // Per channel: Σ dy and Σ dy·x̂.
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let (mean, rstd) = stats[ch];
                let (mut s, mut sx) = (0f64, 0f64);
                for i in 0..n {
                    let base = (i * c + ch) * hw;
                    for j in base..base + hw {
                        s += dy[j] as f64;
                        sx += (dy[j] * (x[j] - mean) * rstd) as f64;
                    }
                }
                (s, sx)
            })
            .collect();
        let m = (n * hw) as f64;
        let mut out = vec![0f32; x.len() + c];
        let (dx, dgamma) = out.split_at_mut(x.len());
        dx.par_chunks_mut(hw).enumerate().for_each(|(plane, d)| {
            let ch = plane % c;
            let (mean, rstd) = stats[ch];
            let (mdy, mdyx) = ((sums[ch].0 / m) as f32, (sums[ch].1 / m) as f32);
            let base = plane * hw;
            for (j, dv) in d.iter_mut().enumerate() {
                let xhat = (x[base + j] - mean) * rstd;
                *dv = gamma[ch] * rstd * (dy[base + j] - mdy - xhat * mdyx);
            }
        });
        for (dg, s) in dgamma.iter_mut().zip(&sums) {
            *dg = s.1 as f32;
        }
        Ok((CpuStorage::F32(out), Shape::from(x.len() + c)))
    }
}

/// Batch normalization with batch statistics and gain γ (NCHW); add β separately.
pub fn batch_norm_train(x: &Tensor, gamma: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        x.contiguous()?.apply_op2(&gamma.contiguous()?, BatchNormOp)
    } else {
        let c = gamma.elem_count();
        let mean = x.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
        xc.broadcast_div(&(var + BN_EPS as f64)?.sqrt()?)?.broadcast_mul(&gamma.reshape((1, c, 1, 1))?)
    }
}

#[cfg(test)]
mod conv_tests {
    use super::*;
    use candle_core::{Device, Var};

    fn grads_match(f: impl Fn(&Tensor, &Tensor) -> Tensor, g: impl Fn(&Tensor, &Tensor) -> Tensor, xs: &[usize], ws: &[usize]) {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, xs, &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0.5f32, 0.3, ws, &dev).unwrap()).unwrap();
        let (a, b) = (f(x.as_tensor(), w.as_tensor()), g(x.as_tensor(), w.as_tensor()));
        let r = Tensor::randn(0f32, 1.0, a.shape(), &dev).unwrap();
        let close = |p: &Tensor, q: &Tensor, what: &str| {
            let (p, q) = (p.flatten_all().unwrap().to_vec1::<f32>().unwrap(), q.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            for (i, (u, v)) in p.iter().zip(&q).enumerate() {
                assert!((u - v).abs() <= 2e-4 * (1.0 + v.abs()), "{what}[{i}]: {u} vs {v}");
            }
        };
        close(&a, &b, "forward");
        let ga = (a * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &r).unwrap().sum_all().unwrap().backward().unwrap();
        close(ga.get(x.as_tensor()).unwrap(), gb.get(x.as_tensor()).unwrap(), "dx");
        close(ga.get(w.as_tensor()).unwrap(), gb.get(w.as_tensor()).unwrap(), "dw");
    }

    #[test]
    fn fused_attention_matches_the_composed_heads() {
        let dev = Device::Cpu;
        let (b, t, c, heads) = (2, 7, 12, 3);
        let mask: Vec<f32> = (0..t * t).map(|k| if k % t > k / t { f32::NEG_INFINITY } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (t, t), &dev).unwrap();
        let composed = |qkv: &Tensor| {
            let hs = c / heads;
            let split = |k: usize| qkv.narrow(2, k * c, c).unwrap().reshape((b, t, heads, hs)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
            let (q, k, v) = (split(0), split(1), split(2));
            let att = candle_nn::ops::softmax(&(q.matmul(&k.t().unwrap()).unwrap() / (hs as f64).sqrt()).unwrap().broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
            att.matmul(&v).unwrap().transpose(1, 2).unwrap().reshape((b, t, c)).unwrap()
        };
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, 3 * c), &dev).unwrap()).unwrap();
        let r = Tensor::randn(0f32, 1.0, (b, t, c), &dev).unwrap();
        let close = |p: &Tensor, q: &Tensor| {
            let (p, q) = (p.flatten_all().unwrap().to_vec1::<f32>().unwrap(), q.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            assert!(p.iter().zip(&q).all(|(u, v)| (u - v).abs() <= 1e-4 * (1.0 + v.abs())), "{p:?}\nvs\n{q:?}");
        };
        let yr = composed(x.as_tensor());
        let gr = (&yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
        // Row blocks that split T = 7 unevenly, and one block holding every row.
        for block in [2, 3, ATTENTION_ROW_BLOCK] {
            let yf = x.as_tensor().apply_op1(CausalAttention { heads, block }).unwrap();
            close(&yf, &yr);
            let gf = (yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
            close(gf.get(x.as_tensor()).unwrap(), gr.get(x.as_tensor()).unwrap());
        }
        close(&causal_self_attention(x.as_tensor(), heads, &mask).unwrap(), &yr);
        close(&composed_causal_self_attention(x.as_tensor(), heads, &mask, Ok).unwrap(), &yr);
    }

    #[test]
    fn vectorized_exp_is_accurate_on_the_non_positive_axis() {
        let xs: Vec<f32> = (0..=200_000).map(|i| -100.0 * i as f32 / 200_000.0).collect();
        for &x in &xs {
            let y = exp_nonpositive(x);
            let want = x.max(-87.0).exp();
            assert!((y - want).abs() <= 3e-7 * want, "exp({x}) = {y}, libm {want}");
        }
    }

    #[test]
    fn conv2d_matches_candle_forward_and_backward() {
        // Shapes where the strided output tiles the input exactly (candle 0.11's own conv2d
        // backward returns a wrongly sized input gradient otherwise; see the next test).
        for (stride, pad, k, hw) in [(1, 1, 3, (9, 8)), (2, 1, 3, (9, 9)), (2, 0, 1, (9, 9)), (1, 0, 3, (9, 8))] {
            grads_match(|x, w| conv2d(x, w, stride, pad).unwrap(), |x, w| x.conv2d(w, pad, stride, 1, 1).unwrap(), &[5, 3, hw.0, hw.1], &[4, 3, k, k]);
        }
    }

    #[test]
    fn conv2d_input_gradient_is_right_when_the_stride_does_not_tile_the_input() {
        // Central differences of Σ r ⊙ conv(x) with respect to a few entries of x (8 wide,
        // stride 2: the last column is read by no window).
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 2, 5, 8), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 2, 3, 3), &dev).unwrap();
        let y = conv2d(x.as_tensor(), &w, 2, 1).unwrap();
        let r = Tensor::randn(0f32, 1.0, y.shape(), &dev).unwrap();
        let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(dx.len(), 80);
        let base = x.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let f = |v: &[f32]| -> f64 {
            let t = Tensor::from_vec(v.to_vec(), (1, 2, 5, 8), &dev).unwrap();
            (conv2d(&t, &w, 2, 1).unwrap() * &r).unwrap().sum_all().unwrap().to_dtype(candle_core::DType::F64).unwrap().to_scalar::<f64>().unwrap()
        };
        for i in [0, 7, 15, 39, 47, 79] {
            let (mut a, mut b) = (base.clone(), base.clone());
            a[i] += 1e-2;
            b[i] -= 1e-2;
            let fd = (f(&a) - f(&b)) / 2e-2;
            assert!((fd - dx[i] as f64).abs() < 1e-2 * (1.0 + fd.abs()), "dx[{i}] {} vs {fd}", dx[i]);
        }
    }

    #[test]
    fn batch_norm_matches_composed_ops() {
        let reference = |x: &Tensor, g: &Tensor| {
            let mean = x.mean_keepdim(0).unwrap().mean_keepdim(2).unwrap().mean_keepdim(3).unwrap();
            let xc = x.broadcast_sub(&mean).unwrap();
            let var = xc.sqr().unwrap().mean_keepdim(0).unwrap().mean_keepdim(2).unwrap().mean_keepdim(3).unwrap();
            xc.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(&g.reshape((1, 4, 1, 1)).unwrap()).unwrap()
        };
        grads_match(|x, g| batch_norm_train(x, g).unwrap(), reference, &[6, 4, 5, 3], &[4]);
    }
}
