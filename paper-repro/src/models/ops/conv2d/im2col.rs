//! The convolution by im2col: per image, the column matrix cols [C·k², P] of every tap's input
//! (zeros in the padding), then one GEMM of K = C·k². Any stride; the only form for stride > 1
//! and for one input channel, where the implicit form's k² GEMMs of K = 1 lose.

use std::mem::MaybeUninit;

use super::super::gemm::{gemm_into, gemm_into_uninit};
use super::ConvShape;

impl ConvShape {
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
    pub(super) fn im2col(&self, img: &[f32], cols: &mut [f32]) {
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
    pub(super) fn col2im_add(&self, dcols: &[f32], dx: &mut [f32]) {
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

/// One task's images: out [O, P] = W [O, K] · cols [K, P] per image, written into `out`
/// (unwritten memory, `out_img` elements per image; all of it is written), the bias of each
/// output channel added to the finished product.
pub(super) fn forward_images(g: &ConvShape, w: &[f32], x: &[f32], out: &mut [MaybeUninit<f32>], bias: Option<&[f32]>) {
    let (img, out_img, p) = (g.c * g.h * g.w, g.o * g.positions(), g.positions());
    let mut cols = vec![0f32; g.rows() * p];
    for (oimg, ximg) in out.chunks_mut(out_img).zip(x.chunks(img)) {
        g.im2col(ximg, &mut cols);
        let oimg = gemm_into_uninit(g.o, p, g.rows(), oimg, (w, g.rows(), 1), (&cols, p, 1));
        super::add_bias(oimg, p, bias);
    }
}

/// One task's images: returns their dW [O, C, k, k] (dW += dY·colsᵀ per image) and, with `dx`,
/// writes dx = col2im(Wᵀ·dY) into all of it (zeros first, then col2im's sums).
pub(super) fn backward_images(
    g: &ConvShape,
    w: &[f32],
    x: &[f32],
    dy: &[f32],
    dx: Option<&mut [MaybeUninit<f32>]>,
) -> Vec<f32> {
    let (img, out_img, p, kr) = (g.c * g.h * g.w, g.o * g.positions(), g.positions(), g.rows());
    let mut dw = vec![0f32; w.len()];
    let mut cols = vec![0f32; kr * p];
    // Rewritten whole by every image's product before it is read: never zero-filled.
    let mut dcols = Vec::<f32>::with_capacity(if dx.is_some() { kr * p } else { 0 });
    let mut dximgs = dx.map(|d| zeroed(d).chunks_mut(img));
    for (ximg, dyimg) in x.chunks(img).zip(dy.chunks(out_img)) {
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
}

/// `d` filled with zeros, as initialized memory.
fn zeroed(d: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    for v in d.iter_mut() {
        v.write(0.0);
    }
    // SAFETY: every element was written just above.
    unsafe { d.assume_init_mut() }
}
