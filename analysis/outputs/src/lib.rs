//! # outputs — how the workspace writes its results
//!
//! Both `analysis` (bound checks, the Reddi counterexample) and `paper-repro` (runs, tables,
//! figures, the report) write files that other commands read back, and both draw figures. What
//! they share lives here, in a crate of its own, so that `paper-repro` depends on `analysis`
//! only for analysis itself and neither crate reaches into the other for generic helpers. It
//! sits inside `analysis/` because the workspace's top level is fixed by its design card.
//!
//! - [`atomic`]: a file is replaced whole or not at all ([`write_atomically`]).
//! - [`lock`]: one writer per folder ([`FolderLock`]).
//! - [`plot`]: line charts and heat maps as SVG and PNG.

pub mod atomic;
pub mod lock;
pub mod plot;

pub use atomic::{remove_stale_temporaries, write_atomically};
pub use lock::FolderLock;
