//! Removing snapshots without breaking others, and protecting them.
//!
//! When snapshot S goes, each child C is rewritten to hold what it inherited
//! from S: its own map becomes S's own map (cut or zero-extended to C's
//! size) with C's laid over it, and C's parent becomes S's parent (or C
//! becomes full). Only metadata changes; chunks are shared, not copied, and
//! C's resolved image map, hence every byte of its image, stays the same.
//!
//! Keyframes (see `store::catalog`): a child of a removed keyframe, or a
//! child that was one, stores its resolved image map, so that every
//! snapshot stays fewer than `KEYFRAME_EVERY` links below a stored map.
//! Removing a snapshot that is not a keyframe only shortens the chains
//! below it.
//!
//! Crash safety: children's manifests are rewritten first (either version
//! describes the same image), then one catalog transaction updates the
//! children and deletes S, then S's manifest file goes. A manifest left
//! without a catalog row is removed by gc.

use crate::error::{Error, Result};
use crate::model::extent::ByteRange;
use crate::model::image_map::{ImageMap, Segment};
use crate::model::snapshot::{SnapshotInfo, SnapshotKind};
use crate::store::catalog::SnapshotRecord;
use crate::store::manifest::{self, Manifest};
use crate::store::repo::Repository;

/// Remove one snapshot, rewriting its children. Refuses a protected one.
pub fn forget_one(repo: &Repository, info: &SnapshotInfo) -> Result<()> {
    let current = repo.resolve(&crate::model::name::SnapshotRef {
        disk: info.disk.clone(),
        selector: crate::model::name::Selector::Id(info.id.clone()),
    })?;
    if current.protected {
        return Err(Error::invalid(format!(
            "{} is protected; unprotect it first",
            current.reference()
        )));
    }
    let own = repo.own_map(&current)?;
    let current_keyframe = repo.catalog().is_keyframe(&current.disk, &current.id)?;
    // What the children are laid over from now on, resolved once if needed.
    let mut new_base: Option<ImageMap> = None;
    let children: Vec<SnapshotInfo> = repo
        .snapshots(Some(&current.disk))?
        .into_iter()
        .filter(|s| s.parent.as_ref() == Some(&current.id))
        .collect();

    let mut rewritten = Vec::new();
    for child in &children {
        let child_own = repo.own_map(child)?;
        let child_keyframe = repo.catalog().is_keyframe(&child.disk, &child.id)?;
        let mut info = child.clone();
        info.parent = current.parent.clone();
        if current.kind == SnapshotKind::Full {
            info.kind = SnapshotKind::Full;
        }
        let merged = inherited(&current, &own, child.size).overlay(&child_own);
        // Recomputed rather than copied: equal bytes, and the same map that
        // verify computes from the new parent and own map.
        let image = match &info.parent {
            Some(p) if current_keyframe || child_keyframe => {
                if new_base.is_none() {
                    let base = repo
                        .catalog()
                        .image_map(&info.disk, p)?
                        .ok_or_else(|| Error::SnapshotNotFound(format!("{}@{p}", info.disk)))?;
                    new_base = Some(base);
                }
                new_base.as_ref().map(|b| b.overlay(&merged))
            }
            _ => None,
        };
        manifest::write(
            repo.backend(),
            &Manifest::new(&info, &merged),
            &info.disk,
            &info.id,
            repo.keys(),
        )?;
        rewritten.push(SnapshotRecord {
            info,
            own: merged,
            image,
        });
    }
    crate::testhook::pause("forget:children-rewritten");
    repo.catalog().write(|w| {
        for rec in &rewritten {
            w.update(rec)?;
        }
        w.delete(&current.disk, &current.id)
    })?;
    crate::testhook::pause("forget:catalog-committed");
    // On object storage this is what removes the snapshot: its manifest
    // is the truth there (the children above no longer name it).
    let key = manifest::manifest_key(&current.disk, &current.id);
    if repo.is_remote() {
        crate::store::lease::ensure_held()?;
    }
    if let Err(e) = repo.backend().delete(&key) {
        if repo.is_remote() {
            return Err(e);
        }
        log::warn!("{key}: {e} (gc will remove it)");
    }
    if repo.is_remote() {
        adopt_late_children(repo, &current, &own)?;
    }
    log::info!(
        "forgot {} ({} children rewritten)",
        current.reference(),
        children.len()
    );
    Ok(())
}

