#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use candle_core::{Device, Tensor};
use paper_repro::gpt::{Gpt, GptConfig};
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    unsafe { libmimalloc_sys::mi_option_set(15, -1) };
    let b: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(8);
    let mut cfg = GptConfig::baby_char(65);
    cfg.dropout = 0.0;
    let m = Gpt::new(cfg.clone(), &Device::Cpu, 0)?;
    let t = cfg.block_size;
    let idx = Tensor::from_vec((0..b * t).map(|i| (i * 7 % 65) as u32).collect::<Vec<_>>(), (b, t), &Device::Cpu)?;
    for it in 0..4 {
        let t0 = Instant::now();
        let logits = m.forward(&idx, true)?;
        let t1 = t0.elapsed();
        let (bb, tt, v) = logits.dims3()?;
        let loss = candle_nn::loss::cross_entropy(&logits.reshape((bb * tt, v))?, &idx.reshape(bb * tt)?)?;
        let t2 = t0.elapsed();
        let grads = loss.backward()?;
        let t3 = t0.elapsed();
        println!("iter {it}: fwd {:?} loss {:?} bwd {:?}  tokens/s {:.0}", t1, t2 - t1, t3 - t2, (b * t) as f64 / t3.as_secs_f64());
        drop(grads);
    }
    Ok(())
}
