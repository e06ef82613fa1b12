//! `copy`: snapshots from one repository to another, sending only the
//! chunks the target lacks.
//!
//! A snapshot goes with every ancestor its image depends on that the
//! target lacks, parents first, and keeps its id, time, kind, parent,
//! label, checkpoint, bitmap and protection. Each is made visible in the
//! target by `Repository::import` once its chunks are there, so an
//! interrupted copy leaves the target consistent and a rerun sends only
//! what is still missing.
//!
//! Between repositories with the same chunk names (both unencrypted) chunk
//! files travel as they are, after being checked; otherwise each chunk is
//! decoded and stored anew under the target's keyed name, and the copied
//! maps are translated.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::chunk_id::ChunkId;
use crate::model::image_map::{ImageMap, Piece, Segment};
use crate::model::snapshot::SnapshotInfo;
use crate::store::lock::{Activity, Registration};
use crate::store::repo::Repository;

#[derive(Debug, Default, Serialize)]
pub struct CopyReport {
    pub copied: Vec<String>,
    pub skipped: Vec<String>,
    pub chunks_sent: u64,
    pub bytes_sent: u64,
}

/// Copy `wanted` (every snapshot when empty) and what their images depend
/// on from `src` to `dst`.
pub fn copy(src: &Repository, dst: &Repository, wanted: &[SnapshotInfo]) -> Result<CopyReport> {
    // gc in the target spares what a registered backup wrote since it began.
    let _registration = Registration::new(dst, Activity::Copy, "copy")?;
    // And in the source: gc there (on any host, for a bucket) leaves what
    // is being copied alone.
    let _reading = Registration::new(src, Activity::Copy, "copy (source)")?;
    let all = src.snapshots(None)?;
    let order = with_ancestors(&all, if wanted.is_empty() { &all } else { wanted })?;
    let same_names = src.chunks().id_of(b"strata") == dst.chunks().id_of(b"strata");
    let mut report = CopyReport::default();
    for info in order {
        // Bound first: a guard in the scrutinee would hold the catalog
        // through the arms, which use it too.
        let existing = dst.catalog().get(&info.disk, &info.id)?;
        match existing {
            Some(existing) => {
                check_same(src, dst, info, &existing, same_names)?;
                report.skipped.push(info.reference());
            }
            None => {
                copy_one(src, dst, info, same_names, &mut report)?;
                report.copied.push(info.reference());
            }
        }
    }
    Ok(report)
}

/// `wanted` and their ancestors, each once, parents before children.
fn with_ancestors<'a>(
    all: &'a [SnapshotInfo],
    wanted: &[SnapshotInfo],
) -> Result<Vec<&'a SnapshotInfo>> {
    let by_ref: HashMap<String, &SnapshotInfo> = all.iter().map(|s| (s.reference(), s)).collect();
    let mut needed: HashSet<String> = HashSet::new();
    for w in wanted {
        let mut next = Some(w.reference());
        while let Some(r) = next.take() {
            let info = by_ref
                .get(&r)
                .ok_or_else(|| Error::SnapshotNotFound(r.clone()))?;
            if needed.insert(r) {
                next = info.parent.as_ref().map(|p| format!("{}@{p}", info.disk));
            }
        }
    }
    // Depth in the chain orders parents first whatever the times say.
    let depth = |s: &SnapshotInfo| {
        let mut d = 0;
        let mut cur = s;
        while let Some(p) = cur
            .parent
            .as_ref()
            .and_then(|p| by_ref.get(&format!("{}@{p}", cur.disk)))
        {
            d += 1;
            cur = p;
        }
        d
    };
    let mut out: Vec<&SnapshotInfo> = all
        .iter()
        .filter(|s| needed.contains(&s.reference()))
        .collect();
    out.sort_by_key(|s| (depth(s), s.time, s.reference()));
    Ok(out)
}

