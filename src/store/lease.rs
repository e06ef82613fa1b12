//! Leases: who is using a repository on object storage, kept as objects
//! `leases/<host>.<pid>.<micros>.json` in the bucket, so that every host
//! sees them. A lease names its kind (backup, receive, restore, copy,
//! mount, maintenance), host, pid, start and expiry; its holder rewrites
//! it every [`REFRESH`] with a new expiry [`TTL`] ahead, and deletes it
//! when done. A lease is *stale* once it expired, or at once when its
//! holder is known dead: on the same host, its process is gone (or the host
//! rebooted since: the lease names its boot).
//!
//! gc and prune hold the one `leases/maintenance.json`, written
//! create-only. What they may delete, and what writers do while one runs,
//! is in `care::gc`. Expiry compares the holder's clock with the reader's:
//! hosts must agree on the time within a minute.

use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::snapshot::{format_time, parse_time};
use crate::store::backend::Backend;

pub const LEASES: &str = "leases/";
const MAINTENANCE: &str = "leases/maintenance.json";
/// How long a lease lasts without a refresh.
pub const TTL: Duration = Duration::from_secs(300);
/// How often a holder refreshes its lease.
pub const REFRESH: Duration = Duration::from_secs(60);
/// A lease older than `TTL - SAFETY` no longer counts as held here.
const SAFETY: Duration = Duration::from_secs(90);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub kind: String,
    pub host: String,
    pub pid: u32,
    pub started: String,
    pub expires: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mountpoint: Option<String>,
    #[serde(default)]
    pub what: String,
    /// The holder's boot (`/proc/sys/kernel/random/boot_id`): after a
    /// reboot its pid may name another process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<String>,
    /// The object's key (not stored in it).
    #[serde(default, skip_serializing)]
    pub key: String,
}

impl LeaseInfo {
    /// Expired, or its holder is known dead.
    pub fn is_stale(&self) -> bool {
        let expired = parse_time(&self.expires).map_or(true, |t| t < Utc::now());
        let here = self.host == host_name();
        let rebooted = matches!((&self.boot, boot_id()), (Some(a), Some(b)) if *a != b);
        expired || (here && (rebooted || !pid_alive(self.pid)))
    }

    /// The name of the lease, `<host>.<pid>.<micros>` (its pins live under it).
    pub fn name(&self) -> &str {
        self.key
            .strip_prefix(LEASES)
            .and_then(|k| k.strip_suffix(".json"))
            .unwrap_or(&self.key)
    }

    pub fn is_writer(&self) -> bool {
        matches!(self.kind.as_str(), "backup" | "receive" | "copy")
    }
}

impl std::fmt::Display for LeaseInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} on {} (pid {}", self.kind, self.host, self.pid)?;
        if !self.what.is_empty() {
            write!(f, ", {}", self.what)?;
        }
        write!(f, ", expires {})", self.expires)
    }
}

pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// This boot's id, if the kernel tells.
fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|b| b.trim().to_string())
        .filter(|b| !b.is_empty())
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new("/proc").join(pid.to_string()).exists()
}

/// A held lease, refreshed by a thread of its own until dropped.
pub struct Lease {
    backend: Arc<dyn Backend>,
    info: LeaseInfo,
    stop: Arc<(Mutex<bool>, Condvar)>,
    refresher: Option<JoinHandle<()>>,
    _state: Arc<State>,
}

/// How a lease object is written.
enum Take {
    /// This process's own key: plain write.
    Own,
    /// Create-only: fails if someone holds it.
    New,
    /// Over a stale holder's lease at this version.
    Over(String),
}

/// When a held lease was last written successfully.
struct State {
    refreshed: Mutex<Instant>,
}

/// The leases this process holds, for [`ensure_held`].
fn held() -> std::sync::MutexGuard<'static, Vec<Weak<State>>> {
    static HELD: Mutex<Vec<Weak<State>>> = Mutex::new(Vec::new());
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    held.retain(|w| w.strong_count() > 0);
    held
}

/// Fail if a lease of this process went unrefreshed for so long that
/// other hosts may take it for stale (and gc there may have acted on
/// that): a commit or a deletion must not go ahead then.
pub fn ensure_held() -> Result<()> {
    for state in held().iter().filter_map(Weak::upgrade) {
        let age = state
            .refreshed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed();
        if age + SAFETY > TTL {
            return Err(Error::invalid(format!(
                "this process could not refresh its lease for {} s (the repository unreachable?): \
                 other hosts may have taken it for stale, so it stops here; run it again",
                age.as_secs()
            )));
        }
    }
    Ok(())
}

