//! With learning disabled, the corners of the MADA family are the baselines they name, and the
//! same optimizer reached two ways (typed constructor, spec) gives equal updates.

use mada::baselines::{AdamConfig, LionConfig, YogiConfig};
use mada::{
    Adam, AmsGrad, AnyOptimizer, AvGrad, Coefficients, HyperConfig, Lion, Mada, MadaConfig, Optimizer, OptimizerSpec,
    RunningMoment, Semantics, Yogi,
};

/// A nonconvex, non-separable test gradient: ∇ of Σ (x_i² − 1)²/4 + 0.3·x_i·x_{i+1} + a drift
/// that changes sign, so every branch (Yogi's sign switch, Lion's sign) is exercised.
fn gradient(x: &[f64], step: usize) -> Vec<f64> {
    let n = x.len();
    (0..n)
        .map(|i| {
            let neighbours = 0.3 * (x[(i + 1) % n] + x[(i + n - 1) % n]);
            x[i] * (x[i] * x[i] - 1.0) + neighbours + 0.2 * ((step + i) as f64 * 0.7).sin()
        })
        .collect()
}

fn x0() -> Vec<f64> {
    (0..7).map(|i| 1.5 * ((i as f64) * 1.3).cos()).collect()
}

/// Largest |difference| of the trajectories of two optimizers over `steps` steps.
fn max_trajectory_gap(a: &mut dyn Optimizer<f64>, b: &mut dyn Optimizer<f64>, steps: usize, lr: f64) -> f64 {
    let (mut xa, mut xb) = (x0(), x0());
    let mut gap = 0.0f64;
    for step in 0..steps {
        let ga = gradient(&xa, step);
        let gb = gradient(&xb, step);
        a.step(&mut [&mut xa[..]], &[&ga[..]], lr).unwrap();
        b.step(&mut [&mut xb[..]], &[&gb[..]], lr).unwrap();
        gap = xa.iter().zip(&xb).map(|(p, q)| (p - q).abs()).fold(gap, f64::max);
    }
    gap
}

/// [`max_trajectory_gap`] through the device path (state as candle tensors: what a CUDA device
/// runs), on the CPU device, stepped as the trainer steps.
#[cfg(feature = "candle")]
fn device_path_gap(a: AnyOptimizer<f64>, b: AnyOptimizer<f64>, steps: usize, lr: f64) -> f64 {
    use candle_core::{Device, Tensor, Var};
    use mada::candle::VarOptimizer;
    let var = || Var::from_tensor(&Tensor::new(x0().as_slice(), &Device::Cpu).unwrap()).unwrap();
    let (va, vb) = (var(), var());
    let mut a = VarOptimizer::with_optimizer(vec![va.clone()], a, lr).unwrap().with_device_path_on_cpu();
    let mut b = VarOptimizer::with_optimizer(vec![vb.clone()], b, lr).unwrap().with_device_path_on_cpu();
    let mut gap = 0.0f64;
    for step in 0..steps {
        for (opt, v) in [(&mut a, &va), (&mut b, &vb)] {
            let g = gradient(&v.as_tensor().to_vec1::<f64>().unwrap(), step);
            let grads = mada::candle::gradient_store(
                std::slice::from_ref(v),
                &[Tensor::new(g.as_slice(), &Device::Cpu).unwrap()],
            )
            .unwrap();
            opt.update(&grads).unwrap();
        }
        let (xa, xb) = (va.as_tensor().to_vec1::<f64>().unwrap(), vb.as_tensor().to_vec1::<f64>().unwrap());
        gap = xa.iter().zip(&xb).map(|(p, q)| (p - q).abs()).fold(gap, f64::max);
    }
    gap
}

fn frozen_mada(q: Coefficients, eps: f64, semantics: Semantics) -> Mada<f64> {
    Mada::new(MadaConfig { eps, semantics, ..MadaConfig::default() }, HyperConfig::frozen(), q).unwrap()
}

