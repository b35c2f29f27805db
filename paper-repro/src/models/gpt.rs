//! nanoGPT's GPT-2 in candle: token and position embeddings, pre-LayerNorm blocks with causal
//! self-attention and a GELU MLP, optional biases, dropout, and an lm_head tied to the token
//! embedding. Parameter names are nanoGPT's state-dict names.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Module, Tensor};
use serde::{Deserialize, Serialize};

use crate::models::nn::{LayerNorm, Linear, ParamStore};
use crate::models::ops;

/// A GPT configuration, as data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptConfig {
    pub block_size: usize,
    pub vocab_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default)]
    pub bias: bool,
}

impl GptConfig {
    /// GPT-2 "124M" as the official `train_gpt2_small.py` (vocab padded to 50304, no bias).
    pub fn gpt2_124m() -> Self {
        Self { block_size: 1024, vocab_size: 50304, n_layer: 12, n_head: 12, n_embd: 768, dropout: 0.0, bias: false }
    }

    /// GPT-2 "355M" as `train_gpt2_medium.py`.
    pub fn gpt2_355m() -> Self {
        Self { block_size: 1024, vocab_size: 50304, n_layer: 24, n_head: 16, n_embd: 1024, dropout: 0.0, bias: false }
    }

    /// nanoGPT's shakespeare-char "baby GPT" (6 layers, 6 heads, 384 wide, block 256).
    pub fn baby_char(vocab_size: usize) -> Self {
        Self { block_size: 256, vocab_size, n_layer: 6, n_head: 6, n_embd: 384, dropout: 0.2, bias: false }
    }

    /// Number of parameters (the tied lm_head counted once); `non_embedding` subtracts the
    /// position embedding, as nanoGPT's `get_num_params` reports.
    pub fn num_params(&self, non_embedding: bool) -> usize {
        let (c, l, v, b) = (self.n_embd, self.n_layer, self.vocab_size, self.bias as usize);
        let ln = c + b * c;
        let attn = c * 3 * c + b * 3 * c + c * c + b * c;
        let mlp = c * 4 * c + b * 4 * c + 4 * c * c + b * c;
        let block = 2 * ln + attn + mlp;
        let total = v * c + self.block_size * c + l * block + ln;
        if non_embedding {
            total - self.block_size * c
        } else {
            total
        }
    }

    pub fn validate(&self) -> Result<()> {
        for (key, v) in [
            ("block_size", self.block_size),
            ("vocab_size", self.vocab_size),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
        ] {
            if v == 0 {
                bail!("{key} must be positive");
            }
        }
        if self.vocab_size > 1 << 24 || self.block_size > 1 << 24 || self.n_embd > 1 << 16 || self.n_layer > 1 << 12 {
            bail!("the model is larger than any this project can allocate: {self:?}");
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            bail!("n_embd = {} is not divisible by n_head = {}", self.n_embd, self.n_head);
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("dropout = {} must lie in [0, 1)", self.dropout);
        }
        Ok(())
    }
}

struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    attn_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_proj: Linear,
}

/// The model.
pub struct Gpt {
    pub config: GptConfig,
    pub params: ParamStore,
    wte: candle_core::Var,
    wpe: candle_core::Var,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
}

