//! File output that never leaves a half-written result behind.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Write `bytes` to `path` through a temporary file in the same folder, then rename: a reader
/// (or a resumed run) sees either the old file or the complete new one. Creates parent folders.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create folder {}", dir.display()))?;
    let name = path.file_name().with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(temporary_name(&name.to_string_lossy()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// The temporary name [`write_atomically`] writes `name` through (in the same folder).
fn temporary_name(name: &str) -> String {
    format!(".{name}.tmp{}", std::process::id())
}

/// Remove what an interrupted [`write_atomically`] left in `dir` (`.NAME.tmpPID` files). Call
/// it only while holding the folder's lock: nobody else can be writing there then.
pub fn remove_stale_temporaries(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let is_temporary = name.starts_with('.')
            && name
                .rsplit_once(".tmp")
                .is_some_and(|(_, pid)| pid.chars().all(|c| c.is_ascii_digit()) && !pid.is_empty());
        if is_temporary && e.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::remove_file(e.path()).with_context(|| format!("cannot remove {}", e.path().display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_replaces_without_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/out.csv");
        write_atomically(&p, b"a").unwrap();
        write_atomically(&p, b"bc").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"bc");
        let names: Vec<_> = std::fs::read_dir(p.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn stale_temporaries_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".result.json.tmp4242"), b"half").unwrap();
        std::fs::write(dir.path().join("result.json"), b"{}").unwrap();
        std::fs::write(dir.path().join(".lock"), b"").unwrap();
        remove_stale_temporaries(dir.path()).unwrap();
        let mut names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, [".lock", "result.json"]);
    }
}
