//! Causal multi-head self-attention on the packed q|k|v projection (B, T, 3C) → (B, T, C), fused
//! forward and backward by row blocks, and the composed form for other devices and dropout.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, D};
use mada::simd_kernel;
use rayon::prelude::*;

use super::gemm::gemm_strided;
use super::softmax::{causal_softmax, causal_softmax_rows};
use super::timing::{timer, OpFamily, Pass};
use super::{f32_slice, on_fused_path, Result, ROW_GROUP};

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
            gemm_strided(
                rows,
                cols,
                hs,
                (&mut s[r * t..], t),
                false,
                scale,
                (&q[r * 3 * c..], 3 * c, 1),
                (k, 1, 3 * c),
            );
            causal_softmax_rows(&mut s[r * t..(r + rows) * t], r, t, cols);
        }
    }
}

impl CustomOp1 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-self-attention"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _timer = timer(OpFamily::Attention, Pass::Forward);
        let qkv = f32_slice(st, l)?;
        let (b, t, c, hs) = self.dims(l)?;
        let mut out = vec![0f32; b * t * c];
        out.par_chunks_mut(t * c).zip(qkv.par_chunks(t * 3 * c)).for_each(|(y, x)| {
            let mut p = vec![0f32; t * t];
            for h in 0..self.heads {
                self.probabilities(x, t, c, hs, h, &mut p);
                // y_h [T, hs] (row stride C) = P [T, T] · v_h [T, hs] (row stride 3C), by row block
                for (r, rows, cols) in self.blocks(t) {
                    gemm_strided(
                        rows,
                        hs,
                        cols,
                        (&mut y[r * c + h * hs..], c),
                        false,
                        1.0,
                        (&p[r * t..], t, 1),
                        (&x[2 * c + h * hs..], 3 * c, 1),
                    );
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, t, c))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _timer = timer(OpFamily::Attention, Pass::Backward);
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

simd_kernel!(fn score_gradients[](p: &[f32], dp: &mut [f32], t: usize, cols: usize, scale: f32)
    = score_gradients_kernel[]);

/// dS = P ⊙ (dP − rowsum(P ⊙ dP))·scale over columns ..cols of the whole rows (length t) of a
/// block, in place in dP; each row's sum runs from −0 in column order, as `Iterator::sum` does.
#[inline(always)]
fn score_gradients_kernel(p: &[f32], dp: &mut [f32], t: usize, cols: usize, scale: f32) {
    for (pg, dg) in p.chunks(t * ROW_GROUP).zip(dp.chunks_mut(t * ROW_GROUP)) {
        let k = pg.len().min(dg.len()) / t;
        let mut dot = [-0.0f32; ROW_GROUP];
        for j in 0..cols {
            for r in 0..k {
                dot[r] += pg[r * t + j] * dg[r * t + j];
            }
        }
        for r in 0..k {
            for (d, &pv) in dg[r * t..][..cols].iter_mut().zip(&pg[r * t..][..cols]) {
                *d = pv * (*d - dot[r]) * scale;
            }
        }
    }
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
        out.par_chunks_mut(t * 3 * c).zip(qkv.par_chunks(t * 3 * c).zip(dy.par_chunks(t * c))).for_each(
            |(dx, (x, g))| {
                let (mut p, mut dp) = (vec![0f32; t * t], vec![0f32; t * t]);
                for h in 0..fwd.heads {
                    let (qo, ko, vo, yo) = (h * hs, c + h * hs, 2 * c + h * hs, h * hs);
                    fwd.probabilities(x, t, c, hs, h, &mut p);
                    for (r, rows, cols) in fwd.blocks(t) {
                        let (pb, dpb) = (&p[r * t..], &mut dp[r * t..]);
                        // dV_h[..cols] += P[block, ..cols]ᵀ · dY_h[block]
                        gemm_strided(
                            cols,
                            hs,
                            rows,
                            (&mut dx[vo..], 3 * c),
                            true,
                            1.0,
                            (pb, 1, t),
                            (&g[r * c + yo..], c, 1),
                        );
                        // dP[block, ..cols] = dY_h[block] · V_h[..cols]ᵀ
                        gemm_strided(
                            rows,
                            cols,
                            hs,
                            (&mut *dpb, t),
                            false,
                            1.0,
                            (&g[r * c + yo..], c, 1),
                            (&x[vo..], 1, 3 * c),
                        );
                        score_gradients(&pb[..rows * t], &mut dpb[..rows * t], t, cols, scale);
                        // dQ_h[block] = dS[block, ..cols] · K_h[..cols]; dK_h[..cols] += dS[block, ..cols]ᵀ · Q_h[block]
                        gemm_strided(
                            rows,
                            hs,
                            cols,
                            (&mut dx[r * 3 * c + qo..], 3 * c),
                            false,
                            1.0,
                            (&dp[r * t..], t, 1),
                            (&x[ko..], 3 * c, 1),
                        );
                        gemm_strided(
                            cols,
                            hs,
                            rows,
                            (&mut dx[ko..], 3 * c),
                            true,
                            1.0,
                            (&dp[r * t..], 1, t),
                            (&x[r * 3 * c + qo..], 3 * c, 1),
                        );
                    }
                }
            },
        );
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// The additive causal mask of `t` tokens (0 on and below the diagonal, −∞ above), which the
/// composed attention needs (the fused CPU kernel needs none).
pub fn causal_mask(t: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t * t).map(|k| if k % t > k / t { f32::NEG_INFINITY } else { 0.0 }).collect();
    Tensor::from_vec(mask, (t, t), device)
}

/// Causal multi-head self-attention from the packed q|k|v projection (B, T, 3C) to (B, T, C)
/// (heads side by side), as nanoGPT's `CausalSelfAttention` between its two linear layers. On
/// other devices it is composed, with `mask` (of [`causal_mask`], built here when `None`).
pub fn causal_self_attention(qkv: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    if on_fused_path(qkv) {
        return qkv.contiguous()?.apply_op1(CausalAttention { heads, block: ATTENTION_ROW_BLOCK });
    }
    match mask {
        Some(m) => composed_causal_self_attention(qkv, heads, m, Ok),
        None => composed_causal_self_attention(qkv, heads, &causal_mask(qkv.dim(1)?, qkv.device())?, Ok),
    }
}

/// The same attention from composed tensor ops, with the (B, H, T, T) probabilities passed
/// through `probabilities` before they weight v: other devices, and attention dropout.
pub fn composed_causal_self_attention(
    qkv: &Tensor,
    heads: usize,
    mask: &Tensor,
    probabilities: impl FnOnce(Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (b, t, c3) = qkv.dims3()?;
    let (c, hs) = (c3 / 3, c3 / 3 / heads);
    let split = |k: usize| qkv.narrow(D::Minus1, k * c, c)?.reshape((b, t, heads, hs))?.transpose(1, 2)?.contiguous();
    let (q, k, v) = (split(0)?, split(1)?, split(2)?);
    let att = probabilities(causal_softmax(&q.matmul(&k.t()?)?, 1.0 / (hs as f64).sqrt(), mask)?)?;
    att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn the_score_gradients_give_the_bits_of_one_row_at_a_time() {
        // A block of 21 rows (two groups of 8 and a tail of 5) of T = 40, 33 columns in use.
        let (t, rows, cols, scale) = (40, 21, 33, 0.125f32);
        let p: Vec<f32> = (0..rows * t).map(|k| (k * 7919 % 997) as f32 / 997.0).collect();
        let dp: Vec<f32> = (0..rows * t).map(|k| ((k * 104_729 % 1000) as f32 - 500.0) * 0.01).collect();
        let mut want = dp.clone();
        for (prow, dprow) in p.chunks(t).zip(want.chunks_mut(t)) {
            let (prow, dprow) = (&prow[..cols], &mut dprow[..cols]);
            let dot: f32 = prow.iter().zip(dprow.iter()).map(|(a, b)| a * b).sum();
            for (d, &pv) in dprow.iter_mut().zip(prow) {
                *d = pv * (*d - dot) * scale;
            }
        }
        let (mut got, mut baseline) = (dp.clone(), dp);
        score_gradients(&p, &mut got, t, cols, scale);
        score_gradients_kernel(&p, &mut baseline, t, cols, scale);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want));
        assert_eq!(bits(&baseline), bits(&want));
    }

    #[test]
    fn fused_attention_matches_the_composed_heads() {
        let dev = Device::Cpu;
        let (b, t, c, heads) = (2, 7, 12, 3);
        let mask = causal_mask(t, &dev).unwrap();
        let composed = |qkv: &Tensor| {
            let hs = c / heads;
            let split = |k: usize| {
                qkv.narrow(2, k * c, c)
                    .unwrap()
                    .reshape((b, t, heads, hs))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let (q, k, v) = (split(0), split(1), split(2));
            let att = candle_nn::ops::softmax(
                &(q.matmul(&k.t().unwrap()).unwrap() / (hs as f64).sqrt()).unwrap().broadcast_add(&mask).unwrap(),
                D::Minus1,
            )
            .unwrap();
            att.matmul(&v).unwrap().transpose(1, 2).unwrap().reshape((b, t, c)).unwrap()
        };
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, 3 * c), &dev).unwrap()).unwrap();
        let r = Tensor::randn(0f32, 1.0, (b, t, c), &dev).unwrap();
        let close = |p: &Tensor, q: &Tensor| {
            let (p, q) = (
                p.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                q.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
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
        close(&causal_self_attention(x.as_tensor(), heads, None).unwrap(), &yr);
        close(&composed_causal_self_attention(x.as_tensor(), heads, &mask, Ok).unwrap(), &yr);
    }
}
