//! # paper-repro — the MADA paper's experiments in candle
//!
//! Two programs in one crate, in folders by concern:
//! - the neural-network engine: [`models`] (layers, GPT-2, vision models, fused CPU operators)
//!   and [`data`] (corpora, token files, image sets);
//! - the reproduction pipeline: [`catalog`] (the experiments as data), [`run`] (one training
//!   run: spec, loop, checkpoints, its folder's files), [`results`] (tables, figures, report),
//!   [`reproduce`] (orchestration), [`bench`] and [`gpu_check`] (the one check that needs a GPU).
//!
//! [`parallel`] runs one training run as several processes (data parallel: MPI, NCCL);
//! [`paths`] holds every path the crate derives.

pub mod bench;
pub mod catalog;
pub mod data;
pub mod gpu_check;
pub mod models;
pub mod parallel;
pub mod paths;
pub mod reproduce;
pub mod results;
pub mod run;
