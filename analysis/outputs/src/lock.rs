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

/// The holder's line from a lock file someone else holds. The holder writes it just after taking
/// the lock (emptying the file first, so a stale line never passes for the current holder), so a
/// process refused in between finds the file empty or the line unfinished: it waits for a
/// complete line (ending in a newline) for up to a second before naming "another process".
fn read_holder(file: &mut File) -> Option<String> {
    for _ in 0..50 {
        let mut content = String::new();
        if file.rewind().is_ok() && file.read_to_string(&mut content).is_ok() {
            if let Some((line, _)) = content.split_once('\n') {
                if !line.trim().is_empty() {
                    return Some(line.trim().to_string());
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    None
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
                let holder = read_holder(&mut file);
                bail!(
                    "{what} {} is in use by {}; wait for it to finish or stop it",
                    folder.display(),
                    holder.as_deref().unwrap_or("another process")
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

    /// A process refused between the holder's taking the lock and its writing the holder line
    /// still names the holder, once the line is written.
    #[test]
    fn a_process_refused_before_the_holder_line_is_written_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".lock");
        let holder = File::create(&path).unwrap();
        holder.try_lock().unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let mut f = OpenOptions::new().write(true).open(&path).unwrap();
            f.write_all(b"process 4242 on host (train x)").unwrap();
            std::thread::sleep(std::time::Duration::from_millis(60));
            f.write_all(b", since unix time 1\n").unwrap();
            holder
        });
        let e = FolderLock::acquire(dir.path(), "run folder").unwrap_err().to_string();
        assert!(e.contains("in use by process 4242 on host (train x), since unix time 1;"), "{e}");
        drop(writer.join().unwrap());
    }
}
