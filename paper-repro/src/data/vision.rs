//! Image datasets in their distribution formats: MNIST / Fashion-MNIST IDX files (gzip or
//! plain) and CIFAR-10 / CIFAR-100 binary batches; seeded CIFAR augmentation (random crop with
//! 4-pixel zero padding, horizontal flip). Every loader names the file it rejects.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Images (N, C, H, W) as u8 and their labels.
#[derive(Clone, Debug)]
pub struct ImageSet {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub classes: usize,
}

impl ImageSet {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    fn image_size(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Per-channel mean and standard deviation of the pixel values in [0, 1].
    pub fn channel_stats(&self) -> Vec<(f32, f32)> {
        let (n, hw) = (self.len(), self.height * self.width);
        (0..self.channels)
            .map(|c| {
                let (mut s, mut s2) = (0f64, 0f64);
                for i in 0..n {
                    let base = i * self.image_size() + c * hw;
                    for &p in &self.images[base..base + hw] {
                        let v = p as f64 / 255.0;
                        s += v;
                        s2 += v * v;
                    }
                }
                let count = (n * hw) as f64;
                let mean = s / count;
                (mean as f32, ((s2 / count - mean * mean).max(1e-12)).sqrt() as f32)
            })
            .collect()
    }

    /// The first `n` examples.
    pub fn take(&self, n: usize) -> ImageSet {
        let n = n.min(self.len());
        ImageSet {
            images: self.images[..n * self.image_size()].to_vec(),
            labels: self.labels[..n].to_vec(),
            ..self.clone()
        }
    }

    /// A batch of the examples `indices`, normalized with `stats`, augmented if `augment` is
    /// given (seeded), as (images f32 (B, C, H, W), labels u32 (B)).
    pub fn batch(
        &self,
        indices: &[usize],
        stats: &[(f32, f32)],
        augment: Option<&mut StdRng>,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let (c, h, w) = (self.channels, self.height, self.width);
        let size = self.image_size();
        let mut out = Vec::with_capacity(indices.len() * size);
        let mut aug = augment;
        for &i in indices {
            let img = &self.images[i * size..(i + 1) * size];
            let (dx, dy, flip) = match aug.as_deref_mut() {
                Some(rng) => (rng.random_range(-4i64..=4), rng.random_range(-4i64..=4), rng.random_bool(0.5)),
                None => (0, 0, false),
            };
            for ch in 0..c {
                let (mean, std) = stats[ch];
                for y in 0..h {
                    for x in 0..w {
                        let sx = if flip { w - 1 - x } else { x } as i64 + dx;
                        let sy = y as i64 + dy;
                        let v = if sx < 0 || sy < 0 || sx >= w as i64 || sy >= h as i64 {
                            0.0 // zero padding (of the raw image, as torchvision pads before normalizing)
                        } else {
                            img[ch * h * w + sy as usize * w + sx as usize] as f32 / 255.0
                        };
                        out.push((v - mean) / std);
                    }
                }
            }
        }
        let labels: Vec<u32> = indices.iter().map(|&i| self.labels[i] as u32).collect();
        Ok((Tensor::from_vec(out, (indices.len(), c, h, w), device)?, Tensor::from_vec(labels, indices.len(), device)?))
    }
}

/// The order of one epoch: a permutation of 0..n from (seed, epoch).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    idx
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .with_context(|| format!("{} is a truncated or corrupt gzip file", path.display()))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Read an IDX file: magic 0x00000801 (labels, 1-D u8) or 0x00000803 (images, 3-D u8).
pub fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let bytes = read_maybe_gz(path)?;
    if bytes.len() < 4 {
        bail!("{} is too short to be an IDX file", path.display());
    }
    if bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 || !(1..=4).contains(&bytes[3]) {
        bail!(
            "{} has a wrong magic number {:02x?} (expected 00 00 08 0n: unsigned-byte IDX)",
            path.display(),
            &bytes[..4]
        );
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        bail!("{} is truncated inside its header", path.display());
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|k| u32::from_be_bytes(bytes[4 + 4 * k..8 + 4 * k].try_into().expect("4 bytes")) as usize)
        .collect();
    let expected: usize = dims.iter().product();
    let data = &bytes[header..];
    if data.len() != expected {
        bail!(
            "{} is truncated: its header announces {expected} bytes of data ({dims:?}), it holds {}",
            path.display(),
            data.len()
        );
    }
    Ok((dims, data.to_vec()))
}

