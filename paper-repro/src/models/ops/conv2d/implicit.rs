//! The convolution as k² shifted GEMMs over the once-padded input — an "implicit GEMM": no
//! column matrix is built, so the k²/s²-fold copy of the input that im2col writes (and col2im
//! reads back in the backward) is never made.
//!
//! The padded input (Hp = H + 2p rows of Wp = W + 2p) is split by stride s into s² phases, phase
//! (py, px) holding the padded rows ≡ py and columns ≡ px (mod s) as a plane of Hq = ⌈Hp/s⌉ rows
//! of Wq = ⌈Wp/s⌉ (for s = 1, the padded image itself). A task's images lie side by side:
//! channel c, phase f, image i is the plane at ((c·s² + f)·images + i)·Hq·Wq. Output position
//! (oy, ox) of image i is column j = i·Hq·Wq + oy·Wq + ox of a product of
//! L = (images − 1)·Hq·Wq + (Ho − 1)·Wq + Wo columns (rounded up to the gemm crate's 16 lanes:
//! [`LANES`]), and tap (ki, kj) reads padded position
//! (oy·s + ki, ox·s + kj), which is phase (ki mod s, kj mod s) at j + ⌊ki/s⌋·Wq + ⌊kj/s⌋: each
//! tap is one GEMM of K = C whose right operand is the phase planes themselves, shifted, with
//! row stride s²·images·Hq·Wq, for all the task's images at once. The columns that are no
//! output position (ox ≥ Wo, and those after an image's last row) are computed and dropped in
//! the forward, and fed zeros in the backward.
//!
//! The sums are those of im2col's single GEMM in another order (tap by tap, each over the
//! channels), so results differ from it in the last bits of f32 — which is why the algorithm is
//! a model setting ([`ConvAlgorithm`](super::ConvAlgorithm)) and not chosen silently.

use std::mem::MaybeUninit;

use super::super::gemm::{gemm_into, gemm_into_uninit, gemm_strided};
use super::ConvShape;

/// The phase planes of one task's images.
struct Grid {
    s: usize,
    wq: usize,
    /// Hq·Wq, one phase plane.
    plane: usize,
    images: usize,
    /// Columns of the products: up to the last image's last output position, rounded up to a
    /// multiple of [`LANES`] where they still fit in one channel's planes ([`Grid::row`]).
    l: usize,
}

/// The gemm crate's f32 vector width. It copies an operand whose rows along its vectors are not
/// a multiple of this into a packed buffer before every product; the products' columns are
/// rounded up to it so that none is copied. The columns past the last output position are
/// computed and dropped in the forward and fed zeros in the backward like the others, and they
/// read or write at most `LANES − 1` elements past a channel's last phase plane: the padded
/// buffers end with that much slack ([`Grid::len`]).
const LANES: usize = 16;

