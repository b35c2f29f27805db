//! 2×2 max pooling with stride 2 (NCHW), forward and backward in one pass each, parallel over
//! the (image, channel) planes.
//!
//! **Why not candle's `max_pool2d`.** Candle 0.11's backward of it is wrong: it gives the
//! maximum (g·a) with a = (elements equal to the maximum)·¼, so a window with one maximum passes
//! a quarter of its gradient (it multiplies by the tie share where it meant to divide; six
//! full-size single-threaded passes besides). The test
//! `candle_0_11s_own_max_pool_gradient_is_a_quarter_at_a_unique_maximum` pins it, so an upgrade
//! that fixes it is noticed.
//!
//! **Convention.** The forward is candle's (the window scanned row by row, the first element
//! kept unless a later one is larger — bit for bit); the gradient goes to that element, the
//! first maximum in scan order, as PyTorch's `max_pool2d` does; a NaN maximum passes none.
//! Sides need not be even: the last odd row or column is dropped, as candle and PyTorch do.

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::timing::{timer, OpFamily, Pass};
use super::{f32_slice, on_fused_path, Result};

fn plane_dims(l: &Layout) -> Result<(usize, usize, usize)> {
    let &[n, c, h, w] = l.dims() else { candle_core::bail!("max_pool2x2: expected NCHW, got {:?}", l.dims()) };
    if h < 2 || w < 2 {
        candle_core::bail!("max_pool2x2: a {h}×{w} plane has no 2×2 window");
    }
    Ok((n * c, h, w))
}

/// The window's elements in scan order, as offsets in the plane.
fn window(w: usize, oy: usize, ox: usize) -> [usize; 4] {
    let top = 2 * oy * w + 2 * ox;
    [top, top + 1, top + w, top + w + 1]
}

/// A window's winner when its maximum is NaN: no element receives the gradient.
const NO_WINNER: u8 = 4;

/// Pool one (h, w) plane into `out` (ho·wo maxima, all written) and record in `winners` which
/// element of each window the forward kept: candle's scan (the window's first element, replaced
/// by any larger one), so the kept element is the first maximum in scan order.
fn pool_plane(xp: &[f32], w: usize, out: &mut [MaybeUninit<f32>], winners: &mut [u8]) {
    let wo = w / 2;
    for (k, (o, won)) in out.iter_mut().zip(winners.iter_mut()).enumerate() {
        let [a, b, c, d] = window(w, k / wo, k % wo).map(|i| xp[i]);
        let (mut largest, mut at) = (a, 0u8);
        for (j, v) in [(1u8, b), (2, c), (3, d)] {
            if largest < v {
                (largest, at) = (v, j);
            }
        }
        o.write(largest);
        // Only a NaN first element survives the scan as NaN.
        *won = if largest.is_nan() { NO_WINNER } else { at };
    }
}

/// The pooling and its winners, plane by plane in parallel.
fn pool(x: &[f32], planes: usize, h: usize, w: usize) -> (Vec<f32>, Vec<u8>) {
    let (hw, p) = (h * w, (h / 2) * (w / 2));
    let mut out = Vec::with_capacity(planes * p);
    let mut winners = vec![0u8; planes * p];
    out.spare_capacity_mut()[..planes * p]
        .par_chunks_mut(p)
        .zip(winners.par_chunks_mut(p))
        .enumerate()
        .for_each(|(i, (o, won))| pool_plane(&x[i * hw..][..hw], w, o, won));
    // SAFETY: the planes partition the planes·p outputs and pool_plane wrote each plane's p.
    unsafe { out.set_len(planes * p) };
    (out, winners)
}

/// The forward; it keeps each window's winner for the backward, a byte per output (a
/// sixteenth of the input's size), so the backward reads neither x nor y and compares nothing.
#[derive(Default)]
struct MaxPool2x2 {
    winners: OnceLock<Vec<u8>>,
}

