//! `just bench-optimizer`: our Adam step vs our MADA step (all six coefficients learned, the
//! hyper-gradient pass included) over 1M and 16M f32 parameters, timed in one run. Prints the
//! ratios, the parts of the MADA step (the hyper-gradient pass, and that pass's arithmetic alone
//! on data in cache), two memory-bandwidth yardsticks, and the optimizer state per parameter of
//! every optimizer. The workloads run interleaved, one of each per round, and
//! every ratio is the median of the rounds' ratios.

use std::hint::black_box;
use std::time::Instant;

use mada::{AnyOptimizer, Coefficients, HyperConfig, Mada, MadaConfig, Optimizer, OptimizerSpec};

fn data(n: usize) -> (Vec<f32>, Vec<f32>) {
    let x = (0..n).map(|i| ((i.wrapping_mul(2654435761) % 2000) as f32 - 1000.0) * 1e-3).collect();
    let g = (0..n).map(|i| ((i.wrapping_mul(40503) % 2000) as f32 - 1000.0) * 1e-4).collect();
    (x, g)
}

/// One step of `opt` over `x` with gradient `g`.
fn step(opt: &mut dyn Optimizer<f32>, x: &mut [f32], g: &[f32]) {
    opt.step(&mut [x], &[g], 1e-4).unwrap();
    black_box(x);
}

/// Runs every workload once per round, for 2 warm-up rounds and then `reps` timed ones, and
/// returns each workload's seconds per round. A ratio is then taken within each round and its
/// median reported: a shared host's bandwidth drifts within one run, and both sides of a round's
/// ratio see the same drift.
fn rounds(reps: usize, work: &mut [&mut dyn FnMut()]) -> Vec<Vec<f64>> {
    let mut times = vec![Vec::with_capacity(reps); work.len()];
    for round in 0..reps + 2 {
        for (w, f) in work.iter_mut().enumerate() {
            let t = Instant::now();
            f();
            if round >= 2 {
                times[w].push(t.elapsed().as_secs_f64());
            }
        }
    }
    times
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Median seconds per call of `f` over `reps` calls after 2 warm-up calls.
fn median_seconds(reps: usize, mut f: impl FnMut()) -> f64 {
    median(rounds(reps, &mut [&mut f]).remove(0))
}

/// The median over rounds of `scale · a / b`.
fn median_ratio(a: &[f64], b: &[f64], scale: f64) -> f64 {
    median(a.iter().zip(b).map(|(a, b)| scale * a / b).collect())
}

/// Bytes per parameter a MADA step (all coefficients learned, f32, running mean) must move:
/// the hyper-gradient pass reads w, g, d, v_old, m, v, v̄, n (8 × 4) and the Lion sign byte
/// (33); the update reads p, g, m, v, v̄, n, g_prev, mL (8 × 4) and writes p, m, v, v̄, n,
/// g_prev, mL, d_prev, v_prev (9 × 4) and the sign byte (69). Two passes are the algorithm's:
/// the update needs the coefficients after the hyper-step, which needs the whole hyper-gradient.
const MADA_BYTES_PER_PARAM: usize = HYPER_BYTES_PER_PARAM + 69;

/// The hyper-gradient pass's share of [`MADA_BYTES_PER_PARAM`].
const HYPER_BYTES_PER_PARAM: usize = 33;

/// Triad passes per round: 6 × 16 bytes per element ≈ the step's 102.
const TRIAD_PASSES: usize = 6;

/// Bytes per element one triad pass moves: 3 f32 reads and 1 f32 write.
const TRIAD_BYTES_PER_ELEMENT: usize = 16;

/// A pass with the MADA step's memory streams and next to no arithmetic: the hyper-gradient
/// pass's reads (8 f32 buffers and the sign bytes), then the update's 8 reads and 9 writes (and
/// the sign bytes). Many concurrent streams run slower than the 4 of the triad yardstick; this
/// says how fast this machine moves the step's own access pattern.
fn same_streams(n: usize) -> impl FnMut() {
    let mut f: Vec<Vec<f32>> = (0..11).map(|j| data(n).0.iter().map(|x| x + j as f32).collect()).collect();
    let mut signs = vec![0i8; n];
    move || {
        let [p, g, m, v, v_mean, nn, g_prev, lion_m, d_prev, v_prev, w] = &mut f[..] else { unreachable!() };
        // The hyper-gradient pass's streams: w, g_prev, d_prev, v_prev, m, v, v̄, n and the signs.
        let read =
            (&w[..], (&g_prev[..], &d_prev[..], &v_prev[..], &m[..]), (&v[..], &v_mean[..], &nn[..], &signs[..]));
        type Reads<'a> =
            (&'a [f32], (&'a [f32], &'a [f32], &'a [f32], &'a [f32]), (&'a [f32], &'a [f32], &'a [f32], &'a [i8]));
        let sum = mada::par::fold(
            read,
            &|(w, (a, b, c, d), (e, f, g, s)): Reads<'_>| {
                let len = w.len();
                let (a, b, c, d, e, f, g, s) =
                    (&a[..len], &b[..len], &c[..len], &d[..len], &e[..len], &f[..len], &g[..len], &s[..len]);
                let mut acc = 0u32;
                for i in 0..len {
                    let bits = w[i].to_bits() ^ a[i].to_bits() ^ b[i].to_bits() ^ c[i].to_bits() ^ d[i].to_bits();
                    acc = acc.wrapping_add(bits ^ e[i].to_bits() ^ f[i].to_bits() ^ g[i].to_bits() ^ s[i] as u32);
                }
                acc
            },
            &|x, y| x.wrapping_add(y),
        );
        black_box(sum);
        // The update's streams: reads p, g, m, v, v̄, n, g_prev, mL; writes those but g, and d_prev,
        // v_prev and the signs.
        let views = (
            (&mut p[..], &g[..], &mut m[..], &mut v[..]),
            (&mut v_mean[..], &mut nn[..], &mut g_prev[..], &mut lion_m[..]),
            (&mut d_prev[..], &mut v_prev[..], &mut signs[..]),
        );
        type Writes<'a> = (
            (&'a mut [f32], &'a [f32], &'a mut [f32], &'a mut [f32]),
            (&'a mut [f32], &'a mut [f32], &'a mut [f32], &'a mut [f32]),
            (&'a mut [f32], &'a mut [f32], &'a mut [i8]),
        );
        mada::par::for_each(views, &|((p, g, m, v), (vm, nn, gp, lm), (dp, vp, s)): Writes<'_>| {
            let len = p.len();
            let (g, m, v, vm, nn, gp, lm) = (
                &g[..len],
                &mut m[..len],
                &mut v[..len],
                &mut vm[..len],
                &mut nn[..len],
                &mut gp[..len],
                &mut lm[..len],
            );
            let (dp, vp, s) = (&mut dp[..len], &mut vp[..len], &mut s[..len]);
            for i in 0..len {
                let gi = g[i];
                dp[i] = gi - gp[i];
                vp[i] = v[i];
                s[i] = (lm[i] > 0.0) as i8;
                p[i] -= gi;
                m[i] += gi;
                v[i] += gi;
                vm[i] += gi;
                nn[i] += gi;
                gp[i] = gi;
                lm[i] += gi;
            }
        });
        black_box(&f);
    }
}

