//! A per-channel bias added to an NCHW tensor (a convolution's bias, batch norm's shift), forward
//! and backward in one parallel pass each.
//!
//! **Why.** Candle's `broadcast_add` of a (1, C, 1, 1) bias is one pass forward, but its backward
//! sums the gradient over (N, H, W) with `sum_keepdim(&[0, 2, 3])`, which candle 0.11 walks on one
//! thread, element by element, with an integer division and remainder per element to find the
//! channel: measured at half of the CNN's training step (48% of `Trainer::step`'s samples).
//!
//! **Bit for bit candle's.** The forward is x + b[c], as candle's broadcast add; the input's
//! gradient is the output's; the bias gradient of channel c is candle's sum in candle's order —
//! from 0, image by image, position by position, in f32 — so training is unchanged to the bit,
//! only the channels are summed in parallel.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::timing::{timer, OpFamily, Pass};
use super::{f32_slice, on_fused_path, par_collect, Result};

/// (images, channels, positions per plane) of an NCHW tensor with a (C) bias.
fn dims(x: &Layout, channels: usize) -> Result<(usize, usize, usize)> {
    let &[n, c, h, w] = x.dims() else { candle_core::bail!("channel bias: expected NCHW, got {:?}", x.dims()) };
    if c != channels {
        candle_core::bail!("channel bias: {channels} biases for {c} channels");
    }
    Ok((n, c, h * w))
}

struct ChannelBias;

impl CustomOp2 for ChannelBias {
    fn name(&self) -> &'static str {
        "channel-bias"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let _timer = timer(OpFamily::ChannelBias, Pass::Forward);
        let (x, b) = (f32_slice(xs, xl)?, f32_slice(bs, bl)?);
        let (_, c, plane) = dims(xl, b.len())?;
        // One plane per chunk: its values are x + that channel's bias.
        let out = par_collect(x.len(), plane, |i| {
            let bias = b[i % c];
            x[i * plane..][..plane].iter().map(move |v| v + bias)
        })?;
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _timer = timer(OpFamily::ChannelBias, Pass::Backward);
        Ok((Some(grad.clone()), Some(channel_sum(&grad.contiguous()?, b.elem_count())?)))
    }
}

/// Channels whose bias gradients one task sums side by side. Each is one chain of dependent f32
/// additions (candle's order), which alone waits on every addition's latency; CHAINS
/// independent chains keep the adder busy that many times as often, each chain's order unchanged.
const CHAINS: usize = 8;

/// Σ over images and positions, per channel, in candle's order (see the module comment).
struct ChannelSum {
    channels: usize,
}

impl CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "channel-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s, l)?;
        let (n, c, plane) = dims(l, self.channels)?;
        let sums = chained_channel_sums((n, c, plane), |i, _| Some(&g[i * plane..][..plane]));
        Ok((CpuStorage::F32(sums), Shape::from(c)))
    }
}

/// Per channel ch of an NCHW layout (n, c, plane): Σ over images and positions of the values
/// `plane_values(image · c + ch, scratch)` gives for each of its planes — a plane it returns
/// (Some), or values it wrote into `scratch`, room for one plane (None) — each channel's sum one f32
/// chain from 0 in candle's order: image by image, position by position. CHAINS channels' chains
/// advance side by side, in parallel over blocks of channels.
///
/// A value computed in the chains' loop itself would cost its arithmetic CHAINS times per step
/// of the chains' one-element-at-a-time walk; computed into `scratch` first, plane by plane, it
/// runs in vector registers and stays in the L1 cache for the chains.
pub(super) fn chained_channel_sums<'a>(
    (n, c, plane): (usize, usize, usize),
    plane_values: impl Fn(usize, &mut [f32]) -> Option<&'a [f32]> + Sync,
) -> Vec<f32> {
    (0..c.div_ceil(CHAINS))
        .into_par_iter()
        .flat_map_iter(|block| {
            let (first, k) = (block * CHAINS, CHAINS.min(c - block * CHAINS));
            let mut scratch = vec![0f32; CHAINS * plane];
            let mut acc = [0f32; CHAINS];
            for img in 0..n {
                // A last block of k < CHAINS channels repeats its last one in the spare
                // chains, whose sums are dropped.
                let mut room = scratch.chunks_exact_mut(plane.max(1));
                let planes: [&[f32]; CHAINS] = std::array::from_fn(|q| {
                    let scratch = room.next().unwrap_or_default();
                    match plane_values(img * c + first + q.min(k - 1), scratch) {
                        Some(values) => &values[..plane],
                        None => &scratch[..plane],
                    }
                });
                for j in 0..plane {
                    for (a, p) in acc.iter_mut().zip(&planes) {
                        *a += p[j];
                    }
                }
            }
            acc.into_iter().take(k)
        })
        .collect()
}

/// The bias gradient of an NCHW output gradient `grad` (contiguous): Σ over images and positions,
/// per channel, in candle's order.
pub(super) fn channel_sum(grad: &Tensor, channels: usize) -> Result<Tensor> {
    grad.apply_op1_no_bwd(&ChannelSum { channels })
}

/// x + b broadcast over channels, x of shape (N, C, H, W) and b of shape (C): the fused kernel
/// for f32 on the CPU, candle's `broadcast_add` elsewhere.
pub fn add_channel_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    if on_fused_path(x) && b.dtype() == candle_core::DType::F32 {
        x.contiguous()?.apply_op2(&b.contiguous()?, ChannelBias)
    } else {
        x.broadcast_add(&b.reshape((1, (), 1, 1))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ops::testing::bits;
    use candle_core::{Device, Var};

    #[test]
    fn channel_bias_forward_and_gradients_are_candles_broadcast_add_bit_for_bit() {
        let dev = Device::Cpu;
        // Planes of 1×1 and odd sides, channel counts that do and do not divide a task's planes,
        // and a batch large enough that the order of the bias gradient's sum shows in its bits.
        for shape in [(3, 5, 4, 7), (2, 8, 1, 1), (64, 3, 9, 9), (1, 1, 2, 3)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape.1, &dev).unwrap()).unwrap();
            let r = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
            let fused = add_channel_bias(x.as_tensor(), b.as_tensor()).unwrap();
            let composed = x.as_tensor().broadcast_add(&b.as_tensor().reshape((1, (), 1, 1)).unwrap()).unwrap();
            assert_eq!(bits(&fused), bits(&composed), "forward {shape:?}");
            let gf = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (composed * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (what, v) in [("dx", &x), ("db", &b)] {
                let (f, c) = (gf.get(v.as_tensor()).unwrap(), gc.get(v.as_tensor()).unwrap());
                assert_eq!(f.dims(), c.dims(), "{what} {shape:?}");
                assert_eq!(bits(f), bits(c), "{what} {shape:?}");
            }
        }
    }

    #[test]
    fn a_bias_that_does_not_match_the_channels_is_an_error() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3, 4, 4), candle_core::DType::F32, &dev).unwrap();
        let b = Tensor::zeros(4, candle_core::DType::F32, &dev).unwrap();
        let err = add_channel_bias(&x, &b).unwrap_err().to_string();
        assert!(err.contains("4 biases for 3 channels"), "{err}");
    }
}
