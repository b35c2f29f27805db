//! Fused CPU operators with hand-written backward passes: causal self-attention on the packed
//! q|k|v projection, the causal softmax, LayerNorm (gain only; the bias is a separate broadcast
//! add), the exact (erf) GELU, the convolution (im2col or implicit GEMM), training-mode batch
//! normalization (with the ReLU after it inside, where one follows), a per-channel bias, ReLU,
//! 2×2 max pooling, and the linear layer's product (its backward forms the weight's gradient in
//! the weight's own layout).
//!
//! Composed from candle's elementwise operators, each of these costs 5–20 passes over its
//! tensor and as many allocations, forward and backward; profiling the baby GPT's training step
//! put those passes above the matrix products (see `just bench-train`). Each fused operator is
//! one pass forward and one pass backward, parallel over rows (or images, or heads), with
//! arithmetic in f32 like candle's own. On other devices and dtypes every public function falls
//! back to the composed candle operations.
//!
//! One kernel family per file, each checked by its tests against the composed candle operations
//! (and, for the convolution and the pooling, against central finite differences). Each
//! family's forward and backward wall time is summed in [`timing`].

mod attention;
mod batch_norm;
mod channel_bias;
mod conv2d;
mod gelu;
mod gemm;
mod layer_norm;
mod linear;
mod pool;
mod relu;
mod softmax;
pub mod timing;

pub use attention::{causal_mask, causal_self_attention, composed_causal_self_attention};
pub use batch_norm::{batch_norm_train, Activation};
pub use channel_bias::add_channel_bias;
pub use conv2d::{conv2d, ConvAlgorithm, IMPLICIT_MIN_CHANNELS};
pub use gelu::gelu;
pub use layer_norm::layer_norm;
pub use linear::linear;
pub use pool::max_pool2x2;
pub use relu::relu;
pub use softmax::causal_softmax;

use candle_core::{CpuStorage, Layout};

pub(crate) type Result<T> = candle_core::Result<T>;

/// Flush subnormal f32/f64 results to zero, and read subnormal inputs as zero, on this thread
/// (x86-64 MXCSR FTZ and DAZ; a no-op elsewhere).
///
/// A diverging run (Adam at β1 = 0.99, β2 = 0.501 in the robustness grid, say) fills its
/// activations with subnormal numbers, and each operation on one costs the x86 core a microcode
/// assist of ~100 cycles: such a run trained 20× slower than a healthy one. Flushing them
/// changes only values below 1.2e-38 (f32), deterministically, as GPUs do by default.
pub fn flush_subnormals_on_this_thread() {
    #[cfg(target_arch = "x86_64")]
    {
        let mut csr: u32 = 0;
        // SAFETY: reading and writing MXCSR only changes this thread's floating-point mode;
        // bits 15 (FTZ) and 6 (DAZ) are defined on every x86-64 CPU with SSE2.
        unsafe {
            std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack));
            csr |= (1 << 15) | (1 << 6);
            std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, readonly));
        }
    }
}

/// The process's compute threads flush subnormals: this thread and rayon's global pool (which
/// the fused operators, the optimizer kernels and candle's matrix products use). Call it once,
/// first thing in `main`; later calls only set this thread.
pub fn init_compute_threads() {
    flush_subnormals_on_this_thread();
    let _ = rayon::ThreadPoolBuilder::new().start_handler(|_| flush_subnormals_on_this_thread()).build_global();
}

/// Whether the fused kernels serve `t`: f32 on the CPU. Every public operator here takes its
/// composed candle fallback otherwise.
pub(crate) fn on_fused_path(t: &candle_core::Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused op: input is not contiguous"),
    }
}