impl Gpt {
    /// A freshly initialized model (nanoGPT: N(0, 0.02), residual projections
    /// N(0, 0.02/√(2·n_layer)), zero biases, unit LayerNorm gains), seeded.
    pub fn new(config: GptConfig, device: &Device, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut ps = ParamStore::new(device, seed);
        let c = config.n_embd;
        let proj_std = 0.02 / (2.0 * config.n_layer as f64).sqrt();
        let wte = ps.normal("transformer.wte.weight", &[config.vocab_size, c], 0.02)?;
        let wpe = ps.normal("transformer.wpe.weight", &[config.block_size, c], 0.02)?;
        let mut blocks = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let p = format!("transformer.h.{i}");
            blocks.push(Block {
                ln_1: LayerNorm::new(&mut ps, &format!("{p}.ln_1"), c, config.bias)?,
                c_attn: Linear::new(&mut ps, &format!("{p}.attn.c_attn"), c, 3 * c, config.bias, 0.02)?,
                attn_proj: Linear::new(&mut ps, &format!("{p}.attn.c_proj"), c, c, config.bias, proj_std)?,
                ln_2: LayerNorm::new(&mut ps, &format!("{p}.ln_2"), c, config.bias)?,
                c_fc: Linear::new(&mut ps, &format!("{p}.mlp.c_fc"), c, 4 * c, config.bias, 0.02)?,
                mlp_proj: Linear::new(&mut ps, &format!("{p}.mlp.c_proj"), 4 * c, c, config.bias, proj_std)?,
            });
        }
        let ln_f = LayerNorm::new(&mut ps, "transformer.ln_f", c, config.bias)?;
        Ok(Self { config, params: ps, wte, wpe, blocks, ln_f })
    }

    fn dropout(&self, x: Tensor, train: bool) -> Result<Tensor> {
        if train && self.config.dropout > 0.0 {
            Ok(candle_nn::ops::dropout(&x, self.config.dropout as f32)?)
        } else {
            Ok(x)
        }
    }

    /// `mask`: the causal mask when the composed attention runs (other devices, dropout).
    fn attention(&self, blk: &Block, x: &Tensor, train: bool, mask: Option<&Tensor>) -> Result<Tensor> {
        let qkv = blk.c_attn.forward(x)?;
        let y = match mask {
            // Attention dropout needs the probabilities as a tensor: the composed path.
            Some(mask) if train && self.config.dropout > 0.0 => {
                ops::composed_causal_self_attention(&qkv, self.config.n_head, mask, |att| {
                    candle_nn::ops::dropout(&att, self.config.dropout as f32)
                })?
            }
            _ => ops::causal_self_attention(&qkv, self.config.n_head, mask)?,
        };
        self.dropout(blk.attn_proj.forward(&y)?, train)
    }

    /// Logits (B, T, vocab) for token ids (B, T).
    pub fn forward(&self, idx: &Tensor, train: bool) -> Result<Tensor> {
        let (b, t) = idx.dims2()?;
        if t > self.config.block_size {
            bail!("sequence of {t} tokens exceeds block_size {}", self.config.block_size);
        }
        let c = self.config.n_embd;
        let tok = self.wte.as_tensor().index_select(&idx.flatten_all()?, 0)?.reshape((b, t, c))?;
        let pos = self.wpe.as_tensor().narrow(0, 0, t)?;
        let mut x = self.dropout(tok.broadcast_add(&pos)?, train)?;
        // One mask for all layers, and only where the composed attention runs.
        let composed = !idx.device().is_cpu() || (train && self.config.dropout > 0.0);
        let mask = if composed { Some(ops::causal_mask(t, idx.device())?) } else { None };
        for blk in &self.blocks {
            x = (&x + self.attention(blk, &blk.ln_1.forward(&x)?, train, mask.as_ref())?)?;
            let h = ops::gelu(&blk.c_fc.forward(&blk.ln_2.forward(&x)?)?)?;
            x = (&x + self.dropout(blk.mlp_proj.forward(&h)?, train)?)?;
        }
        let x = self.ln_f.forward(&x)?;
        Ok(x.broadcast_matmul(&self.wte.as_tensor().t()?)?)
    }

    /// Mean cross-entropy of next-token prediction.
    pub fn loss(&self, idx: &Tensor, targets: &Tensor, train: bool) -> Result<Tensor> {
        let logits = self.forward(idx, train)?;
        let (b, t, v) = logits.dims3()?;
        Ok(candle_nn::loss::cross_entropy(&logits.reshape((b * t, v))?, &targets.reshape(b * t)?)?)
    }

    /// Load Hugging Face GPT-2 weights (safetensors with the standard key names, optionally
    /// prefixed `transformer.`; Conv1D weights stored (in, out) are transposed). The model must
    /// have `bias = true` and the checkpoint's vocabulary and block size.
    pub fn load_hf_safetensors(&self, path: &Path) -> Result<()> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let get = |key: &str| -> Result<&Tensor> {
            tensors
                .get(key)
                .or_else(|| tensors.get(&format!("transformer.{key}")))
                .with_context(|| format!("{}: tensor {key} is missing", path.display()))
        };
        let conv1d = ["attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"];
        for (name, _) in self.params.params() {
            let key = name.strip_prefix("transformer.").unwrap_or(name);
            let t = get(key)?;
            let t = if conv1d.iter().any(|s| key.ends_with(s)) { t.t()?.contiguous()? } else { t.clone() };
            self.params.set(name, &t).with_context(|| format!("{}: {key}", path.display()))?;
        }
        Ok(())
    }
}

