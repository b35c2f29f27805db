//! A run: its spec ([`spec`]), what it trains ([`workload`]), one update ([`trainer`]), the loop
//! with checkpoints and resume ([`train`], [`checkpoint`]) and the files of its folder ([`log`]).

pub mod checkpoint;
pub mod log;
pub mod spec;
pub mod train;
pub mod trainer;
pub mod workload;

pub use log::{RunDir, RunResult};
pub use spec::RunSpec;
pub use train::{train, train_with, Outcome, Start, TrainOptions};
pub use trainer::{Diverged, Trainer};
