//! Every reference trajectory in tests/data/reference-traces is reproduced by `trace`, through
//! the command line as a user runs it, to |ours − ref| ≤ 1e-9 + 1e-8·|ref| on every cell.

use std::path::{Path, PathBuf};

use analysis::trace::{compare, Trace};

fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/reference-traces")
}

#[test]
fn every_reference_trace_is_reproduced() {
    let dir = reference_dir();
    let mut specs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    specs.sort();
    assert!(specs.len() >= 11, "expected the 11 reference specs, found {}", specs.len());
    let out_dir = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    for spec in &specs {
        let name = spec.file_stem().unwrap().to_string_lossy().to_string();
        let out = out_dir.path().join(format!("{name}.csv"));
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_analysis"))
            .args(["trace", spec.to_str().unwrap(), "--out", out.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(status.status.success(), "{name}: {}", String::from_utf8_lossy(&status.stderr));
        let ours = Trace::from_csv(&std::fs::read_to_string(&out).unwrap()).unwrap();
        let reference = Trace::from_csv(&std::fs::read_to_string(spec.with_extension("csv")).unwrap()).unwrap();
        let (ratio, row, col) = compare(&ours, &reference, 1e-9, 1e-8).unwrap();
        report.push(format!("{name}: worst |err|/tol = {ratio:.3e} (row {row}, {col})"));
        assert!(ratio <= 1.0, "{name} deviates at row {row}, column {col}: {ratio} × tolerance");
    }
    eprintln!("{}", report.join("\n"));
}

/// The same reference trajectories through the device path (optimizer state as candle tensors,
/// what a CUDA device runs), forced onto the CPU device: same tolerance, every cell.
#[test]
fn every_reference_trace_is_reproduced_by_the_device_path() {
    use analysis::trace::TraceSpec;
    use candle_core::{Device, Tensor, Var};
    use mada::candle::VarOptimizer;
    use mada::AnyOptimizer;
    for (name, spec, csv) in analysis::trace::REFERENCE_TRACES {
        let spec = TraceSpec::parse(spec).unwrap();
        let p = &spec.problem;
        let x = Var::from_tensor(&Tensor::new(p.x0.as_slice(), &Device::Cpu).unwrap()).unwrap();
        let opt = AnyOptimizer::<f64>::from_spec(&spec.optimizer).unwrap();
        let is_mada = opt.as_mada().is_some();
        let mut opt = VarOptimizer::with_optimizer(vec![x.clone()], opt, spec.lr).unwrap().with_device_path_on_cpu();
        let mut rows = Vec::new();
        for step in 1..=spec.steps {
            let now = x.as_tensor().to_vec1::<f64>().unwrap();
            let grads = mada::candle::gradient_store(
                std::slice::from_ref(&x),
                &[Tensor::new(p.grad(&now).as_slice(), &Device::Cpu).unwrap()],
            )
            .unwrap();
            // As the trainer takes an update: hyper-gradient, coefficient step, parameter update.
            if let Some(h) = opt.mada_hypergradient(&grads).unwrap() {
                opt.apply_mada_hypergradient(h).unwrap();
            }
            opt.update(&grads).unwrap();
            let mut row = vec![step as f64, p.loss(&now)];
            row.extend(x.as_tensor().to_vec1::<f64>().unwrap());
            if is_mada {
                row.extend(opt.optimizer().as_mada().unwrap().coefficients().to_array());
            }
            rows.push(row);
        }
        let reference = Trace::from_csv(csv).unwrap();
        let ours = Trace { header: reference.header.clone(), rows };
        let (ratio, row, col) = compare(&ours, &reference, 1e-9, 1e-8).unwrap();
        assert!(ratio <= 1.0, "{name} (device path) deviates at row {row}, column {col}: {ratio} × tolerance");
    }
}

/// Bad specs end in one clear error naming the key, the optimizer or the dimension.
/// The embedded copies (what the report's claim 1 reruns) are the files of this folder.
#[test]
fn the_embedded_reference_traces_are_every_file_of_the_folder() {
    let mut on_disk: Vec<String> = std::fs::read_dir(reference_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().to_string())
        .collect();
    on_disk.sort();
    let embedded: Vec<&str> = analysis::trace::REFERENCE_TRACES.iter().map(|t| t.0).collect();
    assert_eq!(on_disk, embedded);
    for (name, spec, csv) in analysis::trace::REFERENCE_TRACES {
        assert_eq!(spec, std::fs::read_to_string(reference_dir().join(format!("{name}.json"))).unwrap());
        assert_eq!(csv, std::fs::read_to_string(reference_dir().join(format!("{name}.csv"))).unwrap());
    }
    assert!(analysis::trace::check_references().iter().all(|(_, w)| w.as_ref().is_ok_and(|x| *x <= 1.0)));
}

#[test]
fn bad_specs_are_refused_with_a_clear_error() {
    let good = std::fs::read_to_string(reference_dir().join("mada_interior.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(String, &str)> = vec![
        (good.replace("\"steps\"", "\"stepz\""), "stepz"),
        (good.replace("\"name\": \"mada\"", "\"name\": \"madam\""), "madam"),
        (good.replace("\"rho\": 0.6", "\"rho\": 1.6"), "rho"),
        (good.replace("\"gamma\": 0.01", "\"gama\": 0.01"), "gama"),
        (good.replace("\"lr\": 0.05,", ""), "optimizer.lr"),
        (good.replacen("-0.10922561189039715", "-0.10922561189039715, 1.0", 1), "x0 has 4 entries"),
        ("{ not json".to_string(), "invalid trace spec"),
        // Step counts that used to overflow a capacity or abort on allocation.
        (good.replace("\"steps\": 60", "\"steps\": 18446744073709551615"), "steps = 18446744073709551615"),
        (good.replace("\"steps\": 60", "\"steps\": 1000000000000"), "steps = 1000000000000"),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let spec = dir.path().join(format!("bad{i}.json"));
        std::fs::write(&spec, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_analysis"))
            .args(["trace", spec.to_str().unwrap(), "--out", dir.path().join("o.csv").to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {i} was accepted");
        assert!(err.contains(needle) && err.contains(&format!("bad{i}.json")), "case {i}: {err}");
        assert_eq!(err.lines().count(), 1, "case {i}: one line, no panic: {err}");
        assert!(!dir.path().join("o.csv").exists(), "case {i} left an output");
    }
}

/// Claim 5's variant through `trace`: `"running": "max"` (ρ between v_t and AMSGrad's running
/// maximum) runs from a spec file, learns ρ along another path than the running mean, and the
/// command writes what the library computes.
#[test]
fn the_max_variant_traces_through_the_command_line() {
    let spec_text = std::fs::read_to_string(reference_dir().join("mada_interior.json")).unwrap();
    let mut spec: serde_json::Value = serde_json::from_str(&spec_text).unwrap();
    spec["optimizer"]["running"] = "max".into();
    let dir = tempfile::tempdir().unwrap();
    let (path, out) = (dir.path().join("max.json"), dir.path().join("max.csv"));
    std::fs::write(&path, serde_json::to_string(&spec).unwrap()).unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_analysis"))
        .args(["trace", path.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let ours = Trace::from_csv(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let direct = analysis::trace::run(&analysis::trace::TraceSpec::read(&path).unwrap()).unwrap();
    assert_eq!(compare(&ours, &direct, 1e-300, 0.0).unwrap().0, 0.0, "the command and the library disagree");
    let mean = Trace::from_csv(&std::fs::read_to_string(reference_dir().join("mada_interior.csv")).unwrap()).unwrap();
    let rho = ours.header.iter().position(|h| h == "rho").unwrap();
    let last = ours.rows.len() - 1;
    assert!(
        (ours.rows[last][rho] - mean.rows[last][rho]).abs() > 1e-6,
        "ρ after {} updates: max {} vs mean {}",
        last + 1,
        ours.rows[last][rho],
        mean.rows[last][rho]
    );
}