/// The GPT-2 configuration of a Hugging Face safetensors checkpoint, read from its shapes
/// (n_head from the standard sizes: 768 → 12, 1024 → 16, 1280 → 20, 1600 → 25).
pub fn hf_config(path: &Path) -> Result<GptConfig> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let find = |key: &str| tensors.get(key).or_else(|| tensors.get(&format!("transformer.{key}")));
    let wte = find("wte.weight").with_context(|| format!("{}: no wte.weight", path.display()))?;
    let wpe = find("wpe.weight").with_context(|| format!("{}: no wpe.weight", path.display()))?;
    let (vocab_size, n_embd) = wte.dims2()?;
    let n_layer = (0..).take_while(|i| find(&format!("h.{i}.ln_1.weight")).is_some()).count();
    let n_head = match n_embd {
        768 => 12,
        1024 => 16,
        1280 => 20,
        1600 => 25,
        other => bail!("{}: n_embd {other} is not a standard GPT-2 size; give n_head", path.display()),
    };
    Ok(GptConfig { block_size: wpe.dims2()?.0, vocab_size, n_layer, n_head, n_embd, dropout: 0.0, bias: true })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_configs_report_nanogpts_parameter_counts() {
        assert_eq!(GptConfig::gpt2_124m().num_params(false), 124_373_760);
        assert_eq!(GptConfig::gpt2_124m().num_params(true), 123_587_328);
        assert_eq!(GptConfig::gpt2_355m().num_params(false), 354_599_936);
        assert_eq!(GptConfig::gpt2_355m().num_params(true), 353_551_360);
        assert_eq!(GptConfig::baby_char(65).num_params(false), 10_745_088);
    }

    #[test]
    fn the_built_model_has_the_counted_parameters_and_a_sane_initial_loss() {
        let cfg =
            GptConfig { block_size: 16, vocab_size: 50, n_layer: 2, n_head: 2, n_embd: 16, dropout: 0.0, bias: true };
        let m = Gpt::new(cfg.clone(), &Device::Cpu, 1).unwrap();
        assert_eq!(m.params.num_params(), cfg.num_params(false));
        let idx = Tensor::from_vec((0..32u32).map(|i| i % 50).collect(), (2, 16), &Device::Cpu).unwrap();
        let loss = m.loss(&idx, &idx, false).unwrap().to_scalar::<f32>().unwrap();
        assert!((loss - (50f32).ln()).abs() < 0.3, "initial loss {loss} should be near ln(50)");
    }

    #[test]
    fn attention_is_causal() {
        let cfg =
            GptConfig { block_size: 8, vocab_size: 11, n_layer: 1, n_head: 2, n_embd: 8, dropout: 0.0, bias: false };
        let m = Gpt::new(cfg, &Device::Cpu, 3).unwrap();
        let a = Tensor::new(&[[1u32, 2, 3, 4, 5]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[1u32, 2, 3, 9, 9]], &Device::Cpu).unwrap();
        let la =
            m.forward(&a, false).unwrap().narrow(1, 0, 3).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let lb =
            m.forward(&b, false).unwrap().narrow(1, 0, 3).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(la, lb, "future tokens changed past logits");
    }

    #[test]
    fn hf_safetensors_loader_maps_names_and_transposes_conv1d() {
        // A tiny checkpoint in the Hugging Face GPT-2 layout, written here.
        let cfg =
            GptConfig { block_size: 8, vocab_size: 12, n_layer: 2, n_head: 2, n_embd: 8, dropout: 0.0, bias: true };
        let (c, dev) = (cfg.n_embd, Device::Cpu);
        let mut map = std::collections::HashMap::new();
        let mut k = 0f32;
        let mut t = |shape: &[usize]| {
            let n: usize = shape.iter().product();
            k += 1.0;
            Tensor::from_vec((0..n).map(|i| k + i as f32 * 1e-3).collect::<Vec<f32>>(), shape, &dev).unwrap()
        };
        map.insert("wte.weight".to_string(), t(&[12, c]));
        map.insert("wpe.weight".to_string(), t(&[8, c]));
        for i in 0..2 {
            for (n, s) in [
                ("ln_1.weight", vec![c]),
                ("ln_1.bias", vec![c]),
                ("attn.c_attn.weight", vec![c, 3 * c]),
                ("attn.c_attn.bias", vec![3 * c]),
                ("attn.c_proj.weight", vec![c, c]),
                ("attn.c_proj.bias", vec![c]),
                ("ln_2.weight", vec![c]),
                ("ln_2.bias", vec![c]),
                ("mlp.c_fc.weight", vec![c, 4 * c]),
                ("mlp.c_fc.bias", vec![4 * c]),
                ("mlp.c_proj.weight", vec![4 * c, c]),
                ("mlp.c_proj.bias", vec![c]),
            ] {
                map.insert(format!("h.{i}.{n}"), t(&s));
            }
        }
        map.insert("ln_f.weight".to_string(), t(&[c]));
        map.insert("ln_f.bias".to_string(), t(&[c]));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        candle_core::safetensors::save(&map, &path).unwrap();

        assert!(hf_config(&path).unwrap_err().to_string().contains("n_embd 8"));
        let m = Gpt::new(cfg, &dev, 0).unwrap();
        m.load_hf_safetensors(&path).unwrap();
        let ours = m
            .params
            .params()
            .iter()
            .find(|(n, _)| n == "transformer.h.1.mlp.c_fc.weight")
            .unwrap()
            .1
            .as_tensor()
            .clone();
        let theirs = map["h.1.mlp.c_fc.weight"].t().unwrap();
        assert_eq!(ours.to_vec2::<f32>().unwrap(), theirs.to_vec2::<f32>().unwrap());
        // A missing tensor is named.
        map.remove("h.1.ln_2.bias");
        candle_core::safetensors::save(&map, &path).unwrap();
        let e = format!("{:#}", m.load_hf_safetensors(&path).unwrap_err());
        assert!(e.contains("h.1.ln_2.bias"), "{e}");
    }
}
