//! The statistics the tables and the ledger use: mean and Student-t intervals over seeds,
//! paired (seed-matched) comparisons with two-sided p-values, and Holm's step-down correction.

use serde::Serialize;
use statrs::distribution::{ContinuousCDF, StudentsT};

/// Mean, sample standard deviation and the Student-t 95% interval of the mean (NaN where `n` is
/// too small: no spread from one value, nothing from none).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Stat {
    pub n: usize,
    pub mean: f64,
    pub std: f64,
    pub lo: f64,
    pub hi: f64,
}

/// [`Stat`] of the finite values of `xs`.
pub fn stat(xs: &[f64]) -> Stat {
    let xs: Vec<f64> = xs.iter().cloned().filter(|v| v.is_finite()).collect();
    let n = xs.len();
    if n == 0 {
        return Stat { n, mean: f64::NAN, std: f64::NAN, lo: f64::NAN, hi: f64::NAN };
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return Stat { n, mean, std: f64::NAN, lo: f64::NAN, hi: f64::NAN };
    }
    let std = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
    let t = StudentsT::new(0.0, 1.0, (n - 1) as f64).expect("valid t").inverse_cdf(0.975);
    let half = t * std / (n as f64).sqrt();
    Stat { n, mean, std, lo: mean - half, hi: mean + half }
}

impl Stat {
    /// Whether the 95% interval excludes 0 (never with fewer than two values).
    pub fn excludes_zero(&self) -> bool {
        self.n > 1 && (self.lo > 0.0 || self.hi < 0.0)
    }

    /// The two-sided p-value of a one-sample t-test of mean 0 (1 when it cannot be computed;
    /// 0 when every difference is the same non-zero value).
    pub fn p_value(&self) -> f64 {
        if self.n < 2 || !self.mean.is_finite() {
            return 1.0;
        }
        if self.std == 0.0 {
            return if self.mean == 0.0 { 1.0 } else { 0.0 };
        }
        let t = self.mean / (self.std / (self.n as f64).sqrt());
        let dist = StudentsT::new(0.0, 1.0, (self.n - 1) as f64).expect("valid t");
        2.0 * (1.0 - dist.cdf(t.abs()))
    }
}

/// The seed-matched differences a − b over the seeds both have.
pub fn paired(a: &[(u64, f64)], b: &[(u64, f64)]) -> Vec<f64> {
    a.iter().filter_map(|(s, x)| b.iter().find(|(t, _)| t == s).map(|(_, y)| x - y)).collect()
}

/// Holm's step-down correction at level `alpha`: which of the hypotheses with these p-values
/// are rejected, controlling the family-wise error rate.
pub fn holm(p: &[f64], alpha: f64) -> Vec<bool> {
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&i, &j| p[i].total_cmp(&p[j]));
    let m = p.len();
    let mut rejected = vec![false; m];
    for (rank, &i) in order.iter().enumerate() {
        if p[i] <= alpha / (m - rank) as f64 {
            rejected[i] = true;
        } else {
            break;
        }
    }
    rejected
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_interval_matches_the_textbook() {
        let s = stat(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(s.mean, 3.0);
        assert!((s.std - 1.5811388).abs() < 1e-6);
        // t_{0.975, 4} = 2.776445
        assert!((s.hi - (3.0 + 2.776445 * 1.5811388 / 5f64.sqrt())).abs() < 1e-5);
        assert_eq!(stat(&[2.0]).n, 1);
        assert!(stat(&[f64::NAN]).mean.is_nan());
    }

    #[test]
    fn p_values_are_those_of_the_paired_t_test() {
        // Differences (0.1, 0.2, 0.15): t = 0.15 / (0.05/√3) = 5.196, 2 df → p = 0.0351.
        let s = stat(&[0.1, 0.2, 0.15]);
        assert!((s.p_value() - 0.0351).abs() < 2e-4, "{}", s.p_value());
        assert_eq!(stat(&[0.3]).p_value(), 1.0);
        assert_eq!(stat(&[0.3, 0.3]).p_value(), 0.0);
        assert!(s.excludes_zero() && !stat(&[0.1, -0.1, 0.05]).excludes_zero());
    }

    #[test]
    fn holm_steps_down_and_stops_at_the_first_acceptance() {
        // m = 4: thresholds 0.0125, 0.0167, 0.025, 0.05 in p order.
        assert_eq!(holm(&[0.01, 0.04, 0.015, 0.2], 0.05), [true, false, true, false]);
        // 0.013 > 0.0125 stops everything, although 0.02 < 0.025.
        assert_eq!(holm(&[0.013, 0.02, 0.5, 0.5], 0.05), [false, false, false, false]);
        assert!(holm(&[], 0.05).is_empty());
    }

    #[test]
    fn pairing_uses_the_shared_seeds_only() {
        let a = [(1, 3.0), (2, 3.5), (3, 2.0)];
        let b = [(2, 3.0), (3, 2.5), (4, 9.0)];
        assert_eq!(paired(&a, &b), [0.5, -0.5]);
    }
}