#[test]
fn adam_corner_is_adam_up_to_the_initial_v() {
    let adam_cfg = AdamConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, ..AdamConfig::default() };
    let mut adam = Adam::<f64>::new(adam_cfg).unwrap();
    let mut mada = frozen_mada(Coefficients::adam(0.9, 0.95), 1e-8, Semantics::OfficialCode);
    let gap = max_trajectory_gap(&mut mada, &mut adam, 200, 1e-2);
    assert!(gap < 1e-11, "gap {gap:e}");
    #[cfg(feature = "candle")]
    {
        let mada = frozen_mada(Coefficients::adam(0.9, 0.95), 1e-8, Semantics::OfficialCode);
        let gap =
            device_path_gap(AnyOptimizer::Mada(mada), AnyOptimizer::Adam(Adam::new(adam_cfg).unwrap()), 200, 1e-2);
        assert!(gap < 1e-11, "device path: gap {gap:e}");
    }
    // v_0 = 1e-15 is the whole difference: with v_0 = 0 only rounding remains.
    let mut adam = Adam::<f64>::new(adam_cfg).unwrap();
    let cfg = MadaConfig { eps: 1e-8, initial_v: 0.0, ..MadaConfig::default() };
    let mut mada = Mada::new(cfg, HyperConfig::frozen(), Coefficients::adam(0.9, 0.95)).unwrap();
    let gap0 = max_trajectory_gap(&mut mada, &mut adam, 200, 1e-2);
    assert!(gap0 < 1e-13, "gap with v0 = 0: {gap0:e}");
}

#[test]
fn rho_zero_is_avgrad() {
    let cfg = AdamConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, ..AdamConfig::default() };
    let mut avgrad = AvGrad::<f64>::new(cfg).unwrap();
    let mut mada = frozen_mada(Coefficients::avgrad(0.9, 0.99), 1e-8, Semantics::OfficialCode);
    let gap = max_trajectory_gap(&mut mada, &mut avgrad, 200, 1e-2);
    assert!(gap < 1e-11, "gap {gap:e}");
    #[cfg(feature = "candle")]
    {
        let mada = frozen_mada(Coefficients::avgrad(0.9, 0.99), 1e-8, Semantics::OfficialCode);
        let gap = device_path_gap(AnyOptimizer::Mada(mada), AnyOptimizer::AvGrad(AvGrad::new(cfg).unwrap()), 200, 1e-2);
        assert!(gap < 1e-11, "device path: gap {gap:e}");
        // The device-path comparison can see a difference.
        let adam = AnyOptimizer::Adam(Adam::new(cfg).unwrap());
        assert!(device_path_gap(adam, AnyOptimizer::AvGrad(AvGrad::new(cfg).unwrap()), 200, 1e-2) > 1e-3);
    }
    // ... and AVGrad really differs from Adam on this problem.
    let mut adam = Adam::<f64>::new(cfg).unwrap();
    let mut avgrad = AvGrad::<f64>::new(cfg).unwrap();
    assert!(max_trajectory_gap(&mut adam, &mut avgrad, 200, 1e-2) > 1e-3);
}

#[test]
fn rho_zero_with_the_running_max_is_amsgrad() {
    let cfg = AdamConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, ..AdamConfig::default() };
    let mut amsgrad = AmsGrad::<f64>::new(cfg).unwrap();
    let config = MadaConfig { eps: 1e-8, running: RunningMoment::Max, ..MadaConfig::default() };
    let mut mada = Mada::new(config, HyperConfig::frozen(), Coefficients::avgrad(0.9, 0.99)).unwrap();
    let gap = max_trajectory_gap(&mut mada, &mut amsgrad, 200, 1e-2);
    assert!(gap < 1e-11, "gap {gap:e}");
    #[cfg(feature = "candle")]
    {
        let mada = Mada::new(config, HyperConfig::frozen(), Coefficients::avgrad(0.9, 0.99)).unwrap();
        let amsgrad = AnyOptimizer::AmsGrad(AmsGrad::new(cfg).unwrap());
        let gap = device_path_gap(AnyOptimizer::Mada(mada), amsgrad, 200, 1e-2);
        assert!(gap < 1e-11, "device path: gap {gap:e}");
    }
    // ... AMSGrad differs from AVGrad here, and ρ = 1 with the maximum is still Adam.
    let mut avgrad = AvGrad::<f64>::new(cfg).unwrap();
    let mut amsgrad = AmsGrad::<f64>::new(cfg).unwrap();
    assert!(max_trajectory_gap(&mut avgrad, &mut amsgrad, 200, 1e-2) > 1e-3);
    let mut adam = Adam::<f64>::new(cfg).unwrap();
    let mut mada = Mada::new(config, HyperConfig::frozen(), Coefficients::adam(0.9, 0.99)).unwrap();
    assert!(max_trajectory_gap(&mut mada, &mut adam, 200, 1e-2) < 1e-11);
}