fn first_existing(dir: &Path, names: &[&str]) -> Result<PathBuf> {
    names
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.exists())
        .with_context(|| format!("none of {names:?} found in {}", dir.display()))
}

/// MNIST or Fashion-MNIST (`train` or `t10k` split) from a folder of IDX files (gzip or plain).
pub fn load_idx_split(dir: &Path, split: &str) -> Result<ImageSet> {
    let img = first_existing(
        dir,
        &[
            &format!("{split}-images-idx3-ubyte.gz"),
            &format!("{split}-images-idx3-ubyte"),
            &format!("{split}-images.idx3-ubyte"),
        ],
    )?;
    let lab = first_existing(
        dir,
        &[
            &format!("{split}-labels-idx1-ubyte.gz"),
            &format!("{split}-labels-idx1-ubyte"),
            &format!("{split}-labels.idx1-ubyte"),
        ],
    )?;
    let (idims, images) = read_idx(&img)?;
    let (ldims, labels) = read_idx(&lab)?;
    if idims.len() != 3 {
        bail!("{} is not a 3-D image file (dims {idims:?})", img.display());
    }
    if idims[0] == 0 || idims[1] == 0 || idims[2] == 0 {
        bail!("{} holds no images (dims {idims:?})", img.display());
    }
    if ldims.len() != 1 || ldims[0] != idims[0] {
        bail!("{} has {:?} labels for {} images in {}", lab.display(), ldims, idims[0], img.display());
    }
    if let Some(bad) = labels.iter().find(|&&l| l > 9) {
        bail!("{} holds label {bad} (expected 0..9)", lab.display());
    }
    Ok(ImageSet { images, labels, channels: 1, height: idims[1], width: idims[2], classes: 10 })
}

/// CIFAR-10 (`classes = 10`: `data_batch_{1..5}.bin` / `test_batch.bin`, records of 1 label +
/// 3072 pixels) or CIFAR-100 (`train.bin` / `test.bin`, records of coarse + fine label + 3072
/// pixels; the fine label is used).
pub fn load_cifar(dir: &Path, classes: usize, train: bool) -> Result<ImageSet> {
    let (files, label_bytes): (Vec<String>, usize) = match (classes, train) {
        (10, true) => ((1..=5).map(|i| format!("data_batch_{i}.bin")).collect(), 1),
        (10, false) => (vec!["test_batch.bin".into()], 1),
        (100, true) => (vec!["train.bin".into()], 2),
        (100, false) => (vec!["test.bin".into()], 2),
        _ => bail!("CIFAR has 10 or 100 classes, not {classes}"),
    };
    let record = label_bytes + 3072;
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for f in files {
        let path = dir.join(&f);
        let bytes = std::fs::read(&path)
            .with_context(|| format!("cannot read {} (CIFAR binary version expected)", path.display()))?;
        if bytes.is_empty() || bytes.len() % record != 0 {
            bail!(
                "{} is truncated: {} bytes is not a whole number of {record}-byte records",
                path.display(),
                bytes.len()
            );
        }
        for r in bytes.chunks_exact(record) {
            let label = r[label_bytes - 1];
            if label as usize >= classes {
                bail!("{} holds label {label} for a {classes}-class dataset", path.display());
            }
            labels.push(label);
            images.extend_from_slice(&r[label_bytes..]);
        }
    }
    Ok(ImageSet { images, labels, channels: 3, height: 32, width: 32, classes })
}