fn body(info: &LeaseInfo) -> Vec<u8> {
    let mut info = info.clone();
    info.expires = format_time(&(Utc::now() + TTL));
    serde_json::to_vec_pretty(&info).expect("lease serializes")
}

impl Lease {
    /// Take a lease of `kind` (see the module documentation).
    pub fn take(
        backend: Arc<dyn Backend>,
        kind: &str,
        what: &str,
        mountpoint: Option<String>,
    ) -> Result<Lease> {
        let now = Utc::now();
        let host = host_name();
        let pid = std::process::id();
        let key = format!("{LEASES}{host}.{pid}.{}.json", now.timestamp_micros());
        Self::write(backend, key, kind, what, mountpoint, now, Take::Own)
    }

    /// Take the maintenance lease, or fail naming its holder. A stale one
    /// is taken over by a write conditional on its version, so that of two
    /// commands finding it stale only one wins.
    pub fn maintenance(backend: Arc<dyn Backend>, what: &str) -> Result<Lease> {
        let busy = |holder: &LeaseInfo| {
            Error::Busy(format!(
                "cannot {what}: {holder} is running; try again when it has finished"
            ))
        };
        let attempt = |take| {
            Self::write(
                backend.clone(),
                MAINTENANCE.into(),
                "maintenance",
                what,
                None,
                Utc::now(),
                take,
            )
        };
        for _ in 0..3 {
            match attempt(Take::New) {
                Err(Error::Busy(_)) => {}
                other => return other,
            }
            let Some(version) = backend.head(MAINTENANCE)?.map(|o| o.version) else {
                continue; // released meanwhile
            };
            let Some(holder) = read(backend.as_ref(), MAINTENANCE)? else {
                continue;
            };
            if !holder.is_stale() {
                return Err(busy(&holder));
            }
            log::warn!("taking over the stale maintenance lease of {holder}");
            match attempt(Take::Over(version)) {
                Err(Error::Busy(_)) => {}
                other => return other,
            }
        }
        Err(Error::Busy(format!(
            "cannot {what}: another maintenance command keeps starting"
        )))
    }

    fn write(
        backend: Arc<dyn Backend>,
        key: String,
        kind: &str,
        what: &str,
        mountpoint: Option<String>,
        started: DateTime<Utc>,
        take: Take,
    ) -> Result<Lease> {
        let info = LeaseInfo {
            kind: kind.into(),
            host: host_name(),
            pid: std::process::id(),
            started: format_time(&started),
            expires: String::new(),
            mountpoint,
            what: what.into(),
            boot: boot_id(),
            key: key.clone(),
        };
        let taken = match take {
            Take::Own => backend.put(&key, &body(&info)).map(|()| true)?,
            Take::New => backend.put_new(&key, &body(&info))?,
            Take::Over(version) => backend.replace_if(&key, &body(&info), &version)?,
        };
        if !taken {
            return Err(Error::Busy(key));
        }
        let state = Arc::new(State {
            refreshed: Mutex::new(Instant::now()),
        });
        held().push(Arc::downgrade(&state));
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let refresher = {
            let (backend, info, stop, state) =
                (backend.clone(), info.clone(), stop.clone(), state.clone());
            std::thread::Builder::new()
                .name("strata-lease".into())
                .spawn(move || refresh(backend.as_ref(), &info, &stop, &state))
                .map_err(|e| Error::io("start the lease refresher", e))?
        };
        Ok(Lease {
            backend,
            info,
            stop,
            refresher: Some(refresher),
            _state: state,
        })
    }

    pub fn info(&self) -> &LeaseInfo {
        &self.info
    }
}

/// Rewrite the lease every `REFRESH` until told to stop. A failed refresh
/// is retried at the next one; the TTL leaves room for four.
fn refresh(backend: &dyn Backend, info: &LeaseInfo, stop: &(Mutex<bool>, Condvar), state: &State) {
    let (lock, cv) = stop;
    let mut stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let (guard, _) = cv
            .wait_timeout_while(stopped, REFRESH, |s| !*s)
            .unwrap_or_else(|e| e.into_inner());
        stopped = guard;
        if *stopped {
            return;
        }
        match backend.put(&info.key, &body(info)) {
            Ok(()) => *state.refreshed.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now(),
            Err(e) => log::warn!("refreshing lease {}: {e}", info.key),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        *self.stop.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.stop.1.notify_all();
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        if let Err(e) = self.backend.delete(&self.info.key) {
            log::warn!("releasing lease {}: {e}", self.info.key);
        }
    }
}

