//! A tiny candle regression trained through `VarOptimizer` (autograd gradients, in-place
//! update of the variables) follows the trajectory of the slice kernel driven with the same
//! gradients computed by hand.
#![cfg(feature = "candle")]

use candle_core::{Device, Tensor, Var};
use candle_nn::Optimizer as _;
use mada::candle::VarOptimizer;
use mada::{AnyOptimizer, Optimizer, OptimizerSpec};

const N: usize = 12;
const D: usize = 3;

fn data() -> (Vec<f64>, Vec<f64>) {
    let x: Vec<f64> = (0..N * D).map(|i| ((i * 37 % 11) as f64 - 5.0) / 5.0).collect();
    let y: Vec<f64> = (0..N)
        .map(|r| 0.7 * x[r * D] - 1.3 * x[r * D + 1] + 0.2 * x[r * D + 2] + 0.5 + 0.05 * (r as f64).sin())
        .collect();
    (x, y)
}

/// Gradients of mean((X·w + b − y)²) with respect to w and b.
fn hand_gradients(x: &[f64], y: &[f64], w: &[f64], b: f64) -> (Vec<f64>, f64) {
    let mut gw = vec![0.0; D];
    let mut gb = 0.0;
    for r in 0..N {
        let pred: f64 = (0..D).map(|j| x[r * D + j] * w[j]).sum::<f64>() + b;
        let e = 2.0 * (pred - y[r]) / N as f64;
        for j in 0..D {
            gw[j] += e * x[r * D + j];
        }
        gb += e;
    }
    (gw, gb)
}

fn follow(spec: &str) {
    let spec: OptimizerSpec = serde_json::from_str(spec).unwrap();
    let (x, y) = data();
    let dev = Device::Cpu;
    let xt = Tensor::from_vec(x.clone(), (N, D), &dev).unwrap();
    let yt = Tensor::from_vec(y.clone(), N, &dev).unwrap();
    let w = Var::new(&[0.1f64, -0.2, 0.3], &dev).unwrap();
    let b = Var::new(&[0.0f64], &dev).unwrap();
    let lr = 0.05;
    let mut opt =
        VarOptimizer::new(vec![w.clone(), b.clone()], (AnyOptimizer::<f64>::from_spec(&spec).unwrap(), lr)).unwrap();

    let mut slice_opt = AnyOptimizer::<f64>::from_spec(&spec).unwrap();
    let (mut ws, mut bs) = (vec![0.1f64, -0.2, 0.3], vec![0.0f64]);
    for step in 0..40 {
        let pred = xt
            .matmul(&w.as_tensor().unsqueeze(1).unwrap())
            .unwrap()
            .squeeze(1)
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap();
        let loss = (pred - &yt).unwrap().sqr().unwrap().mean_all().unwrap();
        opt.backward_step(&loss).unwrap();

        let (gw, gb) = hand_gradients(&x, &y, &ws, bs[0]);
        slice_opt.step(&mut [&mut ws[..], &mut bs[..]], &[&gw[..], &[gb][..]], lr).unwrap();

        let wc = w.as_tensor().to_vec1::<f64>().unwrap();
        let bc = b.as_tensor().to_vec1::<f64>().unwrap();
        for j in 0..D {
            assert!((wc[j] - ws[j]).abs() < 1e-12, "{} step {step}: {wc:?} vs {ws:?}", spec.name());
        }
        assert!((bc[0] - bs[0]).abs() < 1e-12, "{} step {step}", spec.name());
    }
    if let (Some(a), Some(b)) = (opt.optimizer().as_mada(), slice_opt.as_mada()) {
        let (qa, qb) = (a.coefficients().to_array(), b.coefficients().to_array());
        assert!(qa.iter().zip(&qb).all(|(x, y)| (x - y).abs() < 1e-12), "{qa:?} vs {qb:?}");
        assert_ne!(qa, mada::Coefficients::avgrad(0.9, 0.95).to_array(), "the coefficients moved");
    }
}

#[test]
fn candle_training_follows_the_slice_kernels() {
    follow(r#"{"name": "adam", "beta2": 0.95}"#);
    follow(r#"{"name": "lion"}"#);
    follow(
        r#"{"name": "mada", "coefficients": {"beta1": 0.9, "beta2": 0.95, "beta3": 0, "rho": 0, "c": 1, "gamma": 1},
            "hyper": {"lr": {"beta1": 0.01, "beta2": 0.01, "beta3": 0.1, "rho": 0.1, "c": 0.1, "gamma": 0.1}, "clip": 10}}"#,
    );
}

#[test]
fn dtype_mismatch_is_an_error() {
    let w = Var::new(&[1.0f32], &Device::Cpu).unwrap();
    let spec: OptimizerSpec = serde_json::from_str(r#"{"name": "adam"}"#).unwrap();
    let r = VarOptimizer::new(vec![w], (AnyOptimizer::<f64>::from_spec(&spec).unwrap(), 0.1));
    assert!(r.err().unwrap().to_string().contains("dtype"));
}
