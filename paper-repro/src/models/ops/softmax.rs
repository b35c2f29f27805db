//! The causal softmax: the fused operator for (…, T, T) scores, and the row kernels the fused
//! attention shares with it (a vectorizable exp, softmax in place).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, D};
use mada::simd_kernel;
use rayon::prelude::*;

use super::timing::{timer, OpFamily, Pass};
use super::{f32_slice, on_fused_path, Result, ROWS_PER_TASK, ROW_GROUP};

/// softmax(scale·x + causal mask) over the last axis of x (…, T, T): row i keeps columns j ≤ i.
struct CausalSoftmax {
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _timer = timer(OpFamily::Softmax, Pass::Forward);
        let x = f32_slice(s, l)?;
        let dims = l.dims();
        let t = dims[dims.len() - 1];
        if dims.len() < 2 || dims[dims.len() - 2] != t {
            candle_core::bail!("causal-softmax expects (…, T, T), got {dims:?}");
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(t * ROWS_PER_TASK).zip(x.par_chunks(t * ROWS_PER_TASK)).enumerate().for_each(
            |(chunk, (o, xs))| {
                for (r, (orow, xrow)) in o.chunks_mut(t).zip(xs.chunks(t)).enumerate() {
                    let i = (chunk * ROWS_PER_TASK + r) % t;
                    orow[..=i].iter_mut().zip(&xrow[..=i]).for_each(|(o, &x)| *o = x * self.scale);
                    softmax_in_place(&mut orow[..=i]);
                }
            },
        );
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _timer = timer(OpFamily::Softmax, Pass::Backward);
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
        out.par_chunks_mut(t * ROWS_PER_TASK)
            .zip(y.par_chunks(t * ROWS_PER_TASK).zip(g.par_chunks(t * ROWS_PER_TASK)))
            .for_each(|(o, (yc, gc))| {
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
    if on_fused_path(x) {
        x.contiguous()?.apply_op1(CausalSoftmax { scale: scale as f32 })
    } else {
        candle_nn::ops::softmax(&(x * scale)?.broadcast_add(mask)?, D::Minus1)
    }
}

/// e^x for x ≤ 0, branch-free and inlined so the loops calling it vectorize (libm's `expf` is
/// a scalar call; in the GELU and softmax loops it was ≈ 7% of a baby-GPT step): Cody–Waite
/// reduction x = n·ln2 + r and Cephes' degree-6 polynomial for e^r, relative error ≤ 3e-7;
/// x below −87 gives e^−87 ≈ 1.6e-38.
#[inline(always)]
pub(super) fn exp_nonpositive(x: f32) -> f32 {
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
/// Each row as [`softmax_in_place`] computes it, bit for bit; compiled per instruction set.
pub(super) fn causal_softmax_rows(rows: &mut [f32], first: usize, t: usize, cols: usize) {
    causal_softmax_rows_dispatched(rows, first, t, cols)
}

simd_kernel!(fn causal_softmax_rows_dispatched[](rows: &mut [f32], first: usize, t: usize, cols: usize)
    = causal_softmax_rows_kernel[]);

/// Folds each live row of a group in column order, the rows side by side: row r of the group is
/// row i0 + r, live in columns 0..=i0 + r. Columns 0..=i0 are live in every row, so the chains
/// run over them together, then over each row's few remaining columns.
#[inline(always)]
fn fold_live_rows(group: &[f32], t: usize, i0: usize, init: f32, f: impl Fn(f32, f32) -> f32) -> [f32; ROW_GROUP] {
    let k = group.len() / t;
    let mut acc = [init; ROW_GROUP];
    for j in 0..=i0 {
        for r in 0..k {
            acc[r] = f(acc[r], group[r * t + j]);
        }
    }
    for r in 1..k {
        for j in i0 + 1..=i0 + r {
            acc[r] = f(acc[r], group[r * t + j]);
        }
    }
    acc
}

#[inline(always)]
fn causal_softmax_rows_kernel(rows: &mut [f32], first: usize, t: usize, cols: usize) {
    for (n, group) in rows.chunks_mut(t * ROW_GROUP).enumerate() {
        let i0 = first + n * ROW_GROUP;
        let k = group.len() / t;
        let max = fold_live_rows(group, t, i0, f32::NEG_INFINITY, f32::max);
        for r in 0..k {
            group[r * t..][..=i0 + r].iter_mut().for_each(|v| *v = exp_nonpositive(*v - max[r]));
        }
        // From −0, as `Iterator::sum` starts.
        let sum = fold_live_rows(group, t, i0, -0.0, |a, v| a + v);
        for r in 0..k {
            let inv = 1.0 / sum[r];
            let row = &mut group[r * t..][..cols];
            row[..=i0 + r].iter_mut().for_each(|v| *v *= inv);
            row[i0 + r + 1..].iter_mut().for_each(|v| *v = 0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ops::testing::check;
    use candle_core::Device;

    #[test]
    fn the_interleaved_rows_give_the_bits_of_one_row_at_a_time() {
        // Blocks as the attention takes them (first row 0, 64 and 128 of T = 150; 64 rows and a
        // short last block), so groups of 8 and a tail group; a row holding a NaN and ±0.
        let t = 150;
        for (first, rows) in [(0, 64), (64, 64), (128, 22), (3, 5)] {
            let cols = first + rows;
            let mut block: Vec<f32> = (0..rows * t).map(|k| ((k * 7919 % 1000) as f32 - 500.0) * 0.013).collect();
            block[2 * t] = f32::NAN;
            block[3 * t] = -0.0;
            block[3 * t + 1] = 0.0;
            let mut want = block.clone();
            for (i, row) in (first..).zip(want.chunks_mut(t)) {
                softmax_in_place(&mut row[..=i]);
                row[i + 1..cols].iter_mut().for_each(|v| *v = 0.0);
            }
            let (mut got, mut baseline) = (block.clone(), block);
            causal_softmax_rows(&mut got, first, t, cols);
            causal_softmax_rows_kernel(&mut baseline, first, t, cols);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "block from row {first}");
            assert_eq!(bits(&baseline), bits(&want), "block from row {first}, baseline build");
        }
    }

    #[test]
    fn causal_softmax_matches_composed_ops() {
        let t = 7;
        let mask: Vec<f32> = (0..t * t).map(|k| if k % t > k / t { f32::NEG_INFINITY } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
        check(
            &[2, 3, t, t],
            |x| causal_softmax(x, 0.3, &mask).unwrap(),
            |x| candle_nn::ops::softmax(&(x * 0.3).unwrap().broadcast_add(&mask).unwrap(), D::Minus1).unwrap(),
        );
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
}