/// A kernel's output of `len` f32s whose every element the kernel computes, without the
/// zero-fill of `vec![0.0; len]`: that fill is a full extra pass over memory (a `memset` of a
/// recycled block), measured at 6% of the CNN's training step across these kernels.
///
/// Chunk i (elements i·chunk .. min((i + 1)·chunk, len)) takes the values `values(i)` yields, in
/// order, the chunks in parallel. An iterator that yields fewer values than its chunk holds is an
/// error (a bug in the kernel), never uninitialized memory.
pub(crate) fn par_collect<I: Iterator<Item = f32>>(
    len: usize,
    chunk: usize,
    values: impl Fn(usize) -> I + Sync,
) -> Result<Vec<f32>> {
    // SAFETY: n counts the elements written from the chunk's start.
    unsafe {
        par_fill(len, chunk, |i, dst| {
            let mut n = 0;
            for (d, v) in dst.iter_mut().zip(values(i)) {
                d.write(v);
                n += 1;
            }
            n
        })
    }
}

/// [`par_collect`] for kernels that write a chunk's slice themselves (a kernel compiled per
/// instruction set by [`mada::simd_kernel`] cannot take the iterator, whose code would be
/// compiled for the baseline): `fill(i, chunk_i)` writes chunk i from its start and returns how
/// many elements it wrote. Fewer than the chunk holds is an error, never uninitialized memory.
///
/// # Safety
/// `fill` must have written the first n elements of its chunk, n being what it returns.
pub(crate) unsafe fn par_fill(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) -> usize + Sync,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(len);
    // SAFETY: passed on from the caller.
    unsafe { par_fill_chunks(&mut out.spare_capacity_mut()[..len], chunk, |i, dst| (fill(i, dst), ())) }?;
    // SAFETY: par_fill_chunks returned Ok: all len elements are written.
    unsafe { out.set_len(len) };
    Ok(out)
}

/// The core of [`par_fill`], for kernels that also return a value per chunk (in chunk order):
/// fills `dst` in chunks of `chunk`, in parallel, and errs unless every element was written.
///
/// # Safety
/// As [`par_fill`]: `fill` must have written the first n elements of its chunk, n being the
/// count it returns.
pub(crate) unsafe fn par_fill_chunks<R: Send>(
    dst: &mut [std::mem::MaybeUninit<f32>],
    chunk: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) -> (usize, R) + Sync,
) -> Result<Vec<R>> {
    use rayon::prelude::*;
    let len = dst.len();
    let (counts, results): (Vec<usize>, Vec<R>) = dst
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .map(|(i, d)| {
            let (n, r) = fill(i, d);
            (n.min(d.len()), r)
        })
        .unzip();
    // The chunks partition dst and each count is at most its chunk's length and counts the
    // elements written from its start: they sum to len only if every element is written.
    let written: usize = counts.iter().sum();
    if written != len {
        candle_core::bail!("fused op: {written} of {len} output elements computed");
    }
    Ok(results)
}

/// Rows of work per rayon task.
pub(crate) const ROWS_PER_TASK: usize = 64;

/// Rows whose reductions advance side by side (layer norm, the softmax rows, the attention's
/// score gradients). A row's sum is a chain of dependent additions in column order, each waiting
/// on the last one's latency; the rows are independent, so their chains interleave, each in its
/// own order, and the bits are those of one row at a time.
pub(crate) const ROW_GROUP: usize = 8;