/// Which dataset a vision run uses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case", deny_unknown_fields)]
pub enum VisionData {
    /// IDX files (gzip or plain) in `dir` (default: Debian's dataset-fashion-mnist folder).
    FashionMnist {
        #[serde(default = "default_fashion_dir")]
        dir: PathBuf,
    },
    Mnist {
        dir: PathBuf,
    },
    Cifar10 {
        dir: PathBuf,
    },
    Cifar100 {
        dir: PathBuf,
    },
}

pub fn default_fashion_dir() -> PathBuf {
    PathBuf::from("/usr/share/datasets/fashion-mnist")
}

impl VisionData {
    /// The same data with its folder passed through `resolve` (relative paths → data root).
    pub fn resolved(&self, resolve: impl Fn(&Path) -> PathBuf) -> VisionData {
        match self {
            VisionData::FashionMnist { dir } => VisionData::FashionMnist { dir: resolve(dir) },
            VisionData::Mnist { dir } => VisionData::Mnist { dir: resolve(dir) },
            VisionData::Cifar10 { dir } => VisionData::Cifar10 { dir: resolve(dir) },
            VisionData::Cifar100 { dir } => VisionData::Cifar100 { dir: resolve(dir) },
        }
    }

    /// (train, test).
    pub fn load(&self) -> Result<(ImageSet, ImageSet)> {
        match self {
            VisionData::FashionMnist { dir } | VisionData::Mnist { dir } => {
                Ok((load_idx_split(dir, "train")?, load_idx_split(dir, "t10k")?))
            }
            VisionData::Cifar10 { dir } => Ok((load_cifar(dir, 10, true)?, load_cifar(dir, 10, false)?)),
            VisionData::Cifar100 { dir } => Ok((load_cifar(dir, 100, true)?, load_cifar(dir, 100, false)?)),
        }
    }

    /// CIFAR gets the standard crop-and-flip augmentation.
    pub fn augments(&self) -> bool {
        matches!(self, VisionData::Cifar10 { .. } | VisionData::Cifar100 { .. })
    }
}

