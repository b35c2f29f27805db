//! Save → restore → continue equals an uninterrupted run, bit for bit, for every optimizer,
//! through both serde formats the workspace uses (JSON for humans, bincode for checkpoints).

use mada::{AnyOptimizer, Float, Optimizer, OptimizerSpec};

const SPECS: &[&str] = &[
    r#"{"name": "sgd", "momentum": 0.9}"#,
    r#"{"name": "adam", "weight_decay": 0.1, "decoupled": true}"#,
    r#"{"name": "amsgrad"}"#,
    r#"{"name": "avgrad"}"#,
    r#"{"name": "yogi"}"#,
    r#"{"name": "adan"}"#,
    r#"{"name": "lion"}"#,
    r#"{"name": "mada", "coefficients": {"beta1": 0.9, "beta2": 0.95, "beta3": 0.2, "rho": 0.5, "c": 0.9, "gamma": 0.9},
        "hyper": {"lr": {"beta1": 0.01, "beta2": 0.01, "beta3": 0.01, "rho": 0.01, "c": 0.01, "gamma": 0.01},
                  "momentum": {"rho": 0.9}, "clip": 1.0, "start": 2}}"#,
    r#"{"name": "mada", "semantics": "textbook", "coefficients": {"beta1": 0.9, "beta2": 0.95, "beta3": 0.2, "rho": 0.5, "c": 0.9, "gamma": 0.5},
        "hyper": {"lr": {"beta1": 0.01, "beta2": 0.01}}}"#,
];

fn grads<T: Float>(x: &[Vec<T>], step: usize) -> Vec<Vec<T>> {
    x.iter()
        .enumerate()
        .map(|(k, t)| {
            t.iter()
                .enumerate()
                .map(|(i, &v)| T::of(v.f64() * (1.0 + 0.1 * k as f64) - ((i + step) as f64 * 0.37).sin()))
                .collect()
        })
        .collect()
}

fn run_steps<T: Float>(opt: &mut AnyOptimizer<T>, x: &mut [Vec<T>], from: usize, to: usize) {
    for step in from..to {
        let g = grads(x, step);
        let gs: Vec<&[T]> = g.iter().map(|v| &v[..]).collect();
        let mut ps: Vec<&mut [T]> = x.iter_mut().map(|v| &mut v[..]).collect();
        opt.step(&mut ps, &gs, 1e-2 * (1.0 + step as f64).recip()).unwrap();
    }
}

fn check<T: Float>(spec: &str) {
    let spec: OptimizerSpec = serde_json::from_str(spec).unwrap();
    let x0: Vec<Vec<T>> =
        vec![(0..40).map(|i| T::of((i as f64 * 0.3).cos())).collect(), (0..7).map(|i| T::of(i as f64 - 3.0)).collect()];
    let mut straight = AnyOptimizer::<T>::from_spec(&spec).unwrap();
    let mut xs = x0.clone();
    run_steps(&mut straight, &mut xs, 0, 12);

    for format in ["json", "bincode"] {
        let mut first = AnyOptimizer::<T>::from_spec(&spec).unwrap();
        let mut xr = x0.clone();
        run_steps(&mut first, &mut xr, 0, 5);
        let mut resumed: AnyOptimizer<T> = match format {
            "json" => serde_json::from_str(&serde_json::to_string(&first).unwrap()).unwrap(),
            _ => {
                let cfg = bincode::config::standard();
                bincode::serde::decode_from_slice(&bincode::serde::encode_to_vec(&first, cfg).unwrap(), cfg).unwrap().0
            }
        };
        drop(first);
        run_steps(&mut resumed, &mut xr, 5, 12);
        let same = xs.iter().flatten().zip(xr.iter().flatten()).all(|(a, b)| a.f64().to_bits() == b.f64().to_bits());
        assert!(same, "{} ({}, {format}): resumed run differs", spec.name(), T::NAME);
        if let (Some(a), Some(b)) = (straight.as_mada(), resumed.as_mada()) {
            assert_eq!(a.coefficients(), b.coefficients());
        }
    }
}

#[test]
fn every_optimizer_resumes_bit_identically() {
    for spec in SPECS {
        check::<f32>(spec);
        check::<f64>(spec);
    }
}
