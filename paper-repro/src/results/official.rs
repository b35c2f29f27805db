//! The official runs the report sets ours beside: the project's own compact extraction of the
//! official repository's committed GPT-2 124M logs (`reports/reference/official-gpt2-124m.csv`),
//! made by `paper-repro reference` from the raw logs, with the source named in its header.
//!
//! Source: the official repository `amazon-science/mada_optimizer_search` at commit 2beded8
//! (Apache License 2.0), files `out_adam/20230917-191731/traj_owt_gpt2_124_adam.txt` and
//! `out_mada/{20230910-003939,20230913-193726,20230916-233953}/traj_owt_gpt2_124_mada.txt`:
//! 10,001 rows of `β1, β2, β3, ρ, c, γ, train loss, val loss`, one every 10 updates.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// The official runs: (name, folder under the logs root, file).
pub const RUNS: [(&str, &str, &str); 4] = [
    ("Adam", "out_adam/20230917-191731", "traj_owt_gpt2_124_adam.txt"),
    ("MADA run A (start rho = 0)", "out_mada/20230910-003939", "traj_owt_gpt2_124_mada.txt"),
    ("MADA run B (start beta1 0.7 beta2 0.8)", "out_mada/20230913-193726", "traj_owt_gpt2_124_mada.txt"),
    ("MADA run C (start beta3 = 0.9)", "out_mada/20230916-233953", "traj_owt_gpt2_124_mada.txt"),
];

/// Updates per row of the official logs (50 micro-steps at gradient accumulation 5).
pub const UPDATES_PER_ROW: u64 = 10;

/// Rows kept: every row-th 10 (100 updates) over the first 5,000 updates, where the coefficients
/// move fastest, then every 100th (1,000 updates).
fn kept(row: usize) -> bool {
    if row <= 500 {
        row.is_multiple_of(10)
    } else {
        row.is_multiple_of(100)
    }
}

/// The compact extraction of the official logs under `logs` (the folder holding `out_adam/`).
pub fn extract(logs: &Path) -> Result<String> {
    let mut csv = String::from(
        "# Extracted by `paper-repro reference` from the committed logs of the official MADA repository\n\
         # (amazon-science/mada_optimizer_search, commit 2beded8, Apache License 2.0): GPT-2 124M on\n\
         # OpenWebText, 8 GPUs; one official row every 10 updates, kept every 100 updates up to 5,000\n\
         # and every 1,000 after. Coefficients are the stored values after the latest hyper-step.\n\
         run,update,beta1,beta2,beta3,rho,c,gamma,train_loss,val_loss\n",
    );
    for (name, folder, file) in RUNS {
        let path = logs.join(folder).join(file);
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        for (row, line) in text.lines().enumerate() {
            let cells: Vec<f64> = line
                .split(',')
                .map(|c| c.trim().parse::<f64>())
                .collect::<Result<_, _>>()
                .with_context(|| format!("{}: line {} is not 8 numbers", path.display(), row + 1))?;
            if cells.len() != 8 {
                bail!("{}: line {} has {} values, expected 8", path.display(), row + 1, cells.len());
            }
            if kept(row) {
                let v: Vec<String> = cells.iter().map(|x| format!("{x}")).collect();
                let _ = writeln!(csv, "{name},{},{}", row as u64 * UPDATES_PER_ROW, v.join(","));
            }
        }
    }
    Ok(csv)
}

/// One official run as extracted.
#[derive(Clone, Debug)]
pub struct OfficialRun {
    pub name: String,
    /// (update, coefficients, train loss, val loss).
    pub rows: Vec<(u64, [f64; 6], f64, f64)>,
}

/// Read the committed extraction.
pub fn read(path: &Path) -> Result<Vec<OfficialRun>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut runs: Vec<OfficialRun> = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.starts_with('#')).skip(1) {
        let cells: Vec<&str> = line.split(',').collect();
        let bad = || format!("{}: line {} is not run,update and 8 numbers", path.display(), i + 1);
        if cells.len() != 10 {
            bail!(bad());
        }
        let v: Vec<f64> = cells[1..].iter().map(|c| c.parse::<f64>()).collect::<Result<_, _>>().with_context(bad)?;
        let row = (v[0] as u64, [v[1], v[2], v[3], v[4], v[5], v[6]], v[7], v[8]);
        match runs.iter_mut().find(|r| r.name == cells[0]) {
            Some(r) => r.rows.push(row),
            None => runs.push(OfficialRun { name: cells[0].to_string(), rows: vec![row] }),
        }
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_the_kept_rows_of_every_run_and_reads_them_back() {
        let dir = tempfile::tempdir().unwrap();
        for (_, folder, file) in RUNS {
            let d = dir.path().join(folder);
            std::fs::create_dir_all(&d).unwrap();
            let rows: String =
                (0..=1200).map(|r| format!("0.9, 0.95, 0.0, {:.6}, 1.0, 1.0, 3.0, 3.1\n", r as f64 / 1e4)).collect();
            std::fs::write(d.join(file), rows).unwrap();
        }
        let csv = extract(dir.path()).unwrap();
        let p = dir.path().join("official.csv");
        std::fs::write(&p, &csv).unwrap();
        let runs = read(&p).unwrap();
        assert_eq!(runs.len(), 4);
        // Rows 0, 10, …, 500 (51), then 600, …, 1200 (7).
        assert_eq!(runs[1].rows.len(), 58);
        assert_eq!(runs[1].rows[2].0, 200);
        assert_eq!(runs[1].rows.last().unwrap().0, 12_000);
        assert!((runs[1].rows[57].1[3] - 0.12).abs() < 1e-12);
        // A short row is named.
        std::fs::write(dir.path().join(RUNS[0].1).join(RUNS[0].2), "0.9, 0.95\n").unwrap();
        let e = format!("{:#}", extract(dir.path()).unwrap_err());
        assert!(e.contains("line 1") && e.contains("traj_owt_gpt2_124_adam.txt"), "{e}");
    }

    /// The committed extraction ends where the official logs end: the final validation losses
    /// the experiment file quotes (digest §8.2), and MADA run A's start at the AVGrad point.
    #[test]
    fn the_committed_extraction_matches_the_quoted_official_numbers() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let runs = read(&root.join("reports/reference/official-gpt2-124m.csv")).unwrap();
        let e = crate::catalog::read(&root.join("experiments/gpt2-124m.toml")).unwrap();
        let quoted = &e.reference.unwrap().values;
        for (name, key) in [
            (RUNS[0].0, "Adam"),
            (RUNS[1].0, "MADA (run A, start ρ = 0)"),
            (RUNS[2].0, "MADA (run B, start β = 0.7, 0.8)"),
            (RUNS[3].0, "MADA (run C, start β3 = 0.9)"),
        ] {
            let run = runs.iter().find(|r| r.name == name).unwrap();
            let last = run.rows.last().unwrap();
            assert_eq!(last.0, 100_000);
            assert!((last.3 - quoted[key]).abs() < 1e-6, "{name}: {} vs {}", last.3, quoted[key]);
        }
        assert_eq!(runs[1].rows[0].1, [0.9, 0.95, 0.0, 0.0, 1.0, 1.0]);
    }
}