/// On object storage a backup that began before this forget may have
/// committed a child of `current` after its children were rewritten (a
/// backup waits for maintenance only when it starts). Such a child is
/// rewritten too, now that `current` is gone; a backup committing later
/// still finds its parent gone and takes its manifest back
/// (`Repository::commit`).
fn adopt_late_children(repo: &Repository, current: &SnapshotInfo, own: &ImageMap) -> Result<()> {
    let known: std::collections::HashSet<String> = repo
        .snapshots(Some(&current.disk))?
        .iter()
        .map(|s| s.id.to_string())
        .collect();
    let prefix = format!("{}{}/", manifest::MANIFESTS_PREFIX, current.disk);
    for o in repo.backend().list(&prefix)? {
        let Some((disk, id)) = manifest::parse_key(&o.key) else {
            continue;
        };
        if disk != current.disk || known.contains(id.as_str()) {
            continue;
        }
        let (child, child_own) =
            manifest::read(repo.backend(), &disk, &id, repo.keys())?.decode()?;
        if child.parent.as_ref() != Some(&current.id) {
            continue;
        }
        let mut info = child.clone();
        info.parent = current.parent.clone();
        if current.kind == SnapshotKind::Full {
            info.kind = SnapshotKind::Full;
        }
        let merged = inherited(current, own, child.size).overlay(&child_own);
        manifest::write(
            repo.backend(),
            &Manifest::new(&info, &merged),
            &disk,
            &id,
            repo.keys(),
        )?;
        log::info!(
            "rewrote {}, committed while {} was forgotten",
            child.reference(),
            current.reference()
        );
    }
    Ok(())
}

/// What a child of `parent` inherited from it, as own segments of a map of
/// `size` bytes. A non-full parent's image beyond its own size read as
/// zeroes, which its grandparent's need not: that part becomes a zero extent.
fn inherited(parent: &SnapshotInfo, own: &ImageMap, size: u64) -> ImageMap {
    let mut segments: Vec<Segment> = own.slice(ByteRange::new(0, size)).collect();
    if parent.kind != SnapshotKind::Full && size > parent.size {
        segments.push(Segment::zero(ByteRange::from_bounds(parent.size, size)));
    }
    ImageMap::new(size, segments)
}

/// Set or clear the protected flag (manifest first, then catalog).
pub fn set_protected(repo: &Repository, info: &SnapshotInfo, protected: bool) -> Result<()> {
    let own = repo.own_map(info)?;
    let mut updated = info.clone();
    updated.protected = protected;
    manifest::write(
        repo.backend(),
        &Manifest::new(&updated, &own),
        &updated.disk,
        &updated.id,
        repo.keys(),
    )?;
    repo.catalog()
        .write(|w| w.set_protected(&updated.disk, &updated.id, protected))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::chunk_id::ChunkId;

    fn info(kind: SnapshotKind, size: u64) -> SnapshotInfo {
        SnapshotInfo::for_test(chrono::Utc::now(), 1, kind, size)
    }

    /// For every shape of sizes, grandparent + merged child == the original
    /// chain, byte for byte (as maps).
    #[test]
    fn merged_child_reads_as_before() {
        let data = |o, l, n| Segment::data(ByteRange::new(o, l), ChunkId([n; 32]), 0);
        for (g, p, c) in [
            (100, 100, 100),
            (100, 40, 100),
            (40, 100, 70),
            (100, 60, 30),
        ] {
            let grand = ImageMap::new(g, vec![data(0, g, 1)]);
            let p_own = ImageMap::new(p, vec![data(10, 10, 2)]);
            let c_own = ImageMap::new(c, vec![data(25, 5, 3)]);
            let p_image = grand.overlay(&p_own);
            let c_image = p_image.overlay(&c_own);
            let parent = info(SnapshotKind::Incremental, p);
            let merged = inherited(&parent, &p_own, c).overlay(&c_own);
            let rebuilt = grand.overlay(&merged);
            let bytes = |m: &ImageMap| -> Vec<(u64, u8)> {
                (0..m.size)
                    .map(|x| {
                        let s = m.slice(ByteRange::new(x, 1)).next();
                        let v = match s.map(|s| s.piece) {
                            Some(crate::model::image_map::Piece::Data { chunk, skip }) => {
                                chunk.0[0] as u64 * 1000 + skip as u64
                            }
                            _ => 0,
                        };
                        (x, v as u8)
                    })
                    .collect()
            };
            assert_eq!(bytes(&rebuilt), bytes(&c_image), "sizes {g} {p} {c}");
        }
    }
}