/// Parameters of the in-cache copy of the hyper-gradient pass: 8K × 33 bytes of state (270 KB)
/// stay in L2, and 8K < `PAR_MIN_LEN`, so one thread runs it.
const IN_CACHE_LEN: usize = 1 << 13;

/// The hyper-gradient pass over `IN_CACHE_LEN` parameters on one thread, repeated until it has
/// covered `n`: the pass's arithmetic for `n` parameters with next to no memory traffic.
fn hyper_pass_in_cache(hyper: HyperConfig, n: usize) -> impl FnMut() {
    let mut mada = Mada::<f32>::new(MadaConfig::default(), hyper, Coefficients::avgrad(0.9, 0.95)).unwrap();
    let (mut x, g) = data(IN_CACHE_LEN);
    for _ in 0..3 {
        step(&mut mada, &mut x, &g);
    }
    move || {
        for _ in 0..n / IN_CACHE_LEN {
            black_box(mada.hypergradient_of_tensor(0, &g).unwrap());
        }
    }
}

fn main() {
    let threads = rayon::current_num_threads();
    println!("optimizer step benchmark: f32, {threads} threads, median of repeated steps");
    let adam_spec: OptimizerSpec = serde_json::from_str(r#"{"name": "adam", "beta2": 0.95}"#).unwrap();
    let mada_hyper = HyperConfig::official_gpt2().with_warmup(0);
    for (label, n, reps) in [("1M", 1usize << 20, 31), ("16M", 1usize << 24, 15)] {
        let mut adam = AnyOptimizer::<f32>::from_spec(&adam_spec).unwrap();
        let mut mada = Mada::<f32>::new(MadaConfig::default(), mada_hyper, Coefficients::avgrad(0.9, 0.95)).unwrap();
        let mut frozen =
            Mada::<f32>::new(MadaConfig::default(), HyperConfig::frozen(), Coefficients::avgrad(0.9, 0.95)).unwrap();
        let (mut x_adam, g) = data(n);
        let (mut x_mada, mut x_frozen) = (x_adam.clone(), x_adam.clone());
        // Yardstick: a pass that reads 3 and writes 1 buffer (≈ the traffic of half an Adam step),
        // run TRIAD_PASSES times in a row so that it lasts about as long as the MADA step beside
        // it and sees the same stretch of the host's bandwidth.
        let (a, b) = data(n);
        let mut c = vec![0f32; n];
        let mut triad = || {
            for _ in 0..TRIAD_PASSES {
                mada::par::for_each((&mut c[..], &a[..], &b[..]), &|(c, a, b): (&mut [f32], &[f32], &[f32])| {
                    for i in 0..c.len() {
                        c[i] += a[i] * 0.5 + b[i];
                    }
                });
                black_box(&c);
            }
        };
        let mut streams = same_streams(n);
        let mut arithmetic = hyper_pass_in_cache(mada_hyper, n);
        let times = rounds(
            reps,
            &mut [
                &mut || step(&mut mada, &mut x_mada, &g),
                &mut triad,
                &mut streams,
                &mut || step(&mut adam, &mut x_adam, &g),
                &mut || step(&mut frozen, &mut x_frozen, &g),
                &mut arithmetic,
            ],
        );
        let [mada_s, triads_s, streams_s, adam_s, frozen_s, arithmetic_s]: [Vec<f64>; 6] = times.try_into().unwrap();
        let [t_mada, t_triads, t_streams, t_adam, t_frozen, t_arithmetic] =
            [&mada_s, &triads_s, &streams_s, &adam_s, &frozen_s, &arithmetic_s].map(|s| median(s.clone()));
        let t_triad = t_triads / TRIAD_PASSES as f64;
        // The hyper-gradient pass alone (state after the steps above).
        let t_hyper = median_seconds(reps, || {
            black_box(mada.hypergradient_of_tensor(0, &g).unwrap());
        });
        let gbps = (TRIAD_BYTES_PER_ELEMENT * n) as f64 / t_triad / 1e9;
        println!("adam step ({label} f32): {:.3} ms", t_adam * 1e3);
        println!("mada step, all coefficients learned ({label} f32): {:.3} ms", t_mada * 1e3);
        println!("  of which the hyper-gradient pass: {:.3} ms", t_hyper * 1e3);
        // What the pass would take if only its arithmetic counted (its in-cache copy's time,
        // spread over the threads) and if only its bytes did. It takes between the larger of
        // the two and their sum: where the arithmetic is the larger, the floor counts bytes that
        // the pass can at best hide behind its arithmetic.
        println!(
            "    its arithmetic alone ({}K in L2 on one thread, scaled to {threads}): {:.3} ms; its {HYPER_BYTES_PER_PARAM} bytes/parameter at the yardstick: {:.3} ms",
            IN_CACHE_LEN >> 10,
            t_arithmetic / threads as f64 * 1e3,
            t_triad * HYPER_BYTES_PER_PARAM as f64 / TRIAD_BYTES_PER_ELEMENT as f64 * 1e3
        );
        println!("mada step, frozen ({label} f32): {:.3} ms", t_frozen * 1e3);
        println!("memory yardstick, 3 reads + 1 write ({label} f32): {:.3} ms = {gbps:.1} GB/s", t_triad * 1e3);
        println!("mada/adam step ratio ({label} f32): {:.2}", median_ratio(&mada_s, &adam_s, 1.0));
        println!("mada-frozen/adam step ratio ({label} f32): {:.2}", median_ratio(&frozen_s, &adam_s, 1.0));
        // The floor: the bytes the step must move at the yardstick's bandwidth, i.e. the triads'
        // time scaled from their TRIAD_BYTES_PER_ELEMENT·TRIAD_PASSES bytes per element to the
        // step's.
        let floor_scale = (TRIAD_BYTES_PER_ELEMENT * TRIAD_PASSES) as f64 / MADA_BYTES_PER_PARAM as f64;
        println!(
            "mada step memory-traffic floor ({label} f32, {MADA_BYTES_PER_PARAM} bytes/parameter): {:.3} ms",
            t_triads / floor_scale * 1e3
        );
        println!(
            "mada step / memory-traffic floor ({label} f32): {:.2}",
            median_ratio(&mada_s, &triads_s, floor_scale)
        );
        println!(
            "memory yardstick, the mada step's streams (17 reads + 9 writes, {MADA_BYTES_PER_PARAM} bytes/parameter, {label} f32): {:.3} ms = {:.1} GB/s",
            t_streams * 1e3,
            (MADA_BYTES_PER_PARAM * n) as f64 / t_streams / 1e9
        );
        println!("mada step / same-streams yardstick ({label} f32): {:.2}", median_ratio(&mada_s, &streams_s, 1.0));
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
