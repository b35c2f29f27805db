//! Single-threaded matrix products on strided slices (the `gemm` crate), for the fused
//! operators that parallelize over images or heads themselves.

/// c (m×n, row-major, contiguous) = [c +] a·b, a (m×k) and b (k×n) given as (data, row stride,
/// column stride). Single-threaded: callers parallelize over images or heads.
pub(super) fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    accumulate: bool,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
) {
    gemm_strided(m, n, k, (c, n), accumulate, 1.0, a, b)
}

/// c = [c +] scale·a·b with c given as (data, row stride) (unit column stride).
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    c: (&mut [f32], usize),
    accumulate: bool,
    scale: f32,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, (d, rs, cs): (&[f32], usize, usize)| {
        assert!(rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < d.len(), "gemm operand out of bounds");
    };
    last(m, k, a);
    last(k, n, b);
    assert!((m - 1) * c.1 + n <= c.0.len(), "gemm destination too small");
    // SAFETY: every index the product touches was bounds-checked just above; c does not alias
    // a or b (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.0.as_mut_ptr(),
            1,
            c.1 as isize,
            accumulate,
            a.0.as_ptr(),
            a.2 as isize,
            a.1 as isize,
            b.0.as_ptr(),
            b.2 as isize,
            b.1 as isize,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
