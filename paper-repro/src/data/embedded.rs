//! The smoke tier's data, prepared from the files embedded in the repository.

use std::path::Path;

use anyhow::{Context, Result};

use crate::data::text::{prepare, Tokenizer};
use crate::paths::data_root;

/// The data the smoke tier needs, prepared from the files embedded in the repository
/// (paper-repro/data): a char-level and a BPE *Macbeth*, and a Fashion-MNIST subset.
pub fn ensure_embedded_data() -> Result<()> {
    let root = data_root();
    let embedded = Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
    let macbeth = std::fs::read_to_string(embedded.join("macbeth.txt")).context("embedded macbeth.txt")?;
    for (name, tok) in [("smoke-char", Tokenizer::Char), ("smoke-bpe", Tokenizer::Bpe)] {
        let dir = root.join(name);
        if !dir.join("meta.json").exists() {
            prepare(std::slice::from_ref(&macbeth), tok, &dir, "embedded paper-repro/data/macbeth.txt")?;
        }
    }
    let fm = root.join("fashion-mnist-mini");
    if !fm.join("t10k-labels-idx1-ubyte.gz").exists() {
        std::fs::create_dir_all(&fm)?;
        for f in std::fs::read_dir(embedded.join("fashion-mnist-mini"))? {
            let f = f?;
            std::fs::copy(f.path(), fm.join(f.file_name()))?;
        }
    }
    Ok(())
}
