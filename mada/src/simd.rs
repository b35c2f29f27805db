//! Kernels compiled three times: for the portable x86-64 baseline, for AVX2 and for AVX-512F,
//! chosen at run time.
//!
//! The kernels are plain loops that LLVM vectorizes. Built for the baseline they get 128-bit
//! vectors; their AVX2 and AVX-512 twins run the same loops on 256- and 512-bit vectors. Results
//! are bit-identical whichever runs: every operation is IEEE (add, mul, div, sqrt, compare), Rust
//! never contracts a·b + c into an FMA, and the reductions fix their lane order in code. Setting
//! the environment variable `MADA_NO_AVX512` forces the AVX2 kernels, `MADA_NO_AVX2` the baseline
//! ones (for comparisons).

use std::sync::OnceLock;

/// Whether the AVX-512 twins run (CPU support, and neither `MADA_NO_AVX2` nor `MADA_NO_AVX512`
/// set). Checked once.
#[inline]
pub fn has_avx512() -> bool {
    static AVX512: OnceLock<bool> = OnceLock::new();
    *AVX512.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            has_avx2() && std::env::var_os("MADA_NO_AVX512").is_none() && std::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether the AVX2 twins run (CPU support, and `MADA_NO_AVX2` unset). Checked once.
#[inline]
pub fn has_avx2() -> bool {
    static AVX2: OnceLock<bool> = OnceLock::new();
    *AVX2.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::env::var_os("MADA_NO_AVX2").is_none() && std::is_x86_feature_detected!("avx2")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// `simd_kernel!(pub(crate) fn name[generics](args) -> Ret = inner[generic args]);` defines
/// `name`, which calls the `#[inline(always)]` kernel `inner` compiled with AVX-512F when
/// [`has_avx512`], with AVX2 when [`has_avx2`], and as built otherwise. Exported for the fused
/// training kernels of the workspace's other crates, which are built for the same baseline.
#[macro_export]
macro_rules! simd_kernel {
    ($vis:vis fn $name:ident [$($gen:tt)*] ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? = $inner:ident [$($call:tt)*]) => {
        $vis fn $name<$($gen)*>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                fn twin<$($gen)*>($($arg: $ty),*) $(-> $ret)? {
                    $inner::<$($call)*>($($arg),*)
                }
                #[target_feature(enable = "avx512f")]
                fn twin512<$($gen)*>($($arg: $ty),*) $(-> $ret)? {
                    $inner::<$($call)*>($($arg),*)
                }
                if $crate::simd::has_avx512() {
                    // SAFETY: the CPU supports AVX-512F (has_avx512).
                    return unsafe { twin512::<$($call)*>($($arg),*) };
                }
                if $crate::simd::has_avx2() {
                    // SAFETY: the CPU supports AVX2 (has_avx2).
                    return unsafe { twin::<$($call)*>($($arg),*) };
                }
            }
            $inner::<$($call)*>($($arg),*)
        }
    };
}
pub use crate::simd_kernel;