impl CustomOp1 for MaxPool2x2 {
    fn name(&self) -> &'static str {
        "max-pool-2x2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _timer = timer(OpFamily::Pool, Pass::Forward);
        let x = f32_slice(s, l)?;
        let (planes, h, w) = plane_dims(l)?;
        let (out, winners) = pool(x, planes, h, w);
        // Each call makes its own op, so this is the one forward it ran.
        let _ = self.winners.set(winners);
        let d = l.dims();
        Ok((CpuStorage::F32(out), Shape::from((d[0], d[1], h / 2, w / 2))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _timer = timer(OpFamily::Pool, Pass::Backward);
        let op = MaxPool2x2Backward { winners: self.winners.get().map(Vec::as_slice) };
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

/// dx of the pooling: each window's gradient to its winner, zeros elsewhere (the dropped last
/// row or column of an odd side included). The winners are the forward's (None: scan x again).
struct MaxPool2x2Backward<'a> {
    winners: Option<&'a [u8]>,
}

impl CustomOp2 for MaxPool2x2Backward<'_> {
    fn name(&self) -> &'static str {
        "max-pool-2x2-backward"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, dy) = (f32_slice(xs, xl)?, f32_slice(gs, gl)?);
        let (planes, h, w) = plane_dims(xl)?;
        let (ho, wo, p) = (h / 2, w / 2, (h / 2) * (w / 2));
        if dy.len() != planes * p {
            candle_core::bail!("max-pool backward: {} gradients for {} outputs", dy.len(), planes * p);
        }
        let scanned;
        let winners = match self.winners {
            Some(won) if won.len() == planes * p => won,
            _ => {
                scanned = pool(x, planes, h, w).1;
                &scanned
            }
        };
        let mut dx = Vec::with_capacity(x.len());
        dx.spare_capacity_mut()[..x.len()].par_chunks_mut(h * w).enumerate().for_each(|(i, d)| {
            let (won, g) = (&winners[i * p..][..p], &dy[i * p..][..p]);
            let pick = |j: u8, at: u8, v: f32| if j == at { v } else { 0.0 };
            for oy in 0..ho {
                let (top, bottom) = d[2 * oy * w..][..2 * w].split_at_mut(w);
                for ox in 0..wo {
                    let (j, v) = (won[oy * wo + ox], g[oy * wo + ox]);
                    top[2 * ox].write(pick(j, 0, v));
                    top[2 * ox + 1].write(pick(j, 1, v));
                    bottom[2 * ox].write(pick(j, 2, v));
                    bottom[2 * ox + 1].write(pick(j, 3, v));
                }
                for e in top[2 * wo..].iter_mut().chain(bottom[2 * wo..].iter_mut()) {
                    e.write(0.0);
                }
            }
            for e in &mut d[2 * ho * w..] {
                e.write(0.0);
            }
        });
        // SAFETY: the planes partition dx, and each plane's loops wrote its 2·ho full rows and
        // its remaining rows.
        unsafe { dx.set_len(x.len()) };
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

/// 2×2 max pooling with stride 2 (an NCHW tensor): the fused kernel for f32 on the CPU,
/// [`composed_max_pool2x2`] elsewhere.
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    if on_fused_path(x) {
        x.contiguous()?.apply_op1(MaxPool2x2::default())
    } else {
        composed_max_pool2x2(x)
    }
}

