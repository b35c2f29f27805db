//! Where things live: the data root, relative data paths, and the catalog, runs and reports
//! folders of one invocation (one place for every path the crate derives).

use std::path::{Path, PathBuf};

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

/// The folders of one `reproduce` / `tables` / `figures` / `report` invocation.
#[derive(Clone, Debug)]
pub struct Paths {
    pub experiments: PathBuf,
    pub runs: PathBuf,
    pub reports: PathBuf,
}

impl Paths {
    pub fn analysis(&self) -> PathBuf {
        self.reports.join("analysis")
    }
    pub fn tables(&self, tier: &str) -> PathBuf {
        self.reports.join("tables").join(tier)
    }
    pub fn figures(&self, tier: &str) -> PathBuf {
        self.reports.join("figures").join(tier)
    }
}
