//! `repair --rebuild-catalog`: recreate the SQLite catalog from the
//! manifest files (invariant 8). Parents are inserted before children, and
//! keyframes (stored image maps) placed by the rule `commit` follows.

use std::collections::HashSet;
use std::fs;

use crate::error::{Error, IoContext, Result};
use crate::model::image_map::ImageMap;
use crate::model::snapshot::SnapshotInfo;
use crate::store::backend::Location;
use crate::store::catalog::{Catalog, SnapshotRecord};
use crate::store::lock::{self, MaintenanceLock};
use crate::store::manifest;
use crate::store::repo::{self, keyframe_image, PassphraseSource};

#[derive(Debug, Default)]
pub struct RebuildReport {
    pub restored: usize,
    /// Manifests that could not be used, with why.
    pub skipped: Vec<String>,
}

/// Rebuild the catalog from the manifests: `catalog.db` in a local
/// repository, this host's cached copy for one on object storage. Nothing
/// else on this host may use the repository meanwhile. `passphrase` opens
/// an encrypted repository's manifests.
pub fn rebuild_catalog(location: &Location, passphrase: PassphraseSource) -> Result<RebuildReport> {
    let backend = location.open(false)?;
    let backend = backend.as_ref();
    let config = repo::read_config(backend)?;
    let keys = repo::unlock(backend, &config, passphrase)?.map(|(keys, _)| keys);
    let Some(root) = backend.local_root() else {
        return rebuild_cache(location, backend, passphrase);
    };
    fs::create_dir_all(root).ctx(|| format!("create {}", root.display()))?;
    let _lock = MaintenanceLock::local(root, "repair")?;
    if let Some(h) = lock::holders(root)?.first() {
        return Err(Error::Busy(format!("the repository is in use by {h}")));
    }
    let mut report = RebuildReport::default();
    let mut pending: Vec<(SnapshotInfo, ImageMap)> = Vec::new();
    for o in manifest::list(backend)? {
        let Some((disk, id)) = manifest::parse_key(&o.key) else {
            continue;
        };
        match manifest::read(backend, &disk, &id, keys.as_deref()).and_then(|m| m.decode()) {
            Ok(x) => pending.push(x),
            Err(e) => report.skipped.push(format!("{}: {e}", o.key)),
        }
    }
    // Parents before children: a parent is always older than its child.
    pending.sort_by(|a, b| (a.0.time, &a.0.id).cmp(&(b.0.time, &b.0.id)));

    // Parents before children, retried until no progress in case times
    // are out of parent order.
    let mut known: HashSet<String> = HashSet::new();
    let mut ordered: Vec<(SnapshotInfo, ImageMap)> = Vec::new();
    loop {
        let before = pending.len();
        pending.retain(|(info, own)| {
            let ready = match &info.parent {
                None => true,
                Some(p) => known.contains(&format!("{}@{p}", info.disk)),
            };
            if ready {
                known.insert(info.reference());
                ordered.push((info.clone(), own.clone()));
            }
            !ready
        });
        if pending.is_empty() || pending.len() == before {
            break;
        }
    }
    for (info, _) in pending {
        report.skipped.push(format!(
            "{}: its parent {} has no usable manifest",
            info.reference(),
            info.parent.map(|p| p.to_string()).unwrap_or_default()
        ));
    }

    let tmp = root.join("catalog.db.rebuild");
    let _ = fs::remove_file(&tmp);
    let mut catalog = Catalog::open(&tmp)?;
    // One transaction, rows in parent order: each keyframe is placed by
    // the same rule as at commit, from the rows inserted before it.
    catalog.write(|w| {
        for (info, own) in &ordered {
            let image = keyframe_image(w, &info.disk, info.parent.as_ref(), own)?;
            w.insert(&SnapshotRecord {
                info: info.clone(),
                own: own.clone(),
                image,
            })?;
        }
        Ok(())
    })?;
    drop(catalog);
    for suffix in ["-wal", "-shm"] {
        let _ = fs::remove_file(root.join(format!("catalog.db{suffix}")));
        let _ = fs::remove_file(root.join(format!("catalog.db.rebuild{suffix}")));
    }
    fs::rename(&tmp, root.join("catalog.db")).ctx(|| "install the rebuilt catalog".into())?;
    crate::store::durable::fsync_dir(root)?;
    report.restored = ordered.len();
    // Opening it proves it usable.
    Catalog::open(&root.join("catalog.db"))?;
    Ok(report)
}

/// A repository on object storage: this host's catalog is a cache. It is
/// removed and made anew from the bucket's manifests, as any open would.
fn rebuild_cache(
    location: &Location,
    backend: &dyn crate::store::backend::Backend,
    passphrase: PassphraseSource,
) -> Result<RebuildReport> {
    let home = repo::cache_home(backend);
    fs::create_dir_all(&home).ctx(|| format!("create {}", home.display()))?;
    let _lock = MaintenanceLock::local(&home, "repair")?;
    if let Some(h) = lock::holders(&home)?.first() {
        return Err(Error::Busy(format!("the repository is in use by {h}")));
    }
    // The pack index too: it is rebuilt from the packs on first use.
    for db in ["catalog.db", "packs.db"] {
        for suffix in ["", "-wal", "-shm"] {
            let _ = fs::remove_file(home.join(format!("{db}{suffix}")));
        }
    }
    let repo = crate::store::repo::Repository::open_at(location, passphrase)?;
    let restored = repo.snapshots(None)?.len();
    let listed = manifest::list(backend)?
        .iter()
        .filter(|o| manifest::parse_key(&o.key).is_some())
        .count();
    let mut report = RebuildReport {
        restored,
        skipped: Vec::new(),
    };
    if listed > restored {
        report.skipped.push(format!(
            "{} manifests not listed (unreadable, or of domain runs that did not finish; see the log with -v)",
            listed - restored
        ));
    }
    Ok(report)
}
