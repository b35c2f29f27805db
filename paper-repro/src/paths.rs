//! Where things live: the data root, relative data paths, and the catalog, runs and reports
//! folders of one invocation (one place for every path the crate derives).

use std::path::{Path, PathBuf};

use crate::catalog::Tier;

/// The root folder of relative data paths: `MADA_DATA`, or `.cache/data`.
pub fn data_root() -> PathBuf {
    std::env::var_os("MADA_DATA").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".cache/data"))
}

/// A data path of a spec: absolute as given, relative under [`data_root`].
pub fn resolve(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        data_root().join(p)
    }
}

/// The folders of one `reproduce` / `tables` / `figures` / `report` invocation. Each tier has a
/// report folder of its own, so regenerating one tier never touches another's:
///
/// ```text
/// <reports>/<tier>/REPORT.md, report.html
///                  tables/<artifact>.{md,csv,tex}, <artifact>_coefficients.csv
///                  figures/<artifact>_*.{svg,png}
///                  analysis/ (bound checks, interpolation study, Reddi counterexample)
/// <reports>/reference/ (official figures the report uses, the paper-bound slots)
/// ```
#[derive(Clone, Debug)]
pub struct Paths {
    pub experiments: PathBuf,
    pub runs: PathBuf,
    pub reports: PathBuf,
}

impl Paths {
    /// `<reports>/<tier>`.
    pub fn tier(&self, tier: Tier) -> PathBuf {
        self.reports.join(tier.name())
    }
    pub fn report(&self, tier: Tier) -> PathBuf {
        self.tier(tier).join("REPORT.md")
    }
    pub fn analysis(&self, tier: Tier) -> PathBuf {
        self.tier(tier).join("analysis")
    }
    pub fn tables(&self, tier: Tier) -> PathBuf {
        self.tier(tier).join("tables")
    }
    pub fn figures(&self, tier: Tier) -> PathBuf {
        self.tier(tier).join("figures")
    }
    /// `<reports>/reference`: the official extraction and the paper-bound slots.
    pub fn reference(&self) -> PathBuf {
        self.reports.join("reference")
    }
}
