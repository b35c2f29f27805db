//! A two-layer MLP classifying points of two interleaved spirals, trained with Adam and with
//! MADA (all six coefficients learned, `train.py`'s hyper-optimizer) from the same start, in
//! candle: `cargo run --release -p mada --example mlp_adam_vs_mada`.
//!
//! It shows the whole integration: build the optimizer, wrap the model's variables in a
//! [`VarOptimizer`], call `backward_step`, and read MADA's coefficients as they move.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{linear, ops::log_softmax, Module, Optimizer as _, VarBuilder, VarMap};
use mada::candle::VarOptimizer;
use mada::{AnyOptimizer, Coefficients, HyperConfig, Mada, MadaConfig, Optimizer as _, OptimizerSpec};

const POINTS: usize = 400;

/// Two spirals of `POINTS` points each, as (x: (2·POINTS, 2), labels: (2·POINTS)).
fn spirals(dev: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let mut x = Vec::with_capacity(4 * POINTS);
    let mut y = Vec::with_capacity(2 * POINTS);
    for class in 0..2u32 {
        for i in 0..POINTS {
            let r = i as f32 / POINTS as f32 * 4.0 + 0.2;
            let t = r * 1.8 + class as f32 * std::f32::consts::PI + 0.13 * ((i * 7919) % 13) as f32 / 13.0;
            x.extend([r * t.cos() / 4.0, r * t.sin() / 4.0]);
            y.push(class);
        }
    }
    Ok((Tensor::from_vec(x, (2 * POINTS, 2), dev)?, Tensor::from_vec(y, 2 * POINTS, dev)?))
}

/// Train the same MLP (same seed-free deterministic start) with `opt`; returns the final loss.
fn train(name: &str, opt: AnyOptimizer<f32>, steps: usize) -> candle_core::Result<f32> {
    let dev = Device::Cpu;
    let (x, y) = spirals(&dev)?;
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
    let (l1, l2) = (linear(2, 64, vb.pp("l1"))?, linear(64, 2, vb.pp("l2"))?);
    // The same start for both optimizers: overwrite candle's random init deterministically.
    for (i, var) in vars.all_vars().iter().enumerate() {
        let n = var.elem_count();
        let values: Vec<f32> =
            (0..n).map(|k| (((k * 2654435761 + i * 97) % 1000) as f32 / 1000.0 - 0.5) * 0.6).collect();
        var.set(&Tensor::from_vec(values, var.shape(), &dev)?)?;
    }
    let mut opt = VarOptimizer::new(vars.all_vars(), (opt, 1e-2))?;
    let mut last = 0.0;
    for step in 1..=steps {
        let logits = l2.forward(&l1.forward(&x)?.tanh()?)?;
        let loss = candle_nn::loss::nll(&log_softmax(&logits, D::Minus1)?, &y)?;
        opt.backward_step(&loss)?;
        last = loss.to_scalar::<f32>()?;
        if step % 100 == 0 {
            let coefficients = opt.optimizer().as_mada().map_or(String::new(), |m| format!("  {}", m.coefficients()));
            println!("{name:>5} step {step:4}: loss {last:.4}{coefficients}");
        }
    }
    Ok(last)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let steps = 600;
    let adam: OptimizerSpec = serde_json::from_str(r#"{"name": "adam", "beta1": 0.9, "beta2": 0.99, "eps": 1e-8}"#)?;
    let adam_loss = train("Adam", AnyOptimizer::from_spec(&adam)?, steps)?;
    // MADA from the Adam point, learning all six coefficients with train.py's hyper-optimizer.
    let mada = Mada::<f32>::new(
        MadaConfig::with_eps(1e-8),
        HyperConfig::official_shakespeare(),
        Coefficients::adam(0.9, 0.99),
    )?;
    let state = mada.state_bytes_per_param();
    let mada_loss = train("MADA", AnyOptimizer::Mada(mada), steps)?;
    println!("after {steps} steps: Adam {adam_loss:.4}, MADA {mada_loss:.4} (MADA keeps {state} bytes of state per parameter)");
    Ok(())
}
