//! Token data in nanoGPT's prepared format (`train.bin`/`val.bin`: little-endian uint16 tokens,
//! memory-mapped), with a `meta.json` describing the vocabulary, and the `prepare` step
//! (text → char-level or GPT-2 BPE tokens).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use memmap2::Mmap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use outputs::write_atomically;

use crate::run::workload::MicroBatch;

/// The GPT-2 end-of-text token.
pub const EOT: u32 = 50256;

/// How a corpus was tokenized.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Vocab {
    /// Characters, in sorted order (token i = chars[i]).
    Char { chars: Vec<char> },
    /// GPT-2 BPE (tiktoken r50k_base), 50257 tokens.
    Bpe,
}

impl Vocab {
    pub fn size(&self) -> usize {
        match self {
            Vocab::Char { chars } => chars.len(),
            Vocab::Bpe => 50257,
        }
    }

    /// "char-level, 92 symbols" or "GPT-2 BPE".
    pub fn describe(&self) -> String {
        match self {
            Vocab::Char { chars } => format!("char-level, {} symbols", chars.len()),
            Vocab::Bpe => "GPT-2 BPE".into(),
        }
    }

    pub fn decode(&self, tokens: &[u32]) -> Result<String> {
        match self {
            Vocab::Char { chars } => tokens
                .iter()
                .map(|&t| chars.get(t as usize).copied().with_context(|| format!("token {t} out of vocabulary")))
                .collect(),
            Vocab::Bpe => Ok(tiktoken_rs::r50k_base()?.decode(tokens)?),
        }
    }
}

/// `meta.json` beside the token files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    pub vocab: Vocab,
    /// Where the text came from.
    pub source: String,
    pub train_tokens: usize,
    pub val_tokens: usize,
}

/// A memory-mapped uint16 token file.
pub struct TokenFile {
    path: PathBuf,
    map: Mmap,
}

impl TokenFile {
    /// Open and validate (exists, non-empty, a whole number of uint16 tokens).
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open token file {}", path.display()))?;
        // SAFETY: the file is only read; a concurrent writer would be a user error that at
        // worst yields wrong tokens, never undefined behaviour beyond that read.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        if map.is_empty() {
            bail!("token file {} is empty", path.display());
        }
        if map.len() % 2 != 0 {
            bail!(
                "token file {} is truncated: {} bytes is not a whole number of uint16 tokens",
                path.display(),
                map.len()
            );
        }
        Ok(Self { path: path.to_path_buf(), map })
    }

    pub fn len(&self) -> usize {
        self.map.len() / 2
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    #[inline]
    pub fn token(&self, i: usize) -> u32 {
        u16::from_le_bytes([self.map[2 * i], self.map[2 * i + 1]]) as u32
    }

    fn window(&self, start: usize, len: usize) -> Vec<u32> {
        (start..start + len).map(|i| self.token(i)).collect()
    }
}

/// A corpus: train and val token files with their meta.
pub struct Corpus {
    pub dir: PathBuf,
    pub meta: Meta,
    /// Whether `meta` was read from `meta.json` (else GPT-2 BPE was assumed).
    pub meta_file: bool,
    pub train: TokenFile,
    pub val: TokenFile,
}

impl Corpus {
    /// Open `dir/{train,val}.bin` and `dir/meta.json`. Without `meta.json` (a folder prepared
    /// by nanoGPT) the vocabulary is taken as GPT-2 BPE.
    pub fn open(dir: &Path) -> Result<Self> {
        let train = TokenFile::open(&dir.join("train.bin"))?;
        let val = TokenFile::open(&dir.join("val.bin"))?;
        let meta_path = dir.join("meta.json");
        let meta_file = meta_path.exists();
        let meta = if meta_file {
            let text =
                std::fs::read_to_string(&meta_path).with_context(|| format!("cannot read {}", meta_path.display()))?;
            serde_json::from_str(&text).with_context(|| format!("invalid {}", meta_path.display()))?
        } else {
            Meta {
                vocab: Vocab::Bpe,
                source: format!("nanoGPT-prepared {}", dir.display()),
                train_tokens: train.len(),
                val_tokens: val.len(),
            }
        };
        let vocab = meta.vocab.size();
        for f in [&train, &val] {
            // A full scan is cheap next to training and catches a wrong meta.json early.
            let step = (f.len() / 100_000).max(1);
            if let Some(i) = (0..f.len()).step_by(step).find(|&i| f.token(i) as usize >= vocab) {
                bail!(
                    "{}: token {} at position {i} is outside the vocabulary of {vocab} given by meta.json",
                    f.path().display(),
                    f.token(i)
                );
            }
        }
        Ok(Self { dir: dir.to_path_buf(), meta, meta_file, train, val })
    }

