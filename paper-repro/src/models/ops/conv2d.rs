//! 2-D convolution (NCHW, square stride, zero padding) by im2col and GEMM, fused forward and
//! backward.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::channel_bias::channel_sum;
use super::gemm::{gemm_into, gemm_into_uninit};
use super::{f32_slice, on_fused_path, Result};

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
        let (&[n, c, h, wd], &[o, ci, k, k2]) = (x, w) else {
            candle_core::bail!("conv2d: expected 4-D input and kernel, got {x:?} and {w:?}")
        };
        if ci != c || k != k2 {
            candle_core::bail!("conv2d: kernel {w:?} does not fit input {x:?}");
        }
        if h + 2 * pad < k || wd + 2 * pad < k {
            candle_core::bail!("conv2d: kernel {k} larger than the padded input {x:?}");
        }
        Ok(Self {
            n,
            c,
            h,
            w: wd,
            o,
            k,
            stride,
            pad,
            ho: (h + 2 * pad - k) / stride + 1,
            wo: (wd + 2 * pad - k) / stride + 1,
        })
    }
    fn rows(&self) -> usize {
        self.c * self.k * self.k
    }
    fn positions(&self) -> usize {
        self.ho * self.wo
    }
    /// The (row, position) → input index map as runs: for every row (channel, ki, kj) and
    /// output row oy, `f(row, oy, taps)` with `taps` = Some((lo, hi, first)) when output columns
    /// lo..hi read the input (at `first`, `first + stride`, …) and the others fall in the
    /// padding, None when the whole output row does. Rows, then oy, then columns ascend — the
    /// order in which col2im adds into an input element.
    #[inline]
    fn for_each_run(&self, mut f: impl FnMut(usize, usize, Option<(usize, usize, usize)>)) {
        let (s, p) = (self.stride as isize, self.pad as isize);
        for ch in 0..self.c {
            for ki in 0..self.k {
                for kj in 0..self.k {
                    let row = (ch * self.k + ki) * self.k + kj;
                    // ix = ox·s − a; valid for 0 ≤ ix < w.
                    let a = p - kj as isize;
                    let lo = if a > 0 { (a + s - 1) / s } else { 0 };
                    let last = self.w as isize - 1 + a;
                    let hi = if last < 0 { 0 } else { (last / s + 1).min(self.wo as isize) };
                    for oy in 0..self.ho {
                        let iy = oy as isize * s - p + ki as isize;
                        if iy < 0 || iy >= self.h as isize || lo >= hi {
                            f(row, oy, None);
                            continue;
                        }
                        let first = (ch * self.h + iy as usize) * self.w + (lo * s - a) as usize;
                        f(row, oy, Some((lo as usize, hi as usize, first)));
                    }
                }
            }
        }
    }
    fn im2col(&self, img: &[f32], cols: &mut [f32]) {
        let (p, wo, s) = (self.positions(), self.wo, self.stride);
        self.for_each_run(|row, oy, taps| {
            let out = &mut cols[row * p + oy * wo..][..wo];
            match taps {
                None => out.fill(0.0),
                Some((lo, hi, first)) => {
                    out[..lo].fill(0.0);
                    out[hi..].fill(0.0);
                    if s == 1 {
                        out[lo..hi].copy_from_slice(&img[first..first + (hi - lo)]);
                    } else {
                        for (t, o) in out[lo..hi].iter_mut().enumerate() {
                            *o = img[first + t * s];
                        }
                    }
                }
            }
        });
    }
    /// dx += col2im(dcols): every column entry added into the input element it was read from.
    fn col2im_add(&self, dcols: &[f32], dx: &mut [f32]) {
        let (p, wo, s) = (self.positions(), self.wo, self.stride);
        self.for_each_run(|row, oy, taps| {
            let Some((lo, hi, first)) = taps else { return };
            let src = &dcols[row * p + oy * wo + lo..][..hi - lo];
            if s == 1 {
                for (d, v) in dx[first..first + (hi - lo)].iter_mut().zip(src) {
                    *d += v;
                }
            } else {
                for (t, v) in src.iter().enumerate() {
                    dx[first + t * s] += v;
                }
            }
        });
    }
}

