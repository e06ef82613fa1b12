//! Garbage collection: delete chunks no snapshot references (marked from
//! every snapshot's own map, see [`gc`]), manifests without a catalog row,
//! temporaries of interrupted work, records of damaged chunks that healed
//! or that nothing uses, and partial pushes nobody wrote to for
//! [`GcOptions::partial_max_age`].
//!
//! gc runs beside backups and mounts. Each backup registers its start time
//! (see `lock`), and storing a chunk that already exists touches its mtime,
//! so a chunk is only a candidate when it is unreferenced *and* older than
//! the oldest running backup. A candidate is renamed to `<hash>.trash`, its
//! mtime checked again (a backup may have touched it just before), and only
//! then deleted; a touch after the rename fails and makes the backup write
//! the chunk anew. Chunks of images open in a mount count as referenced
//! (see `store::pins`), whether or not their snapshot still exists.
//!
//! On object storage there are no mtimes to touch. There gc holds the
//! maintenance lease (`store::lease`) and deletes chunks only when no
//! writer (backup, receive, copy) holds a lease on any host: it marks,
//! finds a writer, and leaves the sweep for a later run, saying so. A
//! writer that starts meanwhile sees the maintenance lease and waits until
//! gc is done, so no backup can deduplicate onto a chunk gc is deleting.
//! Mounts and restores pin their images in the bucket, as mounts do here.

use std::collections::HashSet;
use std::fs;
use std::path::Path;
use std::time::SystemTime;

use chrono::Utc;
use serde::Serialize;

use crate::error::{Error, IoContext, Result};
use crate::model::chunk_id::ChunkId;
use crate::store::chunks::local::trash_path;
use crate::store::chunks::object::{ObjectChunks, PackInfo, PACK_SIZE};
use crate::store::chunks::pack::PackEntry;
use crate::store::lease;
use crate::store::lock::{self, Activity, MaintenanceLock};
use crate::store::manifest;
use crate::store::partial;
use crate::store::pins;
use crate::store::repo::Repository;

#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    pub deleted_chunks: usize,
    pub freed_bytes: u64,
    /// Unreferenced but written since the oldest running backup started.
    pub kept_recent: usize,
    pub removed_manifests: usize,
    pub removed_temporaries: usize,
    /// Records of damaged chunks removed: healed, or used by nothing.
    pub removed_damaged: usize,
    /// Packs rewritten without what nobody needs (object storage).
    pub repacked_packs: usize,
    /// Partial pushes older than the limit, described.
    pub removed_partials: Vec<String>,
    /// Why unreferenced chunks were left for a later gc (object storage,
    /// a writer running).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deferred: Option<String>,
}

#[derive(Debug, Clone)]
pub struct GcOptions {
    /// A partial push not written to for this long is removed (a retry
    /// would resume it otherwise; see `store::partial`).
    pub partial_max_age: chrono::Duration,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            partial_max_age: chrono::Duration::days(partial::DEFAULT_MAX_AGE_DAYS),
        }
    }
}

/// Seconds of slack under the cutoff: file systems stamp mtimes from a
/// coarse clock that can lag the one `now_secs` reads by a tick.
const MARGIN_SECS: f64 = 0.1;

pub fn gc(repo: &Repository, lock: &MaintenanceLock) -> Result<GcReport> {
    gc_with(repo, lock, &GcOptions::default())
}