    /// The window starts of a training micro-batch: `batch` uniform draws from rank `rank`'s
    /// contiguous 1/`ranks` shard of `train.bin` (as `train_ddp.py` gives each of its 8 ranks an
    /// eighth), seeded by (seed, update, rank, micro-batch), so a resumed run sees the same data
    /// and one rank's data does not depend on how many processes compute the others. With one
    /// rank the shard is the whole file.
    pub fn train_starts(&self, batch: usize, block: usize, seed: u64, mb: MicroBatch) -> Vec<usize> {
        let len = self.train.len();
        let (lo, hi) = (mb.rank as usize * len / mb.ranks as usize, (mb.rank as usize + 1) * len / mb.ranks as usize);
        let mixed = seed
            ^ mb.step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ mb.local.wrapping_mul(0xD1B5_4A32_D192_ED03)
            ^ mb.rank.wrapping_mul(0x8CB9_2BA7_2F3D_8DD7);
        let mut rng = StdRng::seed_from_u64(mixed);
        (0..batch).map(|_| lo + rng.random_range(0..hi - lo - block - 1)).collect()
    }

    /// The training windows starting at `starts` as (x, y), y shifted by one token.
    pub fn train_windows(&self, starts: &[usize], block: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        windows(&self.train, starts, block, device)
    }

    /// Where the vocabulary comes from, for messages.
    pub fn vocab_source(&self) -> String {
        if self.meta_file {
            format!("{} from its meta.json", self.meta.vocab.describe())
        } else {
            "GPT-2 BPE assumed: the folder has no meta.json".into()
        }
    }

    /// The deterministic validation batches of the official code: `count` contiguous chunks of
    /// length ⌊(len − block − 1)/count⌋, each read as consecutive windows of `block` tokens
    /// (at most `max_batch` per chunk).
    pub fn val_batches(&self, count: usize, block: usize, max_batch: usize) -> Result<Vec<Vec<usize>>> {
        let f = &self.val;
        if f.len() <= block + 1 {
            bail!("{} has {} tokens, fewer than block_size + 1 = {}", f.path().display(), f.len(), block + 1);
        }
        let chunk = ((f.len() - block - 1) / count.max(1)).max(1);
        Ok((0..count)
            .map(|k| {
                (chunk * k..chunk * (k + 1))
                    .step_by(block)
                    .take(max_batch)
                    .filter(|s| s + block < f.len())
                    .collect::<Vec<_>>()
            })
            .filter(|b| !b.is_empty())
            .collect())
    }

    pub fn val_batch(&self, starts: &[usize], block: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        windows(&self.val, starts, block, device)
    }
}

fn windows(f: &TokenFile, starts: &[usize], block: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let mut x = Vec::with_capacity(starts.len() * block);
    let mut y = Vec::with_capacity(starts.len() * block);
    for &s in starts {
        x.extend(f.window(s, block));
        y.extend(f.window(s + 1, block));
    }
    Ok((Tensor::from_vec(x, (starts.len(), block), device)?, Tensor::from_vec(y, (starts.len(), block), device)?))
}

