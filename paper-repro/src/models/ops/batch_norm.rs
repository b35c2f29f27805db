//! Batch normalization in training mode (batch statistics, gain γ, shift β), optionally followed
//! by a ReLU, fused forward and backward.
//!
//! **Why the ReLU inside.** Every batch norm of the ResNet but the last of each block feeds a
//! ReLU; as its own op that ReLU is two more passes over the activation (forward and backward)
//! and one more activation kept for the backward. Fused, the forward clamps in the pass that
//! normalizes, and the backward gates dy by ReLU′ at the pre-activation, recomputed from x with
//! the forward's own formula — so the result is `relu(batch_norm_train(..))` bit for bit.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use mada::simd_kernel;

use super::channel_bias::chained_channel_sums;
use super::relu::{relu, relu_gradient, relu_value};
use super::timing::{timer, OpFamily, Pass};
use super::{f32_slice, on_fused_path, par_collect, Result};

const BN_EPS: f32 = 1e-5;

/// What the op applies to the normalized value before returning it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// y = (x − mean)·rstd·γ + β.
    Identity,
    /// max(y, 0), as [`relu`](super::relu) computes it, with its ReLU′(0) = 1 convention.
    Relu,
}

impl Activation {
    /// The activation as its own op, after a normalization computed elsewhere.
    pub fn apply(self, y: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Identity => Ok(y.clone()),
            Activation::Relu => relu(y),
        }
    }
}

/// The normalized value of xv in a channel whose (mean, rstd·γ, β) is `pre` (see
/// [`PerChannel::normalization`]): the one formula the forward and the backward both use.
#[inline(always)]
fn normalized((mean, scale, shift): (f32, f32, f32), xv: f32) -> f32 {
    (xv - mean) * scale + shift
}

/// g, the gradient at the op's output, carried back to the normalization's output for an input
/// xv of a channel whose (mean, rstd·γ, β) is `pre`: g itself, or with the ReLU g·ReLU′ at the
/// pre-activation recomputed with the forward's formula — the very bits the forward clamped.
#[inline(always)]
fn gated<const RELU: bool>(g: f32, xv: f32, pre: (f32, f32, f32)) -> f32 {
    if RELU {
        relu_gradient(g, normalized(pre, xv))
    } else {
        g
    }
}

/// Partial sums per channel: the loops below keep this many f32 sums side by side, which the
/// compiler turns into a few vector registers of independent additions (two with AVX-512: the
/// kernels are compiled per instruction set by [`simd_kernel`]); one running sum instead waits
/// on every addition's latency (16% of the ResNet-8's step that way), and 8 lanes in the
/// baseline's 128-bit registers were still bound by it (9% of the step).
const LANES: usize = 32;

/// Σ f over one channel's planes: each plane into LANES f32 partial sums (element j of the plane
/// into lane j mod LANES), flushed lane by lane into LANES f64 sums after every plane, whose lanes
/// are added in order at the end. The f32 sums hold at most ⌈H·W/LANES⌉ terms.
#[inline(always)]
fn channel_sum<'a>(planes: impl Iterator<Item = &'a [f32]>, f: impl Fn(f32) -> f32) -> f64 {
    let mut total = [0f64; LANES];
    for a in planes {
        let mut acc = [0f32; LANES];
        let chunks = a.chunks_exact(LANES);
        let rest = chunks.remainder();
        for ch in chunks {
            let ch: &[f32; LANES] = ch.try_into().expect("chunks_exact");
            for l in 0..LANES {
                acc[l] += f(ch[l]);
            }
        }
        for (s, &v) in acc.iter_mut().zip(rest) {
            *s += f(v);
        }
        for (t, &s) in total.iter_mut().zip(&acc) {
            *t += s as f64;
        }
    }
    total.iter().sum()
}