/// Write a small IDX pair (for tests and the smoke tier): `n` images of `h × w` from `pixel`.
#[allow(clippy::too_many_arguments)]
pub fn write_idx_pair(
    dir: &Path,
    split: &str,
    n: usize,
    h: usize,
    w: usize,
    gz: bool,
    pixel: impl Fn(usize, usize, usize) -> u8,
    label: impl Fn(usize) -> u8,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut img = vec![0, 0, 8, 3];
    for d in [n, h, w] {
        img.extend_from_slice(&(d as u32).to_be_bytes());
    }
    for i in 0..n {
        for y in 0..h {
            for x in 0..w {
                img.push(pixel(i, y, x));
            }
        }
    }
    let mut lab = vec![0, 0, 8, 1];
    lab.extend_from_slice(&(n as u32).to_be_bytes());
    lab.extend((0..n).map(&label));
    let write = |name: &str, bytes: Vec<u8>| -> Result<()> {
        if gz {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut enc, &bytes)?;
            outputs::write_atomically(&dir.join(format!("{name}.gz")), &enc.finish()?)
        } else {
            outputs::write_atomically(&dir.join(name), &bytes)
        }
    };
    write(&format!("{split}-images-idx3-ubyte"), img)?;
    write(&format!("{split}-labels-idx1-ubyte"), lab)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idx_gzip_and_plain_round_trip() {
        for gz in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            write_idx_pair(dir.path(), "train", 5, 4, 3, gz, |i, y, x| (i * 12 + y * 3 + x) as u8, |i| (i % 10) as u8)
                .unwrap();
            write_idx_pair(dir.path(), "t10k", 2, 4, 3, gz, |_, _, _| 7, |_| 1).unwrap();
            let set = load_idx_split(dir.path(), "train").unwrap();
            assert_eq!((set.len(), set.height, set.width), (5, 4, 3));
            assert_eq!(set.images[12], 12);
            assert_eq!(set.labels, vec![0, 1, 2, 3, 4]);
        }
    }

    #[test]
    fn truncated_and_wrong_magic_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        write_idx_pair(dir.path(), "train", 5, 4, 3, false, |_, _, _| 0, |_| 0).unwrap();
        let p = dir.path().join("train-images-idx3-ubyte");
        let mut b = std::fs::read(&p).unwrap();
        b.truncate(b.len() - 1);
        std::fs::write(&p, &b).unwrap();
        let e = format!("{:#}", load_idx_split(dir.path(), "train").unwrap_err());
        assert!(e.contains("train-images-idx3-ubyte") && e.contains("truncated"), "{e}");
        b[2] = 9;
        std::fs::write(&p, &b).unwrap();
        let e = format!("{:#}", load_idx_split(dir.path(), "train").unwrap_err());
        assert!(e.contains("wrong magic"), "{e}");
        // A truncated gzip stream.
        let dir2 = tempfile::tempdir().unwrap();
        write_idx_pair(dir2.path(), "train", 50, 8, 8, true, |i, y, x| (i + y + x) as u8, |_| 0).unwrap();
        let g = dir2.path().join("train-images-idx3-ubyte.gz");
        let gb = std::fs::read(&g).unwrap();
        std::fs::write(&g, &gb[..gb.len() / 2]).unwrap();
        let e = format!("{:#}", load_idx_split(dir2.path(), "train").unwrap_err());
        assert!(e.contains("train-images-idx3-ubyte.gz"), "{e}");
    }

    #[test]
    fn cifar_binary_records() {
        let dir = tempfile::tempdir().unwrap();
        let rec = |label: u8, fill: u8| -> Vec<u8> {
            let mut r = vec![label];
            r.extend(std::iter::repeat_n(fill, 3072));
            r
        };
        for i in 1..=5 {
            std::fs::write(dir.path().join(format!("data_batch_{i}.bin")), [rec(i, 10), rec(0, 20)].concat()).unwrap();
        }
        std::fs::write(dir.path().join("test_batch.bin"), rec(3, 5)).unwrap();
        let set = load_cifar(dir.path(), 10, true).unwrap();
        assert_eq!(set.len(), 10);
        assert_eq!(set.labels[..2], [1, 0]);
        let mut bad = rec(1, 0);
        bad.pop();
        std::fs::write(dir.path().join("test_batch.bin"), bad).unwrap();
        let e = format!("{:#}", load_cifar(dir.path(), 10, false).unwrap_err());
        assert!(e.contains("test_batch.bin") && e.contains("truncated"), "{e}");
        std::fs::write(dir.path().join("test_batch.bin"), rec(12, 0)).unwrap();
        assert!(format!("{:#}", load_cifar(dir.path(), 10, false).unwrap_err()).contains("label 12"));
    }

    #[test]
    fn augmentation_is_seeded_and_shapes_hold() {
        let set = ImageSet {
            images: (0..2 * 3 * 32 * 32).map(|i| (i % 251) as u8).collect(),
            labels: vec![1, 2],
            channels: 3,
            height: 32,
            width: 32,
            classes: 10,
        };
        let stats = set.channel_stats();
        let (a, _) = set.batch(&[0, 1], &stats, Some(&mut StdRng::seed_from_u64(5)), &Device::Cpu).unwrap();
        let (b, y) = set.batch(&[0, 1], &stats, Some(&mut StdRng::seed_from_u64(5)), &Device::Cpu).unwrap();
        assert_eq!(a.dims(), &[2, 3, 32, 32]);
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert_eq!(y.to_vec1::<u32>().unwrap(), vec![1, 2]);
        assert_ne!(epoch_order(100, 1, 0), epoch_order(100, 1, 1));
    }
}
