//! The rules of the claims ledger, each a small function from evidence to a [`Verdict`].
//!
//! Three verdicts — supported, contradicted, inconclusive — plus "not tested at this tier".
//! Optimizers are compared on matched seeds only (the same initialization and data order); a
//! comparison counts as a win or a loss only when it is significant after Holm's correction
//! over every comparison the claim makes (all its tasks together, family-wise α = 0.05);
//! everything else is inconclusive. No optimizer is ranked "best" from means over different
//! seed sets, and a ratio of gains is printed only when its denominator is distinguishable
//! from 0.

use std::fmt;

use serde::Serialize;

use crate::results::stats::{holm, paired, stat, Stat};
use crate::results::tables::{median, worst, GridSummary};

/// The family-wise error rate of every claim's comparisons.
pub const ALPHA: f64 = 0.05;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Supported,
    Contradicted,
    Inconclusive,
    NotTested,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Supported => "supported",
            Verdict::Contradicted => "contradicted",
            Verdict::Inconclusive => "inconclusive",
            Verdict::NotTested => "not tested at this tier",
        })
    }
}

/// How one comparison came out after the correction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// MADA (the first optimizer) significantly better.
    Better,
    /// Significantly worse.
    Worse,
    /// Not distinguishable.
    Undecided,
}

/// A seed-matched comparison of two optimizers on one task: `gain` = sign·(a − b) per shared
/// seed, positive when a is better.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub task: String,
    pub a: String,
    pub b: String,
    pub gain: Stat,
}

impl Comparison {
    /// Compare the (seed, value) lists `a` and `b`; `sign` is +1 when higher is better.
    pub fn new(task: &str, a: (&str, &[(u64, f64)]), b: (&str, &[(u64, f64)]), sign: f64) -> Self {
        let gain: Vec<f64> = paired(a.1, b.1).into_iter().map(|d| sign * d).collect();
        Self { task: task.into(), a: a.0.into(), b: b.0.into(), gain: stat(&gain) }
    }

    pub fn p(&self) -> f64 {
        self.gain.p_value()
    }

    /// "task: A vs B +0.0123 [+0.0050, +0.0196], p = 0.004, 6 seeds → better".
    pub fn describe(&self, outcome: Outcome) -> String {
        let g = &self.gain;
        let range = if g.n > 1 { format!(" [{:+.4}, {:+.4}], p = {:.3}", g.lo, g.hi, self.p()) } else { String::new() };
        let word = match outcome {
            Outcome::Better => format!("{} better", self.a),
            Outcome::Worse => format!("{} worse", self.a),
            Outcome::Undecided => "inconclusive".into(),
        };
        let seeds = if g.n == 1 { "1 seed".to_string() } else { format!("{} seeds", g.n) };
        format!("{}: {} − {} gain {:+.4}{range} ({seeds}) → {word}", self.task, self.a, self.b, g.mean)
    }
}

/// Holm-corrected outcomes of a family of comparisons.
pub fn outcomes(comps: &[Comparison]) -> Vec<Outcome> {
    let p: Vec<f64> = comps.iter().map(Comparison::p).collect();
    holm(&p, ALPHA)
        .into_iter()
        .zip(comps)
        .map(|(rejected, c)| match (rejected, c.gain.mean > 0.0) {
            (true, true) => Outcome::Better,
            (true, false) => Outcome::Worse,
            (false, _) => Outcome::Undecided,
        })
        .collect()
}

/// Claim 2 ("MADA consistently outperforms Adam and other optimizers"), and the comparison
/// part of claim 4: supported when MADA wins every comparison, contradicted when it loses one,
/// inconclusive otherwise; not tested without comparisons.
pub fn wins_every_comparison(comps: &[Comparison]) -> (Verdict, Vec<Outcome>) {
    if comps.is_empty() {
        return (Verdict::NotTested, Vec::new());
    }
    let o = outcomes(comps);
    let verdict = if o.contains(&Outcome::Worse) {
        Verdict::Contradicted
    } else if o.iter().all(|x| *x == Outcome::Better) {
        Verdict::Supported
    } else {
        Verdict::Inconclusive
    };
    (verdict, o)
}

