//! Golden vectors of the official `gdtuo.Meta` (HEAD 2beded8) run
//! unmodified in float64 on a 3-parameter problem with a time-varying target, in three
//! configurations. Checked here: the loss and gradient seen at each step, the hyper-gradient
//! the hyper-step used, the coefficients after the hyper-step and clamp, and the parameters
//! after each update (parameters and coefficients to 1e-9 absolute — the table prints 12
//! significant digits — hyper-gradients to 1e-6 relative).

use mada::{Coef, Coefficients, HyperConfig, Mada, MadaConfig};

struct Row {
    loss: f64,
    grad: [f64; 3],
    hypergrad: [f64; 6],
    coefficients: [f64; 6],
    w: [f64; 3],
}

/// loss_k(w) = ½ Σ a_i (w_i − b_i(k))², b(k) = (0.3, −0.1, 2.0)·(1 + 0.1·(k mod 3)).
fn problem(k: usize, w: &[f64]) -> (f64, Vec<f64>) {
    let a = [1.0, 3.0, 0.2];
    let s = 1.0 + 0.1 * (k % 3) as f64;
    let b = [0.3 * s, -0.1 * s, 2.0 * s];
    let loss = (0..3).map(|i| 0.5 * a[i] * (w[i] - b[i]).powi(2)).sum();
    let grad = (0..3).map(|i| a[i] * (w[i] - b[i])).collect();
    (loss, grad)
}

fn check(config: MadaConfig, hyper: HyperConfig, q0: Coefficients, lr: f64, rows: &[Row]) {
    #[cfg(feature = "candle")]
    check_device_path(config, hyper, q0, lr, rows);
    let mut opt = Mada::<f64>::new(config, hyper, q0).unwrap();
    let mut w = vec![1.0, -2.0, 0.5];
    for (k, row) in rows.iter().enumerate() {
        let (loss, grad) = problem(k, &w);
        assert!((loss - row.loss).abs() <= 1e-9 * row.loss.abs(), "step {k}: loss {loss} vs {}", row.loss);
        for i in 0..3 {
            assert!((grad[i] - row.grad[i]).abs() <= 1e-9, "step {k}: grad {grad:?} vs {:?}", row.grad);
        }
        let info = opt.step_with_info(&mut [&mut w[..]], &[&grad[..]], lr).unwrap();
        let h = info.hypergradient.unwrap_or([0.0; 6]);
        for c in Coef::ALL {
            let (ours, reference) = (h[c.index()], row.hypergrad[c.index()]);
            assert!(
                (ours - reference).abs() <= 1e-6 * reference.abs() + 1e-12,
                "step {k}: hyper-gradient of {c} {ours:e} vs official {reference:e}"
            );
        }
        let q = info.coefficients.to_array();
        for c in Coef::ALL {
            let i = c.index();
            assert!(
                (q[i] - row.coefficients[i]).abs() <= 1e-9,
                "step {k}: {c} = {} vs official {}",
                q[i],
                row.coefficients[i]
            );
        }
        for i in 0..3 {
            assert!((w[i] - row.w[i]).abs() <= 1e-9, "step {k}: w {w:?} vs official {:?}", row.w);
        }
    }
}

