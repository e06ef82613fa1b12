//! Bringing a cached catalog up to date with the manifests of a repository
//! on object storage, where the manifests are the only truth: a snapshot
//! exists once its manifest exists. Rows are added for new manifests,
//! replaced when a manifest was rewritten (protect, forget of a parent) and
//! removed when their manifest is gone; `manifest_versions` remembers which
//! version (ETag) each row was made from, so an unchanged repository costs
//! one listing.

use std::collections::{HashMap, HashSet};

use crate::error::Result;
use crate::model::image_map::ImageMap;
use crate::model::snapshot::SnapshotInfo;
use crate::store::backend::ObjectInfo;
use crate::store::catalog::SnapshotRecord;
use crate::store::manifest;
use crate::store::repo::{keyframe_image, Repository};

/// Manifests fetched at once.
const FETCHERS: usize = 8;

/// Sync `repo`'s catalog with its manifests; true when anything changed.
/// A manifest that cannot be read or whose parent is missing is left out
/// and logged, unless `strict`: then the sync fails and changes nothing.
/// Maintenance (gc above all, which deletes what the catalog does not
/// name) syncs strictly.
pub fn sync(repo: &Repository, strict: bool) -> Result<bool> {
    // Rows first: a row committed by another process on this host after
    // the listing would otherwise look like a manifest that went away.
    let rows = repo.catalog().versions()?;
    let mut listed: HashMap<(String, String), ObjectInfo> = HashMap::new();
    for o in manifest::list(repo.backend())? {
        if let Some((disk, id)) = manifest::parse_key(&o.key) {
            listed.insert((disk.to_string(), id.to_string()), o);
        }
    }
    let mut stale = Vec::new();
    let mut seen = HashSet::new();
    for (disk, id, version) in rows {
        let k = (disk, id);
        match (listed.get(&k), version) {
            (None, _) => stale.push(k.clone()),
            // Committed here by a store that gave no version for the
            // write: read once, since another host may have rewritten it
            // (forgetting its parent) before this sync.
            (Some(_), None) => stale.push(k.clone()),
            (Some(o), Some(v)) if v != o.version => stale.push(k.clone()),
            _ => {}
        }
        seen.insert(k);
    }
    let mut fetch: Vec<&ObjectInfo> = listed
        .iter()
        .filter(|(k, _)| !seen.contains(*k) || stale.contains(k))
        .map(|(_, o)| o)
        .collect();
    if stale.is_empty() && fetch.is_empty() {
        return Ok(false);
    }
    fetch.sort_by(|a, b| a.key.cmp(&b.key));
    let (fetched, mut failed) = fetch_all(repo, &fetch);
    let ordered = parents_first(complete_runs(repo, fetched)?);
    let mut cat = repo.catalog();
    cat.write(|w| {
        for (disk, id) in &stale {
            if let (Ok(d), Ok(i)) = (
                crate::model::name::DiskName::parse(disk),
                crate::model::name::SnapshotId::parse(id),
            ) {
                w.delete(&d, &i)?;
            }
        }
        for (info, own, version) in &ordered {
            // A parent missing (being forgotten elsewhere right now, or
            // damage that verify reports) keeps the row out until it is
            // consistent again.
            let image = match keyframe_image(w, &info.disk, info.parent.as_ref(), own) {
                Ok(image) => image,
                Err(e) => {
                    failed.push(format!("{}: {e}", info.reference()));
                    continue;
                }
            };
            // Another process on this host may have synced it meanwhile
            // (the transaction waited for its): replace, never duplicate.
            w.delete(&info.disk, &info.id)?;
            w.insert(&SnapshotRecord {
                info: info.clone(),
                own: own.clone(),
                image,
            })?;
            w.set_version(info.disk.as_str(), info.id.as_str(), version)?;
        }
        if strict && !failed.is_empty() {
            return Err(crate::Error::invalid(format!(
                "the catalog cannot be brought up to date with the repository, so nothing \
                 was changed: {}. If a manifest is damaged, `strata verify` names it; \
                 removing it gives its snapshot up",
                failed.join("; ")
            )));
        }
        for f in &failed {
            log::warn!("not listed: {f}");
        }
        Ok(())
    })?;
    log::debug!(
        "catalog cache: {} removed or replaced, {} fetched",
        stale.len(),
        ordered.len()
    );
    Ok(true)
}

/// Leave out the snapshots of domain runs whose record is not written
/// (yet, or ever: the run died before its commit).
fn complete_runs(
    repo: &Repository,
    fetched: Vec<(SnapshotInfo, ImageMap, String, Option<String>)>,
) -> Result<Vec<(SnapshotInfo, ImageMap, String)>> {
    let mut records: HashMap<String, bool> = HashMap::new();
    let mut out = Vec::with_capacity(fetched.len());
    for (info, own, version, run) in fetched {
        if let Some(prefix) = run {
            let key = format!("domains/{prefix}/{}.json", info.id);
            let exists = match records.get(&key) {
                Some(e) => *e,
                None => {
                    let e = repo.backend().head(&key)?.is_some();
                    records.insert(key, e);
                    e
                }
            };
            if !exists {
                log::debug!("{}: its domain run is not committed", info.reference());
                continue;
            }
        }
        out.push((info, own, version));
    }
    Ok(out)
}

type Fetched = (SnapshotInfo, ImageMap, String, Option<String>);

/// Read and decode manifests in parallel: the usable ones, and why the
/// others are not.
fn fetch_all(repo: &Repository, objects: &[&ObjectInfo]) -> (Vec<Fetched>, Vec<String>) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let out = std::sync::Mutex::new(Vec::new());
    let failed = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..FETCHERS.min(objects.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(o) = objects.get(i) else { break };
                let got = repo.backend().get(&o.key).and_then(|body| {
                    let body = body.ok_or_else(|| crate::Error::SnapshotNotFound(o.key.clone()))?;
                    let m = manifest::decode(&o.key, &body, repo.keys())?;
                    let (info, own) = m.decode()?;
                    Ok((info, own, m.run))
                });
                match got {
                    Ok((info, own, run)) => out.lock().unwrap_or_else(|e| e.into_inner()).push((
                        info,
                        own,
                        o.version.clone(),
                        run,
                    )),
                    Err(e) => failed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(format!("{}: {e}", o.key)),
                }
            });
        }
    });
    (
        out.into_inner().unwrap_or_else(|e| e.into_inner()),
        failed.into_inner().unwrap_or_else(|e| e.into_inner()),
    )
}

/// Order snapshots so that a parent comes before its children. A parent
/// is older than its child, and ids sort by time within a disk.
pub fn parents_first<T>(
    mut items: Vec<(SnapshotInfo, ImageMap, T)>,
) -> Vec<(SnapshotInfo, ImageMap, T)> {
    items.sort_by(|a, b| (&a.0.disk, a.0.time, &a.0.id).cmp(&(&b.0.disk, b.0.time, &b.0.id)));
    items
}