/// MADA's gain over Adam divided by another optimizer's, where that gain's interval excludes 0
/// and is positive; None otherwise (report the difference of gains instead).
pub fn gain_ratio(mada_gain: &Stat, other_gain: &Stat) -> Option<f64> {
    (other_gain.excludes_zero() && other_gain.mean > 0.0 && mada_gain.n > 0).then(|| mada_gain.mean / other_gain.mean)
}

/// One loss (train or validation) of a robustness grid, MADA against another optimizer.
#[derive(Clone, Debug, Serialize)]
pub struct GridEvidence {
    pub loss: &'static str,
    pub other: String,
    pub median: (f64, f64),
    pub worst: (f64, f64),
    /// The noise of a difference of two single runs (√(σ_MADA² + σ_other²)).
    pub noise: f64,
}

impl GridEvidence {
    /// MADA's and `other`'s cells over the cells both finished.
    pub fn new(mada: &GridSummary, other: &GridSummary, validation: bool) -> Self {
        let pick = |c: (f64, f64)| if validation { c.1 } else { c.0 };
        let (mut m, mut o) = (Vec::new(), Vec::new());
        for (cell, v) in &mada.cells {
            if let Some(w) = other.cell(*cell) {
                m.push(pick(*v));
                o.push(pick(w));
            }
        }
        let sd = |g: &GridSummary| if validation { g.noise.1 } else { g.noise.0 };
        Self {
            loss: if validation { "validation loss" } else { "train loss" },
            other: other.label.clone(),
            median: (median(&m), median(&o)),
            worst: (worst(&m), worst(&o)),
            noise: (sd(mada).powi(2) + sd(other).powi(2)).sqrt(),
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} vs {}: median {:.4} vs {:.4}, worst {:.4} vs {:.4} (noise of a difference {:.4})",
            self.loss, self.other, self.median.0, self.median.1, self.worst.0, self.worst.1, self.noise
        )
    }
}

/// Claim 3 ("robust to sub-optimally tuned initial hyper-parameters"), judged against Adam on
/// train and validation loss: supported when MADA's worst cell is lower than Adam's by more than
/// twice the noise of a difference and its median is not higher by more than that, on both
/// losses; contradicted when MADA's worst cell is higher than Adam's by more than that on
/// either; inconclusive otherwise (and without replicate seeds to measure the noise).
pub fn robustness(vs_adam: &[GridEvidence]) -> Verdict {
    if vs_adam.is_empty() {
        return Verdict::NotTested;
    }
    if vs_adam.iter().any(|g| !g.noise.is_finite()) {
        return Verdict::Inconclusive;
    }
    let margin = |g: &GridEvidence| 2.0 * g.noise;
    if vs_adam.iter().any(|g| g.worst.0 - g.worst.1 > margin(g)) {
        return Verdict::Contradicted;
    }
    if vs_adam.iter().all(|g| g.worst.1 - g.worst.0 > margin(g) && g.median.0 - g.median.1 <= margin(g)) {
        return Verdict::Supported;
    }
    Verdict::Inconclusive
}

/// The text of claim 3's evidence.
pub fn robustness_evidence(evidence: &[GridEvidence]) -> Vec<String> {
    evidence.iter().map(GridEvidence::describe).collect()
}

/// Claim 5 ("AVGrad suits hyper-gradient optimization better than AMSGrad"), from MADA over the
/// mean against MADA over the maximum: the training comparisons (mean − max, Holm-corrected)
/// and the Reddi counterexample's final average regrets (mean, max; lower is better, one
/// deterministic run each). Supported when the mean wins every training comparison and is not
/// worse on the counterexample; contradicted when the maximum wins a training comparison;
/// inconclusive otherwise.
pub fn mean_over_max(training: &[Comparison], reddi_regret: Option<(f64, f64)>) -> (Verdict, Vec<Outcome>) {
    if training.is_empty() && reddi_regret.is_none() {
        return (Verdict::NotTested, Vec::new());
    }
    let o = outcomes(training);
    let reddi_ok = reddi_regret.is_none_or(|(mean, max)| mean <= max);
    let verdict = if o.contains(&Outcome::Worse) {
        Verdict::Contradicted
    } else if !o.is_empty() && o.iter().all(|x| *x == Outcome::Better) && reddi_ok {
        Verdict::Supported
    } else {
        Verdict::Inconclusive
    };
    (verdict, o)
}

