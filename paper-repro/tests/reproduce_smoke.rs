//! `reproduce smoke` end to end on the embedded data, as CI runs it: every experiment of the
//! smoke tier, then tables, figures and the report; a second call finds everything finished.

use std::path::Path;

use paper_repro::catalog::Tier;
use paper_repro::paths::Paths;
use paper_repro::reproduce::{reproduce, Options};

#[test]
fn the_smoke_tier_runs_end_to_end_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    // The only test of this binary: setting the data root and the working directory cannot
    // race with another test. The runs folder is relative, as `just reproduce` has it (the
    // fine-tuning runs then find their pretrained start in the working directory, not under
    // the data root).
    std::env::set_var("MADA_DATA", dir.path().join("data"));
    std::env::set_current_dir(dir.path()).unwrap();
    let paths = Paths {
        experiments: Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments"),
        runs: "runs".into(),
        reports: dir.path().join("reports"),
    };
    // Two worker processes, as `just reproduce` shares out a CPU tier.
    let opts = Options { jobs: 2, exe: Some(env!("CARGO_BIN_EXE_paper-repro").into()), ..Options::default() };
    let o = reproduce(&paths, Tier::Smoke, &opts).unwrap();
    assert!(o.failures.is_empty(), "{:#?}", o.failures);
    assert!(o.runs_total >= 20 && o.runs_finished == o.runs_total, "{}/{}", o.runs_finished, o.runs_total);
    let report = std::fs::read_to_string(paths.report(Tier::Smoke)).unwrap();
    for needle in ["Claims ledger", "gpt2-124m", "vision-resnet", "shakespeare-grid", "Reddi", "bound"] {
        assert!(report.contains(needle), "report lacks {needle}");
    }
    let tier = paths.tier(Tier::Smoke);
    assert!(tier.join("report.html").exists());
    assert!(tier.join("tables/gpt2-124m.csv").exists());
    assert!(tier.join("tables/gpt2-124m_coefficients.csv").exists());
    assert!(tier.join("figures/shakespeare-grid_grid.png").exists());
    assert!(tier.join("analysis/bounds.json").exists() && tier.join("analysis/reddi.json").exists());
    // Nothing outside the tier's own folder was written.
    let written: Vec<_> = std::fs::read_dir(&paths.reports).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(written, [std::ffi::OsString::from("smoke")]);
    // Every referenced figure exists.
    for line in report.lines().filter(|l| l.starts_with("![")) {
        let target = line.split("](").nth(1).unwrap().trim_end_matches(')');
        assert!(tier.join(target).exists(), "missing figure {target}");
    }
    // Nothing left to do the second time.
    let again = reproduce(&paths, Tier::Smoke, &Options::default()).unwrap();
    assert_eq!(again.runs_finished, again.runs_total);
}
