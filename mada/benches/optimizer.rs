//! `just bench-optimizer`: our Adam step vs our MADA step (all six coefficients learned, the
//! hyper-gradient pass included) over 1M and 16M f32 parameters, timed in one run. Prints the
//! ratios, the parts of the MADA step, a memory-bandwidth yardstick, and the optimizer state
//! per parameter of every optimizer.

use std::hint::black_box;
use std::time::Instant;

use mada::{AnyOptimizer, Coefficients, HyperConfig, Mada, MadaConfig, Optimizer, OptimizerSpec};

/// Median seconds per call of `f` over `reps` calls after 2 warm-up calls.
fn median_seconds(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    f();
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[reps / 2]
}

fn data(n: usize) -> (Vec<f32>, Vec<f32>) {
    let x = (0..n).map(|i| ((i.wrapping_mul(2654435761) % 2000) as f32 - 1000.0) * 1e-3).collect();
    let g = (0..n).map(|i| ((i.wrapping_mul(40503) % 2000) as f32 - 1000.0) * 1e-4).collect();
    (x, g)
}

fn time_optimizer(opt: &mut dyn Optimizer<f32>, n: usize, reps: usize) -> f64 {
    let (mut x, g) = data(n);
    median_seconds(reps, || {
        opt.step(&mut [&mut x[..]], &[&g[..]], 1e-4).unwrap();
        black_box(&x);
    })
}

/// Bytes per parameter a MADA step (all coefficients learned, f32, running mean) must move:
/// the hyper-gradient pass reads w, g, d, v_old, m, v, v̄, n (8 × 4) and the Lion sign byte
/// (33); the update reads p, g, m, v, v̄, n, g_prev, mL (8 × 4) and writes p, m, v, v̄, n,
/// g_prev, mL, d_prev, v_prev (9 × 4) and the sign byte (69). Two passes are the algorithm's:
/// the update needs the coefficients after the hyper-step, which needs the whole hyper-gradient.
const MADA_BYTES_PER_PARAM: usize = 33 + 69;

fn main() {
    let threads = rayon::current_num_threads();
    println!("optimizer step benchmark: f32, {threads} threads, median of repeated steps");
    let adam_spec: OptimizerSpec = serde_json::from_str(r#"{"name": "adam", "beta2": 0.95}"#).unwrap();
    let mada_hyper = HyperConfig::official_gpt2().with_warmup(0);
    for (label, n, reps) in [("1M", 1usize << 20, 31), ("16M", 1usize << 24, 9)] {
        let mut adam = AnyOptimizer::<f32>::from_spec(&adam_spec).unwrap();
        let t_adam = time_optimizer(&mut adam, n, reps);
        let mut mada = Mada::<f32>::new(MadaConfig::default(), mada_hyper, Coefficients::avgrad(0.9, 0.95)).unwrap();
        let t_mada = time_optimizer(&mut mada, n, reps);
        let mut frozen =
            Mada::<f32>::new(MadaConfig::default(), HyperConfig::frozen(), Coefficients::avgrad(0.9, 0.95)).unwrap();
        let t_frozen = time_optimizer(&mut frozen, n, reps);
        // The hyper-gradient pass alone (state after a few steps).
        let (_, g) = data(n);
        let t_hyper = median_seconds(reps, || {
            black_box(mada.hypergradient_of_tensor(0, &g).unwrap());
        });
        // Yardstick: a pass that reads 3 and writes 1 buffer (≈ the traffic of half an Adam step).
        let (a, b) = data(n);
        let mut c = vec![0f32; n];
        let t_triad = median_seconds(reps, || {
            mada::par::for_each((&mut c[..], &a[..], &b[..]), &|(c, a, b): (&mut [f32], &[f32], &[f32])| {
                for i in 0..c.len() {
                    c[i] += a[i] * 0.5 + b[i];
                }
            });
            black_box(&c);
        });
        let gbps = (4 * 4 * n) as f64 / t_triad / 1e9;
        println!("adam step ({label} f32): {:.3} ms", t_adam * 1e3);
        println!("mada step, all coefficients learned ({label} f32): {:.3} ms", t_mada * 1e3);
        println!("  of which the hyper-gradient pass: {:.3} ms", t_hyper * 1e3);
        println!("mada step, frozen ({label} f32): {:.3} ms", t_frozen * 1e3);
        println!("memory yardstick, 3 reads + 1 write ({label} f32): {:.3} ms = {gbps:.1} GB/s", t_triad * 1e3);
        println!("mada/adam step ratio ({label} f32): {:.2}", t_mada / t_adam);
        println!("mada-frozen/adam step ratio ({label} f32): {:.2}", t_frozen / t_adam);
        // The floor: the bytes the step must move at the yardstick's bandwidth.
        let floor = (MADA_BYTES_PER_PARAM * n) as f64 / (gbps * 1e9);
        println!(
            "mada step memory-traffic floor ({label} f32, {MADA_BYTES_PER_PARAM} bytes/parameter): {:.3} ms",
            floor * 1e3
        );
        println!("mada step / memory-traffic floor ({label} f32): {:.2}", t_mada / floor);
    }
    println!("optimizer state, bytes per f32 parameter:");
    for spec in [
        r#"{"name": "sgd", "momentum": 0.9}"#,
        r#"{"name": "adam"}"#,
        r#"{"name": "amsgrad"}"#,
        r#"{"name": "avgrad"}"#,
        r#"{"name": "yogi"}"#,
        r#"{"name": "adan"}"#,
        r#"{"name": "lion"}"#,
        r#"{"name": "mada"}"#,
        r#"{"name": "mada", "hyper": {"lr": {"beta1": 1e-3, "beta2": 1e-3}}}"#,
    ] {
        let spec: OptimizerSpec = serde_json::from_str(spec).unwrap();
        let opt = AnyOptimizer::<f32>::from_spec(&spec).unwrap();
        let label = match &spec {
            OptimizerSpec::Mada(m) if !m.hyper.lr.is_empty() => "mada (learning)".to_string(),
            OptimizerSpec::Mada(_) => "mada (frozen)".to_string(),
            s => s.name().to_string(),
        };
        println!("  {label}: {}", opt.state_bytes_per_param());
    }
}
