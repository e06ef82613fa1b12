//! The SQLite catalog: one row per committed snapshot, with its own
//! segments and, every few snapshots of a chain, its resolved image map (a
//! *keyframe*). A row exists only once the snapshot's chunks and manifest
//! are durable, so the catalog is what "visible" means.
//!
//! Resolving an image starts from the nearest row up the chain that holds
//! its image (a keyframe, or a full snapshot, whose own map is its image)
//! and lays the own maps below it over that, oldest first. The placement
//! rule ([`Writer::keyframe_due`]) keeps every snapshot fewer than
//! [`KEYFRAME_EVERY`] links below its base, so opening an image decodes
//! one resolved map and at most `KEYFRAME_EVERY - 1` own maps, whatever
//! the chain's length (invariant 3), while a snapshot's row grows with what
//! it changed, not with the disk.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};

use crate::error::Result;
use crate::model::image_map::ImageMap;
use crate::model::name::{DiskName, SnapshotId};
use crate::model::snapshot::{format_time, parse_time, SnapshotInfo, SnapshotKind};

/// The version of [`SCHEMA`], shown by `strata --version`. It is not
/// stored in the database. Version 2 keeps version 1's columns but lets
/// `image_map` be empty (not a keyframe) and writes map encoding 2; a
/// version 1 catalog (every row a keyframe, encoding 1) is read as it is.
pub const SCHEMA_VERSION: u32 = 2;

/// A chain stores a resolved image map at least every this many snapshots:
/// opening an image overlays at most `KEYFRAME_EVERY - 1` own maps.
pub const KEYFRAME_EVERY: usize = 16;

/// A keyframe is also stored once the own maps since the last one add up
/// to the size of its stored map (so an open never decodes more than about
/// twice a resolved map), unless they are smaller than this: below it,
/// decoding costs nothing worth a copy of the image map.
pub const KEYFRAME_MIN_BYTES: usize = 64 << 10;

/// Longest chain followed before a catalog is called damaged (parents are
/// older than their children, so a loop can only come from corruption).
const MAX_CHAIN: usize = 1 << 20;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS snapshots (
    disk         TEXT NOT NULL,
    id           TEXT NOT NULL,
    time         TEXT NOT NULL,
    kind         TEXT NOT NULL,
    parent       TEXT,
    size         INTEGER NOT NULL,
    granularity  INTEGER NOT NULL,
    label        TEXT NOT NULL,
    checkpoint   TEXT,
    bitmap       TEXT,
    protected    INTEGER NOT NULL DEFAULT 0,
    stored_bytes INTEGER NOT NULL,
    own_map      BLOB NOT NULL,
    image_map    BLOB NOT NULL,
    PRIMARY KEY (disk, id)
);
-- A cached catalog's record of which version of each snapshot's manifest
-- its row was made from (see `catalog_sync`); unused in a local repository.
CREATE TABLE IF NOT EXISTS manifest_versions (
    disk    TEXT NOT NULL,
    id      TEXT NOT NULL,
    version TEXT NOT NULL,
    PRIMARY KEY (disk, id)
);
";

const COLUMNS: &str = "disk, id, time, kind, parent, size, granularity, label, checkpoint, bitmap, protected, stored_bytes";

pub struct Catalog {
    conn: Connection,
}

/// A snapshot row: its own map, and its resolved image map when the row is
/// a keyframe (`None`: resolved from the chain when opened).
pub struct SnapshotRecord {
    pub info: SnapshotInfo,
    pub own: ImageMap,
    pub image: Option<ImageMap>,
}

/// One link of a chain, read without decoding any map.
struct Link {
    parent: Option<SnapshotId>,
    own_len: usize,
    image_len: usize,
}