/// The same rows through the device path (state as candle tensors, on the CPU device), stepped
/// as the trainer steps: the hyper-gradient on the new gradient, the coefficient step, the update.
#[cfg(feature = "candle")]
fn check_device_path(config: MadaConfig, hyper: HyperConfig, q0: Coefficients, lr: f64, rows: &[Row]) {
    use candle_core::{Device, Tensor, Var};
    use mada::candle::VarOptimizer;
    use mada::AnyOptimizer;
    let w = Var::from_tensor(&Tensor::new(&[1.0f64, -2.0, 0.5], &Device::Cpu).unwrap()).unwrap();
    let mada = AnyOptimizer::Mada(Mada::<f64>::new(config, hyper, q0).unwrap());
    let mut opt = VarOptimizer::with_optimizer(vec![w.clone()], mada, lr).unwrap().with_device_path_on_cpu();
    for (k, row) in rows.iter().enumerate() {
        let (_, grad) = problem(k, &w.as_tensor().to_vec1::<f64>().unwrap());
        let grads = mada::candle::gradient_store(
            std::slice::from_ref(&w),
            &[Tensor::new(grad.as_slice(), &Device::Cpu).unwrap()],
        )
        .unwrap();
        let h = opt.mada_hypergradient(&grads).unwrap();
        if let Some(h) = h {
            opt.apply_mada_hypergradient(h).unwrap();
        }
        opt.update(&grads).unwrap();
        let h = h.unwrap_or([0.0; 6]);
        for c in Coef::ALL {
            let (ours, reference) = (h[c.index()], row.hypergrad[c.index()]);
            assert!(
                (ours - reference).abs() <= 1e-6 * reference.abs() + 1e-12,
                "device path, step {k}: hyper-gradient of {c} {ours:e} vs official {reference:e}"
            );
        }
        let q = opt.optimizer().as_mada().unwrap().coefficients().to_array();
        let now = w.as_tensor().to_vec1::<f64>().unwrap();
        for i in 0..6 {
            assert!(
                (q[i] - row.coefficients[i]).abs() <= 1e-9,
                "device path, step {k}: q {q:?} vs {:?}",
                row.coefficients
            );
        }
        for i in 0..3 {
            assert!((now[i] - row.w[i]).abs() <= 1e-9, "device path, step {k}: w {now:?} vs official {:?}", row.w);
        }
    }
}

#[test]
fn a_interior_coefficients_with_hyper_sgd() {
    let q0 = Coefficients { beta1: 0.9, beta2: 0.95, beta3: 0.3, rho: 0.6, c: 0.7, gamma: 0.8 };
    check(MadaConfig::with_eps(1e-6), HyperConfig::mada([0.1; 6]), q0, 1e-2, &A_INTERIOR);
}

#[test]
fn b_frozen_adam_still_reports_its_hypergradients() {
    // Hyper-learning-rate 0: the coefficients never move, the hyper-gradient is still computed.
    check(MadaConfig::with_eps(1e-6), HyperConfig::mada([0.0; 6]), Coefficients::adam(0.9, 0.95), 1e-2, &B_ADAM_FROZEN);
}

#[test]
fn c_the_train_py_hyper_optimizer_with_momentum() {
    let hyper = HyperConfig::mada([2.5e-3; 6]).with_momentum([0.5, 0.5, 0.5, 0.5, 0.5, 0.0]);
    check(MadaConfig::with_eps(1e-8), hyper, Coefficients::adam(0.85, 0.99), 1e-3, &C_TRAINPY_HYPER);
}

