//! Gradient clipping and decoupled weight decay, as the paper's training loops apply them
//! outside the optimizer (`train.py` and `train_ddp.py` of the official code).

use crate::{par, Float};

/// Global L2 norm of a list of tensors, accumulated in f64 (deterministic, see [`par`]).
pub fn global_norm<T: Float>(tensors: &[&[T]]) -> f64 {
    tensors
        .iter()
        .map(|t| par::fold(*t, &|x: &[T]| x.iter().map(|&v| v.f64() * v.f64()).sum::<f64>(), &|a, b| a + b))
        .sum::<f64>()
        .sqrt()
}

/// `torch.nn.utils.clip_grad_norm_`: if the global norm exceeds `max_norm`, scale every
/// gradient by `max_norm / (norm + 1e-6)`. Returns the norm before clipping (NaN or ∞ is
/// returned as is and nothing is scaled, so the caller can stop the run and name the step).
pub fn clip_grad_norm<T: Float>(grads: &mut [&mut [T]], max_norm: f64) -> f64 {
    let norm = {
        let views: Vec<&[T]> = grads.iter().map(|g| &**g).collect();
        global_norm(&views)
    };
    if norm.is_finite() && norm > max_norm {
        let scale = T::of(max_norm / (norm + 1e-6));
        for g in grads.iter_mut() {
            par::for_each(&mut **g, &|x: &mut [T]| x.iter_mut().for_each(|v| *v = *v * scale));
        }
    }
    norm
}

/// Decoupled weight decay, `p ← p − lr·wd·p`, as the official loops apply it to tensors of
/// dimension ≥ 2 before the optimizer step (the caller chooses the tensors).
pub fn decoupled_weight_decay<T: Float>(param: &mut [T], lr: f64, weight_decay: f64) {
    if weight_decay == 0.0 || lr == 0.0 {
        return;
    }
    let k = T::of(lr * weight_decay);
    par::for_each(param, &|x: &mut [T]| x.iter_mut().for_each(|v| *v = *v - k * *v));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_scales_to_max_norm() {
        let mut a = [3.0f64, 0.0];
        let mut b = [0.0f64, 4.0];
        let n = clip_grad_norm(&mut [&mut a[..], &mut b[..]], 1.0);
        assert_eq!(n, 5.0);
        let after = global_norm(&[&a[..], &b[..]]);
        assert!((after - 5.0 / (5.0 + 1e-6)).abs() < 1e-12);
        // below the threshold: untouched
        let mut c = [0.1f64];
        assert_eq!(clip_grad_norm(&mut [&mut c[..]], 1.0), 0.1);
        assert_eq!(c[0], 0.1);
    }

    #[test]
    fn non_finite_norm_is_reported_not_applied() {
        let mut a = [f32::NAN, 1.0];
        assert!(clip_grad_norm(&mut [&mut a[..]], 1.0).is_nan());
        assert_eq!(a[1], 1.0);
    }

    #[test]
    fn weight_decay_shrinks() {
        let mut p = vec![2.0f64, -1.0];
        decoupled_weight_decay(&mut p, 0.1, 0.5);
        assert_eq!(p, vec![2.0 - 0.05 * 2.0, -1.0 + 0.05]);
    }
}