fn read(backend: &dyn Backend, key: &str) -> Result<Option<LeaseInfo>> {
    let Some(body) = backend.get(key)? else {
        return Ok(None);
    };
    let mut info: LeaseInfo = serde_json::from_slice(&body)
        .map_err(|e| Error::invalid(format!("{key}: malformed lease: {e}")))?;
    info.key = key.to_string();
    Ok(Some(info))
}

/// The live maintenance lease, if one is held: one `GET` of its one key
/// (only [`Lease::maintenance`] writes that kind, and only there), however
/// many other leases there are. An unreadable one is reported and does not
/// count, as in [`list`].
pub fn live_maintenance(backend: &dyn Backend) -> Result<Option<LeaseInfo>> {
    match read(backend, MAINTENANCE) {
        Ok(holder) => Ok(holder.filter(|h| !h.is_stale())),
        Err(e @ Error::Invalid(_)) => {
            log::warn!("{e}");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Every lease in the bucket, stale or not, oldest first. Unreadable ones
/// are reported and skipped.
pub fn list(backend: &dyn Backend) -> Result<Vec<LeaseInfo>> {
    let mut out = Vec::new();
    for o in backend.list(LEASES)? {
        if !o.key.ends_with(".json") || o.key[LEASES.len()..].contains('/') {
            continue;
        }
        match read(backend, &o.key) {
            Ok(Some(info)) => out.push(info),
            Ok(None) => {}
            Err(e) => log::warn!("{e}"),
        }
    }
    out.sort_by(|a, b| a.started.cmp(&b.started));
    Ok(out)
}

/// Remove stale leases; the ones removed.
pub fn remove_stale(backend: &dyn Backend) -> Result<Vec<LeaseInfo>> {
    let mut removed = Vec::new();
    for l in list(backend)? {
        if l.is_stale() {
            backend.delete(&l.key)?;
            removed.push(l);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::backend::dir::DirBackend;

    #[test]
    fn leases_are_listed_released_and_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(DirBackend::new(dir.path()));
        let a = Lease::take(backend.clone(), "backup", "backup vm/a", None).unwrap();
        assert!(live_maintenance(backend.as_ref()).unwrap().is_none());
        let m = Lease::maintenance(backend.clone(), "gc").unwrap();
        let held = live_maintenance(backend.as_ref()).unwrap().unwrap();
        assert_eq!(
            (held.kind.as_str(), held.what.as_str()),
            ("maintenance", "gc")
        );
        let err = Lease::maintenance(backend.clone(), "prune").err().unwrap();
        assert!(err.to_string().contains("maintenance on"), "{err}");
        let all = list(backend.as_ref()).unwrap();
        assert_eq!(all.len(), 2);
        assert!(all.iter().all(|l| !l.is_stale()));
        drop(a);
        drop(m);
        assert!(list(backend.as_ref()).unwrap().is_empty());
        // A lease whose holder died on this host is stale at once.
        let mut dead = LeaseInfo {
            kind: "mount".into(),
            host: host_name(),
            pid: u32::MAX - 1,
            started: format_time(&Utc::now()),
            expires: format_time(&(Utc::now() + TTL)),
            mountpoint: Some("/mnt".into()),
            what: String::new(),
            boot: boot_id(),
            key: format!("{LEASES}dead.json"),
        };
        backend
            .put(&dead.key, &serde_json::to_vec(&dead).unwrap())
            .unwrap();
        assert!(list(backend.as_ref()).unwrap()[0].is_stale());
        dead.pid = std::process::id();
        backend
            .put(&dead.key, &serde_json::to_vec(&dead).unwrap())
            .unwrap();
        assert!(!list(backend.as_ref()).unwrap()[0].is_stale());
        assert!(remove_stale(backend.as_ref()).unwrap().is_empty());
        // The same pid in an earlier boot of this host is another process.
        if dead.boot.is_some() {
            let earlier = LeaseInfo {
                boot: Some("an-earlier-boot".into()),
                ..dead.clone()
            };
            assert!(earlier.is_stale());
        }
        // A stale maintenance lease does not block the next one.
        let stale = LeaseInfo {
            kind: "maintenance".into(),
            pid: u32::MAX - 1,
            key: MAINTENANCE.into(),
            ..dead
        };
        backend
            .put(MAINTENANCE, &serde_json::to_vec(&stale).unwrap())
            .unwrap();
        assert!(live_maintenance(backend.as_ref()).unwrap().is_none());
        // An unreadable one does not hold writers back (nor does `list` see it).
        backend.put(MAINTENANCE, b"{").unwrap();
        assert!(live_maintenance(backend.as_ref()).unwrap().is_none());
        backend
            .put(MAINTENANCE, &serde_json::to_vec(&stale).unwrap())
            .unwrap();
        Lease::maintenance(backend.clone(), "gc").unwrap();
    }
}
