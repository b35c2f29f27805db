//! # analysis — the paper's convergence claims, checked numerically
//!
//! - [`trace`]: run one optimizer on a small quadratic in f64 and write its trajectory; the
//!   reference trajectories of `tests/data/reference-traces` are reproduced by a test.
//! - [`io`]: atomic file output shared by the workspace's commands.

pub mod io;
pub mod trace;
pub mod bounds;
pub mod frameworks;
pub mod problems;
pub mod plot;
pub mod checks;
pub mod interp;
pub mod reddi;
pub mod report;
