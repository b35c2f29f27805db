//! 2-D convolution (NCHW, square stride, zero padding), fused forward and backward, by one of
//! two algorithms ([`ConvAlgorithm`]): im2col and one GEMM per image (`im2col.rs`), or k²
//! shifted GEMMs over the once-padded input, split into s² phases for stride s (`implicit.rs`).

mod im2col;
mod implicit;

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::channel_bias::channel_sum;
use super::timing::{timer, OpFamily, Pass};
use super::{f32_slice, on_fused_path, Result};

/// How the CPU convolution forms its sums. The two give the same convolution up to the order of
/// the additions, so they differ in the last bits of f32; a run's results are reproducible bit
/// for bit only with the algorithm it was trained with, which is why this is a model setting
/// (`conv` in a vision model's config). Other devices use candle's own convolution whatever it
/// says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ConvAlgorithm {
    /// im2col and one GEMM of K = C·k² per image, for every shape: the committed cpu-tier
    /// runs' convention.
    #[default]
    Im2col,
    /// k² GEMMs of K = C over the once-padded input, no column matrix (`implicit.rs`), where the
    /// input has at least [`IMPLICIT_MIN_CHANNELS`] channels and the kernel is at least as wide
    /// as the stride; im2col elsewhere: for a first layer on 1–3 channels, where K = C is too
    /// short for a GEMM to pay, and for a 1×1 kernel of stride 2 (a ResNet's projection
    /// shortcut), which reads one phase of four and is a plain subsampling in im2col.
    ImplicitGemm,
}

impl ConvAlgorithm {
    /// The name a config gives it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Im2col => "im2col",
            Self::ImplicitGemm => "implicit-gemm",
        }
    }
}

/// The fewest input channels for which [`ConvAlgorithm::ImplicitGemm`] takes the implicit form.
pub const IMPLICIT_MIN_CHANNELS: usize = 4;

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
}

/// The algorithm's form for one layer, with what it prepares once per call.
enum Plan {
    Im2col,
    /// The kernel tap-major, (k², O, C).
    Implicit(Vec<f32>),
}

impl Plan {
    fn new(algorithm: ConvAlgorithm, g: &ConvShape, w: &[f32]) -> Self {
        match algorithm {
            ConvAlgorithm::ImplicitGemm if g.c >= IMPLICIT_MIN_CHANNELS && g.k >= g.stride => {
                Self::Implicit(implicit::taps_major(g, w))
            }
            _ => Self::Im2col,
        }
    }
}

/// Images per rayon task in the convolution kernels.
const IMAGES_PER_TASK: usize = 4;

/// Add each output channel's bias to its plane of `p` positions.
fn add_bias(out: &mut [f32], p: usize, bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for (row, bv) in out.chunks_mut(p).zip(b) {
            for v in row {
                *v += bv;
            }
        }
    }
}

/// The convolution of every image, plus the bias of each output channel when given — added to
/// the finished product, as candle's broadcast add of a bias does, so the result is bit for bit
/// the separate convolution and bias.
fn forward(g: &ConvShape, x: &[f32], w: &[f32], bias: Option<&[f32]>, algorithm: ConvAlgorithm) -> Vec<f32> {
    let (img, out_img) = (g.c * g.h * g.w, g.o * g.positions());
    let plan = Plan::new(algorithm, g, w);
    let len = g.n * out_img;
    // The products write every output element: no zero-fill first (a pass over the output).
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(out_img * IMAGES_PER_TASK)
        .zip(x.par_chunks(img * IMAGES_PER_TASK))
        .for_each(|(o, xi): (&mut [MaybeUninit<f32>], &[f32])| match &plan {
            Plan::Im2col => im2col::forward_images(g, w, xi, o, bias),
            Plan::Implicit(taps) => implicit::forward_images(g, taps, xi, o, bias),
        });
    // SAFETY: the chunks partition 0..len (x has n images, the output n planes of out_img), and
    // both algorithms write every element of their images' outputs.
    unsafe { out.set_len(len) };
    out
}

/// The input's and the kernel's gradients: dx only when the input takes part in the graph (the
/// images fed to the first layer do not, and their dx is half the first layer's backward).
fn gradients(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    stride: usize,
    pad: usize,
    algorithm: ConvAlgorithm,
) -> Result<(Option<Tensor>, Tensor)> {
    let input_grad = x.track_op();
    let op = Conv2dBackward { w: w.contiguous()?, stride, pad, input_grad, algorithm };
    let packed = x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &op)?;
    let (nx, nw) = (if input_grad { x.elem_count() } else { 0 }, w.elem_count());
    let dx = if input_grad { Some(packed.narrow(0, 0, nx)?.reshape(x.shape())?) } else { None };
    Ok((dx, packed.narrow(0, nx, nw)?.reshape(w.shape())?))
}