/// (Σ f(a, b).0, Σ f(a, b).1) over one channel's pairs of planes, each as [`channel_sum`].
#[inline(always)]
fn channel_sum_pair<'a>(
    planes: impl Iterator<Item = (&'a [f32], &'a [f32])>,
    f: impl Fn(f32, f32) -> (f32, f32),
) -> (f64, f64) {
    let (mut total_p, mut total_q) = ([0f64; LANES], [0f64; LANES]);
    for (a, b) in planes {
        let (mut p, mut q) = ([0f32; LANES], [0f32; LANES]);
        let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (ua, ub) in ca.zip(cb) {
            let (ua, ub): (&[f32; LANES], &[f32; LANES]) =
                (ua.try_into().expect("chunks_exact"), ub.try_into().expect("chunks_exact"));
            for l in 0..LANES {
                let (x, y) = f(ua[l], ub[l]);
                p[l] += x;
                q[l] += y;
            }
        }
        for (l, (&u, &v)) in ra.iter().zip(rb).enumerate() {
            let (x, y) = f(u, v);
            p[l] += x;
            q[l] += y;
        }
        for l in 0..LANES {
            total_p[l] += p[l] as f64;
            total_q[l] += q[l] as f64;
        }
    }
    (total_p.iter().sum(), total_q.iter().sum())
}

/// Per channel c of x (N, C, H, W): the mean and the biased variance (around the f32 mean)
/// over (N, H, W), each as [`channel_sum`].
fn channel_moments(x: &[f32], n: usize, c: usize, hw: usize) -> ChannelMoments {
    (0..c).into_par_iter().map(|ch| moments_of_channel(x, (n, c, hw), ch)).collect()
}

simd_kernel!(fn moments_of_channel[](x: &[f32], nchw: (usize, usize, usize), ch: usize) -> (f32, f32)
    = moments_of_channel_kernel[]);

#[inline(always)]
fn moments_of_channel_kernel(x: &[f32], (n, c, hw): (usize, usize, usize), ch: usize) -> (f32, f32) {
    let count = (n * hw) as f64;
    let planes = || (0..n).map(|i| &x[(i * c + ch) * hw..][..hw]);
    let mean = (channel_sum(planes(), |v| v) / count) as f32;
    let var = channel_sum(planes(), |v| (v - mean) * (v - mean)) / count;
    (mean, var as f32)
}

simd_kernel!(fn backward_sums_of_channel[const RELU: bool](
    dy: &[f32],
    x: &[f32],
    nchw: (usize, usize, usize),
    ch: usize,
    stats: (f32, f32),
    pre: (f32, f32, f32),
) -> (f64, f64) = backward_sums_of_channel_kernel[RELU]);

/// Σ g and Σ g·x̂ over channel ch, with g the [`gated`] dy, as [`channel_sum_pair`].
#[inline(always)]
fn backward_sums_of_channel_kernel<const RELU: bool>(
    dy: &[f32],
    x: &[f32],
    (n, c, hw): (usize, usize, usize),
    ch: usize,
    (mean, rstd): (f32, f32),
    pre: (f32, f32, f32),
) -> (f64, f64) {
    let planes = (0..n).map(|i| (i * c + ch) * hw).map(|base| (&dy[base..base + hw], &x[base..base + hw]));
    channel_sum_pair(planes, |g, xv| {
        let g = gated::<RELU>(g, xv, pre);
        (g, g * (xv - mean) * rstd)
    })
}

/// Per channel: (mean, 1/√(var + ε)).
type ChannelStats = Vec<(f32, f32)>;

/// Per channel: the mean and 1/√(var + ε), from the moments.
fn channel_stats(moments: &[(f32, f32)]) -> ChannelStats {
    moments.iter().map(|&(mean, var)| (mean, 1.0 / (var + BN_EPS).sqrt())).collect()
}

/// Per channel: (mean, biased variance) of a batch.
pub type ChannelMoments = Vec<(f32, f32)>;

/// The moments a forward computed, for the caller's running statistics and the backward.
type Moments = Arc<Mutex<Option<ChannelMoments>>>;

