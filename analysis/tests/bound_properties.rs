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
    fn every_bound_holds_on_random_instances(bound in 0usize..9, instance in 0usize..600, seed in any::<u64>()) {
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
    let outcome = analysis::report::run(dir.path(), &settings, &dir.path().join("no-slots.toml")).unwrap();
    let reddi = analysis::reddi::Settings::read(&catalog.join("reddi.toml")).unwrap();
    analysis::report::reddi_outputs(dir.path(), &reddi, 20_000, 1_000).unwrap();
    assert!(outcome.instances >= 100, "{} instances", outcome.instances);
    assert_eq!(outcome.violations, 0);
    for f in [
        "instances.csv",
        "bounds.md",
        "interpolation.md",
        "bound_vs_n.svg",
        "bound_of_rho.png",
        "reddi.png",
        "reddi.csv",
    ] {
        assert!(dir.path().join(f).exists(), "{f} missing");
    }
}
