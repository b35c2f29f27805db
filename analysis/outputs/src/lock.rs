//! Exclusive locks on folders, so that two processes never write one run (or one runs root).
//!
//! A lock is an advisory `flock` on a file (`.lock` in the folder) that also holds who took it
//! (process id, host, command, time). The operating system releases it when the holder exits,
//! however it exits, so a killed process never leaves a folder locked; the file itself stays and
//! only says who held it last.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

/// An exclusive lock, held until dropped.
#[derive(Debug)]
pub struct FolderLock {
    file: File,
    path: PathBuf,
}

/// Who holds (or last held) a lock: the lock file's content.
fn holder_line() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    let command: Vec<String> = std::env::args().collect();
    let since = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("process {} on {host} ({}), since unix time {since}\n", std::process::id(), command.join(" "))
}

impl FolderLock {
    /// Lock `folder` (created if missing) through `folder/.lock`; `what` names the folder in the
    /// error (for example "run folder"). Fails at once, naming the holder, when another process
    /// holds it.
    pub fn acquire(folder: &Path, what: &str) -> Result<Self> {
        std::fs::create_dir_all(folder).with_context(|| format!("cannot create {}", folder.display()))?;
        let path = folder.join(".lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                bail!(
                    "{what} {} is in use by {}; wait for it to finish or stop it",
                    folder.display(),
                    if holder.is_empty() { "another process" } else { holder }
                );
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        file.set_len(0)?;
        file.rewind()?;
        file.write_all(holder_line().as_bytes())?;
        file.flush()?;
        Ok(Self { file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_named_and_a_released_lock_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let first = FolderLock::acquire(dir.path(), "run folder").unwrap();
        let e = FolderLock::acquire(dir.path(), "run folder").unwrap_err().to_string();
        assert!(e.contains("in use by process") && e.contains(&std::process::id().to_string()), "{e}");
        drop(first);
        FolderLock::acquire(dir.path(), "run folder").unwrap();
    }
}