/// y = (x − mean)·rstd·γ + β (batch statistics), then the activation: the normalized value
/// rounded to f32, then β added, so y is bit for bit the normalization followed by
/// [`add_channel_bias`](super::add_channel_bias) — one pass over the output fewer — and dβ is
/// that op's bias gradient. The forward leaves the batch's moments in `moments`, so the caller's
/// running statistics need no second pass.
struct BatchNormOp {
    /// Also read by the backward: the statistics from the forward's moments are the numbers
    /// their recomputation from x would give, without two more passes over x.
    moments: Moments,
    activation: Activation,
}

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _timer = timer(OpFamily::BatchNorm, Pass::Forward);
        let (x, gamma, beta) = (f32_slice(xs, xl)?, f32_slice(gs, gl)?, f32_slice(bs, bl)?);
        let &[n, c, h, w] = xl.dims() else { candle_core::bail!("batch-norm expects NCHW, got {:?}", xl.dims()) };
        if gamma.len() != c || beta.len() != c {
            candle_core::bail!("batch-norm: {} gains and {} shifts for {c} channels", gamma.len(), beta.len());
        }
        let hw = h * w;
        let moments = channel_moments(x, n, c, hw);
        let stats = channel_stats(&moments);
        *self.moments.lock().expect("moments") = Some(moments);
        let per_channel = PerChannel { stats: &stats, gamma, beta };
        let out = match self.activation {
            Activation::Identity => normalize(x, (c, hw), per_channel, |y| y)?,
            Activation::Relu => normalize(x, (c, hw), per_channel, relu_value)?,
        };
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _timer = timer(OpFamily::BatchNorm, Pass::Backward);
        let stats = self.moments.lock().expect("moments").as_deref().map(channel_stats);
        let op = BatchNormBackward {
            gamma: gamma.contiguous()?,
            beta: beta.contiguous()?,
            stats,
            activation: self.activation,
        };
        let packed = x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &op)?;
        let (nx, c) = (x.elem_count(), gamma.elem_count());
        let (dx, dgamma, dbeta) = (packed.narrow(0, 0, nx)?, packed.narrow(0, nx, c)?, packed.narrow(0, nx + c, c)?);
        Ok((Some(dx.reshape(x.shape())?), Some(dgamma), Some(dbeta)))
    }
}

/// activation((x − mean)·(rstd·γ) + β), plane by plane in parallel.
fn normalize(
    x: &[f32],
    (c, hw): (usize, usize),
    p: PerChannel,
    activation: impl Fn(f32) -> f32 + Copy + Sync + Send,
) -> Result<Vec<f32>> {
    par_collect(x.len(), hw, |plane| {
        let pre = p.normalization(plane % c);
        x[plane * hw..][..hw].iter().map(move |&xv| activation(normalized(pre, xv)))
    })
}

/// [dx | dγ | dβ]: with g the [`gated`] dy, x̂ = (x − mean)·rstd and M = N·H·W per channel,
/// dx = γ·rstd·(g − mean(g) − x̂·mean(g·x̂)), dγ = Σ g·x̂, and dβ = Σ g in candle's order (the
/// channel-bias op's bias gradient, see [`chained_channel_sums`]).
struct BatchNormBackward {
    gamma: Tensor,
    beta: Tensor,
    /// The forward's statistics (None: recompute them from x).
    stats: Option<ChannelStats>,
    activation: Activation,
}

impl CustomOp2 for BatchNormBackward {
    fn name(&self) -> &'static str {
        "batch-norm-train-backward"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, dy) = (f32_slice(xs, xl)?, f32_slice(gs, gl)?);
        let (gamma, beta) = (self.gamma.to_vec1::<f32>()?, self.beta.to_vec1::<f32>()?);
        let &[n, c, h, w] = xl.dims() else { candle_core::bail!("batch-norm expects NCHW") };
        if gamma.len() != c || beta.len() != c || dy.len() != x.len() {
            candle_core::bail!(
                "batch-norm backward: {} gains, {} shifts and {} gradients for {:?}",
                gamma.len(),
                beta.len(),
                dy.len(),
                xl.dims()
            );
        }
        let hw = h * w;
        let stats = match &self.stats {
            Some(s) if s.len() == c => s.clone(),
            _ => channel_stats(&channel_moments(x, n, c, hw)),
        };
        let per_channel = PerChannel { stats: &stats, gamma: &gamma, beta: &beta };
        let out = match self.activation {
            Activation::Identity => backward::<false>(x, dy, (n, c, hw), per_channel),
            Activation::Relu => backward::<true>(x, dy, (n, c, hw), per_channel),
        };
        Ok((CpuStorage::F32(out), Shape::from(out_len(x.len(), c))))
    }
}

