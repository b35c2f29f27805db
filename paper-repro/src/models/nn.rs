//! The few layers the models need, over a parameter store with *seeded* initialization (candle's
//! own random initializers draw from an unseeded generator, which would make runs
//! irreproducible), stable parameter order, and safetensors save/load.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use crate::models::ops::Activation;

/// Named trainable parameters in creation order, plus named non-trainable buffers
/// (batch-norm running statistics).
pub struct ParamStore {
    device: Device,
    rng: StdRng,
    params: Vec<(String, Var)>,
    buffers: BTreeMap<String, Var>,
}

impl ParamStore {
    pub fn new(device: &Device, seed: u64) -> Self {
        Self { device: device.clone(), rng: StdRng::seed_from_u64(seed), params: Vec::new(), buffers: BTreeMap::new() }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn host_tensor(&self, values: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(&self.device)?)
    }

    /// A parameter drawn from N(0, std²).
    pub fn normal(&mut self, name: &str, shape: &[usize], std: f64) -> Result<Var> {
        let n: usize = shape.iter().product();
        let dist = Normal::new(0.0f32, std as f32).context("normal init")?;
        let values: Vec<f32> = (0..n).map(|_| dist.sample(&mut self.rng)).collect();
        self.add(name, self.host_tensor(values, shape)?)
    }

    /// A parameter drawn from U(−bound, bound).
    pub fn uniform(&mut self, name: &str, shape: &[usize], bound: f64) -> Result<Var> {
        use rand::Rng;
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| self.rng.random_range(-bound as f32..=bound as f32)).collect();
        self.add(name, self.host_tensor(values, shape)?)
    }

    /// A constant parameter.
    pub fn constant(&mut self, name: &str, shape: &[usize], value: f32) -> Result<Var> {
        let n: usize = shape.iter().product();
        self.add(name, self.host_tensor(vec![value; n], shape)?)
    }

    fn add(&mut self, name: &str, t: Tensor) -> Result<Var> {
        if self.params.iter().any(|(n, _)| n == name) {
            bail!("duplicate parameter name {name}");
        }
        let v = Var::from_tensor(&t)?;
        self.params.push((name.to_string(), v.clone()));
        Ok(v)
    }

    /// A non-trainable buffer.
    pub fn buffer(&mut self, name: &str, shape: &[usize], value: f32) -> Result<Var> {
        let n: usize = shape.iter().product();
        let v = Var::from_tensor(&self.host_tensor(vec![value; n], shape)?)?;
        self.buffers.insert(name.to_string(), v.clone());
        Ok(v)
    }

    /// Trainable parameters, in creation order (the optimizer's tensor order).
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().map(|(_, v)| v.clone()).collect()
    }

    /// Number of trainable scalars.
    pub fn num_params(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Save parameters and buffers (buffers under `buffer.` names) as safetensors.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map: BTreeMap<String, Tensor> = BTreeMap::new();
        for (n, v) in &self.params {
            map.insert(n.clone(), v.as_tensor().clone());
        }
        for (n, v) in &self.buffers {
            map.insert(format!("buffer.{n}"), v.as_tensor().clone());
        }
        let map: std::collections::HashMap<String, Tensor> = map.into_iter().collect();
        candle_core::safetensors::save(&map, path).with_context(|| format!("cannot write {}", path.display()))
    }

    /// Load every parameter and buffer from a safetensors file written by [`save`](Self::save);
    /// a missing or mis-shaped tensor is an error naming it and the file.
    pub fn load(&self, path: &Path) -> Result<()> {
        let map = candle_core::safetensors::load(path, &self.device)
            .with_context(|| format!("cannot read checkpoint {}", path.display()))?;
        let targets = self
            .params
            .iter()
            .map(|(n, v)| (n.clone(), v))
            .chain(self.buffers.iter().map(|(n, v)| (format!("buffer.{n}"), v)));
        for (name, var) in targets {
            let t = map.get(&name).with_context(|| format!("{}: tensor {name} is missing", path.display()))?;
            if t.shape() != var.shape() {
                bail!(
                    "{}: tensor {name} has shape {:?}, the model expects {:?}",
                    path.display(),
                    t.shape(),
                    var.shape()
                );
            }
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// Overwrite one parameter (e.g. from a pretrained checkpoint).
    pub fn set(&self, name: &str, value: &Tensor) -> Result<()> {
        let (_, var) = self.params.iter().find(|(n, _)| n == name).with_context(|| format!("no parameter {name}"))?;
        if value.shape() != var.shape() {
            bail!("parameter {name}: shape {:?} given, {:?} expected", value.shape(), var.shape());
        }
        var.set(&value.to_dtype(DType::F32)?.to_device(&self.device)?)?;
        Ok(())
    }
}

/// y = x·Wᵀ + b, W of shape (out, in) (PyTorch layout).
pub struct Linear {
    pub weight: Var,
    pub bias: Option<Var>,
}

impl Linear {
    pub fn new(ps: &mut ParamStore, name: &str, inp: usize, out: usize, bias: bool, std: f64) -> Result<Self> {
        let weight = ps.normal(&format!("{name}.weight"), &[out, inp], std)?;
        let bias = if bias { Some(ps.constant(&format!("{name}.bias"), &[out], 0.0)?) } else { None };
        Ok(Self { weight, bias })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.weight.as_tensor();
        // One GEMM over all rows: (B·T, in) × (in, out).
        let y = match x.dims() {
            [b, t, c] => crate::models::ops::linear(&x.reshape((b * t, *c))?, w)?.reshape((*b, *t, ()))?,
            _ => crate::models::ops::linear(x, w)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b.as_tensor()),
            None => Ok(y),
        }
    }
}

