//! # analysis — the paper's convergence claims, checked numerically
//!
//! The MADA paper's theorem statements were not available to this project, so
//! this crate confronts published bounds and bounds derived here (`analysis/THEORY.md`) with the
//! algorithms they are proved for, on synthetic problems whose constants are computed:
//!
//! - [`problems`]: objectives with their smoothness, gradient bound and infimum, and bounded noise.
//! - [`frameworks`]: the algorithms exactly as the bounds' frameworks state them (the nonconvex
//!   form of Défossez et al. 2022 and the online-convex form of Reddi et al. 2018).
//! - [`bounds`]: the bound registry, each bound with its formula, assumptions and source, and the
//!   slot file for the paper's own statements.
//! - [`checks`]: every bound against the quantity it controls on random instances, with a
//!   one-sided confidence rule.
//! - [`mutants`]: wrong versions of every bound, to measure how much the checks can detect.
//! - [`search`]: instances that press on the bounds (and on each mutant), and the regression
//!   set of the worst ones.
//! - [`lemmas`]: Lemma A and the expected descent step, with exact expectations, nearly tight.
//! - [`interp`]: the interpolation claim, bound(ρ) and the empirical quantity over a ρ grid.
//! - [`reddi`]: the Reddi et al. counterexample with the official MADA settings.
//! - [`report`]: `analysis bounds` — runs all of the above and writes the reports.
//! - [`trace`]: one optimizer on a small quadratic in f64 (`analysis trace`); the reference
//!   trajectories of `tests/data/reference-traces` are reproduced by a test.

pub mod bounds;
pub mod checks;
pub mod frameworks;
pub mod interp;
pub mod lemmas;
pub mod mutants;
pub mod problems;
pub mod reddi;
pub mod report;
pub mod search;
pub mod trace;