impl Grid {
    fn new(g: &ConvShape, images: usize) -> Self {
        debug_assert!(g.stride > 0 && images > 0);
        let s = g.stride;
        let (hq, wq) = ((g.h + 2 * g.pad).div_ceil(s), (g.w + 2 * g.pad).div_ceil(s));
        let (plane, last) = (hq * wq, (images - 1) * hq * wq + (g.ho - 1) * wq + g.wo);
        // Rounded up only where the columns still fit in one channel's planes, so that no two
        // elements of the input gradient's products alias.
        let l = Some(last.next_multiple_of(LANES)).filter(|&l| l <= s * s * images * plane).unwrap_or(last);
        Self { s, wq, plane, images, l }
    }
    /// Elements of a task's padded buffer (all channels' phase planes, then the slack).
    fn len(&self, g: &ConvShape) -> usize {
        g.c * self.row() + LANES
    }
    /// Elements of one channel's phase planes, the row stride of every product.
    fn row(&self) -> usize {
        self.s * self.s * self.images * self.plane
    }
    /// Where tap t = ki·k + kj starts reading a channel's planes. The last element a tap's
    /// product reads or writes for an output position is ⌊ki/s⌋·Wq + ⌊kj/s⌋ + L − 1 past the
    /// phase's first image (L unrounded), inside its last image's plane: ⌊ki/s⌋ + Ho − 1 ≤ Hq − 1
    /// because Ho = ⌊(Hp − k)/s⌋ + 1 and ⌈Hp/s⌉ ≥ ⌊(Hp − k)/s⌋ + ⌈k/s⌉ (columns alike). The
    /// rounded columns reach at most `LANES − 1` further.
    fn offset(&self, g: &ConvShape, t: usize) -> usize {
        let (ki, kj) = (t / g.k, t % g.k);
        let phase = (ki % self.s) * self.s + kj % self.s;
        phase * self.images * self.plane + (ki / self.s) * self.wq + kj / self.s
    }
    /// Column of output position (oy, 0) of image i.
    fn column(&self, i: usize, oy: usize) -> usize {
        i * self.plane + oy * self.wq
    }
    /// Where padded position (yp, xp) of image i lies in a channel's planes.
    fn at(&self, i: usize, yp: usize, xp: usize) -> usize {
        let phase = (yp % self.s) * self.s + xp % self.s;
        (phase * self.images + i) * self.plane + (yp / self.s) * self.wq + xp / self.s
    }
    /// For every row y of an image and every column phase: the image's columns x ≡ x0 (mod s)
    /// from x0, as `f(y, x0, at)` with `at` where its first lands in a channel's planes (the
    /// others follow one apart).
    fn for_each_run(&self, g: &ConvShape, i: usize, mut f: impl FnMut(usize, usize, usize)) {
        for y in 0..g.h {
            for x0 in 0..self.s.min(g.w) {
                f(y, x0, self.at(i, y + g.pad, x0 + g.pad));
            }
        }
    }
    /// The task's images `x` in their planes, padding zero. For stride 1 (one phase, the padded
    /// image itself) each element is written once, plane row by plane row; otherwise the
    /// buffer is zero-filled first and the images copied into their phases.
    fn padded(&self, g: &ConvShape, x: &[f32]) -> Vec<f32> {
        if self.s == 1 {
            let len = self.len(g);
            let mut xp = Vec::with_capacity(len);
            let mut rest = &mut xp.spare_capacity_mut()[..len];
            let mut put = |src: Option<&[f32]>, n: usize| {
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
                match src {
                    Some(v) => _ = head.write_copy_of_slice(v),
                    None => head.iter_mut().for_each(|d| _ = d.write(0.0)),
                }
                rest = tail;
            };
            let (hw, p) = (g.h * g.w, g.pad);
            for ch in 0..g.c {
                for i in 0..self.images {
                    let src = &x[(i * g.c + ch) * hw..][..hw];
                    put(None, p * self.wq);
                    for row in src.chunks(g.w) {
                        put(None, p);
                        put(Some(row), g.w);
                        put(None, p);
                    }
                    put(None, p * self.wq);
                }
            }
            put(None, LANES);
            debug_assert!(rest.is_empty());
            // SAFETY: the planes (C·images of (H + 2p)·Wq, each written row by row above) and
            // the slack are all `len` elements, each written once.
            unsafe { xp.set_len(len) };
            return xp;
        }
        let mut xp = vec![0f32; self.len(g)];
        for (i, img) in x.chunks(g.c * g.h * g.w).enumerate() {
            self.pad_into(g, i, img, &mut xp);
        }
        xp
    }
    /// Copy image i (C, H, W) into its planes in `xp`, whose padding stays zero.
    fn pad_into(&self, g: &ConvShape, i: usize, img: &[f32], xp: &mut [f32]) {
        for (src, dst) in img.chunks(g.h * g.w).zip(xp.chunks_mut(self.row())) {
            self.for_each_run(g, i, |y, x0, at| {
                let row = &src[y * g.w..][..g.w];
                if self.s == 1 {
                    dst[at..at + g.w].copy_from_slice(row);
                } else {
                    for (d, &v) in dst[at..].iter_mut().zip(row[x0..].iter().step_by(self.s)) {
                        *d = v;
                    }
                }
            });
        }
    }
    /// The interior of image i's planes in `xp` into `img` (C, H, W), every element of it:
    /// pad_into reversed.
    fn unpad_from(&self, g: &ConvShape, i: usize, xp: &[f32], img: &mut [MaybeUninit<f32>]) {
        for (dst, src) in img.chunks_mut(g.h * g.w).zip(xp.chunks(self.row())) {
            self.for_each_run(g, i, |y, x0, at| {
                let row = &mut dst[y * g.w..][..g.w];
                if self.s == 1 {
                    row.write_copy_of_slice(&src[at..at + g.w]);
                } else {
                    for (d, &v) in row[x0..].iter_mut().step_by(self.s).zip(&src[at..]) {
                        d.write(v);
                    }
                }
            });
        }
    }
}