/// The convolution's geometry and algorithm: without a bias a [`CustomOp2`] of (x, w), with one
/// a [`CustomOp3`] of (x, w, b).
struct Conv2dOp {
    stride: usize,
    pad: usize,
    algorithm: ConvAlgorithm,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "conv2d"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let _timer = timer(OpFamily::Conv, Pass::Forward);
        let (x, w) = (f32_slice(xs, xl)?, f32_slice(ws, wl)?);
        let g = ConvShape::new(xl.dims(), wl.dims(), self.stride, self.pad)?;
        let out = forward(&g, x, w, None, self.algorithm);
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.o, g.ho, g.wo))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _timer = timer(OpFamily::Conv, Pass::Backward);
        let (dx, dw) = gradients(x, w, grad, self.stride, self.pad, self.algorithm)?;
        Ok((dx, Some(dw)))
    }
}

/// The convolution with its bias: one pass over the output fewer than the convolution and
/// [`add_channel_bias`](super::add_channel_bias), with the same values and gradients bit for bit
/// (the bias gradient is that kernel's sum).
impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "conv2d-bias"
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
        let _timer = timer(OpFamily::Conv, Pass::Forward);
        let (x, w, b) = (f32_slice(xs, xl)?, f32_slice(ws, wl)?, f32_slice(bs, bl)?);
        let g = ConvShape::new(xl.dims(), wl.dims(), self.stride, self.pad)?;
        if b.len() != g.o {
            candle_core::bail!("conv2d: {} biases for {} output channels", b.len(), g.o);
        }
        let out = forward(&g, x, w, Some(b), self.algorithm);
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.o, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _timer = timer(OpFamily::Conv, Pass::Backward);
        let (dx, dw) = gradients(x, w, grad, self.stride, self.pad, self.algorithm)?;
        Ok((dx, Some(dw), Some(channel_sum(&grad.contiguous()?, b.elem_count())?)))
    }
}

/// [dx | dw] of a convolution (dw alone without `input_grad`), by the forward's algorithm; the
/// per-task dW partials are summed in task order (deterministic).
struct Conv2dBackward {
    w: Tensor,
    stride: usize,
    pad: usize,
    input_grad: bool,
    algorithm: ConvAlgorithm,
}

impl CustomOp2 for Conv2dBackward {
    fn name(&self) -> &'static str {
        "conv2d-backward"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (wst, wl) = self.w.storage_and_layout();
        let candle_core::Storage::Cpu(wcpu) = &*wst else { candle_core::bail!("conv2d backward: kernel not on CPU") };
        let (x, dy, w) = (f32_slice(xs, xl)?, f32_slice(gs, gl)?, f32_slice(wcpu, wl)?);
        let g = ConvShape::new(xl.dims(), wl.dims(), self.stride, self.pad)?;
        let (img, out_img) = (g.c * g.h * g.w, g.o * g.positions());
        let plan = Plan::new(self.algorithm, &g, w);
        let nx = if self.input_grad { x.len() } else { 0 };
        let per_task = |dxi: Option<&mut [MaybeUninit<f32>]>, xi: &[f32], dyi: &[f32]| match &plan {
            Plan::Im2col => im2col::backward_images(&g, w, xi, dyi, dxi),
            Plan::Implicit(taps) => implicit::backward_images(&g, taps, xi, dyi, dxi),
        };
        let (x_task, dy_task) = (img * IMAGES_PER_TASK, out_img * IMAGES_PER_TASK);
        // [dx | dw], dx written by the tasks without a zero-fill first (a pass over the input's
        // size), dw the sum of their partials.
        let mut out = Vec::with_capacity(nx + w.len());
        let (dx, dw_out) = out.spare_capacity_mut()[..nx + w.len()].split_at_mut(nx);
        let partials: Vec<Vec<f32>> = if self.input_grad {
            fn chunk(v: &[f32], size: usize, i: usize) -> &[f32] {
                v.chunks(size).nth(i).unwrap_or_default()
            }
            // SAFETY: task i's chunk of dx is its images' dx, and both algorithms' backward write
            // every element of the dx they are given.
            unsafe {
                super::par_fill_chunks(dx, x_task, |i, dxi| {
                    let n = dxi.len();
                    (n, per_task(Some(dxi), chunk(x, x_task, i), chunk(dy, dy_task, i)))
                })?
            }
        } else {
            let (xs_, dys) = (x.par_chunks(x_task), dy.par_chunks(dy_task));
            xs_.zip(dys).map(|(xi, dyi)| per_task(None, xi, dyi)).collect()
        };
        let mut dw_total = vec![0f32; w.len()];
        for part in partials {
            for (t, v) in dw_total.iter_mut().zip(part) {
                *t += v;
            }
        }
        if let Plan::Implicit(_) = plan {
            dw_total = implicit::kernel_from_taps(&g, &dw_total);
        }
        dw_out.write_copy_of_slice(&dw_total);
        // SAFETY: the tasks wrote all nx elements of dx, and dw_out's are written just above.
        unsafe { out.set_len(nx + w.len()) };
        Ok((CpuStorage::F32(out), Shape::from(nx + w.len())))
    }
}