fn write_tokens(path: &Path, tokens: &[u32]) -> Result<()> {
    let mut bytes = Vec::with_capacity(tokens.len() * 2);
    for &t in tokens {
        let t: u16 = t.try_into().with_context(|| format!("token {t} does not fit uint16"))?;
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    write_atomically(path, &bytes)
}

/// Tokenization of `prepare`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Tokenizer {
    /// The text's own characters, sorted.
    Char,
    /// A fixed alphabet — newline and printable ASCII (96 symbols) — shared by every corpus
    /// prepared with it (pretraining on one, fine-tuning on another); other characters are
    /// dropped.
    Ascii,
    /// GPT-2 BPE (tiktoken r50k_base).
    Bpe,
}

/// The [`Tokenizer::Ascii`] alphabet.
pub fn ascii_alphabet() -> Vec<char> {
    std::iter::once('\n').chain((32u8..=126).map(char::from)).collect()
}

/// Tokenize documents and write `out/{train,val}.bin` + `meta.json`.
/// Char: the whole text (documents joined) split 90/10 by position, as nanoGPT's
/// shakespeare_char. BPE: every document ends with EOT; with one document the split is 90/10 by
/// position, otherwise every 10th document goes to validation.
pub fn prepare(documents: &[String], tokenizer: Tokenizer, out: &Path, source: &str) -> Result<Meta> {
    if documents.iter().all(|d| d.is_empty()) {
        bail!("no text to prepare");
    }
    let (train, val, vocab) = match tokenizer {
        Tokenizer::Char => {
            let text: String = documents.join("\n\n");
            let chars: Vec<char> = text.chars().collect::<BTreeSet<char>>().into_iter().collect();
            if chars.len() > u16::MAX as usize {
                bail!("{} distinct characters do not fit uint16", chars.len());
            }
            let index = |c: char| chars.binary_search(&c).expect("in vocabulary") as u32;
            let tokens: Vec<u32> = text.chars().map(index).collect();
            let cut = tokens.len() * 9 / 10;
            (tokens[..cut].to_vec(), tokens[cut..].to_vec(), Vocab::Char { chars })
        }
        Tokenizer::Ascii => {
            let chars = ascii_alphabet();
            let text: String = documents.join("\n\n");
            let tokens: Vec<u32> =
                text.chars().filter_map(|c| chars.binary_search(&c).ok().map(|i| i as u32)).collect();
            if tokens.len() < 2 {
                bail!("no ASCII text to prepare");
            }
            let cut = tokens.len() * 9 / 10;
            (tokens[..cut].to_vec(), tokens[cut..].to_vec(), Vocab::Char { chars })
        }
        Tokenizer::Bpe => {
            let bpe = tiktoken_rs::r50k_base()?;
            let encode = |d: &str| -> Vec<u32> {
                let mut t: Vec<u32> = bpe.encode_ordinary(d).into_iter().collect();
                t.push(EOT);
                t
            };
            if documents.len() == 1 {
                let tokens = encode(&documents[0]);
                let cut = tokens.len() * 9 / 10;
                (tokens[..cut].to_vec(), tokens[cut..].to_vec(), Vocab::Bpe)
            } else {
                let (mut train, mut val) = (Vec::new(), Vec::new());
                for (i, d) in documents.iter().enumerate() {
                    if i % 10 == 9 {
                        val.extend(encode(d))
                    } else {
                        train.extend(encode(d))
                    }
                }
                (train, val, Vocab::Bpe)
            }
        }
    };
    write_tokens(&out.join("train.bin"), &train)?;
    write_tokens(&out.join("val.bin"), &val)?;
    let meta = Meta { vocab, source: source.to_string(), train_tokens: train.len(), val_tokens: val.len() };
    write_atomically(&out.join("meta.json"), serde_json::to_string_pretty(&meta)?.as_bytes())?;
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_prepare_round_trips_and_batches_are_reproducible() {
        let dir = tempfile::tempdir().unwrap();
        let text = "To be, or not to be, that is the question.\n".repeat(40);
        let meta = prepare(std::slice::from_ref(&text), Tokenizer::Char, dir.path(), "test").unwrap();
        let c = Corpus::open(dir.path()).unwrap();
        assert_eq!(c.meta, meta);
        let all: Vec<u32> =
            (0..c.train.len()).map(|i| c.train.token(i)).chain((0..c.val.len()).map(|i| c.val.token(i))).collect();
        assert_eq!(meta.vocab.decode(&all).unwrap(), text);
        let mb = MicroBatch { step: 3, rank: 0, ranks: 1, local: 0 };
        let starts = c.train_starts(4, 16, 7, mb);
        let (x1, y1) = c.train_windows(&starts, 16, &Device::Cpu).unwrap();
        let (x2, _) = c.train_windows(&c.train_starts(4, 16, 7, mb), 16, &Device::Cpu).unwrap();
        assert_eq!(x1.to_vec2::<u32>().unwrap(), x2.to_vec2::<u32>().unwrap());
        // y is x shifted by one.
        let (x, y) = (x1.to_vec2::<u32>().unwrap(), y1.to_vec2::<u32>().unwrap());
        assert_eq!(x[0][1..], y[0][..15]);
        // Rank r of 3 draws from its own third of train.bin.
        for rank in 0..3 {
            let third = c.train.len() / 3;
            let s = c.train_starts(50, 8, 7, MicroBatch { step: 3, rank, ranks: 3, local: 1 });
            assert!(s.iter().all(|&x| x >= rank as usize * third && x + 9 <= (rank as usize + 1) * third), "{s:?}");
        }
        let vb = c.val_batches(3, 8, 4).unwrap();
        assert_eq!(vb.len(), 3);
        assert!(vb.iter().flatten().all(|s| s + 8 < c.val.len()));
    }

    #[test]
    fn ascii_corpora_share_one_alphabet_and_drop_the_rest() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ma = prepare(&["Wikipedia — naïve café\n".repeat(30)], Tokenizer::Ascii, a.path(), "t").unwrap();
        let mb = prepare(&["To be, or not to be.\n".repeat(30)], Tokenizer::Ascii, b.path(), "t").unwrap();
        assert_eq!(ma.vocab, mb.vocab);
        assert_eq!(ma.vocab.size(), 96);
        let c = Corpus::open(a.path()).unwrap();
        let text = c.meta.vocab.decode(&(0..20).map(|i| c.train.token(i)).collect::<Vec<_>>()).unwrap();
        assert_eq!(text, "Wikipedia  nave caf\n");
    }

    #[test]
    fn bpe_prepare_appends_eot_per_document() {
        let dir = tempfile::tempdir().unwrap();
        let docs: Vec<String> = (0..20).map(|i| format!("Hello world number {i}.")).collect();
        let meta = prepare(&docs, Tokenizer::Bpe, dir.path(), "test").unwrap();
        let c = Corpus::open(dir.path()).unwrap();
        assert_eq!(meta.vocab.size(), 50257);
        let eots = (0..c.train.len()).filter(|&i| c.train.token(i) == EOT).count();
        assert_eq!(eots, 18);
        assert_eq!(c.train.token(0), 15496); // "Hello"
    }

    #[test]
    fn truncated_missing_and_out_of_vocabulary_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        prepare(&["abcabcabc".repeat(20)], Tokenizer::Char, dir.path(), "t").unwrap();
        let train = dir.path().join("train.bin");
        let mut bytes = std::fs::read(&train).unwrap();
        bytes.push(0);
        std::fs::write(&train, &bytes).unwrap();
        let e = format!("{:#}", Corpus::open(dir.path()).err().unwrap());
        assert!(e.contains("train.bin") && e.contains("truncated"), "{e}");
        bytes.pop();
        bytes[0] = 200; // token 200 ≥ vocabulary of 3
        std::fs::write(&train, &bytes).unwrap();
        let e = format!("{:#}", Corpus::open(dir.path()).err().unwrap());
        assert!(e.contains("outside the vocabulary"), "{e}");
        std::fs::remove_file(dir.path().join("val.bin")).unwrap();
        let e = format!("{:#}", Corpus::open(dir.path()).err().unwrap());
        assert!(e.contains("val.bin"), "{e}");
    }
}