/// The kernel (O, C, k, k) tap-major, (k², O, C): tap t's (O, C) matrix contiguous.
pub(super) fn taps_major(g: &ConvShape, w: &[f32]) -> Vec<f32> {
    let kk = g.k * g.k;
    let mut taps = vec![0f32; w.len()];
    for (oc, ws) in w.chunks(kk).enumerate() {
        for (t, &v) in ws.iter().enumerate() {
            taps[t * g.o * g.c + oc] = v;
        }
    }
    taps
}

/// One task's images: y [O, L] = Σ_t W_t [O, C] · Xp shifted by tap t [C, L], its output
/// positions (plus the bias, added to the finished sum) written into `out` (all of it).
pub(super) fn forward_images(
    g: &ConvShape,
    taps: &[f32],
    x: &[f32],
    out: &mut [MaybeUninit<f32>],
    bias: Option<&[f32]>,
) {
    let img = g.c * g.h * g.w;
    let grid = Grid::new(g, x.len() / img);
    let oc = g.o * g.c;
    let xp = grid.padded(g, x);
    let mut y = Vec::<f32>::with_capacity(g.o * grid.l);
    let b = |t: usize| (&xp[grid.offset(g, t)..], grid.row(), 1);
    let acc = gemm_into_uninit(g.o, grid.l, g.c, y.spare_capacity_mut(), (&taps[..oc], g.c, 1), b(0));
    for t in 1..g.k * g.k {
        gemm_into(g.o, grid.l, g.c, acc, true, (&taps[t * oc..], g.c, 1), b(t));
    }
    for (i, oimg) in out.chunks_mut(g.o * g.positions()).enumerate() {
        for (ch, plane) in oimg.chunks_mut(g.positions()).enumerate() {
            let bv = bias.map(|b| b[ch]);
            for (oy, row) in plane.chunks_mut(g.wo).enumerate() {
                let src = &acc[ch * grid.l + grid.column(i, oy)..][..g.wo];
                for (d, &v) in row.iter_mut().zip(src) {
                    d.write(match bv {
                        Some(bv) => v + bv,
                        None => v,
                    });
                }
            }
        }
    }
}

