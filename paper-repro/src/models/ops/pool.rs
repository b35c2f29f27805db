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

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_slice, on_fused_path, par_collect, Result};

/// Planes per rayon task.
const PLANES_PER_TASK: usize = 8;

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

struct MaxPool2x2;

impl CustomOp1 for MaxPool2x2 {
    fn name(&self) -> &'static str {
        "max-pool-2x2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l)?;
        let (planes, h, w) = plane_dims(l)?;
        let (ho, wo) = (h / 2, w / 2);
        // One plane per chunk, its windows in row-major order.
        let out = par_collect(planes * ho * wo, ho * wo, |p| {
            let xp = &x[p * h * w..][..h * w];
            (0..ho * wo).map(move |k| {
                // Candle's scan: the window's first element, replaced by any larger one.
                let [a, b, c, d] = window(w, k / wo, k % wo).map(|i| xp[i]);
                let mut largest = a;
                for v in [b, c, d] {
                    if largest < v {
                        largest = v;
                    }
                }
                largest
            })
        })?;
        let d = l.dims();
        Ok((CpuStorage::F32(out), Shape::from((d[0], d[1], ho, wo))))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = MaxPool2x2Backward { y: y.contiguous()? };
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

/// dx of the pooling from x and dy, given the forward output y.
struct MaxPool2x2Backward {
    y: Tensor,
}

impl CustomOp2 for MaxPool2x2Backward {
    fn name(&self) -> &'static str {
        "max-pool-2x2-backward"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (yst, yl) = self.y.storage_and_layout();
        let candle_core::Storage::Cpu(ycpu) = &*yst else { candle_core::bail!("max-pool backward: output not on CPU") };
        let (x, dy, y) = (f32_slice(xs, xl)?, f32_slice(gs, gl)?, f32_slice(ycpu, yl)?);
        let (_, h, w) = plane_dims(xl)?;
        let (ho, wo) = (h / 2, w / 2);
        let mut dx = vec![0f32; x.len()];
        let chunk = h * w * PLANES_PER_TASK;
        let out_chunk = ho * wo * PLANES_PER_TASK;
        dx.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .zip(y.par_chunks(out_chunk).zip(dy.par_chunks(out_chunk)))
            .for_each(|((dxi, xi), (yi, dyi))| {
                for (((dxp, xp), yp), dyp) in
                    dxi.chunks_mut(h * w).zip(xi.chunks(h * w)).zip(yi.chunks(ho * wo)).zip(dyi.chunks(ho * wo))
                {
                    for oy in 0..ho {
                        for ox in 0..wo {
                            let top = yp[oy * wo + ox];
                            // The first maximum in scan order: the element the forward kept.
                            if let Some(i) = window(w, oy, ox).into_iter().find(|&i| xp[i] == top) {
                                dxp[i] = dyp[oy * wo + ox];
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

/// 2×2 max pooling with stride 2 (an NCHW tensor): the fused kernel for f32 on the CPU,
/// [`composed_max_pool2x2`] elsewhere.
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    if on_fused_path(x) {
        x.contiguous()?.apply_op1(MaxPool2x2)
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
