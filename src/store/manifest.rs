//! Per-snapshot manifest files: `manifests/<disk>/<id>.json`.
//!
//! A manifest holds everything the catalog row does except the resolved
//! image map, which can be recomputed from the parents. It is the source for
//! `repair --rebuild-catalog` (invariant 8).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::chunk_id::ChunkId;
use crate::model::extent::{ByteRange, Extent, ExtentDoc, ExtentKind, EXTENTS_FORMAT};
use crate::model::image_map::{ImageMap, Segment};
use crate::model::name::{DiskName, SnapshotId};
use crate::model::snapshot::{format_time, parse_time, SnapshotInfo, SnapshotKind};
use crate::store::backend::{Backend, ObjectInfo};
use crate::store::crypto::{from_hex, to_hex, Keys};

/// The manifest format written: the own map in image map encoding 2.
pub const MANIFEST_FORMAT: &str = "strata-manifest/2";
/// The earlier format, still read: the own map as JSON `extents` and
/// `chunks` (about 170 bytes per segment, ten times encoding 2).
pub const MANIFEST_FORMAT_1: &str = "strata-manifest/1";

/// Format 1's entry of a chunk behind an own data range.
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
    /// Format 1: the snapshot's own extents (as in its extent JSON).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extents: Vec<Extent>,
    /// Format 1: the chunk behind every own data range.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<ChunkEntry>,
    /// Format 2: the own map, image map encoding 2, in base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_map: Option<String>,
    /// The libvirt domain run (its PREFIX; the run's id is the snapshot's)
    /// this snapshot was committed with. On object storage such a snapshot
    /// exists only once the run's record does, which is written after all
    /// the run's manifests: a run appears whole or not at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
}

