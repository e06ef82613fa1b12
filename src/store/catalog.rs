//! The SQLite catalog: one row per committed snapshot, with its own
//! segments and its resolved image map. A row exists only once the snapshot's
//! chunks and manifest are durable, so the catalog is what "visible" means.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};

use crate::error::Result;
use crate::model::image_map::ImageMap;
use crate::model::name::{DiskName, SnapshotId};
use crate::model::snapshot::{format_time, parse_time, SnapshotInfo, SnapshotKind};

/// The version of [`SCHEMA`], shown by `strata --version`. It is not
/// stored in the database (no migration exists yet): change it, and add
/// one, when the table changes.
pub const SCHEMA_VERSION: u32 = 1;

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
";

const COLUMNS: &str = "disk, id, time, kind, parent, size, granularity, label, checkpoint, bitmap, protected, stored_bytes";

pub struct Catalog {
    conn: Connection,
}

/// A snapshot row with both of its maps.
pub struct SnapshotRecord {
    pub info: SnapshotInfo,
    pub own: ImageMap,
    pub image: ImageMap,
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

    pub fn maps(&self, disk: &DiskName, id: &SnapshotId) -> Result<Option<(ImageMap, ImageMap)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT own_map, image_map FROM snapshots WHERE disk = ?1 AND id = ?2",
        )?;
        let blobs: Option<(Vec<u8>, Vec<u8>)> = stmt
            .query_row(params![disk.as_str(), id.as_str()], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        match blobs {
            None => Ok(None),
            Some((own, image)) => Ok(Some((ImageMap::decode(&own)?, ImageMap::decode(&image)?))),
        }
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

    /// Replace a snapshot's metadata and maps (forget, protect).
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
                rec.image.encode(),
            ],
        )?;
        if n != 1 {
            return Err(crate::Error::SnapshotNotFound(i.reference()));
        }
        Ok(())
    }

    pub fn exists(&self, disk: &DiskName, id: &SnapshotId) -> Result<bool> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT 1 FROM snapshots WHERE disk = ?1 AND id = ?2")?;
        Ok(stmt.exists(params![disk.as_str(), id.as_str()])?)
    }

    pub fn delete(&self, disk: &DiskName, id: &SnapshotId) -> Result<()> {
        self.conn.execute(
            "DELETE FROM snapshots WHERE disk = ?1 AND id = ?2",
            params![disk.as_str(), id.as_str()],
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
                rec.image.encode(),
            ],
        )?;
        Ok(())
    }
}