/// Images per rayon task in the convolution kernels.
const IMAGES_PER_TASK: usize = 4;

/// The convolution of every image, plus the bias of each output channel when given — added to
/// the finished product, as candle's broadcast add of a bias does, so the result is bit for bit
/// the separate convolution and bias.
fn forward(g: &ConvShape, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let (img, out_img, p) = (g.c * g.h * g.w, g.o * g.positions(), g.positions());
    let len = g.n * out_img;
    // The products write every output element: no zero-fill first (a pass over the output).
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(out_img * IMAGES_PER_TASK)
        .zip(x.par_chunks(img * IMAGES_PER_TASK))
        .for_each(|(o, xi)| {
            let mut cols = vec![0f32; g.rows() * p];
            for (oimg, ximg) in o.chunks_mut(out_img).zip(xi.chunks(img)) {
                g.im2col(ximg, &mut cols);
                // out [O, P] = W [O, K] · cols [K, P]
                let oimg = gemm_into_uninit(g.o, p, g.rows(), oimg, (w, g.rows(), 1), (&cols, p, 1));
                if let Some(b) = bias {
                    for (row, bv) in oimg.chunks_mut(p).zip(b) {
                        for v in row {
                            *v += bv;
                        }
                    }
                }
            }
        });
    // SAFETY: the chunks partition 0..len (x has n images, the output n planes of out_img), and
    // every image's product wrote its out_img elements.
    unsafe { out.set_len(len) };
    out
}

/// The input's and the kernel's gradients: dx only when the input takes part in the graph (the
/// images fed to the first layer do not, and their dx is half the first layer's backward).
fn gradients(x: &Tensor, w: &Tensor, grad: &Tensor, stride: usize, pad: usize) -> Result<(Option<Tensor>, Tensor)> {
    let input_grad = x.track_op();
    let op = Conv2dBackward { w: w.contiguous()?, stride, pad, input_grad };
    let packed = x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &op)?;
    let (nx, nw) = (if input_grad { x.elem_count() } else { 0 }, w.elem_count());
    let dx = if input_grad { Some(packed.narrow(0, 0, nx)?.reshape(x.shape())?) } else { None };
    Ok((dx, packed.narrow(0, nx, nw)?.reshape(w.shape())?))
}

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
        Ok((CpuStorage::F32(forward(&g, x, w, None)), Shape::from((g.n, g.o, g.ho, g.wo))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = gradients(x, w, grad, self.stride, self.pad)?;
        Ok((dx, Some(dw)))
    }
}

/// The convolution with its bias: one pass over the output fewer than the convolution and
/// [`add_channel_bias`](super::add_channel_bias), with the same values and gradients bit for bit
/// (the bias gradient is that kernel's sum).
struct Conv2dBiasOp {
    stride: usize,
    pad: usize,
}