impl Manifest {
    pub fn new(info: &SnapshotInfo, own: &ImageMap) -> Self {
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
            extents: Vec::new(),
            chunks: Vec::new(),
            own_map: Some(base64_encode(&own.encode())),
            run: None,
        }
    }

    /// The snapshot's metadata and own map, checked for consistency.
    pub fn decode(&self) -> Result<(SnapshotInfo, ImageMap)> {
        let bad =
            |m: String| Error::invalid(format!("manifest {}@{}: {m}", self.disk, self.snapshot));
        if self.format != MANIFEST_FORMAT && self.format != MANIFEST_FORMAT_1 {
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
        if self.format == MANIFEST_FORMAT {
            if !self.extents.is_empty() || !self.chunks.is_empty() {
                return Err(bad("extents or chunks beside own_map".into()));
            }
            let blob = self
                .own_map
                .as_deref()
                .and_then(base64_decode)
                .ok_or_else(|| bad("own_map missing or not base64".into()))?;
            let own = ImageMap::decode(&blob).map_err(|e| bad(e.to_string()))?;
            if own.size != self.size {
                return Err(bad("own_map size differs from the snapshot size".into()));
            }
            return Ok((info, own));
        }
        if self.own_map.is_some() {
            return Err(bad("own_map in a format 1 manifest".into()));
        }
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

    /// The snapshot's own extent JSON (decodes the own map).
    pub fn extent_doc(&self) -> Result<ExtentDoc> {
        let (_, own) = self.decode()?;
        Ok(ExtentDoc {
            format: EXTENTS_FORMAT.to_string(),
            disk: self.disk.clone(),
            snapshot: self.snapshot.clone(),
            kind: self.kind.as_str().to_string(),
            parent: self.parent.clone(),
            size: self.size,
            granularity: self.granularity,
            bitmap: self.bitmap.clone(),
            extents: own.extents(),
        })
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (RFC 4648), for binary maps in JSON.
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The bytes of padded standard base64, `None` if it is not that.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let t = text.as_bytes();
    if t.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(t.len() / 4 * 3);
    for (q, quad) in t.chunks(4).enumerate() {
        let last = q == t.len() / 4 - 1;
        let pad = quad.iter().rev().take_while(|&&b| b == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &b in &quad[..4 - pad] {
            let v = B64.iter().position(|&x| x == b)? as u32;
            n = n << 6 | v;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

/// Manifests live under this prefix: `manifests/<disk>/<id>.json`.
pub const MANIFESTS_PREFIX: &str = "manifests/";

pub fn manifest_key(disk: &DiskName, id: &SnapshotId) -> String {
    format!("{MANIFESTS_PREFIX}{disk}/{id}.json")
}

/// The snapshot a manifest key names, if it names one.
pub fn parse_key(key: &str) -> Option<(DiskName, SnapshotId)> {
    let rest = key.strip_prefix(MANIFESTS_PREFIX)?.strip_suffix(".json")?;
    let (disk, id) = rest.rsplit_once('/')?;
    Some((DiskName::parse(disk).ok()?, SnapshotId::parse(id).ok()?))
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

/// Write a manifest whole and durably (with `keys`, sealed). Writing it
/// is what commits a snapshot: see `store::repo`.
pub fn write(
    backend: &dyn Backend,
    m: &Manifest,
    disk: &DiskName,
    id: &SnapshotId,
    keys: Option<&Keys>,
) -> Result<()> {
    backend.put(&manifest_key(disk, id), &encode(m, disk, id, keys)?)
}

/// The stored form of a manifest: compact JSON, or its sealed wrapper.
pub fn encode(
    m: &Manifest,
    disk: &DiskName,
    id: &SnapshotId,
    keys: Option<&Keys>,
) -> Result<Vec<u8>> {
    // Compact, not pretty: a full backup of a large disk lists tens of
    // thousands of chunks, and indentation would double the file.
    let body = serde_json::to_vec(m).expect("manifest serializes");
    let Some(keys) = keys else {
        return Ok(body);
    };
    let sealed = SealedManifest {
        format: SEALED_FORMAT.into(),
        disk: disk.to_string(),
        snapshot: id.to_string(),
        sealed: to_hex(&keys.seal_manifest(&format!("{disk}@{id}"), &body)?),
    };
    Ok(serde_json::to_vec_pretty(&sealed).expect("sealed manifest serializes"))
}

/// Read the manifest of `disk@id` (opening it with `keys` in an encrypted
/// repository); `Error::SnapshotNotFound` when it does not exist.
pub fn read(
    backend: &dyn Backend,
    disk: &DiskName,
    id: &SnapshotId,
    keys: Option<&Keys>,
) -> Result<Manifest> {
    let key = manifest_key(disk, id);
    let body = backend
        .get(&key)?
        .ok_or_else(|| Error::SnapshotNotFound(format!("{disk}@{id}")))?;
    decode(&key, &body, keys)
}

/// Parse a stored manifest and check that it describes the snapshot its
/// key names: a manifest copied over another's is damage.
pub fn decode(key: &str, body: &[u8], keys: Option<&Keys>) -> Result<Manifest> {
    let bad = |m: String| Error::invalid(format!("{key}: {m}"));
    let body = match keys {
        None => body.to_vec(),
        Some(keys) => {
            let sealed: SealedManifest = serde_json::from_slice(body)
                .map_err(|e| bad(format!("not a sealed manifest: {e}")))?;
            let what = format!("{}@{}", sealed.disk, sealed.snapshot);
            let bytes = from_hex(&sealed.sealed).ok_or_else(|| bad("malformed seal".into()))?;
            keys.open_manifest(&what, &bytes)
                .map_err(|e| bad(format!("sealed manifest: {e}")))?
        }
    };
    let m: Manifest =
        serde_json::from_slice(&body).map_err(|e| bad(format!("malformed manifest: {e}")))?;
    if key != format!("{MANIFESTS_PREFIX}{}/{}.json", m.disk, m.snapshot) {
        return Err(bad(format!(
            "holds the manifest of {}@{}, not of the snapshot its path names",
            m.disk, m.snapshot
        )));
    }
    Ok(m)
}

/// Every object under `manifests/`: manifests and leftovers.
pub fn list(backend: &dyn Backend) -> Result<Vec<ObjectInfo>> {
    backend.list(MANIFESTS_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::image_map::tests::{random_map, Rng};

    #[test]
    fn base64_round_trips_and_refuses_garbage() {
        let mut rng = Rng(11);
        for len in 0..40 {
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            assert_eq!(base64_decode(&base64_encode(&bytes)).unwrap(), bytes);
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        for bad in ["Zm9", "Zm9v!mFy", "Zg==Zg==", "Z==="] {
            assert!(base64_decode(bad).is_none(), "{bad}");
        }
    }

    /// Format 2 round trips; format 1 (JSON extents and chunks) still reads.
    #[test]
    fn both_formats_decode_to_the_own_map() {
        let mut rng = Rng(5);
        let m = random_map(&mut rng, 200, 20, 1 << 20);
        let mut info = SnapshotInfo::for_test(chrono::Utc::now(), 1, SnapshotKind::Full, m.size);
        info.time = parse_time(&format_time(&info.time)).unwrap();
        let v2 = Manifest::new(&info, &m);
        let json = serde_json::to_vec(&v2).unwrap();
        let back: Manifest = serde_json::from_slice(&json).unwrap();
        assert_eq!(back.decode().unwrap().1, m);
        assert_eq!(back.extent_doc().unwrap().extents, m.extents());

        let mut v1 = v2.clone();
        v1.format = MANIFEST_FORMAT_1.into();
        v1.own_map = None;
        v1.extents = m.extents();
        v1.chunks = m
            .segments
            .iter()
            .filter_map(|s| match s.piece {
                crate::model::image_map::Piece::Data { chunk, skip } => Some(ChunkEntry {
                    offset: s.range.offset,
                    length: s.range.length,
                    hash: chunk.to_hex(),
                    skip,
                }),
                _ => None,
            })
            .collect();
        let json1 = serde_json::to_vec(&v1).unwrap();
        let back1: Manifest = serde_json::from_slice(&json1).unwrap();
        assert_eq!(back1.decode().unwrap(), back.decode().unwrap());
        assert!(
            json.len() * 3 < json1.len(),
            "{} vs {}",
            json.len(),
            json1.len()
        );

        let mut broken = v2.clone();
        broken.own_map = Some("AAAA".into());
        assert!(broken.decode().is_err());
        broken.own_map = None;
        assert!(broken.decode().is_err());
    }
}
