//! This host's index of the packs in a bucket: which pack holds each chunk
//! and where. A cache like the catalog (`packs.db` beside it): rebuilt
//! from the packs' own indexes (see `pack`) by [`PackIndex::sync`], which
//! lists the bucket's packs and reads the tail of each pack it has not
//! seen. Kept in SQLite rather than in memory so that a process's memory
//! does not grow with the repository, and shared by the processes of one
//! host.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};

use super::pack::{self, PackEntry, FOOTER_LEN, PACKS};
use crate::error::{Error, Result};
use crate::model::chunk_id::ChunkId;
use crate::model::extent::ByteRange;
use crate::store::backend::Backend;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS packs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    -- When this host indexed it (seconds): a sync only drops packs it
    -- indexed before it listed the bucket.
    added REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    chunk BLOB NOT NULL,
    pack INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    -- Found damaged here (see `quarantine`): never read or trusted again.
    bad INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (chunk, pack)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_by_pack ON entries (pack, offset);
";

/// Bytes read from a pack's end to find its index in one request: the
/// footer and the entries of up to ~1,500 chunks.
const TAIL_GUESS: u64 = 64 << 10;
/// Packs whose indexes are fetched at once.
const FETCHERS: usize = 8;

/// Where a chunk's file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub pack: String,
    pub range: ByteRange,
}

