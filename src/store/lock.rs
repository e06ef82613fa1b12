//! Who is using the repository, kept in `locks/` with `flock`, which the
//! kernel releases when a process dies: no lock is ever stale.
//!
//! - Backups, receives and mounts each hold a [`Registration`]: the file
//!   `locks/<pid>.<kind>` with their start time, locked shared for their
//!   whole life. gc reads them to keep what running backups wrote and to
//!   tell live mounts' pins (`store::pins`) from those of dead ones.
//! - forget, prune, gc and repair take the [`MaintenanceLock`]: one at a time.
//!
//! On object storage both also hold a lease in the bucket (`store::lease`),
//! which other hosts see: a registration its kind's lease, the maintenance
//! lock the maintenance lease. A writer (backup, receive, copy) does not
//! start while a maintenance lease is held (it waits), so that gc's
//! decisions there never race a backup's deduplication (see `care::gc`).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::store::backend::Backend;
use crate::store::lease::{self, Lease};
use crate::store::repo::Repository;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activity {
    Backup,
    Mount,
    Receive,
    Copy,
    Restore,
}

impl Activity {
    pub fn as_str(&self) -> &'static str {
        match self {
            Activity::Backup => "backup",
            Activity::Mount => "mount",
            Activity::Receive => "receive",
            Activity::Copy => "copy",
            Activity::Restore => "restore",
        }
    }

    /// Writes chunks that no manifest names yet.
    pub fn is_writer(&self) -> bool {
        matches!(self, Activity::Backup | Activity::Receive | Activity::Copy)
    }
}

/// What a registration file says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub activity: Activity,
    pub what: String,
    /// Seconds since the epoch (with fraction) when the activity started.
    pub started: f64,
    /// `<pid>.<µs>`, the name its pins are kept under: taken from the
    /// registration file's name, never recomputed from `started` (a float
    /// read back from JSON may differ in its last bit, and the name with it).
    #[serde(skip)]
    pub name: String,
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
pub struct Registration {
    _file: File,
    path: PathBuf,
    pub holder: Holder,
    /// Its lease, on object storage.
    pub lease: Option<Lease>,
}

/// How long a writer waits for a maintenance command to finish.
const MAINTENANCE_WAIT: Duration = Duration::from_secs(900);

impl Registration {
    /// Register `activity` with `repo`: on this host, and with a lease on
    /// object storage (where a writer first waits out maintenance).
    pub fn new(repo: &Repository, activity: Activity, what: &str) -> Result<Self> {
        Self::with_mountpoint(repo, activity, what, None)
    }

    pub fn with_mountpoint(
        repo: &Repository,
        activity: Activity,
        what: &str,
        mountpoint: Option<String>,
    ) -> Result<Self> {
        let mut reg = Self::local(repo.home(), activity, what)?;
        if let Some(backend) = repo.shared_backend() {
            reg.lease = Some(lease_for(backend, activity, what, mountpoint)?);
            // A maintenance command may have run while this one waited.
            repo.refresh()?;
        }
        Ok(reg)
    }

    /// The name under which this registration's pins are kept.
    pub fn pin_name(&self) -> String {
        match &self.lease {
            Some(l) => l.info().name().to_string(),
            None => self.holder.name.clone(),
        }
    }

    /// A registration on this host only.
    pub fn local(root: &Path, activity: Activity, what: &str) -> Result<Self> {
        let started = now_secs();
        let pid = std::process::id();
        let micros = (started * 1e6) as u64;
        let holder = Holder {
            pid,
            activity,
            what: what.to_string(),
            started,
            name: format!("{pid}.{micros}"),
        };
        let kind = activity.as_str();
        // Several registrations per process are possible (tests, receive).
        let path = locks_dir(root)?.join(format!("{pid}.{kind}.{micros}"));
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
            lease: None,
        })
    }
}