/// LayerNorm over the last dimension with optional bias (nanoGPT's `bias` flag), ε = 1e-5.
pub struct LayerNorm {
    pub weight: Var,
    pub bias: Option<Var>,
}

impl LayerNorm {
    pub fn new(ps: &mut ParamStore, name: &str, dim: usize, bias: bool) -> Result<Self> {
        Ok(Self {
            weight: ps.constant(&format!("{name}.weight"), &[dim], 1.0)?,
            bias: if bias { Some(ps.constant(&format!("{name}.bias"), &[dim], 0.0)?) } else { None },
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = crate::models::ops::layer_norm(x, self.weight.as_tensor())?;
        match &self.bias {
            Some(b) => y.broadcast_add(b.as_tensor()),
            None => Ok(y),
        }
    }
}

/// 2-D convolution (NCHW), weight (out, in, k, k), Kaiming-uniform initialization as PyTorch.
pub struct Conv2d {
    pub weight: Var,
    pub bias: Option<Var>,
    pub stride: usize,
    pub padding: usize,
    pub algorithm: crate::models::ops::ConvAlgorithm,
}

impl Conv2d {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        inp: usize,
        out: usize,
        k: usize,
        stride: usize,
        padding: usize,
        bias: bool,
        algorithm: crate::models::ops::ConvAlgorithm,
    ) -> Result<Self> {
        let fan_in = (inp * k * k) as f64;
        let bound = 1.0 / fan_in.sqrt();
        Ok(Self {
            weight: ps.uniform(&format!("{name}.weight"), &[out, inp, k, k], bound * 3f64.sqrt())?,
            bias: if bias { Some(ps.uniform(&format!("{name}.bias"), &[out], bound)?) } else { None },
            stride,
            padding,
            algorithm,
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let bias = self.bias.as_ref().map(|b| b.as_tensor());
        crate::models::ops::conv2d(x, self.weight.as_tensor(), bias, self.stride, self.padding, self.algorithm)
    }
}

/// Batch normalization over (N, H, W) per channel, PyTorch conventions: batch statistics
/// (biased variance) in training, running statistics (momentum 0.1, unbiased variance) in
/// evaluation, ε = 1e-5.
pub struct BatchNorm2d {
    pub weight: Var,
    pub bias: Var,
    pub running_mean: Var,
    pub running_var: Var,
}

impl BatchNorm2d {
    pub fn new(ps: &mut ParamStore, name: &str, channels: usize) -> Result<Self> {
        Ok(Self {
            weight: ps.constant(&format!("{name}.weight"), &[channels], 1.0)?,
            bias: ps.constant(&format!("{name}.bias"), &[channels], 0.0)?,
            running_mean: ps.buffer(&format!("{name}.running_mean"), &[channels], 0.0)?,
            running_var: ps.buffer(&format!("{name}.running_var"), &[channels], 1.0)?,
        })
    }

    /// The normalization followed by `activation` (fused into one op in training on the CPU).
    pub fn forward_t(&self, x: &Tensor, train: bool, activation: Activation) -> candle_core::Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let shape = (1, c, 1, 1);
        let bias = self.bias.as_tensor();
        if train {
            let (y, moments) = crate::models::ops::batch_norm_train(x, self.weight.as_tensor(), bias, activation)?;
            // Running statistics, outside the graph: the batch moments the fused kernel computed
            // (in f64), else computed here.
            let (mean, var) = match moments {
                Some(m) => (
                    Tensor::from_iter(m.iter().map(|p| p.0), x.device())?,
                    Tensor::from_iter(m.iter().map(|p| p.1), x.device())?,
                ),
                None => {
                    let xd = x.detach();
                    let mean = xd.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
                    let var = xd.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
                    (mean.flatten_all()?, var.flatten_all()?)
                }
            };
            let count = (n * h * w) as f64;
            let unbiased = (var * (count / (count - 1.0).max(1.0)))?;
            let rm = ((self.running_mean.as_tensor() * 0.9)? + (mean * 0.1)?)?;
            let rv = ((self.running_var.as_tensor() * 0.9)? + (unbiased * 0.1)?)?;
            self.running_mean.set(&rm)?;
            self.running_var.set(&rv)?;
            Ok(y)
        } else {
            let (mean, var) =
                (self.running_mean.as_tensor().reshape(shape)?, self.running_var.as_tensor().reshape(shape)?);
            let y = x
                .broadcast_sub(&mean)?
                .broadcast_div(&(var + 1e-5)?.sqrt()?)?
                .broadcast_mul(&self.weight.as_tensor().reshape(shape)?)?;
            activation.apply(&crate::models::ops::add_channel_bias(&y, bias)?)
        }
    }
}