/// Claim 6 ("interpolations can improve the error bounds") by THEORY.md §6's definition, on
/// the instances of one derived bound: supported when an interior ρ beats both ends on at least
/// half of them; otherwise inconclusive — a bound derived here that shows no interior optimum
/// cannot contradict the paper's own (unavailable) theorem.
pub fn interpolation(interior: usize, instances: usize) -> Verdict {
    if instances == 0 {
        Verdict::NotTested
    } else if 2 * interior >= instances {
        Verdict::Supported
    } else {
        Verdict::Inconclusive
    }
}

/// Claim 1 ("the family contains the known optimizers"): the reference trajectories of the
/// corners, reproduced (`ok` of `total` within tolerance).
pub fn family_contains(ok: usize, total: usize) -> Verdict {
    if total == 0 {
        Verdict::NotTested
    } else if ok == total {
        Verdict::Supported
    } else {
        Verdict::Contradicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Role;

    fn seeds(v: &[f64]) -> Vec<(u64, f64)> {
        v.iter().enumerate().map(|(i, x)| (i as u64 + 1, *x)).collect()
    }

    /// Losses (lower is better): MADA vs `other` on six seeds.
    fn loss_comparison(mada: &[f64], other: &[f64]) -> Comparison {
        Comparison::new("task", ("MADA", &seeds(mada)), ("X", &seeds(other)), -1.0)
    }

    #[test]
    fn a_clear_win_everywhere_supports_claim_2_a_clear_loss_contradicts_it() {
        let win = loss_comparison(&[2.0, 2.1, 2.05, 1.95, 2.02, 2.08], &[2.2, 2.32, 2.24, 2.16, 2.21, 2.3]);
        let also = loss_comparison(&[1.0, 1.1, 1.05, 0.95, 1.02, 1.08], &[1.3, 1.38, 1.36, 1.24, 1.33, 1.4]);
        assert_eq!(wins_every_comparison(&[win.clone(), also.clone()]).0, Verdict::Supported);
        let loss = loss_comparison(&[2.2, 2.32, 2.24, 2.16, 2.21, 2.3], &[2.0, 2.1, 2.05, 1.95, 2.02, 2.08]);
        assert_eq!(wins_every_comparison(&[win.clone(), loss]).0, Verdict::Contradicted);
        // A tie on one task leaves the claim open, even if MADA wins elsewhere.
        let tie = loss_comparison(&[2.0, 2.1, 2.05, 1.95, 2.02, 2.08], &[2.02, 2.07, 2.06, 1.97, 2.0, 2.09]);
        assert_eq!(wins_every_comparison(&[win, tie]).0, Verdict::Inconclusive);
        assert_eq!(wins_every_comparison(&[]).0, Verdict::NotTested);
    }

    #[test]
    fn holm_can_turn_a_nominal_win_into_inconclusive() {
        // p ≈ 0.03 alone is a win; among five comparisons (threshold 0.01 for the smallest) not.
        let marginal = loss_comparison(&[2.0, 2.1, 2.05], &[2.1, 2.3, 2.2]);
        assert!(marginal.p() > 0.01 && marginal.p() < 0.05, "{}", marginal.p());
        assert_eq!(wins_every_comparison(std::slice::from_ref(&marginal)).0, Verdict::Supported);
        let five = vec![marginal.clone(), marginal.clone(), marginal.clone(), marginal.clone(), marginal];
        assert_eq!(wins_every_comparison(&five).0, Verdict::Inconclusive);
    }

    #[test]
    fn comparisons_pair_seeds_and_single_seeds_never_decide() {
        // Other optimizer with one seed: inconclusive however large the gap.
        let c = Comparison::new("t", ("MADA", &seeds(&[1.0, 1.0])), ("Lion", &[(1, 9.0)]), -1.0);
        assert_eq!(c.gain.n, 1);
        assert_eq!(outcomes(&[c]), [Outcome::Undecided]);
        // Accuracy: higher is better.
        let acc =
            Comparison::new("t", ("MADA", &seeds(&[0.90, 0.91, 0.92])), ("Adam", &seeds(&[0.80, 0.805, 0.81])), 1.0);
        assert_eq!(outcomes(&[acc]), [Outcome::Better]);
    }

    #[test]
    fn a_ratio_needs_a_denominator_away_from_zero() {
        let mada = stat(&[0.2, 0.21, 0.19]);
        assert!((gain_ratio(&mada, &stat(&[0.1, 0.11, 0.09])).unwrap() - 2.0).abs() < 1e-9);
        assert_eq!(gain_ratio(&mada, &stat(&[0.1, -0.1, 0.02])), None);
        assert_eq!(gain_ratio(&mada, &stat(&[0.1])), None);
        assert_eq!(gain_ratio(&mada, &stat(&[-0.1, -0.11, -0.12])), None);
    }

    fn grid(label: &str, cells: &[(f64, f64)], noise: f64) -> GridSummary {
        GridSummary {
            label: label.into(),
            key: label.to_lowercase(),
            role: Role::Other,
            cells: cells.iter().enumerate().map(|(i, &v)| ((i as f64 / 10.0, 0.9), v)).collect(),
            finished_cells: cells.len(),
            planned_cells: cells.len(),
            noise: (noise, noise),
        }
    }

    #[test]
    fn robustness_judges_median_and_worst_case_against_the_noise() {
        let adam = grid("Adam", &[(2.0, 2.1), (2.05, 2.15), (6.0, 6.2), (2.1, 2.2)], 0.02);
        let robust = grid("MADA", &[(2.0, 2.1), (2.04, 2.12), (2.3, 2.4), (2.1, 2.2)], 0.02);
        let ev = |m: &GridSummary| vec![GridEvidence::new(m, &adam, false), GridEvidence::new(m, &adam, true)];
        assert_eq!(robustness(&ev(&robust)), Verdict::Supported);
        // The same worst case but a median far above Adam's: not supported.
        let shifted = grid("MADA", &[(2.5, 2.6), (2.6, 2.7), (2.7, 2.8), (2.55, 2.65)], 0.02);
        assert_eq!(robustness(&ev(&shifted)), Verdict::Inconclusive);
        // A worse worst case contradicts it.
        let fragile = grid("MADA", &[(2.0, 2.1), (2.05, 2.15), (9.0, 9.5), (2.1, 2.2)], 0.02);
        assert_eq!(robustness(&ev(&fragile)), Verdict::Contradicted);
        // Differences within the noise decide nothing; no replicates, no verdict.
        let noisy = grid("MADA", &[(2.0, 2.1), (2.04, 2.12), (2.3, 2.4), (2.1, 2.2)], 3.0);
        assert_eq!(robustness(&ev(&noisy)), Verdict::Inconclusive);
        let unmeasured = grid("MADA", &[(2.0, 2.1), (2.04, 2.12), (2.3, 2.4), (2.1, 2.2)], f64::NAN);
        assert_eq!(robustness(&ev(&unmeasured)), Verdict::Inconclusive);
        // A diverged cell is the worst case.
        let diverged = grid("Adam", &[(2.0, 2.1), (f64::NAN, f64::NAN)], 0.02);
        assert_eq!(GridEvidence::new(&robust, &diverged, false).worst.1, f64::INFINITY);
    }

    #[test]
    fn claim_5_needs_the_mean_to_win_and_the_counterexample_to_agree() {
        let mean_wins = loss_comparison(&[2.0, 2.1, 2.05, 1.95], &[2.3, 2.42, 2.36, 2.24]);
        assert_eq!(mean_over_max(std::slice::from_ref(&mean_wins), Some((0.1, 0.2))).0, Verdict::Supported);
        assert_eq!(mean_over_max(std::slice::from_ref(&mean_wins), Some((0.3, 0.2))).0, Verdict::Inconclusive);
        let max_wins = loss_comparison(&[2.3, 2.42, 2.36, 2.24], &[2.0, 2.1, 2.05, 1.95]);
        assert_eq!(mean_over_max(&[max_wins], Some((0.1, 0.2))).0, Verdict::Contradicted);
        assert_eq!(mean_over_max(&[], Some((0.1, 0.2))).0, Verdict::Inconclusive);
        assert_eq!(mean_over_max(&[], None).0, Verdict::NotTested);
    }

    #[test]
    fn claim_6_follows_theorys_definition_and_claim_1_the_traces() {
        assert_eq!(interpolation(0, 48), Verdict::Inconclusive);
        assert_eq!(interpolation(30, 48), Verdict::Supported);
        assert_eq!(interpolation(0, 0), Verdict::NotTested);
        assert_eq!(family_contains(11, 11), Verdict::Supported);
        assert_eq!(family_contains(10, 11), Verdict::Contradicted);
    }
}
