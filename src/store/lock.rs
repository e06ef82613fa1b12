//! Who is using the repository, kept in `locks/` with `flock`, which the
//! kernel releases when a process dies: no lock is ever stale.
//!
//! - Backups, receives and mounts each hold a [`Registration`]: the file
//!   `locks/<pid>.<kind>` with their start time, locked shared for their
//!   whole life. gc reads them to keep what running backups wrote and to
//!   tell live mounts' pins (`store::pins`) from those of dead ones.
//! - forget, prune, gc and repair take the [`MaintenanceLock`]: one at a time.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activity {
    Backup,
    Mount,
}

/// What a registration file says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub activity: Activity,
    pub what: String,
    /// Seconds since the epoch (with fraction) when the activity started.
    pub started: f64,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.what)
    }
}

fn flock(file: &File, op: i32) -> bool {
    // SAFETY: flock on a descriptor we own.
    unsafe { libc::flock(file.as_raw_fd(), op) == 0 }
}

fn locks_dir(root: &Path) -> Result<PathBuf> {
    let dir = root.join("locks");
    fs::create_dir_all(&dir).ctx(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

/// A running backup or mount, visible to gc until dropped (or the process dies).
#[derive(Debug)]
pub struct Registration {
    _file: File,
    path: PathBuf,
    pub holder: Holder,
}

impl Registration {
    pub fn new(root: &Path, activity: Activity, what: &str) -> Result<Self> {
        let started = now_secs();
        let holder = Holder {
            pid: std::process::id(),
            activity,
            what: what.to_string(),
            started,
        };
        let kind = match activity {
            Activity::Backup => "backup",
            Activity::Mount => "mount",
        };
        // Several registrations per process are possible (tests, receive).
        let path =
            locks_dir(root)?.join(format!("{}.{kind}.{}", holder.pid, (started * 1e6) as u64));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .ctx(|| format!("create {}", path.display()))?;
        if !flock(&file, libc::LOCK_SH) {
            return Err(Error::io("flock", std::io::Error::last_os_error()));
        }
        file.write_all(&serde_json::to_vec(&holder).expect("holder serializes"))
            .ctx(|| format!("write {}", path.display()))?;
        Ok(Registration {
            _file: file,
            path,
            holder,
        })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Live registrations; stale ones (their process died) are removed.
pub fn holders(root: &Path) -> Result<Vec<Holder>> {
    let mut out = Vec::new();
    let dir = locks_dir(root)?;
    for entry in fs::read_dir(&dir).ctx(|| format!("list {}", dir.display()))? {
        let path = entry.ctx(|| "list locks".into())?.path();
        if path.extension().is_some_and(|e| e == "lock") {
            continue;
        }
        let Ok(file) = File::open(&path) else {
            continue;
        };
        // If we can lock it exclusively, nobody holds it: a leftover.
        if flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            let _ = fs::remove_file(&path);
            continue;
        }
        let holder = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Holder>(&b).ok());
        if let Some(h) = holder {
            out.push(h);
        }
    }
    Ok(out)
}

/// The one maintenance operation (forget, prune, gc, repair) at a time.
#[derive(Debug)]
pub struct MaintenanceLock {
    _file: File,
}

impl MaintenanceLock {
    /// Take the lock or fail at once, naming the process that holds it.
    pub fn acquire(root: &Path, what: &str) -> Result<Self> {
        let path = locks_dir(root)?.join("maintenance.lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .ctx(|| format!("open {}", path.display()))?;
        if !flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            let who = fs::read_to_string(&path).unwrap_or_default();
            return Err(Error::Busy(format!(
                "cannot {what}: {} is running; try again when it has finished",
                if who.trim().is_empty() {
                    "another maintenance command"
                } else {
                    who.trim()
                }
            )));
        }
        file.set_len(0)
            .ctx(|| format!("truncate {}", path.display()))?;
        let _ = write!(file, "pid {} ({what})", std::process::id());
        Ok(MaintenanceLock { _file: file })
    }
}

pub fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_and_maintenance() {
        let dir = tempfile::tempdir().unwrap();
        let a = Registration::new(dir.path(), Activity::Backup, "backup a").unwrap();
        let _b = Registration::new(dir.path(), Activity::Mount, "mount /m").unwrap();
        assert_eq!(holders(dir.path()).unwrap().len(), 2);
        drop(a);
        let left = holders(dir.path()).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].activity, Activity::Mount);

        let m = MaintenanceLock::acquire(dir.path(), "gc").unwrap();
        // flock locks belong to the open file description: a second open in
        // the same process conflicts, as another process would.
        let err = MaintenanceLock::acquire(dir.path(), "prune").unwrap_err();
        assert!(err.to_string().contains("(gc) is running"), "{err}");
        drop(m);
        MaintenanceLock::acquire(dir.path(), "prune").unwrap();
    }
}