/// 2-D convolution (NCHW input, (O, C, k, k) kernel, optional (O) bias), square stride and zero
/// padding, on the CPU by `algorithm`.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: usize,
    algorithm: ConvAlgorithm,
) -> Result<Tensor> {
    if on_fused_path(x) {
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        match bias {
            Some(b) => x.apply_op3(&w, &b.contiguous()?, Conv2dOp { stride, pad, algorithm }),
            None => x.apply_op2(&w, Conv2dOp { stride, pad, algorithm }),
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

    const BOTH: [ConvAlgorithm; 2] = [ConvAlgorithm::Im2col, ConvAlgorithm::ImplicitGemm];

    #[test]
    fn an_algorithm_is_named_as_configs_and_the_command_line_spell_it() {
        use clap::ValueEnum;
        for a in BOTH {
            assert_eq!(serde_json::to_value(a).unwrap(), a.name());
            assert_eq!(a.to_possible_value().unwrap().get_name(), a.name());
        }
    }

    #[test]
    fn conv2d_matches_candle_forward_and_backward_by_either_algorithm() {
        // Shapes where the strided output tiles the input exactly (candle 0.11's own conv2d
        // backward returns a wrongly sized input gradient otherwise; see the FD test). With 5
        // input channels the implicit form takes every shape, including padding wider than the
        // kernel's reach, an even kernel, 1×1 kernels and strides 2 and 3.
        for algorithm in BOTH {
            for (stride, pad, k, hw) in [
                (1, 1, 3, (9, 8)),
                (2, 1, 3, (9, 9)),
                (2, 0, 1, (9, 9)),
                (1, 0, 3, (9, 8)),
                (1, 2, 5, (7, 6)),
                (1, 1, 2, (6, 7)),
                (1, 0, 1, (5, 4)),
                (1, 3, 3, (4, 5)),
                (3, 1, 3, (10, 7)),
                (2, 2, 5, (11, 9)),
            ] {
                grads_match(
                    |x, w| conv2d(x, w, None, stride, pad, algorithm).unwrap(),
                    |x, w| x.conv2d(w, pad, stride, 1, 1).unwrap(),
                    &[6, 5, hw.0, hw.1],
                    &[4, 5, k, k],
                );
            }
        }
    }

    #[test]
    fn the_buffers_written_without_a_zero_fill_are_written_whole() {
        // The backward's dx, the padded inputs of stride 1 and the implicit form's dY copies
        // are not zero-filled first. Recycled blocks full of NaN are freed first on every thread
        // (the caller's, which allocates dx, and rayon's, which allocate the rest), so an
        // element left unwritten would show as NaN or a wrong value against candle's.
        for n in [1usize << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18] {
            drop(std::hint::black_box(vec![f32::NAN; n]));
            rayon::broadcast(|_| drop(std::hint::black_box(vec![f32::NAN; n])));
        }
        for algorithm in BOTH {
            for (c, stride, pad, k, hw) in [
                (5, 1, 1, 3, (9, 8)),
                (5, 2, 1, 3, (9, 9)),
                (5, 2, 0, 1, (9, 9)),
                (1, 1, 1, 3, (7, 7)),
                (6, 1, 2, 5, (7, 6)),
            ] {
                grads_match(
                    |x, w| conv2d(x, w, None, stride, pad, algorithm).unwrap(),
                    |x, w| x.conv2d(w, pad, stride, 1, 1).unwrap(),
                    &[6, c, hw.0, hw.1],
                    &[4, c, k, k],
                );
            }
        }
    }

    #[test]
    fn the_implicit_form_is_taken_exactly_where_documented_and_im2col_elsewhere_bit_for_bit() {
        let dev = Device::Cpu;
        for (c, stride, k, implicit) in [
            (IMPLICIT_MIN_CHANNELS, 1, 3, true),
            (IMPLICIT_MIN_CHANNELS - 1, 1, 3, false),
            (8, 2, 3, true),
            (1, 2, 3, false),
            (8, 2, 1, false),
            (8, 1, 1, true),
        ] {
            let pad = k / 2;
            let g = ConvShape::new(&[2, c, 8, 8], &[3, c, k, k], stride, pad).unwrap();
            let w = vec![0.5f32; 3 * c * k * k];
            assert_eq!(matches!(Plan::new(ConvAlgorithm::ImplicitGemm, &g, &w), Plan::Implicit(_)), implicit);
            assert!(matches!(Plan::new(ConvAlgorithm::Im2col, &g, &w), Plan::Im2col));
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, c, 8, 8), &dev).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f32, 0.3, (3, c, k, k), &dev).unwrap()).unwrap();
            let run = |a| {
                let y = conv2d(x.as_tensor(), w.as_tensor(), None, stride, pad, a).unwrap();
                let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                [bits(&y), bits(g.get(x.as_tensor()).unwrap()), bits(g.get(w.as_tensor()).unwrap())]
            };
            let (a, b) = (run(ConvAlgorithm::Im2col), run(ConvAlgorithm::ImplicitGemm));
            // Where the forms differ, only in the order of the sums: not bit for bit.
            assert_eq!(a == b, !implicit, "c = {c}, stride {stride}, k = {k}");
        }
    }

    #[test]
    fn conv2d_with_bias_is_the_convolution_then_the_bias_bit_for_bit_with_or_without_dx() {
        let dev = Device::Cpu;
        for (algorithm, (stride, pad, k, c)) in
            BOTH.into_iter().flat_map(|a| [(1, 1, 3, 1), (2, 1, 3, 3), (1, 1, 3, 6)].map(|s| (a, s)))
        {
            let x0 = Tensor::randn(0f32, 1.0, (9, c, 8, 7), &dev).unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f32, 0.3, (5, c, k, k), &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, 5, &dev).unwrap()).unwrap();
            let x = Var::from_tensor(&x0).unwrap();
            let fused = conv2d(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), stride, pad, algorithm).unwrap();
            let composed = super::super::add_channel_bias(
                &conv2d(x.as_tensor(), w.as_tensor(), None, stride, pad, algorithm).unwrap(),
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
            let plain = conv2d(&x0, w.as_tensor(), Some(b.as_tensor()), stride, pad, algorithm).unwrap();
            let gp = (plain * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&w, &b] {
                assert_eq!(bits(gp.get(v.as_tensor()).unwrap()), bits(gf.get(v.as_tensor()).unwrap()));
            }
        }
    }

    #[test]
    fn conv2d_gradients_match_central_differences() {
        // Σ r ⊙ conv(x), differentiated at a few entries of x and of the kernel: im2col with
        // stride 2 on 8 columns (the last is read by no window, where candle's own backward is
        // wrong), and the implicit form (4 channels) with stride 1 and with that stride 2, at
        // corners, edges and interior.
        let dev = Device::Cpu;
        for (algorithm, c, stride) in [
            (ConvAlgorithm::Im2col, 2, 2),
            (ConvAlgorithm::ImplicitGemm, IMPLICIT_MIN_CHANNELS, 1),
            (ConvAlgorithm::ImplicitGemm, IMPLICIT_MIN_CHANNELS, 2),
        ] {
            let xs = (1, c, 5, 8);
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, xs, &dev).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, c, 3, 3), &dev).unwrap()).unwrap();
            let y = conv2d(x.as_tensor(), w.as_tensor(), None, stride, 1, algorithm).unwrap();
            let r = Tensor::randn(0f32, 1.0, y.shape(), &dev).unwrap();
            let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (dx, dw) = (flat(g.get(x.as_tensor()).unwrap()), flat(g.get(w.as_tensor()).unwrap()));
            assert_eq!(dx.len(), c * 40);
            let (x0, w0) = (flat(x.as_tensor()), flat(w.as_tensor()));
            let f = |xv: &[f32], wv: &[f32]| -> f64 {
                let t = Tensor::from_vec(xv.to_vec(), xs, &dev).unwrap();
                let k = Tensor::from_vec(wv.to_vec(), (3, c, 3, 3), &dev).unwrap();
                (conv2d(&t, &k, None, stride, 1, algorithm).unwrap() * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_dtype(candle_core::DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let central = |i: usize, of_x: bool| {
                let h = 1e-2;
                let (mut a, mut b) = if of_x { (x0.clone(), x0.clone()) } else { (w0.clone(), w0.clone()) };
                a[i] += h;
                b[i] -= h;
                let (fa, fb) = if of_x { (f(&a, &w0), f(&b, &w0)) } else { (f(&x0, &a), f(&x0, &b)) };
                (fa - fb) / (2.0 * h as f64)
            };
            for i in [0, 7, 15, 39, 47, 79, c * 40 - 1] {
                let fd = central(i, true);
                assert!((fd - dx[i] as f64).abs() < 1e-2 * (1.0 + fd.abs()), "{algorithm:?} dx[{i}] {} vs {fd}", dx[i]);
            }
            for i in [0, 4, 8, 13, 26, dw.len() - 1] {
                let fd = central(i, false);
                assert!((fd - dw[i] as f64).abs() < 1e-2 * (1.0 + fd.abs()), "{algorithm:?} dw[{i}] {} vs {fd}", dw[i]);
            }
        }
    }
}
