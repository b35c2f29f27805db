//! Vision models: a small CNN and CIFAR-style ResNets (ResNet-20, ResNet-18 and smaller
//! variants as configs), with batch normalization in training and evaluation modes.
//!
//! The paper's vision setup is unknown (the official repository has no vision code); these are standard choices, stated in the
//! experiment specs and flagged in the report.

use anyhow::{bail, Result};
use candle_core::{Device, Module, Tensor};
use serde::{Deserialize, Serialize};

use crate::models::nn::{BatchNorm2d, Conv2d, Linear, ParamStore};
use crate::models::ops::{max_pool2x2, relu, Activation, ConvAlgorithm};

/// A vision model, as data. `conv` says how the CPU convolutions form their sums (im2col when
/// omitted, the committed cpu-tier runs' convention; `implicit-gemm` is faster and differs in
/// the last bits, see [`ConvAlgorithm`]); other devices ignore it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum VisionModelConfig {
    /// conv(3×3, c1)–ReLU–maxpool(2) → conv(3×3, c2)–ReLU–maxpool(2) → linear(hidden)–ReLU →
    /// linear(classes).
    Cnn {
        c1: usize,
        c2: usize,
        hidden: usize,
        #[serde(default, skip_serializing_if = "is_im2col")]
        conv: ConvAlgorithm,
    },
    /// A CIFAR-style ResNet: 3×3 stem of `widths[0]` channels, then for each stage s
    /// `blocks[s]` basic blocks of `widths[s]` channels (stride 2 at the start of every stage
    /// but the first, 1×1 projection shortcut when the shape changes), global average pooling,
    /// linear classifier. ResNet-20: blocks [3, 3, 3], widths [16, 32, 64]; ResNet-18 (CIFAR
    /// stem): blocks [2, 2, 2, 2], widths [64, 128, 256, 512].
    Resnet {
        blocks: Vec<usize>,
        widths: Vec<usize>,
        #[serde(default, skip_serializing_if = "is_im2col")]
        conv: ConvAlgorithm,
    },
}

/// The default is left out of a spec's JSON, so runs that predate the setting keep their ids.
fn is_im2col(a: &ConvAlgorithm) -> bool {
    *a == ConvAlgorithm::Im2col
}

impl VisionModelConfig {
    pub fn cnn() -> Self {
        Self::Cnn { c1: 32, c2: 64, hidden: 128, conv: ConvAlgorithm::Im2col }
    }
    pub fn resnet20() -> Self {
        Self::Resnet { blocks: vec![3, 3, 3], widths: vec![16, 32, 64], conv: ConvAlgorithm::Im2col }
    }
    pub fn resnet18() -> Self {
        Self::Resnet { blocks: vec![2, 2, 2, 2], widths: vec![64, 128, 256, 512], conv: ConvAlgorithm::Im2col }
    }
    /// Every width and block count positive, one width per stage.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Cnn { c1, c2, hidden, .. } => {
                for (key, v) in [("c1", c1), ("c2", c2), ("hidden", hidden)] {
                    if *v == 0 || *v > 1 << 16 {
                        bail!("{key} = {v} must lie in 1..=65536");
                    }
                }
            }
            Self::Resnet { blocks, widths, .. } => {
                if blocks.is_empty() || blocks.len() != widths.len() {
                    bail!("resnet: `blocks` and `widths` must be non-empty and of equal length");
                }
                if let Some(w) = widths.iter().find(|w| **w == 0 || **w > 1 << 16) {
                    bail!("resnet: width {w} must lie in 1..=65536");
                }
                if let Some(b) = blocks.iter().find(|b| **b == 0 || **b > 1 << 10) {
                    bail!("resnet: {b} blocks in a stage; give 1..=1024");
                }
            }
        }
        Ok(())
    }

    pub fn name(&self) -> String {
        match self {
            Self::Cnn { .. } => "cnn".into(),
            Self::Resnet { blocks, .. } => format!("resnet-{}", 2 + 2 * blocks.iter().sum::<usize>()),
        }
    }
}

struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    shortcut: Option<(Conv2d, BatchNorm2d)>,
}

enum Body {
    Cnn { conv1: Conv2d, conv2: Conv2d, fc1: Linear, fc2: Linear },
    Resnet { stem: Conv2d, stem_bn: BatchNorm2d, blocks: Vec<BasicBlock>, fc: Linear },
}

/// The model.
pub struct VisionModel {
    pub config: VisionModelConfig,
    pub params: ParamStore,
    body: Body,
}

fn linear_init(ps: &mut ParamStore, name: &str, inp: usize, out: usize) -> Result<Linear> {
    // PyTorch's default: U(±1/√in) for weight and bias.
    let bound = 1.0 / (inp as f64).sqrt();
    Ok(Linear {
        weight: ps.uniform(&format!("{name}.weight"), &[out, inp], bound)?,
        bias: Some(ps.uniform(&format!("{name}.bias"), &[out], bound)?),
    })
}

