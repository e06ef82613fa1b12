//! `verify`: prove that snapshots read back intact.
//!
//! Metadata first (manifest against catalog, extents, parents, the resolved
//! map recomputed from the parent), then every chunk the selected images
//! use, each read once however many snapshots share it, on several threads.
//! Damage is reported per snapshot with the image ranges it affects, and
//! every damaged chunk is moved out of use (see `store::chunks::quarantine`), so
//! that backups store its data anew.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::chunk_id::ChunkId;
use crate::model::extent::ByteRange;
use crate::model::image_map::{ImageMap, Piece};
use crate::model::snapshot::SnapshotInfo;
use crate::store::repo::Repository;

/// Which chunks to read (all unless a subset is asked for).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Subset {
    All,
    /// Group `n` (1-based) of `t` groups, split by hash.
    Group {
        n: u64,
        t: u64,
    },
    /// About this percentage of the chunks, chosen by hash.
    Percent(f64),
}

impl Subset {
    /// `N/T` or `P%`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || Error::invalid(format!("invalid subset {s:?}: expected N/T or P%"));
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p.parse().map_err(|_| bad())?;
            if !(0.0..=100.0).contains(&p) {
                return Err(bad());
            }
            return Ok(Subset::Percent(p));
        }
        let (n, t) = s.split_once('/').ok_or_else(bad)?;
        let (n, t): (u64, u64) = (n.parse().map_err(|_| bad())?, t.parse().map_err(|_| bad())?);
        if t == 0 || n == 0 || n > t {
            return Err(bad());
        }
        Ok(Subset::Group { n, t })
    }

    fn includes(&self, id: &ChunkId) -> bool {
        let h = u64::from_le_bytes(id.0[..8].try_into().expect("8 bytes"));
        match *self {
            Subset::All => true,
            Subset::Group { n, t } => h % t == n - 1,
            Subset::Percent(p) => (h as f64 / u64::MAX as f64) * 100.0 < p,
        }
    }
}

#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Presence and metadata only.
    pub quick: bool,
    pub subset: Subset,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Damage {
    pub snapshot: String,
    pub reason: String,
    /// `[offset, length]` of the image.
    pub ranges: Vec<[u64; 2]>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub ok: bool,
    pub checked_snapshots: usize,
    pub checked_chunks: usize,
    pub damaged: Vec<Damage>,
}

/// Verify `snapshots` (all when empty).
pub fn verify(
    repo: &Repository,
    snapshots: &[SnapshotInfo],
    opts: &VerifyOptions,
) -> Result<Report> {
    let all = repo.snapshots(None)?;
    let selected: Vec<SnapshotInfo> = if snapshots.is_empty() {
        all.clone()
    } else {
        snapshots.to_vec()
    };
    let known: HashSet<String> = all.iter().map(|s| s.reference()).collect();

    // reason and ranges per snapshot, in selection order
    let mut damage: BTreeMap<usize, (Vec<String>, Vec<ByteRange>)> = BTreeMap::new();
    // Only the chunk names are kept across snapshots, not their image maps:
    // memory stays one image map (plus the names) however many snapshots
    // are verified. Images are resolved again only if a chunk is bad.
    let mut sound: Vec<usize> = Vec::new();
    let mut wanted: HashSet<ChunkId> = HashSet::new();
    for (i, info) in selected.iter().enumerate() {
        match check_metadata(repo, info, &known) {
            Ok(image) => {
                sound.push(i);
                wanted.extend(
                    image
                        .chunks()
                        .into_iter()
                        .filter(|id| opts.subset.includes(id)),
                );
            }
            Err(reason) => {
                let entry = damage.entry(i).or_default();
                entry.0.push(reason);
            }
        }
    }
    let mut wanted: Vec<ChunkId> = wanted.into_iter().collect();
    wanted.sort_unstable();
    if !opts.quick && matches!(opts.subset, Subset::All) {
        // Every chunk is read: in the order they are stored, several per
        // request on object storage.
        let order = repo.chunks().reading_order(&wanted)?;
        wanted = order.into_iter().map(|i| wanted[i]).collect();
        repo.chunks().will_read(&wanted);
    }
    let bad = check_chunks(repo, &wanted, opts.quick);

    for &i in sound.iter().filter(|_| !bad.is_empty()) {
        let map = match repo.image_map(&selected[i]) {
            Ok(map) => map,
            Err(e) => {
                damage.entry(i).or_default().0.push(format!("catalog: {e}"));
                continue;
            }
        };
        let mut reasons: BTreeMap<String, ()> = BTreeMap::new();
        let mut ranges = Vec::new();
        for seg in &map.segments {
            if let Piece::Data { chunk, .. } = seg.piece {
                if let Some(why) = bad.get(&chunk) {
                    reasons.insert(format!("chunk {}: {why}", chunk.to_hex()), ());
                    ranges.push(seg.range);
                }
            }
        }
        if !ranges.is_empty() {
            let entry = damage.entry(i).or_default();
            entry.0.extend(reasons.into_keys());
            entry.1.extend(ranges);
        }
    }

    let damaged: Vec<Damage> = damage
        .into_iter()
        .map(|(i, (reasons, ranges))| Damage {
            snapshot: selected[i].reference(),
            reason: reasons.join("; "),
            ranges: merge(ranges)
                .into_iter()
                .map(|r| [r.offset, r.length])
                .collect(),
        })
        .collect();
    Ok(Report {
        ok: damaged.is_empty(),
        checked_snapshots: selected.len(),
        checked_chunks: wanted.len(),
        damaged,
    })
}