pub fn gc_with(repo: &Repository, _lock: &MaintenanceLock, opts: &GcOptions) -> Result<GcReport> {
    let holders = lock::holders(repo.home())?;
    let leases = match repo.shared_backend() {
        Some(b) => lease::list(b.as_ref())?
            .into_iter()
            .filter(|l| !l.is_stale())
            .collect(),
        None => Vec::new(),
    };
    let oldest = holders
        .iter()
        .filter(|h| h.activity.is_writer())
        .map(|h| h.started)
        .fold(lock::now_secs(), f64::min);
    let cutoff = oldest - MARGIN_SECS;

    let snaps = repo.snapshots(None)?;
    // Before deleting anything: an empty catalog beside manifests means a
    // lost catalog, and everything would look unreferenced.
    if snaps.is_empty()
        && manifest::list(repo.backend())?
            .iter()
            .any(|o| o.key.ends_with(".json"))
    {
        return Err(Error::invalid(
            "the catalog lists no snapshots but manifests exist: if the catalog was lost, \
             run `strata repair --rebuild-catalog` before gc",
        ));
    }
    // Own maps suffice: an image is its chain's own maps laid over one
    // another, each cut to the next one's size, so every chunk an image
    // references is in the own map of one of its snapshot's ancestors (or
    // its own), all of which are in the catalog; and a snapshot's own map
    // is the top layer of its image, so nothing more is marked either.
    // forget keeps this true: a child's new own map holds what it inherited
    // from the removed snapshot. Marking costs the sum of the own maps, not
    // disk size times snapshots.
    let mut referenced: HashSet<ChunkId> = HashSet::new();
    for s in &snaps {
        referenced.extend(repo.own_map(s)?.chunks());
    }
    // After the catalog, never before: see `store::pins` for why.
    let live: HashSet<String> = if repo.is_remote() {
        leases
            .iter()
            .filter(|l| matches!(l.kind.as_str(), "mount" | "restore"))
            .map(|l| l.name().to_string())
            .collect()
    } else {
        holders
            .iter()
            .filter(|h| matches!(h.activity, Activity::Mount | Activity::Restore))
            .map(|h| h.name.clone())
            .collect()
    };
    // A mount or restore that started after the look above counts too.
    let alive_now = |name: &str| -> Result<bool> {
        if repo.is_remote() {
            let key = format!("{}{name}.json", lease::LEASES);
            return Ok(lease::list(repo.backend())?
                .iter()
                .any(|l| l.key == key && !l.is_stale()));
        }
        Ok(lock::holders(repo.home())?.iter().any(|h| h.name == name))
    };
    referenced.extend(pins::pinned_chunks(repo.backend(), &live, &alive_now)?);
    crate::testhook::pause("gc:marked");

    let mut report = GcReport::default();
    if let Some(local) = repo.chunks().as_local() {
        for path in local.list_files()? {
            sweep_chunk_file(&path, &referenced, cutoff, &mut report)?;
        }
        sweep_manifests(repo, &snaps, cutoff, &mut report)?;
    } else if let Some(objects) = repo.chunks().as_object() {
        match leases.iter().find(|l| l.is_writer()) {
            Some(w) => {
                report.deferred = Some(format!(
                    "{w} is running; unreferenced chunks are left for the next gc"
                ))
            }
            None => {
                lease::ensure_held()?;
                sweep_packs(objects, &referenced, &mut report)?;
                sweep_unfinished_runs(repo, &snaps, &mut report)?;
            }
        }
    }
    sweep_tmp(repo, cutoff, &mut report)?;
    // A partial's chunks are not needed (its data is in its staging file),
    // so it is only a matter of age.
    report.removed_partials =
        partial::sweep(&partial::home(repo), Utc::now() - opts.partial_max_age)?
            .iter()
            .map(|p| p.describe())
            .collect();
    sweep_damaged(repo, &referenced, &mut report)?;
    log::info!(
        "gc: deleted {} chunks ({} bytes), kept {} recent",
        report.deleted_chunks,
        report.freed_bytes,
        report.kept_recent
    );
    Ok(report)
}

fn mtime_secs(path: &Path) -> Option<f64> {
    let m = fs::metadata(path).ok()?.modified().ok()?;
    Some(m.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs_f64())
}

fn sweep_chunk_file(
    path: &Path,
    referenced: &HashSet<ChunkId>,
    cutoff: f64,
    report: &mut GcReport,
) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let (hex, rest) = name.split_at(name.len().min(64));
    let Ok(id) = ChunkId::from_hex(hex) else {
        log::warn!("gc: ignoring unexpected file {}", path.display());
        return Ok(());
    };
    let recent = mtime_secs(path).is_some_and(|t| t >= cutoff);
    let chunk = path.with_file_name(hex);
    match rest {
        "" if referenced.contains(&id) => {}
        "" if recent => report.kept_recent += 1,
        "" => {
            let trash = trash_path(&chunk);
            fs::rename(&chunk, &trash).ctx(|| format!("rename {}", chunk.display()))?;
            crate::testhook::pause("gc:trashed");
            delete_or_restore(&trash, &chunk, cutoff, report)?;
        }
        ".trash" => {
            // Left by an interrupted gc: finish the decision it was making.
            if referenced.contains(&id) || recent {
                if !chunk.exists() {
                    fs::rename(path, &chunk).ctx(|| format!("restore {}", path.display()))?;
                } else {
                    fs::remove_file(path).ctx(|| format!("remove {}", path.display()))?;
                }
            } else {
                delete_or_restore(path, &chunk, cutoff, report)?;
            }
        }
        _ if rest.starts_with(".tmp.") => {
            if !recent {
                fs::remove_file(path).ctx(|| format!("remove {}", path.display()))?;
                report.removed_temporaries += 1;
            }
        }
        _ => log::warn!("gc: ignoring unexpected file {}", path.display()),
    }
    Ok(())
}