/// The same pooling from candle operators whose backward is right (a max over the window's four
/// elements, laid out as a last axis): equal forward; the same gradient except at ties, where
/// every maximum receives the window's whole gradient (candle's reduce-max convention) — after
/// a ReLU, ties are windows of zeros whose gradient the ReLU stops anyway.
pub fn composed_max_pool2x2(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (ho, wo) = (h / 2, w / 2);
    x.narrow(2, 0, 2 * ho)?
        .narrow(3, 0, 2 * wo)?
        .reshape((n, c, ho, 2, wo, 2))?
        .permute((0, 1, 2, 4, 3, 5))?
        .reshape((n, c, ho, wo, 4))?
        .max(4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ops::testing::bits;
    use candle_core::{Device, Var};

    /// The gradient the convention defines, element by element: the first maximum of each
    /// window (scan order) receives the window's output gradient.
    fn reference_gradient(x: &[f32], dy: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
        let (ho, wo) = (h / 2, w / 2);
        let mut dx = vec![0f32; x.len()];
        for p in 0..planes {
            for oy in 0..ho {
                for ox in 0..wo {
                    let idx = window(w, oy, ox).map(|i| p * h * w + i);
                    let top = idx.iter().map(|&i| x[i]).fold(f32::NEG_INFINITY, f32::max);
                    let first = idx.into_iter().find(|&i| x[i] == top).unwrap();
                    dx[first] = dy[p * ho * wo + oy * wo + ox];
                }
            }
        }
        dx
    }

    #[test]
    fn max_pool_forward_is_candles_bit_for_bit_and_its_gradient_goes_to_the_first_maximum() {
        let dev = Device::Cpu;
        // After a ReLU about half the inputs are 0, so many windows tie; rounding to a coarse
        // grid makes ties among positive values too. Odd sides drop their last row or column.
        for shape in [(3, 5, 8, 6), (2, 3, 7, 9)] {
            let raw = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
            let grid = ((raw * 4.0).unwrap().round().unwrap() / 4.0).unwrap().relu().unwrap();
            let x = Var::from_tensor(&grid).unwrap();
            let (a, b) = (max_pool2x2(x.as_tensor()).unwrap(), x.as_tensor().max_pool2d(2).unwrap());
            assert_eq!(bits(&a), bits(&b));
            let r = Tensor::randn(0f32, 1.0, a.shape(), &dev).unwrap();
            let g = (a * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let (n, c, h, w) = shape;
            // The reference on the cropped even part; the dropped row/column gets nothing.
            let cropped = grid.narrow(2, 0, h / 2 * 2).unwrap().narrow(3, 0, w / 2 * 2).unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = reference_gradient(&flat(&cropped), &flat(&r), n * c, h / 2 * 2, w / 2 * 2);
            let got = g.get(x.as_tensor()).unwrap().narrow(2, 0, h / 2 * 2).unwrap().narrow(3, 0, w / 2 * 2).unwrap();
            assert_eq!(flat(&got), want);
            assert_eq!(flat(g.get(x.as_tensor()).unwrap()).iter().sum::<f32>(), want.iter().sum::<f32>());
        }
    }

    #[test]
    fn the_backward_from_the_forwards_winners_equals_the_comparison_with_the_output_bit_for_bit() {
        // NaN first elements (no winner), NaN later ones (ignored by the scan), ±0 ties, ties of
        // positives, odd sides: the recorded winners give what comparing x with y gives (the
        // earlier backward: the first element equal to the window's output), and so does the
        // backward that scans x again.
        let (planes, h, w) = (6, 7, 9);
        let pool_vals = [f32::NAN, 0.0, -0.0, 1.0, 1.0, -2.0, 0.5, f32::NAN, -0.0, 3.0];
        let x: Vec<f32> = (0..planes * h * w).map(|i| pool_vals[(i * 7 + i / 5) % pool_vals.len()]).collect();
        let dev = Device::Cpu;
        let xt = Var::from_tensor(&Tensor::from_vec(x.clone(), (2, 3, h, w), &dev).unwrap()).unwrap();
        let y = max_pool2x2(xt.as_tensor()).unwrap();
        let yv = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let dy: Vec<f32> = (0..yv.len()).map(|i| i as f32 - 7.5).collect();
        let (ho, wo) = (h / 2, w / 2);
        let mut want = vec![0f32; x.len()];
        for p in 0..planes {
            for oy in 0..ho {
                for ox in 0..wo {
                    let k = p * ho * wo + oy * wo + ox;
                    if let Some(i) = window(w, oy, ox).into_iter().find(|&i| x[p * h * w + i] == yv[k]) {
                        want[p * h * w + i] = dy[k];
                    }
                }
            }
        }
        let g = Tensor::from_vec(dy, y.shape(), &dev).unwrap();
        let got = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let bits_of = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(bits_of(&flat(got.get(xt.as_tensor()).unwrap())), bits_of(&want));
        let rescanned = MaxPool2x2Backward { winners: None };
        let again = xt.as_tensor().apply_op2_no_bwd(&g, &rescanned).unwrap();
        assert_eq!(bits_of(&flat(&again)), bits_of(&want));
        assert!(yv.iter().any(|v| v.is_nan()) && want.iter().any(|&v| v != 0.0));
    }

    #[test]
    fn candle_0_11s_own_max_pool_gradient_is_a_quarter_at_a_unique_maximum() {
        // Why the fused kernel exists on every path: when this fails, candle's backward was
        // fixed, and the composed fallback could use max_pool2d again.
        let x = Var::from_tensor(&Tensor::new(&[[[[1f32, 2.0], [3.0, 4.0]]]], &Device::Cpu).unwrap()).unwrap();
        let g = x.as_tensor().max_pool2d(2).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(dx, [0.0, 0.0, 0.0, 0.25]);
        let g = max_pool2x2(x.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(
            g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0.0, 0.0, 0.0, 1.0]
        );
    }

    #[test]
    fn max_pool_gradient_matches_central_differences_away_from_ties() {
        let dev = Device::Cpu;
        // Distinct values 0.01 apart (a permutation), so no ±1e-3 step changes a window's maximum.
        let values: Vec<f32> = (0..144).map(|i| ((i * 89) % 144) as f32 * 0.01 - 0.7).collect();
        let x0 = Tensor::from_vec(values, (2, 3, 4, 6), &dev).unwrap();
        let x = Var::from_tensor(&x0).unwrap();
        let r = Tensor::randn(0f32, 1.0, (2, 3, 2, 3), &dev).unwrap();
        let grad = |pool: fn(&Tensor) -> Result<Tensor>| {
            let g = (pool(x.as_tensor()).unwrap() * &r).unwrap().sum_all().unwrap().backward().unwrap();
            g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let (dx, composed) = (grad(max_pool2x2), grad(composed_max_pool2x2));
        let base = x0.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let f = |v: &[f32]| -> f64 {
            let t = Tensor::from_vec(v.to_vec(), (2, 3, 4, 6), &dev).unwrap();
            let s = (max_pool2x2(&t).unwrap() * &r).unwrap().sum_all().unwrap();
            f64::from(s.to_scalar::<f32>().unwrap())
        };
        for i in 0..base.len() {
            let (mut p, mut m) = (base.clone(), base.clone());
            p[i] += 1e-3;
            m[i] -= 1e-3;
            let fd = (f(&p) - f(&m)) / 2e-3;
            assert!((fd - f64::from(dx[i])).abs() < 2e-2 * (1.0 + fd.abs()), "dx[{i}] {} vs {fd}", dx[i]);
            assert_eq!(composed[i], dx[i], "the composed pooling's dx[{i}]");
        }
    }
}