fn link(conn: &Connection, disk: &DiskName, id: &SnapshotId) -> Result<Option<Link>> {
    let mut stmt = conn.prepare_cached(
        "SELECT parent, length(own_map), length(image_map) FROM snapshots WHERE disk = ?1 AND id = ?2",
    )?;
    let row: Option<(Option<String>, i64, i64)> = stmt
        .query_row(params![disk.as_str(), id.as_str()], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    row.map(|(parent, own, image)| {
        Ok(Link {
            parent: parent.as_deref().map(SnapshotId::parse).transpose()?,
            own_len: own as usize,
            image_len: image as usize,
        })
    })
    .transpose()
}

fn blobs(conn: &Connection, disk: &DiskName, id: &SnapshotId) -> Result<Option<Blobs>> {
    let mut stmt = conn.prepare_cached(
        "SELECT parent, own_map, image_map FROM snapshots WHERE disk = ?1 AND id = ?2",
    )?;
    let row: Option<(Option<String>, Vec<u8>, Vec<u8>)> = stmt
        .query_row(params![disk.as_str(), id.as_str()], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    row.map(|(parent, own, image)| {
        Ok(Blobs {
            parent: parent.as_deref().map(SnapshotId::parse).transpose()?,
            own,
            image,
        })
    })
    .transpose()
}

struct Blobs {
    parent: Option<SnapshotId>,
    own: Vec<u8>,
    image: Vec<u8>,
}

fn decode(blob: &[u8], disk: &DiskName, id: &SnapshotId, what: &str) -> Result<ImageMap> {
    ImageMap::decode(blob)
        .map_err(|e| crate::Error::invalid(format!("catalog: {what} of {disk}@{id}: {e}")))
}

/// The resolved image map of `disk@id`, `None` if there is no such row:
/// the nearest stored image up the chain (a keyframe's, or a full
/// snapshot's own map) with the own maps below it laid over it.
fn resolve(conn: &Connection, disk: &DiskName, id: &SnapshotId) -> Result<Option<ImageMap>> {
    Ok(layers(conn, disk, id)?.map(|(base, tops)| base.overlay_all(&tops)))
}

/// What [`resolve`] lays over what: the nearest stored image up the chain
/// and the own maps below it, oldest first.
fn layers(
    conn: &Connection,
    disk: &DiskName,
    id: &SnapshotId,
) -> Result<Option<(ImageMap, Vec<ImageMap>)>> {
    let mut tops: Vec<ImageMap> = Vec::new();
    let mut cur = id.clone();
    let base = loop {
        let Some(row) = blobs(conn, disk, &cur)? else {
            if tops.is_empty() {
                return Ok(None);
            }
            return Err(crate::Error::invalid(format!(
                "catalog: {disk}@{cur}, an ancestor of {disk}@{id}, is missing"
            )));
        };
        if !row.image.is_empty() {
            break decode(&row.image, disk, &cur, "image map")?;
        }
        let own = decode(&row.own, disk, &cur, "own map")?;
        match row.parent {
            None => break own,
            Some(p) => {
                tops.push(own);
                if tops.len() > MAX_CHAIN {
                    return Err(crate::Error::invalid(format!(
                        "catalog: the chain of {disk}@{id} loops"
                    )));
                }
                cur = p;
            }
        }
    };
    tops.reverse();
    Ok(Some((base, tops)))
}

impl Catalog {
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(60))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Catalog { conn })
    }

    fn row_to_info(row: &Row) -> rusqlite::Result<SnapshotInfo> {
        let text_err = |i: usize, e: crate::error::Error| {
            rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
        };
        let disk: String = row.get(0)?;
        let id: String = row.get(1)?;
        let time: String = row.get(2)?;
        let kind: String = row.get(3)?;
        let parent: Option<String> = row.get(4)?;
        Ok(SnapshotInfo {
            disk: DiskName::parse(&disk).map_err(|e| text_err(0, e))?,
            id: SnapshotId::parse(&id).map_err(|e| text_err(1, e))?,
            time: parse_time(&time).map_err(|e| text_err(2, e))?,
            kind: SnapshotKind::parse(&kind).map_err(|e| text_err(3, e))?,
            parent: parent
                .map(|p| SnapshotId::parse(&p))
                .transpose()
                .map_err(|e| text_err(4, e))?,
            size: row.get::<_, i64>(5)? as u64,
            granularity: row.get::<_, i64>(6)? as u64,
            label: row.get(7)?,
            checkpoint: row.get(8)?,
            bitmap: row.get(9)?,
            protected: row.get(10)?,
            stored_bytes: row.get::<_, i64>(11)? as u64,
        })
    }

    /// Every row's `(disk, id)` with the manifest version it was made from,
    /// if one is on record.
    pub fn versions(&self) -> Result<Vec<(String, String, Option<String>)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT s.disk, s.id, v.version FROM snapshots s
             LEFT JOIN manifest_versions v ON v.disk = s.disk AND v.id = s.id",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Changes whenever another connection commits: a cheap "did anything change".
    pub fn data_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }

    /// Snapshots, oldest first, of one disk or of all.
    pub fn list(&self, disk: Option<&DiskName>) -> Result<Vec<SnapshotInfo>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM snapshots WHERE (?1 IS NULL OR disk = ?1) ORDER BY disk, time, id"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params![disk.map(|d| d.as_str())], Self::row_to_info)?;
        let mut out = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        out.sort_by(|a, b| (a.time, &a.disk, &a.id).cmp(&(b.time, &b.disk, &b.id)));
        Ok(out)
    }

    pub fn get(&self, disk: &DiskName, id: &SnapshotId) -> Result<Option<SnapshotInfo>> {
        let sql = format!("SELECT {COLUMNS} FROM snapshots WHERE disk = ?1 AND id = ?2");
        let mut stmt = self.conn.prepare_cached(&sql)?;
        Ok(stmt
            .query_row(params![disk.as_str(), id.as_str()], Self::row_to_info)
            .optional()?)
    }

    pub fn latest(&self, disk: &DiskName) -> Result<Option<SnapshotInfo>> {
        Ok(self.list(Some(disk))?.pop())
    }

    /// The snapshot's own map.
    pub fn own_map(&self, disk: &DiskName, id: &SnapshotId) -> Result<Option<ImageMap>> {
        blobs(&self.conn, disk, id)?
            .map(|b| decode(&b.own, disk, id, "own map"))
            .transpose()
    }

    /// The snapshot's resolved image map (see the module comment for the
    /// cost), read in one transaction: a forget committing meanwhile is
    /// seen entirely or not at all, never half a rewritten chain.
    pub fn image_map(&self, disk: &DiskName, id: &SnapshotId) -> Result<Option<ImageMap>> {
        let tx = self.conn.unchecked_transaction()?;
        resolve(&tx, disk, id)
    }

    /// The layers [`image_map`](Self::image_map) resolves, read in one
    /// transaction: the stored map it starts from and the own maps laid
    /// over it, oldest first (`base.overlay_all(&tops)` is the image map).
    /// For readers that build their own form of the map
    /// (`model::compact_map`) without the resolved one beside it.
    pub fn image_layers(
        &self,
        disk: &DiskName,
        id: &SnapshotId,
    ) -> Result<Option<(ImageMap, Vec<ImageMap>)>> {
        let tx = self.conn.unchecked_transaction()?;
        layers(&tx, disk, id)
    }

    /// The snapshot's own map and resolved image map, as of one moment.
    pub fn maps(&self, disk: &DiskName, id: &SnapshotId) -> Result<Option<(ImageMap, ImageMap)>> {
        let tx = self.conn.unchecked_transaction()?;
        let Some(b) = blobs(&tx, disk, id)? else {
            return Ok(None);
        };
        let own = decode(&b.own, disk, id, "own map")?;
        let image = resolve(&tx, disk, id)?
            .ok_or_else(|| crate::Error::SnapshotNotFound(format!("{disk}@{id}")))?;
        Ok(Some((own, image)))
    }

    /// Whether the row holds its resolved image map (a keyframe).
    pub fn is_keyframe(&self, disk: &DiskName, id: &SnapshotId) -> Result<bool> {
        Ok(link(&self.conn, disk, id)?.is_some_and(|l| l.image_len > 0))
    }

    /// Bytes of map blobs in the catalog: own maps and stored image maps.
    pub fn map_bytes(&self) -> Result<(u64, u64)> {
        let (own, image): (i64, i64) = self.conn.query_row(
            "SELECT coalesce(sum(length(own_map)), 0), coalesce(sum(length(image_map)), 0) FROM snapshots",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((own as u64, image as u64))
    }

    /// Run `f` inside an immediate (write-locked) transaction.
    pub fn write<T>(&mut self, f: impl FnOnce(&Writer) -> Result<T>) -> Result<T> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&Writer { conn: &tx })?;
        tx.commit()?;
        Ok(out)
    }
}