impl CustomOp3 for Conv2dBiasOp {
    fn name(&self) -> &'static str {
        "conv2d-im2col-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (f32_slice(xs, xl)?, f32_slice(ws, wl)?, f32_slice(bs, bl)?);
        let g = ConvShape::new(xl.dims(), wl.dims(), self.stride, self.pad)?;
        if b.len() != g.o {
            candle_core::bail!("conv2d: {} biases for {} output channels", b.len(), g.o);
        }
        Ok((CpuStorage::F32(forward(&g, x, w, Some(b))), Shape::from((g.n, g.o, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = gradients(x, w, grad, self.stride, self.pad)?;
        Ok((dx, Some(dw), Some(channel_sum(&grad.contiguous()?, b.elem_count())?)))
    }
}

/// [dx | dw] of a convolution (dw alone without `input_grad`): per image, dW += dY·colsᵀ and
/// dcols = Wᵀ·dY scattered back (col2im) into dx; the per-task dW partials are summed in task
/// order (deterministic).
struct Conv2dBackward {
    w: Tensor,
    stride: usize,
    pad: usize,
    input_grad: bool,
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
        let nx = if self.input_grad { x.len() } else { 0 };
        let mut out = vec![0f32; nx + w.len()];
        let (dx, dw_total) = out.split_at_mut(nx);
        let per_task = |dxi: Option<&mut [f32]>, xi: &[f32], dyi: &[f32]| {
            let mut dw = vec![0f32; w.len()];
            let mut cols = vec![0f32; kr * p];
            // Rewritten whole by every image's product before it is read: never zero-filled.
            let mut dcols = Vec::<f32>::with_capacity(if dxi.is_some() { kr * p } else { 0 });
            let mut dximgs = dxi.map(|d| d.chunks_mut(img));
            for (ximg, dyimg) in xi.chunks(img).zip(dyi.chunks(out_img)) {
                g.im2col(ximg, &mut cols);
                // dW [O, K] += dY [O, P] · colsᵀ [P, K]
                gemm_into(g.o, kr, p, &mut dw, true, (dyimg, p, 1), (&cols, 1, p));
                if let Some(dximg) = dximgs.as_mut().and_then(|it| it.next()) {
                    // dcols [K, P] = Wᵀ [K, O] · dY [O, P]
                    let written = gemm_into_uninit(kr, p, g.o, dcols.spare_capacity_mut(), (w, 1, kr), (dyimg, p, 1));
                    g.col2im_add(written, dximg);
                }
            }
            dw
        };
        let (xs_, dys) = (x.par_chunks(img * IMAGES_PER_TASK), dy.par_chunks(out_img * IMAGES_PER_TASK));
        let partials: Vec<Vec<f32>> = if self.input_grad {
            dx.par_chunks_mut(img * IMAGES_PER_TASK)
                .zip(xs_.zip(dys))
                .map(|(dxi, (xi, dyi))| per_task(Some(dxi), xi, dyi))
                .collect()
        } else {
            xs_.zip(dys).map(|(xi, dyi)| per_task(None, xi, dyi)).collect()
        };
        for part in partials {
            for (t, v) in dw_total.iter_mut().zip(part) {
                *t += v;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(nx + w.len())))
    }
}

/// 2-D convolution (NCHW input, (O, C, k, k) kernel, optional (O) bias), square stride and zero
/// padding.
pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, stride: usize, pad: usize) -> Result<Tensor> {
    if on_fused_path(x) {
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        match bias {
            Some(b) => x.apply_op3(&w, &b.contiguous()?, Conv2dBiasOp { stride, pad }),
            None => x.apply_op2(&w, Conv2dOp { stride, pad }),
        }
    } else {
        let y = x.conv2d(w, pad, stride, 1, 1)?;
        match bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ops::testing::{bits, grads_match};
    use candle_core::{Device, Var};

    /// im2col and col2im tap by tap, as the runs must reproduce them.
    fn taps(g: &ConvShape, mut f: impl FnMut(usize, usize, usize)) {
        let (s, p) = (g.stride as isize, g.pad as isize);
        for ch in 0..g.c {
            for ki in 0..g.k {
                for kj in 0..g.k {
                    let row = (ch * g.k + ki) * g.k + kj;
                    for oy in 0..g.ho {
                        for ox in 0..g.wo {
                            let (iy, ix) = (oy as isize * s - p + ki as isize, ox as isize * s - p + kj as isize);
                            if (0..g.h as isize).contains(&iy) && (0..g.w as isize).contains(&ix) {
                                f(row, oy * g.wo + ox, (ch * g.h + iy as usize) * g.w + ix as usize);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn im2col_and_col2im_runs_equal_the_tap_by_tap_maps_bit_for_bit() {
        let mut seed = 1u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        for (c, h, w, k, stride, pad) in [
            (3, 9, 8, 3, 1, 1),
            (2, 9, 9, 3, 2, 1),
            (2, 7, 10, 1, 2, 0),
            (1, 5, 8, 3, 2, 1),
            (2, 4, 4, 5, 1, 2),
            (1, 6, 6, 3, 3, 2),
        ] {
            let g = ConvShape::new(&[1, c, h, w], &[2, c, k, k], stride, pad).unwrap();
            let img: Vec<f32> = (0..c * h * w).map(|_| next()).collect();
            let (kr, p) = (g.rows(), g.positions());
            let mut cols = vec![f32::NAN; kr * p];
            g.im2col(&img, &mut cols);
            let mut want = vec![0f32; kr * p];
            taps(&g, |row, pos, i| want[row * p + pos] = img[i]);
            assert_eq!(
                cols.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            let dcols: Vec<f32> = (0..kr * p).map(|_| next()).collect();
            let start: Vec<f32> = (0..c * h * w).map(|_| next()).collect();
            let (mut dx, mut want) = (start.clone(), start);
            g.col2im_add(&dcols, &mut dx);
            taps(&g, |row, pos, i| want[i] += dcols[row * p + pos]);
            assert_eq!(
                dx.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn conv2d_matches_candle_forward_and_backward() {
        // Shapes where the strided output tiles the input exactly (candle 0.11's own conv2d
        // backward returns a wrongly sized input gradient otherwise; see the next test).
        for (stride, pad, k, hw) in [(1, 1, 3, (9, 8)), (2, 1, 3, (9, 9)), (2, 0, 1, (9, 9)), (1, 0, 3, (9, 8))] {
            grads_match(
                |x, w| conv2d(x, w, None, stride, pad).unwrap(),
                |x, w| x.conv2d(w, pad, stride, 1, 1).unwrap(),
                &[5, 3, hw.0, hw.1],
                &[4, 3, k, k],
            );
        }
    }

    #[test]
    fn conv2d_with_bias_is_the_convolution_then_the_bias_bit_for_bit_with_or_without_dx() {
        let dev = Device::Cpu;
        for (stride, pad, k, c) in [(1, 1, 3, 1), (2, 1, 3, 3)] {
            let x0 = Tensor::randn(0f32, 1.0, (9, c, 8, 7), &dev).unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f32, 0.3, (5, c, k, k), &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, 5, &dev).unwrap()).unwrap();
            let x = Var::from_tensor(&x0).unwrap();
            let fused = conv2d(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), stride, pad).unwrap();
            let composed = super::super::add_channel_bias(
                &conv2d(x.as_tensor(), w.as_tensor(), None, stride, pad).unwrap(),
                b.as_tensor(),
            )
            .unwrap();
            assert_eq!(bits(&fused), bits(&composed));
            let r = Tensor::randn(0f32, 1.0, fused.shape(), &dev).unwrap();
            let gf = (&fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (&composed * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w, &b] {
                assert_eq!(bits(gf.get(v.as_tensor()).unwrap()), bits(gc.get(v.as_tensor()).unwrap()));
            }
            // Images outside the graph: no dx is computed, and dw and db do not change.
            let plain = conv2d(&x0, w.as_tensor(), Some(b.as_tensor()), stride, pad).unwrap();
            let gp = (plain * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&w, &b] {
                assert_eq!(bits(gp.get(v.as_tensor()).unwrap()), bits(gf.get(v.as_tensor()).unwrap()));
            }
        }
    }

    #[test]
    fn conv2d_input_gradient_is_right_when_the_stride_does_not_tile_the_input() {
        // Central differences of Σ r ⊙ conv(x) with respect to a few entries of x (8 wide,
        // stride 2: the last column is read by no window).
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 2, 5, 8), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 2, 3, 3), &dev).unwrap();
        let y = conv2d(x.as_tensor(), &w, None, 2, 1).unwrap();
        let r = Tensor::randn(0f32, 1.0, y.shape(), &dev).unwrap();
        let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(dx.len(), 80);
        let base = x.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let f = |v: &[f32]| -> f64 {
            let t = Tensor::from_vec(v.to_vec(), (1, 2, 5, 8), &dev).unwrap();
            (conv2d(&t, &w, None, 2, 1).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_dtype(candle_core::DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        for i in [0, 7, 15, 39, 47, 79] {
            let (mut a, mut b) = (base.clone(), base.clone());
            a[i] += 1e-2;
            b[i] -= 1e-2;
            let fd = (f(&a) - f(&b)) / 2e-2;
            assert!((fd - dx[i] as f64).abs() < 1e-2 * (1.0 + fd.abs()), "dx[{i}] {} vs {fd}", dx[i]);
        }
    }
}
