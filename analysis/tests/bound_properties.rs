//! Property-based checks: every registered bound holds on random problem instances and
//! optimizer settings (a CI-sized sample; `just bounds` runs the full one). Each case prints
//! its bound, instance and seed, so a failure can be replayed with `check_nonconvex` or
//! `check_regret` directly; proptest also records failing cases in `proptest-regressions/`.

use analysis::bounds::{registry, Form};
use analysis::checks::{check_nonconvex, check_regret, Size, Status};
use proptest::prelude::*;

const SIZE: Size = Size { instances: 1, seeds: 6, steps: (30, 150), base_seed: 0 };

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn every_bound_holds_on_random_instances(bound in 0usize..registry().len(), instance in 0usize..600, seed in any::<u64>()) {
        let bounds = registry();
        let b = &bounds[bound];
        eprintln!("replay: bound={} instance={instance} seed={seed}", b.id);
        let row = match b.form {
            Form::Regret { .. } => check_regret(b, instance, seed, &SIZE),
            _ => check_nonconvex(b, instance, seed, &SIZE),
        };
        let row = row.expect("every registered bound covers some setting");
        prop_assert!(
            matches!(row.status, Status::Pass | Status::Excluded),
            "{} violated on {} with {}: empirical {:e} (ucb {:e}) vs bound {:e}",
            row.bound, row.problem, row.settings, row.empirical, row.empirical_ucb, row.bound_value
        );
    }
}

#[test]
fn the_quick_report_finds_no_violation() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments");
    let settings = analysis::report::BoundsSettings::read(&catalog.join("bounds.toml"), "smoke").unwrap();
    let outcome = analysis::report::run(
        dir.path(),
        &settings,
        &dir.path().join("no-slots.toml"),
        &catalog.join("bounds-worst.json"),
    )
    .unwrap();
    let reddi = analysis::reddi::Settings::read(&catalog.join("reddi.toml")).unwrap();
    analysis::report::reddi_outputs(dir.path(), &reddi, 20_000, 1_000).unwrap();
    assert!(outcome.instances >= 100, "{} instances", outcome.instances);
    assert_eq!(outcome.violations, 0);
    // The checks have power: a fifth of the wrong bounds is caught even at the quick size
    // (the full size: reports/cpu/analysis/mutants.md).
    assert!(
        outcome.mutants_detected * 5 >= outcome.mutants,
        "mutants: {} of {}",
        outcome.mutants_detected,
        outcome.mutants
    );
    for f in [
        "instances.csv",
        "bounds.md",
        "interpolation.md",
        "bound_vs_n.svg",
        "bound_of_rho.png",
        "reddi.png",
        "reddi.csv",
        "mutants.md",
        "lemmas.md",
        "worst-instances.json",
    ] {
        assert!(dir.path().join(f).exists(), "{f} missing");
    }
}

/// The regression set of worst instances (experiments/bounds-worst.json, written by
/// `analysis bounds --keep-worst`): every instance still passes its bound, and presses on it
/// exactly as hard as when it was kept (the runs are deterministic).
#[test]
fn the_kept_worst_instances_still_pass_and_press_on_their_bounds() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/bounds-worst.json");
    let kept = analysis::search::read_kept(&path).unwrap();
    assert!(!kept.is_empty(), "{} is empty", path.display());
    let bounds = registry();
    let mut worst = std::collections::BTreeMap::<String, f64>::new();
    for k in &kept {
        let bound = bounds.iter().find(|b| b.id == k.bound).unwrap_or_else(|| panic!("unknown bound {}", k.bound));
        let row = analysis::search::evaluate(bound, &k.case, 0, 16).expect("the bound covers its kept case");
        assert_eq!(row.status, Status::Pass, "{}: {:?} on {}", k.bound, row.status, row.settings);
        assert!(
            (row.tightness - k.tightness).abs() <= 1e-6 * k.tightness.abs(),
            "{}: tightness {} now, {} when kept",
            k.bound,
            row.tightness,
            k.tightness
        );
        let w = worst.entry(k.bound.clone()).or_insert(0.0);
        *w = w.max(row.tightness);
    }
    // Every bound has a kept instance, and the regret bounds' are nearly tight.
    for b in &bounds {
        assert!(worst.contains_key(&b.id), "no kept instance of {}", b.id);
    }
    assert!(worst["avgrad-regret"] > 0.5, "{worst:?}");
}