#[test]
fn c_zero_is_yogis_recursion() {
    // Yogi with v_0 = m_0 = 1e-15 and MADA's ε: the same recursion v ← v − (1−β2)·sign(v − g²)·g².
    let yogi_cfg = YogiConfig { beta1: 0.9, beta2: 0.99, eps: 1e-6, initial_accumulator: 1e-15 };
    let mut yogi = Yogi::<f64>::new(yogi_cfg).unwrap();
    let mut mada = frozen_mada(Coefficients::yogi(0.9, 0.99), 1e-6, Semantics::OfficialCode);
    let gap = max_trajectory_gap(&mut mada, &mut yogi, 200, 1e-2);
    assert!(gap < 1e-11, "gap {gap:e}");
    #[cfg(feature = "candle")]
    {
        let mada = frozen_mada(Coefficients::yogi(0.9, 0.99), 1e-6, Semantics::OfficialCode);
        let gap =
            device_path_gap(AnyOptimizer::Mada(mada), AnyOptimizer::Yogi(Yogi::new(yogi_cfg).unwrap()), 200, 1e-2);
        assert!(gap < 1e-11, "device path: gap {gap:e}");
    }
    let mut adam =
        Adam::<f64>::new(AdamConfig { beta1: 0.9, beta2: 0.99, eps: 1e-6, ..AdamConfig::default() }).unwrap();
    let mut yogi = Yogi::<f64>::new(yogi_cfg).unwrap();
    assert!(max_trajectory_gap(&mut adam, &mut yogi, 200, 1e-2) > 1e-4);
}

#[test]
fn gamma_zero_is_lions_sign_step() {
    // Textbook: exactly Lion(βL1, βL2). Official: the direction uses the updated momentum,
    // which is Lion with β1 = βL1·βL2 = 0.931.
    let mut lion = Lion::<f64>::new(LionConfig { beta1: 0.95, beta2: 0.98 }).unwrap();
    let mut mada = frozen_mada(Coefficients::lion(), 1e-6, Semantics::Textbook);
    assert_eq!(max_trajectory_gap(&mut mada, &mut lion, 200, 1e-2), 0.0);
    let mut lion = Lion::<f64>::new(LionConfig { beta1: 0.95 * 0.98, beta2: 0.98 }).unwrap();
    let mut mada = frozen_mada(Coefficients::lion(), 1e-6, Semantics::OfficialCode);
    let gap = max_trajectory_gap(&mut mada, &mut lion, 200, 1e-2);
    assert!(gap < 1e-12, "gap {gap:e}");
    #[cfg(feature = "candle")]
    {
        let textbook = frozen_mada(Coefficients::lion(), 1e-6, Semantics::Textbook);
        let lion = AnyOptimizer::Lion(Lion::new(LionConfig { beta1: 0.95, beta2: 0.98 }).unwrap());
        assert_eq!(device_path_gap(AnyOptimizer::Mada(textbook), lion, 200, 1e-2), 0.0, "device path, textbook");
        let official = frozen_mada(Coefficients::lion(), 1e-6, Semantics::OfficialCode);
        let lion = AnyOptimizer::Lion(Lion::new(LionConfig { beta1: 0.95 * 0.98, beta2: 0.98 }).unwrap());
        let gap = device_path_gap(AnyOptimizer::Mada(official), lion, 200, 1e-2);
        assert!(gap < 1e-12, "device path: gap {gap:e}");
    }
    // The two readings are different optimizers.
    let mut a = frozen_mada(Coefficients::lion(), 1e-6, Semantics::Textbook);
    let mut b = frozen_mada(Coefficients::lion(), 1e-6, Semantics::OfficialCode);
    assert!(max_trajectory_gap(&mut a, &mut b, 200, 1e-2) > 1e-3);
}

