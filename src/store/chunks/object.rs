//! Chunks of a repository on object storage: `chunks/xx/<hash>` objects in
//! the same encoding as a local store's files, written create-only, and
//! read through this host's [`ObjectCache`] by a mount only (the one
//! reader that comes back for the same chunks). Damaged chunks are moved out of use as in a local store:
//! their body goes to `damaged/<hash>` and the chunk object is deleted.
//!
//! Which chunks the bucket holds is listed once per process, on the first
//! write, so that deduplication costs no request per chunk; chunks written
//! by others since then are found by the create-only write, which the
//! store refuses without storing anything.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::codec::{decode, encode_file, is_current_file};
use super::object_cache::{self, ObjectCache};
use super::quarantine::{on_damage, Taken};
use super::uploader::Uploader;
use super::{ChunkStore, PutOutcome};
use crate::error::{Error, Result};
use crate::model::chunk_id::ChunkId;
use crate::store::backend::Backend;
use crate::store::crypto::Keys;

const CHUNKS: &str = "chunks/";
const DAMAGED: &str = "damaged/";

pub struct ObjectChunks {
    backend: Arc<dyn Backend>,
    level: i32,
    keys: Option<Arc<Keys>>,
    cache: ObjectCache,
    /// Keep what is read in the cache (a mount re-reads; a restore not).
    keep_reads: AtomicBool,
    /// Chunks known to be in the bucket, once listed.
    known: Mutex<Option<HashSet<ChunkId>>>,
    /// Started on the first write.
    uploader: std::sync::OnceLock<Uploader>,
}

fn key(id: &ChunkId) -> String {
    let hex = id.to_hex();
    format!("{CHUNKS}{}/{hex}", &hex[..2])
}

impl ObjectChunks {
    pub fn new(
        backend: Arc<dyn Backend>,
        home: &Path,
        level: i32,
        keys: Option<Arc<Keys>>,
    ) -> Result<Self> {
        Ok(ObjectChunks {
            backend,
            level,
            keys,
            cache: ObjectCache::new(&home.join("cache"), object_cache::configured_size()?)?,
            keep_reads: AtomicBool::new(false),
            known: Mutex::new(None),
            uploader: std::sync::OnceLock::new(),
        })
    }

    /// Every chunk in the bucket with its size and last write.
    pub fn list(&self) -> Result<Vec<(ChunkId, crate::store::backend::ObjectInfo)>> {
        Ok(self
            .backend
            .list(CHUNKS)?
            .into_iter()
            .filter_map(|o| {
                let hex = o.key.rsplit('/').next()?;
                Some((ChunkId::from_hex(hex).ok()?, o))
            })
            .collect())
    }

    /// Delete a chunk object (gc).
    pub fn delete(&self, id: &ChunkId) -> Result<()> {
        self.forget_known(id);
        self.cache.remove(&id.to_hex());
        self.backend.delete(&key(id))
    }

    fn known(&self, id: &ChunkId) -> Result<bool> {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.is_none() {
            *known = Some(self.list()?.into_iter().map(|(id, _)| id).collect());
        }
        Ok(known.as_ref().is_some_and(|k| k.contains(id)))
    }

    fn add_known(&self, id: ChunkId) {
        if let Some(k) = self
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            k.insert(id);
        }
    }

    fn forget_known(&self, id: &ChunkId) {
        if let Some(k) = self
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            k.remove(id);
        }
    }

    /// Store an encoded chunk unless the bucket has it; the bytes sent.
    /// The write happens in the background (see `uploader`): it is
    /// durable once [`ChunkStore::flush`] returns.
    fn store(&self, id: &ChunkId, file: Vec<u8>) -> Result<u64> {
        if self.known(id)? {
            return Ok(0);
        }
        let uploader = match self.uploader.get() {
            Some(u) => u,
            None => {
                let u = Uploader::new(self.backend.clone())?;
                self.uploader.get_or_init(|| u)
            }
        };
        let len = file.len() as u64;
        uploader.send(key(id), file)?;
        self.add_known(*id);
        Ok(len)
    }

    /// The stored chunk, from the cache (for a mount) or the bucket;
    /// `None` if missing. Everything else reads the bucket: verify must
    /// check what is there, and a restore reads each chunk once anyway.
    fn fetch(&self, id: &ChunkId) -> Result<Option<(Vec<u8>, bool)>> {
        if self.keep_reads.load(Ordering::Relaxed) {
            if let Some(body) = self.cache.get(&id.to_hex()) {
                return Ok(Some((body, true)));
            }
        }
        Ok(self.backend.get(&key(id))?.map(|b| (b, false)))
    }

    fn read(&self, id: &ChunkId, into: &mut Vec<u8>, file: Option<&mut Vec<u8>>) -> Result<()> {
        let hex = id.to_hex();
        let (mut body, cached) = match self.fetch(id)? {
            Some(x) => x,
            None => {
                return Err(Error::BadChunk {
                    hash: hex,
                    message: format!("missing: {} does not exist", key(id)),
                })
            }
        };
        let keep = !cached && self.keep_reads.load(Ordering::Relaxed);
        // decode opens a sealed body in place: keep the stored bytes.
        let original = (file.is_some() || keep).then(|| body.clone());
        match decode(id, &mut body, into, self.keys.as_deref()) {
            Ok(()) => {}
            // A bad cached copy is the cache's problem: read the bucket's.
            Err(_) if cached => {
                self.cache.remove(&hex);
                return self.read(id, into, file);
            }
            Err(e) => return Err(e),
        }
        if let (true, Some(stored)) = (keep, &original) {
            self.cache.insert(&hex, stored);
        }
        if let Some(file) = file {
            *file = original.unwrap_or_default();
        }
        Ok(())
    }
}