fn merge(mut ranges: Vec<ByteRange>) -> Vec<ByteRange> {
    ranges.sort();
    let mut out: Vec<ByteRange> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(last) if last.end() >= r.offset => {
                let end = last.end().max(r.end());
                *last = ByteRange::from_bounds(last.offset, end);
            }
            _ => out.push(r),
        }
    }
    out
}

/// The snapshot's image map if its metadata holds together, else why not.
fn check_metadata(
    repo: &Repository,
    info: &SnapshotInfo,
    known: &HashSet<String>,
) -> Result<ImageMap, String> {
    let (own, image) = repo.maps(info).map_err(|e| format!("catalog: {e}"))?;
    let manifest = repo.manifest(info).map_err(|e| format!("manifest: {e}"))?;
    let (m_info, m_own) = manifest.decode().map_err(|e| format!("manifest: {e}"))?;
    if !same_identity(&m_info, info) {
        return Err("manifest: metadata differs from the catalog".into());
    }
    if (&m_info.parent, &m_own) != (&info.parent, &own) {
        // forget rewrites a child's manifest before the catalog: until the
        // catalog follows, both must describe the same image.
        let m_image = resolve_with_parent(repo, info, m_info.parent.as_ref(), &m_own, known)
            .map_err(|e| format!("manifest: {e}"))?;
        if m_image != image {
            return Err("manifest: its extents do not describe the catalog's image".into());
        }
    }
    if image.size != info.size || own.size != info.size {
        return Err("catalog: map size differs from the snapshot size".into());
    }
    let mut end = 0;
    for s in &image.segments {
        if s.range.offset < end || s.range.end() > info.size || s.range.is_empty() {
            return Err(format!(
                "catalog: image map segment {} out of order or bounds",
                s.range
            ));
        }
        end = s.range.end();
    }
    let expected = resolve_with_parent(repo, info, info.parent.as_ref(), &own, known)?;
    if expected != image {
        return Err("catalog: the resolved image map does not match parent + own extents".into());
    }
    Ok(image)
}

/// The fields that never change after commit. `protected` may lag between
/// manifest and catalog after a crash; parent and kind are checked through
/// the image they describe.
fn same_identity(a: &SnapshotInfo, b: &SnapshotInfo) -> bool {
    a.disk == b.disk
        && a.id == b.id
        && a.time == b.time
        && a.size == b.size
        && a.granularity == b.granularity
        && a.label == b.label
        && a.checkpoint == b.checkpoint
        && a.bitmap == b.bitmap
        && a.stored_bytes == b.stored_bytes
}

