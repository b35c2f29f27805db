//! The smoke tier's data, embedded in the binary (so that a moved binary still has it) and
//! prepared into the data root on first use: a char-level and a BPE *Macbeth*, and a
//! Fashion-MNIST subset (`paper-repro/data/`, see its README for the sources).

use anyhow::Result;

use crate::data::text::{prepare, Tokenizer};
use crate::paths::data_root;

/// *Macbeth* (Project Gutenberg, public domain).
pub const MACBETH: &str = include_str!("../../data/macbeth.txt");

/// The Fashion-MNIST subset's IDX files (name, gzip bytes).
pub const FASHION_MNIST_MINI: [(&str, &[u8]); 4] = [
    ("train-images-idx3-ubyte.gz", include_bytes!("../../data/fashion-mnist-mini/train-images-idx3-ubyte.gz")),
    ("train-labels-idx1-ubyte.gz", include_bytes!("../../data/fashion-mnist-mini/train-labels-idx1-ubyte.gz")),
    ("t10k-images-idx3-ubyte.gz", include_bytes!("../../data/fashion-mnist-mini/t10k-images-idx3-ubyte.gz")),
    ("t10k-labels-idx1-ubyte.gz", include_bytes!("../../data/fashion-mnist-mini/t10k-labels-idx1-ubyte.gz")),
];

/// Write the Fashion-MNIST subset's files into `dir`.
pub fn write_fashion_mnist_mini(dir: &std::path::Path) -> Result<()> {
    for (name, bytes) in FASHION_MNIST_MINI {
        outputs::write_atomically(&dir.join(name), bytes)?;
    }
    Ok(())
}

/// Prepare the smoke tier's corpora and images in the data root, unless they are there.
pub fn ensure_embedded_data() -> Result<()> {
    let root = data_root();
    for (name, tok) in [("smoke-char", Tokenizer::Char), ("smoke-bpe", Tokenizer::Bpe)] {
        let dir = root.join(name);
        if !dir.join("meta.json").exists() {
            prepare(&[MACBETH.to_string()], tok, &dir, "embedded paper-repro/data/macbeth.txt")?;
        }
    }
    let fm = root.join("fashion-mnist-mini");
    if !fm.join("t10k-labels-idx1-ubyte.gz").exists() {
        write_fashion_mnist_mini(&fm)?;
    }
    Ok(())
}