fn delete_or_restore(trash: &Path, chunk: &Path, cutoff: f64, report: &mut GcReport) -> Result<()> {
    let meta = fs::metadata(trash).ctx(|| format!("stat {}", trash.display()))?;
    let touched = mtime_secs(trash).is_some_and(|t| t >= cutoff);
    if touched {
        fs::rename(trash, chunk).ctx(|| format!("restore {}", trash.display()))?;
        report.kept_recent += 1;
    } else {
        fs::remove_file(trash).ctx(|| format!("remove {}", trash.display()))?;
        report.deleted_chunks += 1;
        report.freed_bytes += meta.len();
    }
    Ok(())
}

/// Records of damaged chunks that were stored anew or that no image uses:
/// they hold nothing anyone needs.
fn sweep_damaged(
    repo: &Repository,
    referenced: &HashSet<ChunkId>,
    report: &mut GcReport,
) -> Result<()> {
    let chunks = repo.chunks();
    for id in chunks.damaged_records()? {
        // On object storage the record also keeps every host off the bad
        // copies: it stays until gc repacked them away.
        if let Some(objects) = chunks.as_object() {
            if !objects.damage_settled(&id)? {
                continue;
            }
        }
        if chunks.contains(&id) || !referenced.contains(&id) {
            chunks.remove_damaged_record(&id)?;
            report.removed_damaged += 1;
        }
    }
    Ok(())
}

/// On object storage: delete the packs nothing needs, and repack those
/// worth it (see [`repack_worth_it`]) into new packs before deleting them.
/// A chunk in several packs (two hosts stored it at once) is kept in the
/// first only; copies found damaged are never kept.
fn sweep_packs(
    objects: &ObjectChunks,
    referenced: &HashSet<ChunkId>,
    report: &mut GcReport,
) -> Result<()> {
    let packs = objects.packs()?;
    let mut kept: HashSet<ChunkId> = HashSet::new();
    let plans: Vec<Vec<PackEntry>> = packs
        .iter()
        .map(|p| {
            p.entries
                .iter()
                .filter(|(e, bad)| !bad && referenced.contains(&e.id) && kept.insert(e.id))
                .map(|(e, _)| *e)
                .collect()
        })
        .collect();
    let small = packs
        .iter()
        .zip(&plans)
        .filter(|(p, keep)| is_small(p) && !keep.is_empty())
        .count();
    let mut doomed: Vec<&PackInfo> = Vec::new();
    let mut rewrite: Vec<(&PackInfo, &[PackEntry])> = Vec::new();
    for (pack, keep) in packs.iter().zip(&plans) {
        if keep.is_empty() {
            doomed.push(pack);
        } else if repack_worth_it(pack, keep, small) {
            rewrite.push((pack, keep));
        }
    }
    // All rewritten at once, so that small packs merge; every new pack is
    // stored before an old one goes.
    let (written, names) = objects.repack(&rewrite)?;
    let mut freed_by_repack = 0;
    for (pack, keep) in &rewrite {
        if names.contains(&pack.name) {
            continue; // written again as it was: it is its own new copy
        }
        objects.delete_pack(pack)?;
        report.repacked_packs += 1;
        report.deleted_chunks += pack.entries.len() - keep.len();
        freed_by_repack += pack.size;
    }
    report.freed_bytes += freed_by_repack.saturating_sub(written);
    delete_packs(objects, &doomed)?;
    report.deleted_chunks += doomed.iter().map(|p| p.entries.len()).sum::<usize>();
    report.freed_bytes += doomed.iter().map(|p| p.size).sum::<u64>();
    Ok(())
}

/// Packs of less than a quarter of the usual size (the last of each
/// backup) are merged once there are a few of them.
fn is_small(pack: &PackInfo) -> bool {
    pack.size < (PACK_SIZE / 4) as u64
}

/// Rewrite a pack holding damaged copies, a quarter or more of bytes no
/// one needs, or one of several small packs.
fn repack_worth_it(pack: &PackInfo, keep: &[PackEntry], small_packs: usize) -> bool {
    let live: u64 = keep.iter().map(|e| e.range.length).sum();
    let dead = pack.size.saturating_sub(live);
    pack.entries.iter().any(|(_, bad)| *bad)
        || dead * 4 >= pack.size
        || (is_small(pack) && small_packs >= MERGE_SMALL_PACKS)
}

