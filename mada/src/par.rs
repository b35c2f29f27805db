//! Deterministic data parallelism over element ranges of several buffers at once.
//!
//! A kernel receives a tuple of equally long slices (parameters, gradient, state buffers).
//! Large tuples are halved recursively and the halves run with `rayon::join`; results are
//! combined left-to-right. The split points depend only on the length, so a reduction (the
//! hyper-gradient's sums) gives the same bits whatever the number of threads — which is what
//! makes a resumed run continue bit-identically.

/// Below this many elements a kernel runs on one thread (64 Ki elements: 256 KiB per f32
/// buffer, large enough that the fork/join overhead is noise).
pub const PAR_MIN_LEN: usize = 1 << 16;

/// A bundle of equally long slices that can be cut at an element index.
pub trait Split: Sized + Send {
    /// Number of elements (of the first slice; all have the same length).
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Cut at `mid`.
    fn split_at(self, mid: usize) -> (Self, Self);
}

// An empty slice stands for a buffer that is not kept (for example MADA's hyper-gradient
// buffers while nothing is learned): it splits into two empty slices.

impl<T: Sync> Split for &[T] {
    fn len(&self) -> usize {
        <[T]>::len(self)
    }
    fn split_at(self, mid: usize) -> (Self, Self) {
        if self.is_empty() {
            (self, self)
        } else {
            <[T]>::split_at(self, mid)
        }
    }
}

impl<T: Send> Split for &mut [T] {
    fn len(&self) -> usize {
        <[T]>::len(self)
    }
    fn split_at(self, mid: usize) -> (Self, Self) {
        if self.is_empty() {
            (self, &mut [])
        } else {
            <[T]>::split_at_mut(self, mid)
        }
    }
}

macro_rules! split_tuple {
    ($($name:ident : $idx:tt),+) => {
        impl<$($name: Split),+> Split for ($($name,)+) {
            fn len(&self) -> usize {
                self.0.len()
            }
            #[allow(non_snake_case)]
            fn split_at(self, mid: usize) -> (Self, Self) {
                $(let $name = self.$idx.split_at(mid);)+
                (($($name.0,)+), ($($name.1,)+))
            }
        }
    };
}

split_tuple!(A: 0, B: 1);
split_tuple!(A: 0, B: 1, C: 2);
split_tuple!(A: 0, B: 1, C: 2, D: 3);
split_tuple!(A: 0, B: 1, C: 2, D: 3, E: 4);
split_tuple!(A: 0, B: 1, C: 2, D: 3, E: 4, F: 5);
split_tuple!(A: 0, B: 1, C: 2, D: 3, E: 4, F: 5, G: 6);
split_tuple!(A: 0, B: 1, C: 2, D: 3, E: 4, F: 5, G: 6, H: 7);
split_tuple!(A: 0, B: 1, C: 2, D: 3, E: 4, F: 5, G: 6, H: 7, I: 8);
split_tuple!(A: 0, B: 1, C: 2, D: 3, E: 4, F: 5, G: 6, H: 7, I: 8, J: 9);
split_tuple!(A: 0, B: 1, C: 2, D: 3, E: 4, F: 5, G: 6, H: 7, I: 8, J: 9, K: 10);
split_tuple!(A: 0, B: 1, C: 2, D: 3, E: 4, F: 5, G: 6, H: 7, I: 8, J: 9, K: 10, L: 11);

/// Run `kernel` over `views`, in parallel for large inputs, and combine the per-piece results
/// left-to-right in a tree fixed by the length alone.
pub fn fold<V, R, K, C>(views: V, kernel: &K, combine: &C) -> R
where
    V: Split,
    R: Send,
    K: Fn(V) -> R + Sync,
    C: Fn(R, R) -> R + Sync,
{
    let len = views.len();
    if len <= PAR_MIN_LEN {
        return kernel(views);
    }
    // Cut on a multiple of 1024 elements so every piece stays SIMD- and cache-line aligned
    // relative to the buffer start.
    let mid = (len / 2).next_multiple_of(1024).min(len);
    let (a, b) = views.split_at(mid);
    let (ra, rb) = rayon::join(|| fold(a, kernel, combine), || fold(b, kernel, combine));
    combine(ra, rb)
}

/// [`fold`] for kernels without a result.
pub fn for_each<V, K>(views: V, kernel: &K)
where
    V: Split,
    K: Fn(V) + Sync,
{
    fold(views, kernel, &|(), ()| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_covers_every_element_once_and_is_deterministic() {
        let n = 5 * PAR_MIN_LEN + 17;
        let a: Vec<f64> = (0..n).map(|i| (i as f64).sin()).collect();
        let mut b = vec![0.0f64; n];
        let sum = fold(
            (&a[..], &mut b[..]),
            &|(a, b): (&[f64], &mut [f64])| {
                let mut s = 0.0;
                for (x, y) in a.iter().zip(b.iter_mut()) {
                    *y += 1.0;
                    s += x;
                }
                s
            },
            &|x, y| x + y,
        );
        assert!(b.iter().all(|&y| y == 1.0));
        let again = fold(&a[..], &|a: &[f64]| a.iter().sum::<f64>(), &|x, y| x + y);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let single = pool.install(|| fold(&a[..], &|a: &[f64]| a.iter().sum::<f64>(), &|x, y| x + y));
        assert_eq!(sum.to_bits(), again.to_bits());
        assert_eq!(sum.to_bits(), single.to_bits());
    }
}