/// Per channel, the numbers the forward and the backward read: the batch statistics and the
/// affine parameters.
#[derive(Clone, Copy)]
struct PerChannel<'a> {
    stats: &'a [(f32, f32)],
    gamma: &'a [f32],
    beta: &'a [f32],
}

impl PerChannel<'_> {
    /// Channel ch's (mean, rstd·γ, β), for [`normalized`].
    fn normalization(&self, ch: usize) -> (f32, f32, f32) {
        let (mean, rstd) = self.stats[ch];
        (mean, rstd * self.gamma[ch], self.beta[ch])
    }
}

/// [dx | dγ | dβ] has x's elements and two per channel.
fn out_len(nx: usize, c: usize) -> usize {
    nx + 2 * c
}

/// [dx | dγ | dβ] (see [`BatchNormBackward`]), with dy gated as [`gated`]`::<RELU>`.
fn backward<const RELU: bool>(x: &[f32], dy: &[f32], (n, c, hw): (usize, usize, usize), p: PerChannel) -> Vec<f32> {
    // Per channel: Σ g and Σ g·x̂, as channel_sum_pair.
    let sums: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| backward_sums_of_channel::<RELU>(dy, x, (n, c, hw), ch, p.stats[ch], p.normalization(ch)))
        .collect();
    let dbeta = chained_channel_sums((n, c, hw), |plane, scratch| {
        let dy = &dy[plane * hw..][..hw];
        if !RELU {
            return Some(dy);
        }
        let pre = p.normalization(plane % c);
        for ((s, &g), &xv) in scratch.iter_mut().zip(dy).zip(&x[plane * hw..][..hw]) {
            *s = gated::<RELU>(g, xv, pre);
        }
        None
    });
    let m = (n * hw) as f64;
    // dx plane by plane, in parallel, as plain slice loops (they vectorize), into memory each
    // element of which is written once.
    let len = out_len(x.len(), c);
    let mut out = Vec::with_capacity(len);
    let (dx, dgamma) = out.spare_capacity_mut()[..len].split_at_mut(x.len());
    dx.par_chunks_mut(hw.max(1)).enumerate().for_each(|(plane, dst)| {
        let ch = plane % c;
        let (mean, rstd) = p.stats[ch];
        // γ·rstd is the normalization's own scale (rstd·γ: the same bits).
        let pre @ (_, scale, _) = p.normalization(ch);
        let (mdy, mdyx) = ((sums[ch].0 / m) as f32, (sums[ch].1 / m) as f32);
        let base = plane * hw;
        for ((d, &xv), &g) in dst.iter_mut().zip(&x[base..base + hw]).zip(&dy[base..base + hw]) {
            let g = gated::<RELU>(g, xv, pre);
            let xhat = (xv - mean) * rstd;
            d.write(scale * (g - mdy - xhat * mdyx));
        }
    });
    let (dgamma, dbeta_out) = dgamma.split_at_mut(c);
    for (d, s) in dgamma.iter_mut().zip(&sums) {
        d.write(s.1 as f32);
    }
    for (d, &s) in dbeta_out.iter_mut().zip(&dbeta) {
        d.write(s);
    }
    // SAFETY: the planes partition dx (x.len() = n·c·hw) and each loop wrote its whole plane;
    // dγ's and dβ's c elements each were written just above.
    unsafe { out.set_len(len) };
    out
}

/// Batch normalization with batch statistics, gain γ and shift β (NCHW), then `activation`.
/// With the output, the batch's per-channel (mean, biased variance) when the fused kernel
/// computed them (f32 on the CPU; None elsewhere: compute them from x).
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    activation: Activation,
) -> Result<(Tensor, Option<ChannelMoments>)> {
    if on_fused_path(x) {
        let moments = Moments::default();
        let op = BatchNormOp { moments: moments.clone(), activation };
        let y = x.contiguous()?.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
        let computed = moments.lock().expect("moments").clone();
        Ok((y, computed))
    } else {
        let y = composed(x, gamma)?.broadcast_add(&beta.reshape((1, (), 1, 1))?)?;
        Ok((activation.apply(&y)?, None))
    }
}