/// One task's images: returns their dW tap-major, (k², C, O), per tap dW_tᵀ = (Xp shifted by t) ·
/// dYᵀ ([`kernel_from_taps`] puts the tasks' sum in the kernel's order), and, with `dx`, writes
/// dx = the interiors of Σ_t W_tᵀ · dY placed at tap t's offset into all of it.
pub(super) fn backward_images(
    g: &ConvShape,
    taps: &[f32],
    x: &[f32],
    dy: &[f32],
    dx: Option<&mut [MaybeUninit<f32>]>,
) -> Vec<f32> {
    let img = g.c * g.h * g.w;
    let grid = Grid::new(g, x.len() / img);
    let (oc, kk) = (g.o * g.c, g.k * g.k);
    let xp = grid.padded(g, x);
    // dY at its output positions' columns, zero in every other column: row-major ([O, L]) for
    // the input gradient's products, and column-major ([L, O], output channel fastest) for the
    // weights'. The gemm crate then reads every operand as it lies; otherwise each of the k²
    // weight products would first gather the shifted input, C × L elements one by one.
    // Each element is written once, channel row by channel row: zeros up to an output row's
    // first column, its values, and zeros after the last image's last row.
    let mut dyw = Vec::<f32>::with_capacity(g.o * grid.l);
    for (ch, dst) in dyw.spare_capacity_mut()[..g.o * grid.l].chunks_mut(grid.l).enumerate() {
        let mut at = 0;
        for (i, dyimg) in dy.chunks(g.o * g.positions()).enumerate() {
            let plane = &dyimg[ch * g.positions()..][..g.positions()];
            for (oy, row) in plane.chunks(g.wo).enumerate() {
                let col = grid.column(i, oy);
                dst[at..col].iter_mut().for_each(|d| _ = d.write(0.0));
                dst[col..col + g.wo].write_copy_of_slice(row);
                at = col + g.wo;
            }
        }
        dst[at..].iter_mut().for_each(|d| _ = d.write(0.0));
    }
    // SAFETY: every channel's row of L columns was written whole just above (the output rows'
    // columns ascend and end at or before L).
    unsafe { dyw.set_len(g.o * grid.l) };
    let dyt = transposed(&dyw, g.o, grid.l);
    let mut dw_taps = Vec::<f32>::with_capacity(kk * oc);
    let spare = &mut dw_taps.spare_capacity_mut()[..kk * oc];
    for (t, dwt) in spare.chunks_mut(oc).enumerate() {
        // dW_tᵀ [C, O] = (Xp shifted by t) [C, L] · dYᵀ [L, O]
        gemm_into_uninit(g.c, g.o, grid.l, dwt, (&xp[grid.offset(g, t)..], grid.row(), 1), (&dyt, g.o, 1));
    }
    // SAFETY: the chunks partition the kk·oc elements, and each product wrote all of its chunk.
    unsafe { dw_taps.set_len(kk * oc) };
    if let Some(dx) = dx {
        let mut dxp = vec![0f32; grid.len(g)];
        for t in 0..kk {
            // (dXp shifted by t) [C, L] += W_tᵀ [C, O] · dY [O, L]; within one product no two
            // elements alias (L ≤ one channel's planes), and the products run one after another.
            let dst = (&mut dxp[grid.offset(g, t)..], grid.row());
            gemm_strided(g.c, grid.l, g.o, dst, true, 1.0, (&taps[t * oc..], 1, g.c), (&dyw, grid.l, 1));
        }
        for (i, dximg) in dx.chunks_mut(img).enumerate() {
            grid.unpad_from(g, i, &dxp, dximg);
        }
    }
    dw_taps
}

/// A kernel gradient as [`backward_images`] returns it, (k², C, O), in the kernel's (O, C, k, k)
/// order. A permutation: applied to the tasks' sum, it gives the sum of the permuted partials.
pub(super) fn kernel_from_taps(g: &ConvShape, dw_taps: &[f32]) -> Vec<f32> {
    let kk = g.k * g.k;
    let mut dw = vec![0f32; dw_taps.len()];
    for (t, dwt) in dw_taps.chunks(g.o * g.c).enumerate() {
        for (c, row) in dwt.chunks(g.o).enumerate() {
            for (o, &v) in row.iter().enumerate() {
                dw[(o * g.c + c) * kk + t] = v;
            }
        }
    }
    dw
}

/// `a` (rows × cols, row-major) transposed, (cols × rows): by blocks of 16 columns, so that the
/// rows' reads and the block's writes both stay within a few cache lines each.
fn transposed(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const BLOCK: usize = 16;
    assert_eq!(a.len(), rows * cols, "transposed: not a {rows} × {cols} matrix");
    let mut t = Vec::with_capacity(a.len());
    let dst = &mut t.spare_capacity_mut()[..a.len()];
    for j0 in (0..cols).step_by(BLOCK) {
        let width = BLOCK.min(cols - j0);
        for (r, row) in a.chunks_exact(cols).enumerate() {
            for (dj, &v) in row[j0..j0 + width].iter().enumerate() {
                dst[(j0 + dj) * rows + r].write(v);
            }
        }
    }
    // SAFETY: a is rows × cols (asserted), and each (row, column) wrote its transposed place.
    unsafe { t.set_len(a.len()) };
    t
}
