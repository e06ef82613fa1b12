//! Per-snapshot manifest files: `manifests/<disk>/<id>.json`.
//!
//! A manifest holds everything the catalog row does except the resolved
//! image map, which can be recomputed from the parents. It is the source for
//! `repair --rebuild-catalog` (invariant 8).

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::model::chunk_id::ChunkId;
use crate::model::extent::{ByteRange, Extent, ExtentDoc, ExtentKind, EXTENTS_FORMAT};
use crate::model::image_map::{ImageMap, Piece, Segment};
use crate::model::name::{DiskName, SnapshotId};
use crate::model::snapshot::{format_time, parse_time, SnapshotInfo, SnapshotKind};
use crate::store::crypto::{from_hex, to_hex, Keys};
use crate::store::durable;

pub const MANIFEST_FORMAT: &str = "strata-manifest/1";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChunkEntry {
    pub offset: u64,
    pub length: u64,
    pub hash: String,
    /// Where in the chunk the range starts (non-zero after a rewrite by forget).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skip: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub disk: String,
    pub snapshot: String,
    pub time: String,
    pub kind: SnapshotKind,
    pub parent: Option<String>,
    pub size: u64,
    pub granularity: u64,
    pub label: String,
    pub checkpoint: Option<String>,
    pub bitmap: Option<String>,
    pub protected: bool,
    pub stored_bytes: u64,
    /// The snapshot's own extents (as in its extent JSON).
    pub extents: Vec<Extent>,
    /// The chunk behind every own data range.
    pub chunks: Vec<ChunkEntry>,
}

impl Manifest {
    pub fn new(info: &SnapshotInfo, own: &ImageMap) -> Self {
        let chunks = own
            .segments
            .iter()
            .filter_map(|s| match s.piece {
                Piece::Data { chunk, skip } => Some(ChunkEntry {
                    offset: s.range.offset,
                    length: s.range.length,
                    hash: chunk.to_hex(),
                    skip,
                }),
                Piece::Zero => None,
            })
            .collect();
        Manifest {
            format: MANIFEST_FORMAT.to_string(),
            disk: info.disk.to_string(),
            snapshot: info.id.to_string(),
            time: format_time(&info.time),
            kind: info.kind,
            parent: info.parent.as_ref().map(|p| p.to_string()),
            size: info.size,
            granularity: info.granularity,
            label: info.label.clone(),
            checkpoint: info.checkpoint.clone(),
            bitmap: info.bitmap.clone(),
            protected: info.protected,
            stored_bytes: info.stored_bytes,
            extents: own.extents(),
            chunks,
        }
    }

    /// The snapshot's metadata and own map, checked for consistency.
    pub fn decode(&self) -> Result<(SnapshotInfo, ImageMap)> {
        let bad =
            |m: String| Error::invalid(format!("manifest {}@{}: {m}", self.disk, self.snapshot));
        if self.format != MANIFEST_FORMAT {
            return Err(bad(format!("unknown format {:?}", self.format)));
        }
        let info = SnapshotInfo {
            disk: DiskName::parse(&self.disk)?,
            id: SnapshotId::parse(&self.snapshot)?,
            time: parse_time(&self.time)?,
            kind: self.kind,
            parent: self.parent.as_deref().map(SnapshotId::parse).transpose()?,
            size: self.size,
            granularity: self.granularity,
            label: self.label.clone(),
            checkpoint: self.checkpoint.clone(),
            bitmap: self.bitmap.clone(),
            protected: self.protected,
            stored_bytes: self.stored_bytes,
        };
        crate::model::extent::validate(&self.extents, self.size).map_err(bad)?;
        let mut segments: Vec<Segment> = self
            .extents
            .iter()
            .filter(|e| e.kind == ExtentKind::Zero)
            .map(|e| Segment::zero(e.range()))
            .collect();
        for c in &self.chunks {
            segments.push(Segment::data(
                ByteRange::new(c.offset, c.length),
                ChunkId::from_hex(&c.hash)?,
                c.skip,
            ));
        }
        let own = ImageMap::new(self.size, segments);
        if own.extents() != self.extents {
            return Err(bad("chunk list does not match the data extents".into()));
        }
        Ok((info, own))
    }