/// The same normalization from candle operators (other devices and dtypes).
fn composed(x: &Tensor, gamma: &Tensor) -> Result<Tensor> {
    let c = gamma.elem_count();
    let mean = x.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
    xc.broadcast_div(&(var + BN_EPS as f64)?.sqrt()?)?.broadcast_mul(&gamma.reshape((1, c, 1, 1))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ops::testing::grads_match;

    #[test]
    fn batch_norm_matches_composed_ops() {
        let beta = Tensor::new(&[0.3f32, -1.1, 0.0, 2.0], &candle_core::Device::Cpu).unwrap();
        let reference = |x: &Tensor, g: &Tensor| {
            let mean = x.mean_keepdim(0).unwrap().mean_keepdim(2).unwrap().mean_keepdim(3).unwrap();
            let xc = x.broadcast_sub(&mean).unwrap();
            let var = xc.sqr().unwrap().mean_keepdim(0).unwrap().mean_keepdim(2).unwrap().mean_keepdim(3).unwrap();
            xc.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
                .unwrap()
                .broadcast_mul(&g.reshape((1, 4, 1, 1)).unwrap())
                .unwrap()
                .broadcast_add(&beta.reshape((1, 4, 1, 1)).unwrap())
                .unwrap()
        };
        grads_match(
            |x, g| batch_norm_train(x, g, &beta, Activation::Identity).unwrap().0,
            reference,
            &[6, 4, 5, 3],
            &[4],
        );
        grads_match(
            |x, g| batch_norm_train(x, g, &beta, Activation::Relu).unwrap().0,
            |x, g| reference(x, g).relu().unwrap(),
            &[6, 4, 5, 3],
            &[4],
        );
    }

    #[test]
    fn the_shift_is_added_as_the_channel_bias_op_adds_it_bit_for_bit() {
        use crate::models::ops::{add_channel_bias, testing::bits};
        use candle_core::Var;
        let dev = candle_core::Device::Cpu;
        // Batches large enough that the order of dβ's sum shows in its bits; channel counts that
        // do and do not fill the bias gradient's chains.
        for (n, c, h, w) in [(64, 3, 9, 9), (5, 16, 4, 6), (2, 9, 1, 1)] {
            let vars = [n * c * h * w, c, c].map(|len| {
                Var::from_tensor(&Tensor::randn(0f32, 1.0, len, &dev).unwrap().affine(1.5, 0.5).unwrap()).unwrap()
            });
            let [x, gamma, beta] = &vars;
            let x4 = x.as_tensor().reshape((n, c, h, w)).unwrap();
            let r = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
            let fused = batch_norm_train(&x4, gamma.as_tensor(), beta.as_tensor(), Activation::Identity).unwrap().0;
            // The normalization alone (a zero shift adds nothing but turns −0 into +0, which
            // the channel bias's own addition does as well), then the shift by the bias op.
            let zero = Tensor::zeros(c, candle_core::DType::F32, &dev).unwrap();
            let normalized = batch_norm_train(&x4, gamma.as_tensor(), &zero, Activation::Identity).unwrap().0;
            let composed = add_channel_bias(&normalized, beta.as_tensor()).unwrap();
            assert_eq!(bits(&fused), bits(&composed), "forward {n}×{c}×{h}×{w}");
            let gf = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (composed * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (what, v) in [("dx", x), ("dγ", gamma), ("dβ", beta)] {
                let (f, c) = (gf.get(v.as_tensor()).unwrap(), gc.get(v.as_tensor()).unwrap());
                assert_eq!(bits(f), bits(c), "{what} {n}×{c}×{h}×{w}");
            }
        }
    }

    #[test]
    fn a_gain_or_shift_that_does_not_match_the_channels_is_an_error() {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::zeros((2, 3, 4, 4), candle_core::DType::F32, &dev).unwrap();
        let (three, four) = (
            Tensor::ones(3, candle_core::DType::F32, &dev).unwrap(),
            Tensor::ones(4, candle_core::DType::F32, &dev).unwrap(),
        );
        let err = batch_norm_train(&x, &three, &four, Activation::Relu).unwrap_err().to_string();
        assert!(err.contains("3 gains and 4 shifts for 3 channels"), "{err}");
    }

    #[test]
    fn the_backward_from_the_forwards_statistics_equals_the_one_that_recomputes_them_bit_for_bit() {
        use crate::models::ops::testing::bits;
        let dev = candle_core::Device::Cpu;
        // 7×7 planes of 64 channels: dγ (64 values) spans two 49-element chunks of the output.
        for ((n, c, h, w), activation) in
            [(5, 3, 4, 6), (3, 64, 7, 7)].into_iter().flat_map(|s| [(s, Activation::Identity), (s, Activation::Relu)])
        {
            let x = candle_core::Var::from_tensor(
                &Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap().affine(2.0, 0.5).unwrap(),
            )
            .unwrap();
            let gamma = candle_core::Var::from_tensor(&Tensor::randn(1f32, 0.2, c, &dev).unwrap()).unwrap();
            let beta = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, c, &dev).unwrap()).unwrap();
            let (y, _) = batch_norm_train(x.as_tensor(), gamma.as_tensor(), beta.as_tensor(), activation).unwrap();
            let r = Tensor::randn(0f32, 1.0, y.shape(), &dev).unwrap();
            let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let recomputed = BatchNormBackward {
                gamma: gamma.as_tensor().clone(),
                beta: beta.as_tensor().clone(),
                stats: None,
                activation,
            };
            let packed = x.as_tensor().apply_op2_no_bwd(&r, &recomputed).unwrap();
            let nx = n * c * h * w;
            let what = format!("{n}×{c}×{h}×{w} {activation:?}");
            assert_eq!(bits(g.get(x.as_tensor()).unwrap()), bits(&packed.narrow(0, 0, nx).unwrap()), "dx {what}");
            assert_eq!(bits(g.get(gamma.as_tensor()).unwrap()), bits(&packed.narrow(0, nx, c).unwrap()), "dγ {what}");
            assert_eq!(
                bits(g.get(beta.as_tensor()).unwrap()),
                bits(&packed.narrow(0, nx + c, c).unwrap()),
                "dβ {what}"
            );
        }
    }

    #[test]
    fn the_relu_inside_is_the_relu_op_after_it_bit_for_bit() {
        use crate::models::ops::testing::bits;
        use candle_core::Var;
        let dev = candle_core::Device::Cpu;
        // Batches large enough that the order of dβ's sum shows in its bits; channel counts that
        // do and do not fill the bias gradient's chains.
        for (n, c, h, w) in [(64, 3, 9, 9), (5, 16, 4, 6), (2, 9, 1, 1)] {
            let mut x = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap().affine(1.5, 0.5).unwrap();
            let (mut gamma, mut beta) = (
                Tensor::randn(1f32, 0.3, c, &dev).unwrap().to_vec1::<f32>().unwrap(),
                Tensor::randn(0f32, 1.0, c, &dev).unwrap().to_vec1::<f32>().unwrap(),
            );
            // Pre-activations of exactly +0, where ReLU′ = 1: channel 0 is constant (x − mean is
            // 0 exactly) with β = 0; channel 1 has γ = 0 and β = 0 ((x − mean)·0 + 0 is +0 for
            // either sign of x − mean).
            let constant = Tensor::full(0.75f32, (n, 1, h, w), &dev).unwrap();
            x = Tensor::cat(&[&constant, &x.narrow(1, 1, c - 1).unwrap()], 1).unwrap();
            (gamma[1], beta[0], beta[1]) = (0.0, 0.0, 0.0);
            let vars = [x.flatten_all().unwrap(), Tensor::new(gamma, &dev).unwrap(), Tensor::new(beta, &dev).unwrap()]
                .map(|t| Var::from_tensor(&t).unwrap());
            let [x, gamma, beta] = &vars;
            let x4 = x.as_tensor().reshape((n, c, h, w)).unwrap();
            let r = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
            let fused = batch_norm_train(&x4, gamma.as_tensor(), beta.as_tensor(), Activation::Relu).unwrap().0;
            let normalized =
                batch_norm_train(&x4, gamma.as_tensor(), beta.as_tensor(), Activation::Identity).unwrap().0;
            let composed = relu(&normalized).unwrap();
            assert_eq!(bits(&fused), bits(&composed), "forward {n}×{c}×{h}×{w}");
            let zeros = normalized.narrow(1, 0, 2).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(zeros.iter().all(|v| v.to_bits() == 0), "channels 0 and 1 are +0 before the ReLU");
            let gf = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (composed * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (what, v) in [("dx", x), ("dγ", gamma), ("dβ", beta)] {
                let (f, c) = (gf.get(v.as_tensor()).unwrap(), gc.get(v.as_tensor()).unwrap());
                assert_eq!(bits(f), bits(c), "{what} {n}×{c}×{h}×{w}");
            }
            // At +0 the gradient passes (ReLU′(0) = 1): channel 1's dβ is Σ r over it, not 0.
            let dbeta = gf.get(beta.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            assert_ne!(dbeta[1], 0.0);
        }
    }

    #[test]
    fn the_sums_are_the_same_bits_whichever_instruction_set_runs_them() {
        // The dispatched kernels run as AVX-512 or AVX2 twins where the CPU has them; the
        // kernels called directly here are compiled for the test's own (baseline) target.
        let dev = candle_core::Device::Cpu;
        for (n, c, hw) in [(5, 3, 49), (3, 2, 196), (2, 2, 784), (4, 3, 7)] {
            let x =
                Tensor::randn(0f32, 1.0, n * c * hw, &dev).unwrap().affine(3.0, 2.0).unwrap().to_vec1::<f32>().unwrap();
            let dy = Tensor::randn(0f32, 1.0, n * c * hw, &dev).unwrap().to_vec1::<f32>().unwrap();
            for ch in 0..c {
                let (mean, var) = moments_of_channel(&x, (n, c, hw), ch);
                let baseline = moments_of_channel_kernel(&x, (n, c, hw), ch);
                assert_eq!(
                    (mean.to_bits(), var.to_bits()),
                    (baseline.0.to_bits(), baseline.1.to_bits()),
                    "{n}×{c}×{hw}"
                );
                let stats = (mean, 1.0 / (var + BN_EPS).sqrt());
                let pre = (stats.0, stats.1 * (1.0 + 0.1 * ch as f32), 0.5 - 0.4 * ch as f32);
                let (a, b) = backward_sums_of_channel::<false>(&dy, &x, (n, c, hw), ch, stats, pre);
                let baseline = backward_sums_of_channel_kernel::<false>(&dy, &x, (n, c, hw), ch, stats, pre);
                assert_eq!((a.to_bits(), b.to_bits()), (baseline.0.to_bits(), baseline.1.to_bits()), "{n}×{c}×{hw}");
                let (a, b) = backward_sums_of_channel::<true>(&dy, &x, (n, c, hw), ch, stats, pre);
                let baseline = backward_sums_of_channel_kernel::<true>(&dy, &x, (n, c, hw), ch, stats, pre);
                assert_eq!(
                    (a.to_bits(), b.to_bits()),
                    (baseline.0.to_bits(), baseline.1.to_bits()),
                    "ReLU {n}×{c}×{hw}"
                );
            }
        }
    }

    #[test]
    fn the_forward_returns_the_batch_moments_the_composed_ops_compute() {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (8, 3, 5, 4), &dev).unwrap().affine(3.0, 2.0).unwrap();
        let (ones, zeros) = (
            Tensor::ones(3, candle_core::DType::F32, &dev).unwrap(),
            Tensor::zeros(3, candle_core::DType::F32, &dev).unwrap(),
        );
        let (_, moments) = batch_norm_train(&x, &ones, &zeros, Activation::Identity).unwrap();
        let moments = moments.expect("the fused kernel ran");
        let mean = x.mean_keepdim(0).unwrap().mean_keepdim(2).unwrap().mean_keepdim(3).unwrap();
        let var = x.broadcast_sub(&mean).unwrap().sqr().unwrap().mean_keepdim(0).unwrap();
        let var = var.mean_keepdim(2).unwrap().mean_keepdim(3).unwrap();
        let (mean, var) = (
            mean.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            var.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        for (ch, &(m, v)) in moments.iter().enumerate() {
            assert!((m - mean[ch]).abs() <= 1e-5 * (1.0 + mean[ch].abs()), "mean[{ch}] {m} vs {}", mean[ch]);
            assert!((v - var[ch]).abs() <= 1e-5 * var[ch], "var[{ch}] {v} vs {}", var[ch]);
        }
    }
}
