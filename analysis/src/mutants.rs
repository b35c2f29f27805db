//! How much power the checks have: wrong versions of every bound (mutants), each smaller than
//! the bound, confronted with the same instances by the same rule. A mutant is *detected* when
//! the rule that passes the real bound reports it violated on some instance — as a wrong
//! published constant or a wrong rate in a derivation would be. An undetected mutant is listed
//! with the reason the instances could not see it.
//!
//! Per term of a bound (see [`crate::bounds::Term`]): its constant ×0.5 and ×0.1, the term
//! dropped, its rate in N (or T) one half-power faster (1/√N → 1/N, N⁰ → 1/√N, √T → T⁰), and
//! its logarithmic factor dropped where it has one (ln(1 + NR²/ε), √(1 + ln T)).

use serde::Serialize;

use crate::bounds::Term;
use crate::checks::{InstanceData, Row, Status};

/// How a mutant changes one term.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum Change {
    Scale(f64),
    Drop,
    FasterRate,
    DropLog,
}

impl Change {
    pub fn describe(&self) -> String {
        match self {
            Change::Scale(f) => format!("×{f}"),
            Change::Drop => "dropped".into(),
            Change::FasterRate => "rate one half-power faster in N (or T)".into(),
            Change::DropLog => "logarithmic factor dropped".into(),
        }
    }

    /// The changed term's value.
    fn apply(&self, t: &Term) -> f64 {
        match self {
            Change::Scale(f) => f * t.value,
            Change::Drop => 0.0,
            Change::FasterRate => t.value / t.n.max(1.0).sqrt(),
            Change::DropLog => match t.log {
                Some(l) if l > 0.0 => t.value / l,
                _ => t.value,
            },
        }
    }
}

/// A wrong version of a bound: one term changed.
#[derive(Clone, Debug, Serialize)]
pub struct Mutant {
    pub bound: String,
    pub term: &'static str,
    pub change: Change,
}

impl Mutant {
    /// The mutant's value from the real bound's terms.
    pub fn value(&self, terms: &[Term]) -> f64 {
        terms.iter().map(|t| if t.name == self.term { self.change.apply(t) } else { t.value }).sum()
    }

    pub fn describe(&self) -> String {
        format!("{}: term {} {}", self.bound, self.term, self.change.describe())
    }

    /// The instance's verdict on the mutant, by the real bound's rule.
    pub fn status_on(&self, data: &InstanceData) -> Status {
        data.status(&|t| self.value(t))
    }
}

/// Every mutant of a bound whose terms are `terms` (the terms of any of its instances).
pub fn mutants_of(bound: &str, terms: &[Term]) -> Vec<Mutant> {
    let mut out = Vec::new();
    for t in terms {
        let mut changes = vec![Change::Scale(0.5), Change::Scale(0.1), Change::Drop, Change::FasterRate];
        if t.log.is_some() {
            changes.push(Change::DropLog);
        }
        out.extend(changes.into_iter().map(|change| Mutant { bound: bound.to_string(), term: t.name, change }));
    }
    out
}

/// What the instances said about one mutant.
#[derive(Clone, Debug, Serialize)]
pub struct MutantResult {
    pub mutant: Mutant,
    /// Instances the mutant was confronted with (those the real bound passes).
    pub instances: usize,
    /// Instances on which the rule reports it violated (confidently, or unresolved — the real
    /// checks count both as violations).
    pub detected_on: usize,
    /// … of which confidently (the empirical lower confidence bound above it).
    pub confident_on: usize,
    /// The largest empirical/mutant over the instances.
    pub max_tightness: f64,
    /// The largest share of the bound the changed term took away on any instance.
    pub max_reduction: f64,
}

impl MutantResult {
    pub fn detected(&self) -> bool {
        self.detected_on > 0
    }

    /// Why the instances could not see an undetected mutant.
    pub fn reason(&self) -> String {
        if self.instances == 0 {
            "no instance of the bound passed its own check".into()
        } else if self.max_reduction < 0.01 {
            format!(
                "the change takes at most {:.2}% of the bound away on any instance: the term is dominated",
                100.0 * self.max_reduction
            )
        } else {
            format!(
                "the bound is loose where the term matters: the mutant still keeps empirical/bound ≤ {:.3} on every \
                 instance (its change takes up to {:.0}% of the bound away)",
                self.max_tightness,
                100.0 * self.max_reduction
            )
        }
    }
}

