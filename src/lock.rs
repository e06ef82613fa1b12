//! Repository locks: `flock` on `<repo>/lock`, which the kernel drops when a
//! process dies, so no lock is ever stale.
//!
//! Backups, receives and mounts hold it shared; gc, prune and forget hold it
//! exclusively. Each holder also leaves `locks/<pid>` naming what it does, so
//! that a blocked command can say who is in the way.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    Shared,
    Exclusive,
}

#[derive(Debug)]
pub struct RepoLock {
    _file: File,
    note: PathBuf,
}

impl RepoLock {
    /// Take the lock, waiting for it if `wait`, else failing with the holders.
    pub fn acquire(root: &Path, mode: LockMode, what: &str, wait: bool) -> Result<Self> {
        let path = root.join("lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .ctx(|| format!("open {}", path.display()))?;
        let op = match mode {
            LockMode::Shared => libc::LOCK_SH,
            LockMode::Exclusive => libc::LOCK_EX,
        };
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
        if rc != 0 {
            let holders = holders(root);
            if !wait {
                return Err(Error::Busy(format!(
                    "cannot {what}: the repository is in use by {holders}"
                )));
            }
            log::warn!("waiting for the repository lock held by {holders}");
            // SAFETY: as above, blocking this time.
            if unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
                return Err(Error::io("flock", std::io::Error::last_os_error()));
            }
        }
        let dir = root.join("locks");
        fs::create_dir_all(&dir).ctx(|| format!("create {}", dir.display()))?;
        let note = dir.join(std::process::id().to_string());
        let _ = fs::write(&note, what);
        Ok(RepoLock { _file: file, note })
    }
}

impl Drop for RepoLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.note);
    }
}

/// "pid 123 (backup vm1/vda), pid 456 (mount /mnt)": live holders only.
fn holders(root: &Path) -> String {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(root.join("locks")) {
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let alive = Path::new("/proc").join(&name).exists();
            if alive {
                let what = fs::read_to_string(entry.path()).unwrap_or_default();
                out.push(format!("pid {name} ({what})"));
            }
        }
    }
    if out.is_empty() {
        "another strata process".to_string()
    } else {
        out.join(", ")
    }
}
