//! The neural-network engine the experiments train: layers over a seeded parameter store
//! ([`nn`]), nanoGPT's GPT-2 ([`gpt`]), the vision models ([`vision`]) and the fused CPU
//! operators they run on ([`ops`]).

pub mod gpt;
pub mod nn;
pub mod ops;
pub mod vision;