/// `own` laid over the catalog image of `parent` (or alone for a full).
fn resolve_with_parent(
    repo: &Repository,
    info: &SnapshotInfo,
    parent: Option<&crate::model::name::SnapshotId>,
    own: &ImageMap,
    known: &HashSet<String>,
) -> Result<ImageMap, String> {
    let Some(pid) = parent else {
        return Ok(own.clone());
    };
    let pref = format!("{}@{pid}", info.disk);
    if !known.contains(&pref) {
        return Err(format!("parent {pref} is missing"));
    }
    let parent = repo
        .resolve(&crate::model::name::SnapshotRef::parse(&pref).map_err(|e| e.to_string())?)
        .map_err(|e| format!("parent: {e}"))?;
    let (_, parent_image) = repo.maps(&parent).map_err(|e| format!("parent: {e}"))?;
    Ok(parent_image.overlay(own))
}

/// Read (or, with `quick`, look for) every chunk; the bad ones with why.
fn check_chunks(repo: &Repository, ids: &[ChunkId], quick: bool) -> HashMap<ChunkId, String> {
    let bad = Mutex::new(HashMap::new());
    let next = AtomicUsize::new(0);
    // Reads wait on the disk when the cache is cold: more threads than cores.
    let threads = 4 * std::thread::available_parallelism().map_or(2, |n| n.get());
    let total: u64 = ids.len() as u64;
    let bar = crate::progress::count(total, "verify chunks");
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(id) = ids.get(i) else { break };
                    let result = if quick {
                        quick_check(repo, id)
                    } else {
                        repo.chunks().get_into(id, &mut buf).map_err(|e| match e {
                            Error::BadChunk { message, .. } => message,
                            e => e.to_string(),
                        })
                    };
                    if let Err(why) = result {
                        bad.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(*id, why);
                    }
                    bar.inc(1);
                }
            });
        }
    });
    bar.finish_and_clear();
    bad.into_inner().unwrap_or_else(|p| p.into_inner())
}

/// Whether a chunk file is there and long enough to hold a header; one that
/// is not is moved out of use like a chunk that fails to read.
fn quick_check(repo: &Repository, id: &ChunkId) -> Result<(), String> {
    let why = match repo.chunks().stored_size(id) {
        Some(n) if n >= 4 => return Ok(()),
        Some(_) => "truncated",
        None => "missing",
    };
    match repo.chunks().quarantine(id) {
        Ok(Some(taken)) => Err(format!("{why}; {}", taken.describe())),
        Ok(None) => Ok(()),
        Err(e) => Err(format!("{why}; moving it out of use failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subsets() {
        assert_eq!(Subset::parse("2/5").unwrap(), Subset::Group { n: 2, t: 5 });
        assert_eq!(Subset::parse("10%").unwrap(), Subset::Percent(10.0));
        for bad in ["0/5", "6/5", "1/0", "x", "101%", "-1%"] {
            assert!(Subset::parse(bad).is_err(), "{bad}");
        }
        let ids: Vec<ChunkId> = (0..1000u32)
            .map(|i| ChunkId::of(&i.to_le_bytes()))
            .collect();
        let per_group: Vec<usize> = (1..=4)
            .map(|n| {
                ids.iter()
                    .filter(|id| Subset::Group { n, t: 4 }.includes(id))
                    .count()
            })
            .collect();
        assert_eq!(per_group.iter().sum::<usize>(), 1000);
        assert!(per_group.iter().all(|&c| c > 150));
        let some = ids
            .iter()
            .filter(|id| Subset::Percent(20.0).includes(id))
            .count();
        assert!((120..280).contains(&some), "{some}");
    }

    #[test]
    fn merge_ranges() {
        let r = |o, l| ByteRange::new(o, l);
        assert_eq!(
            merge(vec![r(10, 5), r(0, 10), r(20, 1)]),
            vec![r(0, 15), r(20, 1)]
        );
    }
}