/// A snapshot the target has already must be the same snapshot: the same
/// metadata and, where chunk names are shared, the same image map; across
/// keys, the same allocation (the data itself would have to be read back).
fn check_same(
    src: &Repository,
    dst: &Repository,
    info: &SnapshotInfo,
    existing: &SnapshotInfo,
    same_names: bool,
) -> Result<()> {
    let conflict = |what: &str| {
        Error::invalid(format!(
            "{} exists in the target with a different {what}; it was not overwritten",
            info.reference()
        ))
    };
    if (
        existing.time,
        existing.kind,
        existing.size,
        &existing.parent,
    ) != (info.time, info.kind, info.size, &info.parent)
    {
        return Err(conflict("time, kind, size or parent"));
    }
    let (ours, theirs) = (src.image_map(info)?, dst.image_map(existing)?);
    let same = match same_names {
        true => ours == theirs,
        false => ours.extents() == theirs.extents(),
    };
    if !same {
        return Err(conflict("image"));
    }
    Ok(())
}

fn copy_one(
    src: &Repository,
    dst: &Repository,
    info: &SnapshotInfo,
    same_names: bool,
    report: &mut CopyReport,
) -> Result<()> {
    let own = src.own_map(info)?;
    let chunks = own.chunks();
    // In the order they were stored, mostly.
    src.chunks().will_read(&chunks);
    let names: Mutex<HashMap<ChunkId, ChunkId>> = Mutex::new(HashMap::new());
    let (sent, bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    let next = AtomicUsize::new(0);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let bar = crate::progress::count(chunks.len() as u64, &format!("copy {}", info.reference()));
    // Chunk reads and writes wait on the disk (or, later, the network).
    let threads = 4 * std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let (mut data, mut file) = (Vec::new(), Vec::new());
                while let Some(id) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) {
                    match send(src, dst, id, same_names, &mut data, &mut file) {
                        Ok((name, n)) => {
                            names
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(*id, name);
                            if n > 0 {
                                sent.fetch_add(1, Ordering::Relaxed);
                                bytes.fetch_add(n, Ordering::Relaxed);
                            }
                            bar.inc(1);
                        }
                        Err(e) => {
                            first_error
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                            next.store(chunks.len(), Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    bar.finish_and_clear();
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let names = names.into_inner().unwrap_or_else(|p| p.into_inner());
    let own = rename_chunks(&own, &names);
    let mut copied = info.clone();
    copied.stored_bytes = bytes.load(Ordering::Relaxed);
    crate::testhook::pause("copy:chunks-sent");
    dst.import(&copied, &own)?;
    report.chunks_sent += sent.into_inner();
    report.bytes_sent += bytes.into_inner();
    Ok(())
}

/// Put one chunk into the target unless it is there; its name in the
/// target and the bytes written.
fn send(
    src: &Repository,
    dst: &Repository,
    id: &ChunkId,
    same_names: bool,
    data: &mut Vec<u8>,
    file: &mut Vec<u8>,
) -> Result<(ChunkId, u64)> {
    let context = |e: Error| match e {
        Error::BadChunk { hash, message } => Error::BadChunk {
            hash,
            message: format!("{message} (in the source repository; not copied)"),
        },
        e => e,
    };
    if same_names {
        // Touching an existing chunk also keeps a concurrent gc off it.
        if dst.chunks().touch(id) {
            return Ok((*id, 0));
        }
        src.chunks()
            .get_with_file(id, data, file)
            .map_err(context)?;
        return Ok((*id, dst.chunks().put_file(id, file, data)?));
    }
    src.chunks().get_into(id, data).map_err(context)?;
    let put = dst.chunks().put(data)?;
    Ok((put.id, put.stored))
}

fn rename_chunks(map: &ImageMap, names: &HashMap<ChunkId, ChunkId>) -> ImageMap {
    let segments = map
        .segments
        .iter()
        .map(|s| match s.piece {
            Piece::Data { chunk, skip } => Segment::data(s.range, names[&chunk], skip),
            Piece::Zero => Segment::zero(s.range),
        })
        .collect();
    ImageMap::new(map.size, segments)
}
