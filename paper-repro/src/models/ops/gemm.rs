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
    check_operands(m, n, k, a, b);
    assert!((m - 1) * c.1 + n <= c.0.len(), "gemm destination too small");
    // SAFETY: every index the product touches was bounds-checked just above; c does not alias
    // a or b (distinct borrows).
    unsafe { gemm_unchecked(m, n, k, (c.0.as_mut_ptr(), c.1), accumulate, scale, a, b) }
}

/// c (m×n, row-major, contiguous) = a·b into memory not yet written: the product writes every
/// element of c's first m·n and reads none (no zero-fill needed first), and returns them,
/// initialized.
pub(super) fn gemm_into_uninit<'c>(
    m: usize,
    n: usize,
    k: usize,
    c: &'c mut [std::mem::MaybeUninit<f32>],
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
) -> &'c mut [f32] {
    assert!(m * n <= c.len(), "gemm destination too small");
    let c = &mut c[..m * n];
    check_operands(m, n, k, a, b);
    // SAFETY: the operands were bounds-checked just above and c is m×n with row stride n; c does
    // not alias a or b (distinct borrows). With `read_dst` false the gemm crate never reads c
    // and writes scale·(a·b) into every element of it (zeros when k = 0; nothing to write when
    // m or n is 0), so afterwards all of c is initialized.
    unsafe {
        gemm_unchecked(m, n, k, (c.as_mut_ptr().cast::<f32>(), n), false, 1.0, a, b);
        std::slice::from_raw_parts_mut(c.as_mut_ptr().cast::<f32>(), c.len())
    }
}

/// Panics unless every element of a (m×k) and b (k×n) that the product reads lies in its slice.
fn check_operands(m: usize, n: usize, k: usize, a: (&[f32], usize, usize), b: (&[f32], usize, usize)) {
    let last = |rows: usize, cols: usize, (d, rs, cs): (&[f32], usize, usize)| {
        assert!(rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < d.len(), "gemm operand out of bounds");
    };
    last(m, k, a);
    last(k, n, b);
}

/// The gemm crate's product, single-threaded, c = [c +] scale·a·b.
///
/// # Safety
/// Every element the product touches must lie inside the given operands and c must not alias
/// them; with `accumulate` false, c's m×n elements may be uninitialized.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_unchecked(
    m: usize,
    n: usize,
    k: usize,
    c: (*mut f32, usize),
    accumulate: bool,
    scale: f32,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.0,
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

#[cfg(test)]
mod tests {
    use std::mem::MaybeUninit;

    use super::*;

    #[test]
    fn the_product_into_unwritten_memory_is_the_product_into_zeros_bit_for_bit() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.91).cos()).collect();
        let mut zeros = vec![0f32; m * n];
        gemm_into(m, n, k, &mut zeros, false, (&a, k, 1), (&b, n, 1));
        // Garbage where the product must write: it may not show through.
        let mut fresh = vec![MaybeUninit::new(f32::NAN); m * n + 2];
        let product = gemm_into_uninit(m, n, k, &mut fresh, (&a, k, 1), (&b, n, 1));
        assert_eq!(
            zeros.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            product.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        // SAFETY: every element was initialized (NaN, then the product's first m·n).
        assert!(fresh[m * n..].iter().all(|v| unsafe { v.assume_init() }.is_nan()), "wrote past m·n");
        // k = 0: the empty sum, zero everywhere.
        let mut empty = vec![MaybeUninit::new(f32::NAN); m * n];
        assert!(gemm_into_uninit(m, n, 0, &mut empty, (&[], 0, 1), (&[], n, 1)).iter().all(|&v| v == 0.0));
    }
}