const A_INTERIOR: [Row; 6] = [
    Row {
        loss: 5.885,
        grad: [0.7, -5.7, -0.3],
        hypergrad: [
            0.000000000e+00,
            0.000000000e+00,
            0.000000000e+00,
            0.000000000e+00,
            0.000000000e+00,
            0.000000000e+00,
        ],
        coefficients: [0.9, 0.95, 0.3, 0.6, 0.7, 0.8],
        w: [0.990166162455, -1.99371076981, 0.509279981333],
    },
    Row {
        loss: 5.82631249562,
        grad: [0.660166162455, -5.65113230943, -0.338144003733],
        hypergrad: [
            0.000000000e+00,
            1.274892342e-01,
            1.159453124e-01,
            0.000000000e+00,
            -6.938893904e-18,
            2.665401999e-02,
        ],
        coefficients: [0.9, 0.93725107658, 0.288405468761, 0.6, 0.7, 0.797334598001],
        w: [0.979997032796, -1.98468686698, 0.519529286701],
    },
    Row {
        loss: 5.76140083855,
        grad: [0.619997032796, -5.59406060095, -0.37609414266],
        hypergrad: [
            -2.398318240e-01,
            2.642090881e-01,
            2.162042901e-02,
            5.247743743e-03,
            -5.739838407e-04,
            6.599142419e-03,
        ],
        coefficients: [0.923983182399, 0.910830167769, 0.286243425859, 0.599475225626, 0.700057398384, 0.79667468376],
        w: [0.967190974626, -1.97223706435, 0.532349160287],
    },
    Row {
        loss: 5.69587923471,
        grad: [0.667190974626, -5.61671119304, -0.293530167943],
        hypergrad: [
            -6.270745175e-01,
            2.576408081e-01,
            7.556315880e-03,
            1.269435294e-02,
            -1.372567413e-03,
            -2.066053921e-02,
        ],
        coefficients: [0.98669063415, 0.885066086958, 0.285487794271, 0.598205790332, 0.700194655125, 0.798740737681],
        w: [0.917201070811, -1.92224173116, 0.583396263393],
    },
    Row {
        loss: 5.36007345114,
        grad: [0.587201070811, -5.43672519348, -0.323320747321],
        hypergrad: [
            -2.161687248e+01,
            8.140371522e-01,
            2.436654510e-03,
            7.114766722e-02,
            -8.745911504e-03,
            -3.182473586e-01,
        ],
        coefficients: [0.99, 0.803662371733, 0.28524412882, 0.591091023609, 0.701069246276, 0.830565473538],
        w: [0.852880501765, -1.85948864444, 0.646669874258],
    },
    Row {
        loss: 4.96761336372,
        grad: [0.492880501765, -5.21846593333, -0.350666025148],
        hypergrad: [
            -3.546161286e+01,
            3.800262065e-01,
            -1.668841437e-03,
            1.043549159e-01,
            -1.869270480e-02,
            -3.861766361e-01,
        ],
        coefficients: [0.99, 0.765659751086, 0.285411012964, 0.580655532016, 0.702938516756, 0.869183137144],
        w: [0.79391655222, -1.80440532847, 0.699892155619],
    },
];

const B_ADAM_FROZEN: [Row; 6] = [
    Row {
        loss: 5.885,
        grad: [0.7, -5.7, -0.3],
        hypergrad: [
            0.000000000e+00,
            0.000000000e+00,
            0.000000000e+00,
            0.000000000e+00,
            0.000000000e+00,
            0.000000000e+00,
        ],
        coefficients: [0.9, 0.95, 0.0, 1.0, 1.0, 1.0],
        w: [0.990000014286, -1.99000000175, 0.509999966667],
    },
    Row {
        loss: 5.80501003059,
        grad: [0.660000014286, -5.64000000526, -0.338000006667],
        hypergrad: [
            0.000000000e+00,
            1.040859066e-14,
            -3.058987087e-08,
            0.000000000e+00,
            -3.469446952e-17,
            3.058992311e-08,
        ],
        coefficients: [0.9, 0.95, 0.0, 1.0, 1.0, 1.0],
        w: [0.980012296058, -1.98000157168, 0.519998333245],
    },
    Row {
        loss: 5.73505702031,
        grad: [0.620012296058, -5.58000471504, -0.376000333351],
        hypergrad: [
            -3.128249188e-01,
            3.229703301e-01,
            2.680301728e-04,
            7.940099662e-03,
            -8.495688723e-04,
            1.698920911e-05,
        ],
        coefficients: [0.9, 0.95, 0.0, 1.0, 1.0, 1.0],
        w: [0.970046353736, -1.97000577387, 0.529996881537],
    },
    Row {
        loss: 5.68595436638,
        grad: [0.670046353736, -5.61001732162, -0.294000623693],
        hypergrad: [
            -3.952835322e-01,
            4.204387187e-01,
            4.617053669e-04,
            1.041254582e-02,
            -1.134581459e-03,
            4.682139769e-05,
        ],
        coefficients: [0.9, 0.95, 0.0, 1.0, 1.0, 1.0],
        w: [0.960067261481, -1.96000984457, 0.539945747843],
    },
    Row {
        loss: 5.60787502653,
        grad: [0.630067261481, -5.55002953372, -0.332010850431],
        hypergrad: [
            -4.151779844e-01,
            4.537378653e-01,
            6.662348038e-05,
            1.153306929e-02,
            -1.257283615e-03,
            5.274273431e-05,
        ],
        coefficients: [0.9, 0.95, 0.0, 1.0, 1.0, 1.0],
        w: [0.95009672428, -1.95001643421, 0.549909369533],
    },
    Row {
        loss: 5.53983083032,
        grad: [0.59009672428, -5.49004930263, -0.370018126093],
        hypergrad: [
            -4.149646907e-01,
            4.677422211e-01,
            4.101896210e-04,
            1.203677601e-02,
            -1.330232625e-03,
            6.702397196e-05,
        ],
        coefficients: [0.9, 0.95, 0.0, 1.0, 1.0, 1.0],
        w: [0.940153209594, -1.94002743118, 0.559900013044],
    },
];