#[test]
fn the_same_optimizer_built_two_ways_gives_equal_updates() {
    let spec: OptimizerSpec = serde_json::from_str(
        r#"{"name": "mada", "eps": 1e-8,
            "coefficients": {"beta1": 0.85, "beta2": 0.99, "beta3": 0.1, "rho": 0.5, "c": 0.9, "gamma": 0.95},
            "hyper": {"lr": {"beta1": 0.0025, "beta2": 0.0025, "beta3": 0.0025, "rho": 0.0025, "c": 0.0025, "gamma": 0.0025},
                      "momentum": {"beta1": 0.5, "beta2": 0.5, "beta3": 0.5, "rho": 0.5, "c": 0.5}, "clip": 10}}"#,
    )
    .unwrap();
    let mut from_spec = AnyOptimizer::<f64>::from_spec(&spec).unwrap();
    let q = Coefficients { beta1: 0.85, beta2: 0.99, beta3: 0.1, rho: 0.5, c: 0.9, gamma: 0.95 };
    let mut typed = Mada::<f64>::new(MadaConfig::with_eps(1e-8), HyperConfig::official_shakespeare(), q).unwrap();
    assert_eq!(max_trajectory_gap(&mut from_spec, &mut typed, 100, 1e-2), 0.0);
    assert_ne!(from_spec.as_mada().unwrap().coefficients(), q, "the coefficients were learned");

    // The per-tensor protocol (prepare, then update each tensor) equals `step`.
    let mut a = Mada::<f64>::new(MadaConfig::default(), HyperConfig::mada([1e-2; 6]), q).unwrap();
    let mut b = a.clone();
    let (mut x1, mut x2) = (x0(), x0());
    let (mut y1, mut y2) = (vec![0.3, -0.2], vec![0.3, -0.2]);
    for step in 0..20 {
        let gx = gradient(&x1, step);
        let gy: Vec<f64> = y1.iter().map(|v| 2.0 * v - 0.1).collect();
        a.step(&mut [&mut x1[..], &mut y1[..]], &[&gx[..], &gy[..]], 1e-2).unwrap();
        b.prepare(&[&gx[..], &gy[..]]).unwrap();
        b.update_tensor(0, &mut x2, &gx, 1e-2).unwrap();
        b.update_tensor(1, &mut y2, &gy, 1e-2).unwrap();
    }
    assert_eq!((x1, y1), (x2, y2));
}

#[test]
fn f32_runs_track_f64_runs() {
    let q = Coefficients { beta1: 0.9, beta2: 0.95, beta3: 0.2, rho: 0.5, c: 0.8, gamma: 0.9 };
    let mut a = Mada::<f64>::new(MadaConfig::default(), HyperConfig::mada([1e-2; 6]), q).unwrap();
    let mut b = Mada::<f32>::new(MadaConfig::default(), HyperConfig::mada([1e-2; 6]), q).unwrap();
    let mut xa = x0();
    let mut xb: Vec<f32> = x0().iter().map(|&v| v as f32).collect();
    for step in 0..50 {
        let ga = gradient(&xa, step);
        let gb: Vec<f32> =
            gradient(&xb.iter().map(|&v| v as f64).collect::<Vec<_>>(), step).iter().map(|&v| v as f32).collect();
        a.step(&mut [&mut xa[..]], &[&ga[..]], 1e-2).unwrap();
        b.step(&mut [&mut xb[..]], &[&gb[..]], 1e-2).unwrap();
    }
    let gap = xa.iter().zip(&xb).map(|(p, q)| (p - *q as f64).abs()).fold(0.0, f64::max);
    assert!(gap < 1e-3, "f32 vs f64 gap {gap:e}");
}

#[test]
fn wrong_shapes_are_errors_not_panics() {
    let mut opt =
        Mada::<f64>::new(MadaConfig::default(), HyperConfig::mada([1e-3; 6]), Coefficients::default()).unwrap();
    let mut x = [1.0, 2.0];
    let e = opt.step(&mut [&mut x[..]], &[&[1.0][..]], 0.1).unwrap_err().to_string();
    assert!(e.contains("tensor 0") && e.contains("2 elements"), "{e}");
    opt.step(&mut [&mut x[..]], &[&[1.0, 1.0][..]], 0.1).unwrap();
    let mut y = [1.0, 2.0, 3.0];
    let e = opt.step(&mut [&mut y[..]], &[&[1.0, 1.0, 1.0][..]], 0.1).unwrap_err().to_string();
    assert!(e.contains("created for 2"), "{e}");
    let e = opt.step(&mut [&mut x[..]], &[], 0.1).unwrap_err().to_string();
    assert!(e.contains("1 parameter tensors but 0 gradients"), "{e}");
    let e = opt.step(&mut [&mut x[..]], &[&[1.0, 1.0][..]], f64::NAN).unwrap_err().to_string();
    assert!(e.contains("lr"), "{e}");
}