/// Take the lease of `activity`; a writer waits while a maintenance lease
/// is held (see the module documentation).
fn lease_for(
    backend: Arc<dyn Backend>,
    activity: Activity,
    what: &str,
    mountpoint: Option<String>,
) -> Result<Lease> {
    let deadline = std::time::Instant::now() + MAINTENANCE_WAIT;
    let mut told = false;
    loop {
        let lease = Lease::take(backend.clone(), activity.as_str(), what, mountpoint.clone())?;
        if !activity.is_writer() {
            return Ok(lease);
        }
        let Some(holder) = lease::live_maintenance(backend.as_ref())? else {
            return Ok(lease);
        };
        drop(lease);
        if std::time::Instant::now() > deadline {
            return Err(Error::Busy(format!(
                "{what}: {holder} has held the repository for too long"
            )));
        }
        if !told {
            log::warn!("{what}: waiting for {holder} to finish");
            told = true;
        }
        // Polling the bucket: there is nothing to wait on across hosts.
        std::thread::sleep(Duration::from_secs(2));
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
        // `<pid>.<kind>.<µs>`
        let file = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let name = match file.split('.').collect::<Vec<_>>()[..] {
            [pid, _, micros] => format!("{pid}.{micros}"),
            _ => continue,
        };
        if let Some(h) = holder {
            out.push(Holder { name, ..h });
        }
    }
    Ok(out)
}

/// The one maintenance operation (forget, prune, gc, repair) at a time.
pub struct MaintenanceLock {
    _file: File,
    _lease: Option<Lease>,
}

impl MaintenanceLock {
    /// Take the lock (on this host, and the maintenance lease on object
    /// storage) or fail at once, naming who holds it.
    pub fn acquire(repo: &Repository, what: &str) -> Result<Self> {
        let mut lock = Self::local(repo.home(), what)?;
        if let Some(backend) = repo.shared_backend() {
            lock._lease = Some(Lease::maintenance(backend, what)?);
            // What was committed between the open and the lease counts:
            // gc must mark it, forget rewrite it.
            repo.refresh_strict()?;
        }
        Ok(lock)
    }

    /// The lock on this host only.
    pub fn local(root: &Path, what: &str) -> Result<Self> {
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
        Ok(MaintenanceLock {
            _file: file,
            _lease: None,
        })
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

    /// gc finds a mount's pins by the name `holders` reports: it must be
    /// the registration's own, for every start time (recomputing it from
    /// the JSON float missed by a microsecond for ~3% of them, and gc then
    /// took an open image's pins for a dead mount's).
    #[test]
    fn holders_report_the_pin_name_of_every_registration() {
        let dir = tempfile::tempdir().unwrap();
        let regs: Vec<Registration> = (0..300)
            .map(|_| Registration::local(dir.path(), Activity::Mount, "mount /m").unwrap())
            .collect();
        let mut reported: Vec<String> = holders(dir.path())
            .unwrap()
            .into_iter()
            .map(|h| h.name)
            .collect();
        let mut own: Vec<String> = regs.iter().map(|r| r.pin_name()).collect();
        reported.sort();
        own.sort();
        assert_eq!(reported, own);
    }

    #[test]
    fn registrations_and_maintenance() {
        let dir = tempfile::tempdir().unwrap();
        let a = Registration::local(dir.path(), Activity::Backup, "backup a").unwrap();
        let _b = Registration::local(dir.path(), Activity::Mount, "mount /m").unwrap();
        assert_eq!(holders(dir.path()).unwrap().len(), 2);
        drop(a);
        let left = holders(dir.path()).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].activity, Activity::Mount);

        let m = MaintenanceLock::local(dir.path(), "gc").unwrap();
        // flock locks belong to the open file description: a second open in
        // the same process conflicts, as another process would.
        let err = MaintenanceLock::local(dir.path(), "prune").err().unwrap();
        assert!(err.to_string().contains("(gc) is running"), "{err}");
        drop(m);
        MaintenanceLock::local(dir.path(), "prune").unwrap();
    }
}
