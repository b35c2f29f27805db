//! # paper-repro — the MADA paper's experiments in candle
pub mod data;
pub mod gpt;
pub mod nn;
pub mod vision;
pub mod ops;
pub mod spec;
pub mod train;
pub mod catalog;
pub mod tables;
pub mod figures;
pub mod report;
pub mod reproduce;
pub mod bench;