impl ChunkStore for ObjectChunks {
    fn id_of(&self, data: &[u8]) -> ChunkId {
        match self.keys.as_deref() {
            Some(k) => k.chunk_id(data),
            None => ChunkId::of(data),
        }
    }

    fn put(&self, data: &[u8]) -> Result<PutOutcome> {
        let id = self.id_of(data);
        if self.known(&id)? {
            return Ok(PutOutcome { id, stored: 0 });
        }
        let file = encode_file(data, self.level, self.keys.as_deref(), &id)?;
        let stored = self.store(&id, file)?;
        Ok(PutOutcome { id, stored })
    }

    fn get_into(&self, id: &ChunkId, into: &mut Vec<u8>) -> Result<()> {
        self.get_checked(id, into, None)
    }

    fn get_with_file(&self, id: &ChunkId, into: &mut Vec<u8>, file: &mut Vec<u8>) -> Result<()> {
        self.get_checked(id, into, Some(file))
    }

    fn put_file(&self, id: &ChunkId, file: &[u8], data: &[u8]) -> Result<u64> {
        if !is_current_file(file) {
            return Ok(self.put(data)?.stored);
        }
        self.store(id, file.to_vec())
    }

    fn flush(&self) -> Result<()> {
        match self.uploader.get() {
            Some(u) => u.flush(),
            None => Ok(()),
        }
    }

    fn contains(&self, id: &ChunkId) -> bool {
        self.backend.head(&key(id)).ok().flatten().is_some()
    }

    fn stored_size(&self, id: &ChunkId) -> Option<u64> {
        self.backend.head(&key(id)).ok().flatten().map(|o| o.size)
    }

    /// Objects have no mtime to refresh: gc on object storage relies on
    /// leases instead (see `care::gc`).
    fn touch(&self, id: &ChunkId) -> bool {
        self.known(id).unwrap_or(false) || self.contains(id)
    }

    fn quarantine(&self, id: &ChunkId) -> Result<Option<Taken>> {
        let hex = id.to_hex();
        self.cache.remove(&hex);
        self.forget_known(id);
        let record = format!("{DAMAGED}{hex}");
        let Some(mut body) = self.backend.get(&key(id))? else {
            if self.backend.head(&record)?.is_none() {
                self.backend.put(&record, b"")?;
            }
            return Ok(Some(Taken::Missing));
        };
        let copy = body.clone();
        let mut scratch = Vec::new();
        if decode(id, &mut body, &mut scratch, self.keys.as_deref()).is_ok() {
            return Ok(None); // stored anew meanwhile
        }
        self.backend.put(&record, &copy)?;
        self.backend.delete(&key(id))?;
        log::warn!("chunk {id} is damaged; moved out of use");
        Ok(Some(Taken::Moved))
    }

    fn damaged_records(&self) -> Result<Vec<ChunkId>> {
        Ok(self
            .backend
            .list(DAMAGED)?
            .iter()
            .filter_map(|o| ChunkId::from_hex(o.key.trim_start_matches(DAMAGED)).ok())
            .collect())
    }

    fn remove_damaged_record(&self, id: &ChunkId) -> Result<()> {
        self.backend.delete(&format!("{DAMAGED}{}", id.to_hex()))
    }

    fn keep_reads(&self, keep: bool) {
        self.keep_reads.store(keep, Ordering::Relaxed);
    }

    fn as_object(&self) -> Option<&ObjectChunks> {
        Some(self)
    }
}

impl ObjectChunks {
    fn get_checked(
        &self,
        id: &ChunkId,
        into: &mut Vec<u8>,
        file: Option<&mut Vec<u8>>,
    ) -> Result<()> {
        on_damage(self.read(id, into, file), || self.quarantine(id))
    }
}