/// Delete packs, several requests at a time.
fn delete_packs(objects: &ObjectChunks, doomed: &[&PackInfo]) -> Result<()> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..DELETERS.min(doomed.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(pack) = doomed.get(i) else { break };
                if let Err(e) = objects.delete_pack(pack) {
                    *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    break;
                }
            });
        }
    });
    match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Manifests of domain runs that died before writing their record (object
/// storage, where such manifests are written first): they never count,
/// and nobody is writing (the caller checked the leases).
fn sweep_unfinished_runs(
    repo: &Repository,
    snaps: &[crate::model::snapshot::SnapshotInfo],
    report: &mut GcReport,
) -> Result<()> {
    let known = manifest_keys(snaps);
    for o in manifest::list(repo.backend())? {
        let Some((disk, id)) = manifest::parse_key(&o.key) else {
            continue;
        };
        if known.contains(&o.key) {
            continue;
        }
        // Unreadable ones are verify's to report, not gc's to delete.
        let Ok(m) = manifest::read(repo.backend(), &disk, &id, repo.keys()) else {
            continue;
        };
        let Some(run) = &m.run else { continue };
        if repo
            .backend()
            .head(&format!("domains/{run}/{id}.json"))?
            .is_none()
        {
            repo.backend().delete(&o.key)?;
            report.removed_manifests += 1;
        }
    }
    Ok(())
}

/// The manifest keys of the snapshots the catalog lists.
fn manifest_keys(snaps: &[crate::model::snapshot::SnapshotInfo]) -> HashSet<String> {
    snaps
        .iter()
        .map(|s| manifest::manifest_key(&s.disk, &s.id))
        .collect()
}

/// Deletes in flight at once on object storage.
const DELETERS: usize = 8;
/// Small packs merged by gc once there are this many.
const MERGE_SMALL_PACKS: usize = 4;

/// Staging files of receives that died (a live one is a registered backup,
/// so its files are newer than the cutoff).
fn sweep_tmp(repo: &Repository, cutoff: f64, report: &mut GcReport) -> Result<()> {
    let dir = repo.scratch_dir();
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(());
    };
    for entry in entries {
        let path = entry.ctx(|| format!("list {}", dir.display()))?.path();
        // receive-<pid>-<n>.raw: its process may be gone however recent it is.
        let owner_gone = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| {
                n.strip_prefix("receive-")?
                    .split('-')
                    .next()?
                    .parse::<u32>()
                    .ok()
            })
            .is_some_and(|pid| !Path::new("/proc").join(pid.to_string()).exists());
        if owner_gone || mtime_secs(&path).is_some_and(|t| t < cutoff) {
            fs::remove_file(&path).ctx(|| format!("remove {}", path.display()))?;
            report.removed_temporaries += 1;
        }
    }
    Ok(())
}

/// Remove manifests whose snapshot is not in the catalog, and temporaries
/// (a local repository: on object storage a manifest is its snapshot).
fn sweep_manifests(
    repo: &Repository,
    snaps: &[crate::model::snapshot::SnapshotInfo],
    cutoff: f64,
    report: &mut GcReport,
) -> Result<()> {
    let known = manifest_keys(snaps);
    let files = manifest::list(repo.backend())?;
    let manifests = files.iter().filter(|o| o.key.ends_with(".json")).count();
    if snaps.is_empty() && manifests > 0 {
        return Err(Error::invalid(
            "the catalog lists no snapshots but manifests exist: if the catalog was lost, \
             run `strata repair --rebuild-catalog` before gc",
        ));
    }
    for o in files {
        let path = repo.home().join(&o.key);
        // A running backup writes its manifest just before its catalog row.
        let old = mtime_secs(&path).is_some_and(|t| t < cutoff);
        let leftover = o.key.contains(".json.tmp.") || o.key.contains(".new.");
        if leftover {
            if old {
                fs::remove_file(&path).ctx(|| format!("remove {}", path.display()))?;
                report.removed_temporaries += 1;
            }
        } else if o.key.ends_with(".json") && !known.contains(&o.key) && old {
            fs::remove_file(&path).ctx(|| format!("remove {}", path.display()))?;
            report.removed_manifests += 1;
        }
    }
    Ok(())
}