const C_TRAINPY_HYPER: [Row; 6] = [
    Row {
        loss: 5.885,
        grad: [0.7, -5.7, -0.3],
        hypergrad: [
            0.000000000e+00,
            0.000000000e+00,
            0.000000000e+00,
            0.000000000e+00,
            0.000000000e+00,
            0.000000000e+00,
        ],
        coefficients: [0.85, 0.99, 0.0, 1.0, 1.0, 1.0],
        w: [0.999000000014, -1.999, 0.500999999967],
    },
    Row {
        loss: 5.86492210003,
        grad: [0.669000000014, -5.66700000001, -0.339800000007],
        hypergrad: [
            0.000000000e+00,
            2.657804990e-14,
            -3.082643949e-11,
            0.000000000e+00,
            -2.602085214e-18,
            3.082617842e-11,
        ],
        coefficients: [0.85, 0.99, 7.70660987283e-14, 1.0, 1.0, 1.0],
        w: [0.998001978349, -1.99800022502, 0.502002792543],
    },
    Row {
        loss: 5.85408986991,
        grad: [0.638001978349, -5.63400067506, -0.379599441491],
        hypergrad: [
            -2.039798245e-02,
            1.657811673e-01,
            9.101108598e-06,
            8.252727721e-04,
            -1.674520548e-05,
            1.469880217e-06,
        ],
        coefficients: [0.850050994956, 0.989585547082, 0.0, 0.999997936818, 1.0, 0.999999996325],
        w: [0.996993218614, -1.99698716367, 0.503022052819],
    },
    Row {
        loss: 5.86483451955,
        grad: [0.696993218614, -5.69096149102, -0.299395589436],
        hypergrad: [
            -2.546386632e-02,
            2.125337676e-01,
            2.235254699e-05,
            1.129678118e-03,
            -2.342014802e-05,
            -8.620353788e-05,
        ],
        coefficients: [0.8501401521, 0.988846986204, 0.0, 0.999994081032, 1.0, 1.0],
        w: [0.995959103968, -1.9959514796, 0.504054823511],
    },
    Row {
        loss: 5.84459324333,
        grad: [0.665959103968, -5.65785443879, -0.339189035298],
        hypergrad: [
            -2.660895718e-02,
            2.221567014e-01,
            -2.182866877e-05,
            1.320871803e-03,
            -2.827864323e-05,
            -2.357297455e-04,
        ],
        coefficients: [0.850251253065, 0.987922314011, 2.09428049491e-08, 0.999988850959, 1.0, 1.0],
        w: [0.994900746411, -1.99489137304, 0.505113837567],
    },
    Row {
        loss: 5.83343532678,
        grad: [0.634900746411, -5.62467411911, -0.378977232487],
        hypergrad: [
            -2.650413221e-02,
            2.202384587e-01,
            1.399459937e-05,
            1.459471363e-03,
            -3.315229291e-05,
            -3.974960485e-04,
        ],
        coefficients: [0.850373063878, 0.986909381768, 0.0, 0.999982587244, 1.0, 1.0],
        w: [0.993821812104, -1.993808627, 0.506200160301],
    },
];