/// Catalog writes, only available inside [`Catalog::write`].
pub struct Writer<'a> {
    conn: &'a Connection,
}

impl Writer<'_> {
    pub fn next_seq(&self, disk: &DiskName) -> Result<u32> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id FROM snapshots WHERE disk = ?1")?;
        let ids = stmt.query_map(params![disk.as_str()], |r| r.get::<_, String>(0))?;
        let mut max = 0;
        for id in ids {
            if let Ok(id) = SnapshotId::parse(&id?) {
                max = max.max(id.seq());
            }
        }
        Ok(max + 1)
    }

    /// Replace a snapshot's metadata and maps (forget).
    pub fn update(&self, rec: &SnapshotRecord) -> Result<()> {
        let i = &rec.info;
        let n = self.conn.execute(
            "UPDATE snapshots SET kind = ?3, parent = ?4, protected = ?5, own_map = ?6, image_map = ?7
             WHERE disk = ?1 AND id = ?2",
            params![
                i.disk.as_str(),
                i.id.as_str(),
                i.kind.as_str(),
                i.parent.as_ref().map(|p| p.as_str()),
                i.protected,
                rec.own.encode(),
                image_blob(rec),
            ],
        )?;
        if n != 1 {
            return Err(crate::Error::SnapshotNotFound(i.reference()));
        }
        Ok(())
    }

    /// Set or clear the protected flag; the maps stay as they are.
    pub fn set_protected(&self, disk: &DiskName, id: &SnapshotId, protected: bool) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE snapshots SET protected = ?3 WHERE disk = ?1 AND id = ?2",
            params![disk.as_str(), id.as_str(), protected],
        )?;
        if n != 1 {
            return Err(crate::Error::SnapshotNotFound(format!("{disk}@{id}")));
        }
        Ok(())
    }

    /// The resolved image map of `disk@id`, as the transaction sees it.
    pub fn image_map(&self, disk: &DiskName, id: &SnapshotId) -> Result<Option<ImageMap>> {
        resolve(self.conn, disk, id)
    }

    /// Whether a new child of `parent` whose own map encodes to `own_len`
    /// bytes must store its resolved image map: when it would otherwise lie
    /// [`KEYFRAME_EVERY`] links below its base, or when the own maps
    /// since the base (its own included) add up to the base's stored map
    /// (and to at least [`KEYFRAME_MIN_BYTES`]). A missing parent is an
    /// error. Only blob lengths are read: the cost is a few row lookups.
    pub fn keyframe_due(
        &self,
        disk: &DiskName,
        parent: Option<&SnapshotId>,
        own_len: usize,
    ) -> Result<bool> {
        let Some(parent) = parent else {
            return Ok(false); // a full snapshot's own map is its image
        };
        let (mut depth, mut own_sum) = (1usize, own_len);
        let mut cur = parent.clone();
        let base_len = loop {
            let l = link(self.conn, disk, &cur)?
                .ok_or_else(|| crate::Error::SnapshotNotFound(format!("{disk}@{cur}")))?;
            if l.image_len > 0 {
                break l.image_len;
            }
            let Some(p) = l.parent else {
                break l.own_len;
            };
            depth += 1;
            own_sum += l.own_len;
            if depth >= KEYFRAME_EVERY {
                return Ok(true);
            }
            cur = p;
        };
        Ok(depth >= KEYFRAME_EVERY || own_sum >= base_len.max(KEYFRAME_MIN_BYTES))
    }

    pub fn exists(&self, disk: &DiskName, id: &SnapshotId) -> Result<bool> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT 1 FROM snapshots WHERE disk = ?1 AND id = ?2")?;
        Ok(stmt.exists(params![disk.as_str(), id.as_str()])?)
    }

    pub fn delete(&self, disk: &DiskName, id: &SnapshotId) -> Result<()> {
        for table in ["snapshots", "manifest_versions"] {
            self.conn.execute(
                &format!("DELETE FROM {table} WHERE disk = ?1 AND id = ?2"),
                params![disk.as_str(), id.as_str()],
            )?;
        }
        Ok(())
    }

    /// Record the manifest version a row was made from.
    pub fn set_version(&self, disk: &str, id: &str, version: &str) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO manifest_versions (disk, id, version) VALUES (?1, ?2, ?3)",
            params![disk, id, version],
        )?;
        Ok(())
    }

    pub fn insert(&self, rec: &SnapshotRecord) -> Result<()> {
        let i = &rec.info;
        self.conn.execute(
            &format!("INSERT INTO snapshots ({COLUMNS}, own_map, image_map) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"),
            params![
                i.disk.as_str(),
                i.id.as_str(),
                format_time(&i.time),
                i.kind.as_str(),
                i.parent.as_ref().map(|p| p.as_str()),
                i.size as i64,
                i.granularity as i64,
                i.label,
                i.checkpoint,
                i.bitmap,
                i.protected,
                i.stored_bytes as i64,
                rec.own.encode(),
                image_blob(rec),
            ],
        )?;
        Ok(())
    }
}

/// The `image_map` column: the encoded map of a keyframe, else empty.
fn image_blob(rec: &SnapshotRecord) -> Vec<u8> {
    rec.image.as_ref().map(ImageMap::encode).unwrap_or_default()
}