/// Checks shared by the operators' tests: each fused operator against the composed candle ops.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Device, Tensor, Var};

    /// A tensor's f32 values as bit patterns, for bit-for-bit comparisons (−0 ≠ +0, NaN = NaN).
    pub(crate) fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    pub(crate) fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let (a, b) =
            (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "element {i}: {x} vs {y}");
        }
    }

    /// Forward values and gradients (of Σ r⊙f(x) for a random r) of a fused operator against
    /// the composed candle reference.
    pub(crate) fn check(shape: &[usize], fused: impl Fn(&Tensor) -> Tensor, reference: impl Fn(&Tensor) -> Tensor) {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap();
        let r = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let (yf, yr) = (fused(x.as_tensor()), reference(x.as_tensor()));
        close(&yf, &yr, 1e-5);
        let gf = (yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
        close(gf.get(x.as_tensor()).unwrap(), gr.get(x.as_tensor()).unwrap(), 1e-4);
    }

    pub(crate) fn grads_match(
        f: impl Fn(&Tensor, &Tensor) -> Tensor,
        g: impl Fn(&Tensor, &Tensor) -> Tensor,
        xs: &[usize],
        ws: &[usize],
    ) {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, xs, &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0.5f32, 0.3, ws, &dev).unwrap()).unwrap();
        let (a, b) = (f(x.as_tensor(), w.as_tensor()), g(x.as_tensor(), w.as_tensor()));
        let r = Tensor::randn(0f32, 1.0, a.shape(), &dev).unwrap();
        let close = |p: &Tensor, q: &Tensor, what: &str| {
            let (p, q) = (
                p.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                q.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            for (i, (u, v)) in p.iter().zip(&q).enumerate() {
                assert!((u - v).abs() <= 2e-4 * (1.0 + v.abs()), "{what}[{i}]: {u} vs {v}");
            }
        };
        close(&a, &b, "forward");
        let ga = (a * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &r).unwrap().sum_all().unwrap().backward().unwrap();
        close(ga.get(x.as_tensor()).unwrap(), gb.get(x.as_tensor()).unwrap(), "dx");
        close(ga.get(w.as_tensor()).unwrap(), gb.get(w.as_tensor()).unwrap(), "dw");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn par_collect_fills_every_chunk_in_order_and_refuses_a_short_one() {
        let v = super::par_collect(10, 4, |i| (0..4).map(move |k| (i * 4 + k) as f32)).unwrap();
        assert_eq!(v, (0..10).map(|k| k as f32).collect::<Vec<_>>());
        // Chunks of 4, 4 and 2; the second yields 3 values.
        let e = super::par_collect(10, 4, |i| (0..if i == 1 { 3 } else { 4 }).map(|k| k as f32)).unwrap_err();
        assert!(e.to_string().contains("9 of 10 output elements"), "{e}");
    }
}