impl VisionModel {
    pub fn new(
        config: VisionModelConfig,
        channels: usize,
        size: (usize, usize),
        classes: usize,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        config.validate()?;
        let mut ps = ParamStore::new(device, seed);
        let body = match &config {
            VisionModelConfig::Cnn { c1, c2, hidden, conv } => {
                let (h, w) = (size.0 / 4, size.1 / 4);
                if h == 0 || w == 0 {
                    bail!("images of {size:?} are too small for two 2×2 poolings");
                }
                Body::Cnn {
                    conv1: Conv2d::new(&mut ps, "conv1", channels, *c1, 3, 1, 1, true, *conv)?,
                    conv2: Conv2d::new(&mut ps, "conv2", *c1, *c2, 3, 1, 1, true, *conv)?,
                    fc1: linear_init(&mut ps, "fc1", c2 * h * w, *hidden)?,
                    fc2: linear_init(&mut ps, "fc2", *hidden, classes)?,
                }
            }
            VisionModelConfig::Resnet { blocks, widths, conv } => {
                if blocks.is_empty() || blocks.len() != widths.len() {
                    bail!("resnet: `blocks` and `widths` must be non-empty and of equal length");
                }
                let stem = Conv2d::new(&mut ps, "stem.conv", channels, widths[0], 3, 1, 1, false, *conv)?;
                let stem_bn = BatchNorm2d::new(&mut ps, "stem.bn", widths[0])?;
                let mut all = Vec::new();
                let mut inp = widths[0];
                for (s, (&n, &wd)) in blocks.iter().zip(widths).enumerate() {
                    for b in 0..n {
                        let stride = if s > 0 && b == 0 { 2 } else { 1 };
                        let p = format!("layer{}.{b}", s + 1);
                        let shortcut = if stride != 1 || inp != wd {
                            Some((
                                Conv2d::new(
                                    &mut ps,
                                    &format!("{p}.shortcut.conv"),
                                    inp,
                                    wd,
                                    1,
                                    stride,
                                    0,
                                    false,
                                    *conv,
                                )?,
                                BatchNorm2d::new(&mut ps, &format!("{p}.shortcut.bn"), wd)?,
                            ))
                        } else {
                            None
                        };
                        all.push(BasicBlock {
                            conv1: Conv2d::new(&mut ps, &format!("{p}.conv1"), inp, wd, 3, stride, 1, false, *conv)?,
                            bn1: BatchNorm2d::new(&mut ps, &format!("{p}.bn1"), wd)?,
                            conv2: Conv2d::new(&mut ps, &format!("{p}.conv2"), wd, wd, 3, 1, 1, false, *conv)?,
                            bn2: BatchNorm2d::new(&mut ps, &format!("{p}.bn2"), wd)?,
                            shortcut,
                        });
                        inp = wd;
                    }
                }
                let fc = linear_init(&mut ps, "fc", inp, classes)?;
                Body::Resnet { stem, stem_bn, blocks: all, fc }
            }
        };
        Ok(Self { config, params: ps, body })
    }