/// Confront every mutant of every bound with the rows of its passed instances.
pub fn evaluate(rows: &[Row]) -> Vec<MutantResult> {
    let mut bounds: Vec<&str> = Vec::new();
    for r in rows {
        if !bounds.contains(&r.bound.as_str()) {
            bounds.push(&r.bound);
        }
    }
    let mut out = Vec::new();
    for bound in bounds {
        let passed: Vec<&Row> =
            rows.iter().filter(|r| r.bound == bound && r.status == Status::Pass && r.data.is_some()).collect();
        let Some(first) = passed.first() else { continue };
        let Some(data) = &first.data else { continue };
        for m in mutants_of(bound, data.terms()) {
            let mut res = MutantResult {
                mutant: m.clone(),
                instances: passed.len(),
                detected_on: 0,
                confident_on: 0,
                max_tightness: 0.0,
                max_reduction: 0.0,
            };
            for r in &passed {
                let data = r.data.as_ref().expect("filtered");
                let status = m.status_on(data);
                res.detected_on += status.counts_as_violation() as usize;
                res.confident_on += (status == Status::Violation) as usize;
                let (emp, value) = data.means(&|t| m.value(t));
                let (_, real) = data.means(&crate::bounds::total);
                if value > 0.0 {
                    res.max_tightness = res.max_tightness.max(emp / value);
                }
                if real > 0.0 {
                    res.max_reduction = res.max_reduction.max(1.0 - value / real);
                }
            }
            out.push(res);
        }
    }
    out
}

/// `mutants.md`: the detection rate, per bound, and every undetected mutant with its reason.
pub fn markdown(results: &[MutantResult]) -> String {
    use std::fmt::Write as _;
    let detected = results.iter().filter(|r| r.detected()).count();
    let mut md = format!(
        "# Mutants of the bounds\n\n`mutants: {detected} of {} detected`\n\nEach mutant changes one term of one bound \
         (its constant ×0.5 or ×0.1, the term dropped, its rate in N or T one half-power faster, its logarithmic factor \
         dropped) and is confronted with the same instances by the same rule as the real bound. *Detected*: reported \
         violated (confidently or unresolved) on at least one instance the real bound passes.\n\n\
         | bound | mutants | detected |\n|---|---|---|\n",
        results.len()
    );
    let mut bounds: Vec<&str> = results.iter().map(|r| r.mutant.bound.as_str()).collect();
    bounds.dedup(); // results are grouped by bound
    for b in &bounds {
        let mine: Vec<&MutantResult> = results.iter().filter(|r| r.mutant.bound == *b).collect();
        let _ = writeln!(md, "| `{b}` | {} | {} |", mine.len(), mine.iter().filter(|r| r.detected()).count());
    }
    md.push_str(
        "\nWhere whole families of mutants go undetected because a derivation spends a fixed factor on every \
         instance (the Δ terms' ½ and ¼ ceilings, Lemma A's ≤ 0.17 for the noise terms, the regret bounds' β1t \
         terms), the reason is derived in `analysis/THEORY.md`, \"Loose by construction\".\n",
    );
    md.push_str("\n## Every mutant\n\n| mutant | instances | detected on | confidently | max empirical/mutant | why undetected |\n|---|---|---|---|---|---|\n");
    for r in results {
        let why = if r.detected() { String::new() } else { r.reason() };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.3} | {why} |",
            r.mutant.describe(),
            r.instances,
            r.detected_on,
            r.confident_on,
            r.max_tightness
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::regret_row as row;

    #[test]
    fn a_mutant_is_detected_where_the_instance_presses_on_its_term() {
        let t = |name, value, log| Term { name, value, n_power: -0.5, n: 100.0, log };
        // Empirical 0.6 under a bound of 1.0 = 0.9 (main) + 0.1 (small, with a log factor 2).
        let rows = vec![row(0.6, vec![t("main", 0.9, None), t("small", 0.1, Some(2.0))])];
        let res = evaluate(&rows);
        let get = |term: &str, change: Change| {
            res.iter().find(|r| r.mutant.term == term && r.mutant.change == change).unwrap()
        };
        assert!(get("main", Change::Scale(0.5)).detected()); // 0.45 + 0.1 < 0.6
        assert!(get("main", Change::FasterRate).detected()); // 0.09 + 0.1
        assert!(!get("small", Change::Drop).detected()); // 0.9 ≥ 0.6
        assert!(!get("small", Change::DropLog).detected());
        assert!((get("small", Change::Drop).max_reduction - 0.1).abs() < 1e-12);
        assert!(get("small", Change::Drop).reason().contains("loose"));
        assert_eq!(res.len(), 4 + 5);
    }
}