/// The vendored candle-core's change (paper-repro/vendor/README.md): a node's first gradient is
/// the gradient as it comes, not 0 + g in a fresh buffer.
#[cfg(test)]
mod patched_candle {
    use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor, Var};

    use super::testing::bits;

    #[test]
    fn a_matmul_writes_every_element_of_its_unfilled_destination() {
        // The patched matmul does not zero-fill its output first. Recycled blocks full of NaN
        // are freed first, so an element the gemm crate did not write would show as NaN here
        // (or as a wrong value) — every branch: one product, batches, a batch-invariant rhs
        // folded into one product, a transposed operand, and k = 0.
        let dev = Device::Cpu;
        for n in [1usize << 10, 1 << 16, 1 << 20] {
            drop(std::hint::black_box(vec![f32::NAN; n]));
        }
        let naive = |a: &[f32], b: &[f32], (m, k, n): (usize, usize, usize)| -> Vec<f32> {
            let mut c = vec![0f32; m * n];
            for i in 0..m {
                for j in 0..n {
                    c[i * n + j] = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
                }
            }
            c
        };
        for (batch, m, k, n) in [(1, 70, 33, 50), (3, 17, 9, 40), (2, 5, 0, 6), (1, 300, 64, 257)] {
            let a = Tensor::randn(0f32, 1.0, (batch, m, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, (batch, k, n), &dev).unwrap();
            let bt = b.transpose(1, 2).unwrap().contiguous().unwrap().transpose(1, 2).unwrap();
            let shared = Tensor::randn(0f32, 1.0, (k, n), &dev).unwrap();
            for (c, rhs) in [
                (a.matmul(&b).unwrap(), b.clone()),
                (a.matmul(&bt).unwrap(), b.clone()),
                (
                    a.broadcast_matmul(&shared).unwrap(),
                    shared.broadcast_as((batch, k, n)).unwrap().contiguous().unwrap(),
                ),
            ] {
                let (c, a, rhs) =
                    (c.to_vec3::<f32>().unwrap(), a.to_vec3::<f32>().unwrap(), rhs.to_vec3::<f32>().unwrap());
                for s in 0..batch {
                    let want = naive(&a[s].concat(), &rhs[s].concat(), (m, k, n));
                    for (got, want) in c[s].concat().iter().zip(&want) {
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{batch}×{m}×{k}×{n}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_first_gradient_is_g_itself_so_a_negative_zero_stays_negative() {
        // d(Σ x·w)/dx = w: the product rule gives 1·(−0) = −0, which upstream candle's
        // zero-filled buffer turned into 0 + (−0) = +0. The only value the change can alter.
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::new(&[1f32, 2.0], &dev).unwrap()).unwrap();
        let w = Tensor::new(&[-0.0f32, -3.0], &dev).unwrap();
        let grads = (x.as_tensor() * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(bits(grads.get(x.as_tensor()).unwrap()), [(-0f32).to_bits(), (-3f32).to_bits()]);
    }

    #[test]
    fn later_gradients_are_added_and_a_strided_first_one_is_made_contiguous() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 4), &dev).unwrap()).unwrap();
        let (a, b) = (Tensor::randn(0f32, 1.0, (4, 3), &dev).unwrap(), Tensor::randn(0f32, 1.0, (3, 4), &dev).unwrap());
        // x reaches the loss twice, once through a transpose (its gradient arrives strided).
        let loss = ((x.as_tensor().t().unwrap() * &a).unwrap().sum_all().unwrap()
            + (x.as_tensor() * &b).unwrap().sum_all().unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap();
        assert!(g.is_contiguous());
        // The same sum as candle's add of the two contributions, in the order backward meets them.
        let want = (a.t().unwrap().contiguous().unwrap() + &b).unwrap();
        let other = (&b + a.t().unwrap().contiguous().unwrap()).unwrap();
        assert!(bits(g) == bits(&want) || bits(g) == bits(&other));
        // Through the transpose alone: the strided gradient, materialized in x's order.
        let only = (x.as_tensor().t().unwrap() * &a).unwrap().sum_all().unwrap().backward().unwrap();
        let g = only.get(x.as_tensor()).unwrap();
        assert!(g.is_contiguous());
        assert_eq!(bits(g), bits(&a.t().unwrap().contiguous().unwrap()));
    }

    /// An operator whose backward returns a gradient of the wrong shape.
    struct WrongShapeGradient;
    impl CustomOp1 for WrongShapeGradient {
        fn name(&self) -> &'static str {
            "wrong-shape-gradient"
        }
        fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            Ok((s.clone(), l.shape().clone()))
        }
        fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
            Ok(Some(grad.flatten_all()?))
        }
    }

    #[test]
    fn a_first_gradient_of_the_wrong_shape_is_refused_as_the_add_refused_it() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::zeros((2, 3), candle_core::DType::F32, &dev).unwrap()).unwrap();
        let y = x.as_tensor().apply_op1(WrongShapeGradient).unwrap();
        let e = y.sum_all().unwrap().backward().unwrap_err();
        assert!(e.to_string().contains("shape mismatch in add"), "{e}");
    }

    #[test]
    fn no_grad_records_nothing_nests_and_is_restored_after_a_panic() {
        use candle_core::backprop::no_grad;
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::new(&[1f32, 2.0], &dev).unwrap()).unwrap();
        let y = no_grad(|| {
            let inner = no_grad(|| (x.as_tensor() * 2.0).unwrap());
            // Still off after the nested call returns.
            assert!(!inner.track_op());
            (x.as_tensor() * 3.0).unwrap()
        });
        assert!(!y.track_op());
        assert_eq!(bits(&y), bits(&(x.as_tensor() * 3.0).unwrap()));
        let caught = std::panic::catch_unwind(|| no_grad(|| panic!("inside")));
        assert!(caught.is_err());
        assert!((x.as_tensor() * 2.0).unwrap().track_op(), "recording is back on");
    }
}