pub struct PackIndex {
    conn: Mutex<Connection>,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl PackIndex {
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(60))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // A cache: losing the last writes to a crash only costs requests.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(PackIndex {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where a good copy of the chunk is, if this host knows one.
    pub fn locate(&self, id: &ChunkId) -> Result<Option<Location>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(
            "SELECT p.name, e.offset, e.length FROM entries e JOIN packs p ON p.id = e.pack
             WHERE e.chunk = ?1 AND e.bad = 0 LIMIT 1",
        )?;
        Ok(st
            .query_row([&id.0[..]], |r| {
                Ok(Location {
                    pack: r.get(0)?,
                    range: ByteRange::new(r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64),
                })
            })
            .optional()?)
    }

    /// Record a pack and its chunks (one this process wrote, or found).
    pub fn add(&self, name: &str, size: u64, entries: &[PackEntry]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT OR IGNORE INTO packs (name, size, added) VALUES (?1, ?2, ?3)",
            params![name, size as i64, now()],
        )?;
        let pack: i64 =
            tx.query_row("SELECT id FROM packs WHERE name = ?1", [name], |r| r.get(0))?;
        {
            let mut st = tx.prepare_cached(
                "INSERT OR IGNORE INTO entries (chunk, pack, offset, length) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for e in entries {
                st.execute(params![
                    &e.id.0[..],
                    pack,
                    e.range.offset as i64,
                    e.range.length as i64
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Forget a pack (deleted from the bucket).
    pub fn remove(&self, name: &str) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM entries WHERE pack = (SELECT id FROM packs WHERE name = ?1)",
            [name],
        )?;
        tx.execute("DELETE FROM packs WHERE name = ?1", [name])?;
        tx.commit()?;
        Ok(())
    }

    pub fn has_pack(&self, name: &str) -> Result<bool> {
        let conn = self.conn();
        let mut st = conn.prepare_cached("SELECT 1 FROM packs WHERE name = ?1")?;
        Ok(st.exists([name])?)
    }

    /// Every indexed pack with its size.
    pub fn packs(&self) -> Result<HashMap<String, u64>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached("SELECT name, size FROM packs")?;
        let rows = st.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// A pack's chunks in the order they are stored, with whether each
    /// was found damaged.
    pub fn entries(&self, name: &str) -> Result<Vec<(PackEntry, bool)>> {
        self.entries_from(name, 0, usize::MAX)
    }

    /// At most `limit` of a pack's chunks from `offset` on, in order.
    pub fn entries_from(
        &self,
        name: &str,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<(PackEntry, bool)>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(
            "SELECT e.chunk, e.offset, e.length, e.bad FROM entries e
             WHERE e.pack = (SELECT id FROM packs WHERE name = ?1) AND e.offset >= ?2
             ORDER BY e.offset LIMIT ?3",
        )?;
        let rows = st.query_map(
            params![name, offset as i64, limit.min(i64::MAX as usize) as i64],
            |r| {
                let chunk: Vec<u8> = r.get(0)?;
                let mut id = [0u8; 32];
                if chunk.len() == 32 {
                    id.copy_from_slice(&chunk);
                }
                Ok((
                    PackEntry {
                        id: ChunkId(id),
                        range: ByteRange::new(
                            r.get::<_, i64>(1)? as u64,
                            r.get::<_, i64>(2)? as u64,
                        ),
                    },
                    r.get::<_, i64>(3)? != 0,
                ))
            },
        )?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Never trust this copy of the chunk again.
    pub fn mark_bad(&self, id: &ChunkId, pack: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE entries SET bad = 1 WHERE chunk = ?1
             AND pack = (SELECT id FROM packs WHERE name = ?2)",
            params![&id.0[..], pack],
        )?;
        Ok(())
    }

    /// Bring the index in step with the bucket: index the packs it does
    /// not know (reading each one's tail), drop those gone from the
    /// bucket. A pack whose index cannot be read is left out and named in
    /// the log: its chunks count as missing, which verify reports and the
    /// next backup of the same data mends.
    pub fn sync(&self, backend: &dyn Backend) -> Result<()> {
        let started = now();
        let listed: HashMap<String, u64> = backend
            .list(PACKS)?
            .into_iter()
            .filter_map(|o| Some((pack::name_of_key(&o.key)?.to_string(), o.size)))
            .collect();
        let known = self.packs()?;
        let new: Vec<(&String, u64)> = listed
            .iter()
            .filter(|(name, _)| !known.contains_key(*name))
            .map(|(n, s)| (n, *s))
            .collect();
        for (name, size, entries) in fetch_indexes(backend, &new)? {
            self.add(name, size, &entries)?;
        }
        let gone: HashSet<&String> = known.keys().filter(|n| !listed.contains_key(*n)).collect();
        if !gone.is_empty() {
            let conn = self.conn();
            let mut st = conn.prepare_cached("SELECT added FROM packs WHERE name = ?1")?;
            let mut stale = Vec::new();
            for name in gone {
                let added: Option<f64> = st.query_row([name], |r| r.get(0)).optional()?;
                // Indexed after the listing: written by a process here
                // after this one looked.
                if added.is_some_and(|a| a < started) {
                    stale.push(name.clone());
                }
            }
            drop(st);
            drop(conn);
            for name in stale {
                self.remove(&name)?;
            }
        }
        Ok(())
    }
}

/// The indexes of `packs` (name and size), several requests at a time;
/// packs gone meanwhile or unreadable as packs are left out.
fn fetch_indexes<'a>(
    backend: &dyn Backend,
    packs: &[(&'a String, u64)],
) -> Result<Vec<(&'a String, u64, Vec<PackEntry>)>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let found = Mutex::new(Vec::new());
    let failed = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..FETCHERS.min(packs.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&(name, size)) = packs.get(i) else {
                    break;
                };
                match read_index(backend, name, size) {
                    Ok(Some(entries)) => found
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((name, size, entries)),
                    Ok(None) => {}
                    Err(e) => {
                        failed
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert(e);
                        break;
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    Ok(found.into_inner().unwrap_or_else(|e| e.into_inner()))
}

/// A pack's entries from its tail: `None` if it is gone or is no pack.
pub fn read_index(backend: &dyn Backend, name: &str, size: u64) -> Result<Option<Vec<PackEntry>>> {
    let key = pack::key(name);
    let not_a_pack = |e: Error| {
        log::warn!(
            "{key} in {}: {e}; its chunks count as missing",
            backend.describe()
        );
        Ok(None)
    };
    if size < FOOTER_LEN as u64 {
        return not_a_pack(Error::invalid("shorter than a pack footer"));
    }
    let guess = size.min(TAIL_GUESS);
    let Some(mut tail) = backend.get_range(&key, ByteRange::from_bounds(size - guess, size))?
    else {
        return Ok(None);
    };
    let need = match pack::trailer_len(&tail, size) {
        Ok(n) => n,
        Err(e) => return not_a_pack(e),
    };
    if need > guess {
        match backend.get_range(&key, ByteRange::from_bounds(size - need, size))? {
            Some(t) => tail = t,
            None => return Ok(None),
        }
    }
    match pack::parse_entries(&tail, size) {
        Ok(entries) => Ok(Some(entries)),
        Err(e) => not_a_pack(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::backend::dir::DirBackend;
    use crate::store::chunks::pack::PackBuilder;

    fn put_pack(backend: &dyn Backend, files: &[(&[u8], usize)]) -> pack::Pack {
        let mut b = PackBuilder::default();
        for (seed, len) in files {
            b.add(ChunkId::of(seed), &vec![seed[0]; *len]);
        }
        let p = b.finish();
        backend.put(&pack::key(&p.name), &p.bytes).unwrap();
        p
    }

    #[test]
    fn sync_indexes_new_packs_and_drops_deleted_ones() {
        let dir = tempfile::tempdir().unwrap();
        let backend = DirBackend::new(dir.path());
        let index = PackIndex::open(&dir.path().join("packs.db")).unwrap();
        let small = put_pack(&backend, &[(b"a", 10), (b"b", 20)]);
        // More entries than the first read of a tail covers.
        let many: Vec<Vec<u8>> = (0..2000u32).map(|i| i.to_le_bytes().to_vec()).collect();
        let mut b = PackBuilder::default();
        for m in &many {
            b.add(ChunkId::of(m), m);
        }
        let big = b.finish();
        backend.put(&pack::key(&big.name), &big.bytes).unwrap();
        backend.put("packs/zz/not-a-pack", b"junk").unwrap();
        let junk = "ab".repeat(32);
        backend
            .put(&pack::key(&junk), b"junk junk junk junk")
            .unwrap();

        index.sync(&backend).unwrap();
        let a = index.locate(&ChunkId::of(b"a")).unwrap().unwrap();
        assert_eq!(a.pack, small.name);
        assert_eq!(a.range, ByteRange::new(0, 10));
        let last = index.locate(&ChunkId::of(&many[1999])).unwrap().unwrap();
        assert_eq!(last.pack, big.name);
        assert_eq!(index.packs().unwrap().len(), 2, "junk is not indexed");

        index.mark_bad(&ChunkId::of(b"b"), &small.name).unwrap();
        assert!(index.locate(&ChunkId::of(b"b")).unwrap().is_none());
        assert!(index.entries(&small.name).unwrap()[1].1);

        backend.delete(&pack::key(&small.name)).unwrap();
        index.sync(&backend).unwrap();
        assert!(index.locate(&ChunkId::of(b"a")).unwrap().is_none());
        assert!(index.locate(&ChunkId::of(&many[0])).unwrap().is_some());
    }

    #[test]
    fn a_pack_indexed_after_the_listing_stays() {
        let dir = tempfile::tempdir().unwrap();
        let backend = DirBackend::new(dir.path());
        let index = PackIndex::open(&dir.path().join("packs.db")).unwrap();
        let mut b = PackBuilder::default();
        b.add(ChunkId::of(b"x"), b"x");
        let p = b.finish();
        // Added by this host's writer; not yet in any listing this sync
        // will see, because it is indexed "in the future".
        index
            .add(&p.name, p.bytes.len() as u64, &p.entries)
            .unwrap();
        index
            .conn()
            .execute("UPDATE packs SET added = added + 3600", [])
            .unwrap();
        index.sync(&backend).unwrap();
        assert!(index.locate(&ChunkId::of(b"x")).unwrap().is_some());
    }
}