    pub fn extent_doc(&self) -> ExtentDoc {
        ExtentDoc {
            format: EXTENTS_FORMAT.to_string(),
            disk: self.disk.clone(),
            snapshot: self.snapshot.clone(),
            kind: self.kind.as_str().to_string(),
            parent: self.parent.clone(),
            size: self.size,
            granularity: self.granularity,
            bitmap: self.bitmap.clone(),
            extents: self.extents.clone(),
        }
    }
}

pub fn manifest_path(dir: &Path, disk: &DiskName, id: &SnapshotId) -> PathBuf {
    dir.join(disk.as_str()).join(format!("{id}.json"))
}

/// An encrypted repository's manifest file: only the name of the snapshot
/// in clear, the manifest sealed and bound to that name.
#[derive(Serialize, Deserialize)]
struct SealedManifest {
    format: String,
    disk: String,
    snapshot: String,
    /// Nonce, sealed manifest JSON and tag, in hex.
    sealed: String,
}

pub const SEALED_FORMAT: &str = "strata-sealed-manifest/1";

/// Write a manifest durably: temporary file, fsync, rename, fsync the
/// directory. With `keys`, sealed.
pub fn write(
    dir: &Path,
    m: &Manifest,
    disk: &DiskName,
    id: &SnapshotId,
    keys: Option<&Keys>,
) -> Result<PathBuf> {
    let path = manifest_path(dir, disk, id);
    // Compact, not pretty: a full backup of a large disk lists tens of
    // thousands of chunks, and indentation would double the file.
    let mut body = serde_json::to_vec(m).expect("manifest serializes");
    if let Some(keys) = keys {
        let sealed = SealedManifest {
            format: SEALED_FORMAT.into(),
            disk: disk.to_string(),
            snapshot: id.to_string(),
            sealed: to_hex(&keys.seal_manifest(&format!("{disk}@{id}"), &body)?),
        };
        body = serde_json::to_vec_pretty(&sealed).expect("sealed manifest serializes");
    }
    durable::replace(&path, &body)?;
    Ok(path)
}

/// Read a manifest (opening it with `keys` in an encrypted repository) and
/// check that it describes the snapshot its path names: a manifest copied
/// over another's is damage.
pub fn read(path: &Path, keys: Option<&Keys>) -> Result<Manifest> {
    let bad = |m: String| Error::invalid(format!("{}: {m}", path.display()));
    let body = fs::read(path).ctx(|| format!("read {}", path.display()))?;
    let body = match keys {
        None => body,
        Some(keys) => {
            let sealed: SealedManifest = serde_json::from_slice(&body)
                .map_err(|e| bad(format!("not a sealed manifest: {e}")))?;
            let what = format!("{}@{}", sealed.disk, sealed.snapshot);
            let bytes = from_hex(&sealed.sealed).ok_or_else(|| bad("malformed seal".into()))?;
            keys.open_manifest(&what, &bytes)
                .map_err(|e| bad(format!("sealed manifest: {e}")))?
        }
    };
    let m: Manifest =
        serde_json::from_slice(&body).map_err(|e| bad(format!("malformed manifest: {e}")))?;
    if !path.ends_with(format!("{}/{}.json", m.disk, m.snapshot)) {
        return Err(bad(format!(
            "holds the manifest of {}@{}, not of the snapshot its path names",
            m.disk, m.snapshot
        )));
    }
    Ok(m)
}

/// Every file under the manifests directory.
pub fn list_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    walk(dir, &mut out)?;
    out.sort();
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).ctx(|| format!("list {}", dir.display()))? {
        let entry = entry.ctx(|| format!("list {}", dir.display()))?;
        let ft = entry.file_type().ctx(|| "file type".into())?;
        if ft.is_dir() {
            walk(&entry.path(), out)?;
        } else {
            out.push(entry.path());
        }
    }
    Ok(())
}