    /// Logits (B, classes) for images (B, C, H, W); `train` selects batch statistics.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(match &self.body {
            Body::Cnn { conv1, conv2, fc1, fc2 } => {
                let x = max_pool2x2(&relu(&conv1.forward(x)?)?)?;
                let x = max_pool2x2(&relu(&conv2.forward(&x)?)?)?;
                let x = x.flatten_from(1)?;
                fc2.forward(&relu(&fc1.forward(&x)?)?)?
            }
            Body::Resnet { stem, stem_bn, blocks, fc } => {
                let mut x = stem_bn.forward_t(&stem.forward(x)?, train, Activation::Relu)?;
                for b in blocks {
                    let y = b.bn1.forward_t(&b.conv1.forward(&x)?, train, Activation::Relu)?;
                    let y = b.bn2.forward_t(&b.conv2.forward(&y)?, train, Activation::Identity)?;
                    let short = match &b.shortcut {
                        Some((c, bn)) => bn.forward_t(&c.forward(&x)?, train, Activation::Identity)?,
                        None => x.clone(),
                    };
                    x = relu(&(y + short)?)?;
                }
                let pooled = x.mean(3)?.mean(2)?;
                fc.forward(&pooled)?
            }
        })
    }

    /// Mean cross-entropy and the number of correct predictions.
    pub fn loss_and_correct(&self, x: &Tensor, y: &Tensor, train: bool) -> Result<(Tensor, usize)> {
        let logits = self.forward(x, train)?;
        let loss = candle_nn::loss::cross_entropy(&logits, y)?;
        let pred = logits.argmax(1)?;
        let correct = pred.eq(y)?.to_dtype(candle_core::DType::U32)?.sum_all()?.to_scalar::<u32>()? as usize;
        Ok((loss, correct))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_parameter_counts() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 1, 28, 28), candle_core::DType::F32, &dev).unwrap();
        let cnn = VisionModel::new(VisionModelConfig::cnn(), 1, (28, 28), 10, &dev, 0).unwrap();
        assert_eq!(cnn.forward(&x, true).unwrap().dims(), &[2, 10]);
        // 1·32·9+32 + 32·64·9+64 + 64·49·128+128 + 128·10+10
        assert_eq!(cnn.params.num_params(), 320 + 18_496 + 401_536 + 1_290);
        let r20 = VisionModel::new(VisionModelConfig::resnet20(), 3, (32, 32), 10, &dev, 0).unwrap();
        let x3 = Tensor::zeros((2, 3, 32, 32), candle_core::DType::F32, &dev).unwrap();
        assert_eq!(r20.forward(&x3, false).unwrap().dims(), &[2, 10]);
        // The standard ResNet-20 with projection shortcuts has ≈ 0.27M parameters.
        let n = r20.params.num_params();
        assert!((260_000..290_000).contains(&n), "{n}");
        let r18 = VisionModel::new(VisionModelConfig::resnet18(), 3, (32, 32), 10, &dev, 0).unwrap();
        let n = r18.params.num_params();
        assert!((11_100_000..11_250_000).contains(&n), "ResNet-18 (CIFAR) has ≈ 11.17M parameters, got {n}");
    }

    #[test]
    fn evaluation_without_the_graph_gives_the_same_loss_and_accuracy_and_records_nothing() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (50, 1, 28, 28), &dev).unwrap();
        let y = Tensor::from_vec((0..50u32).map(|i| i % 10).collect::<Vec<_>>(), 50, &dev).unwrap();
        for config in [
            VisionModelConfig::cnn(),
            VisionModelConfig::Resnet { blocks: vec![1, 1], widths: vec![8, 16], conv: ConvAlgorithm::Im2col },
        ] {
            let m = VisionModel::new(config, 1, (28, 28), 10, &dev, 3).unwrap();
            let (recorded, c) = m.loss_and_correct(&x, &y, false).unwrap();
            let (free, cf) = candle_core::backprop::no_grad(|| m.loss_and_correct(&x, &y, false)).unwrap();
            assert_eq!(recorded.to_scalar::<f32>().unwrap().to_bits(), free.to_scalar::<f32>().unwrap().to_bits());
            assert_eq!(c, cf);
            assert!(recorded.track_op() && !free.track_op(), "the loss computed without the graph carries none");
            // Recording is back on afterwards.
            assert!(m.loss_and_correct(&x, &y, false).unwrap().0.track_op());
        }
    }

    #[test]
    fn the_convolution_algorithm_is_a_setting_left_out_of_the_json_at_its_default() {
        // Runs trained before the setting existed keep their ids: the default serializes as before.
        assert_eq!(
            serde_json::to_string(&VisionModelConfig::cnn()).unwrap(),
            r#"{"kind":"cnn","c1":32,"c2":64,"hidden":128}"#
        );
        let parsed: VisionModelConfig =
            serde_json::from_str(r#"{"kind":"resnet","blocks":[1],"widths":[8],"conv":"implicit-gemm"}"#).unwrap();
        assert_eq!(
            parsed,
            VisionModelConfig::Resnet { blocks: vec![1], widths: vec![8], conv: ConvAlgorithm::ImplicitGemm }
        );
        let bad =
            serde_json::from_str::<VisionModelConfig>(r#"{"kind":"cnn","c1":1,"c2":1,"hidden":1,"conv":"winograd"}"#);
        let msg = bad.unwrap_err().to_string();
        assert!(msg.contains("winograd") && msg.contains("implicit-gemm"), "{msg}");
        // The setting reaches every layer: the same parameters, outputs equal to f32 rounding
        // but not bit for bit (the 8-channel block convolutions take the implicit form).
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (6, 1, 12, 12), &dev).unwrap();
        let logits = |conv| {
            let m = VisionModel::new(
                VisionModelConfig::Resnet { blocks: vec![1], widths: vec![8], conv },
                1,
                (12, 12),
                3,
                &dev,
                5,
            )
            .unwrap();
            m.forward(&x, true).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let (a, b) = (logits(ConvAlgorithm::Im2col), logits(ConvAlgorithm::ImplicitGemm));
        assert_ne!(a, b);
        for (u, v) in a.iter().zip(&b) {
            assert!((u - v).abs() <= 1e-4 * (1.0 + v.abs()), "{u} vs {v}");
        }
    }

    #[test]
    fn batch_norm_switches_modes() {
        let dev = Device::Cpu;
        let m = VisionModel::new(
            VisionModelConfig::Resnet { blocks: vec![1], widths: vec![4], conv: ConvAlgorithm::Im2col },
            1,
            (8, 8),
            3,
            &dev,
            1,
        )
        .unwrap();
        let x = Tensor::randn(0f32, 1.0, (4, 1, 8, 8), &dev).unwrap();
        let before = m.forward(&x, false).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        m.forward(&x, true).unwrap(); // updates running statistics
        let after = m.forward(&x, false).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_ne!(before, after, "evaluation must use the running statistics, which training moved");
    }
}
