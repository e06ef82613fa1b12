//! Reading point-in-time images: a byte range of an image map (an
//! [`ImageMap`](crate::model::image_map::ImageMap) or the mount's
//! [`CompactMap`](crate::model::compact_map::CompactMap)) turned into bytes,
//! through a bounded cache of decoded chunks.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex};

use crate::error::Result;
use crate::model::chunk_id::ChunkId;
use crate::model::extent::ByteRange;
use crate::model::image_map::{MapView, Piece};
use crate::store::chunks::ChunkStore;

/// Decoded chunks, bounded by total bytes, least recently used out first.
/// A chunk being decoded by one thread is waited for by the others rather
/// than decoded twice (read-ahead and readers often want the same one).
pub struct ChunkCache {
    capacity: usize,
    inner: Mutex<CacheInner>,
    loaded: Condvar,
}

#[derive(Default)]
struct CacheInner {
    map: HashMap<ChunkId, (Arc<Vec<u8>>, u64)>,
    loading: HashSet<ChunkId>,
    bytes: usize,
    tick: u64,
}

impl ChunkCache {
    pub fn new(capacity: usize) -> Self {
        ChunkCache {
            capacity,
            inner: Mutex::new(CacheInner::default()),
            loaded: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        let inner = self.lock();
        inner.map.contains_key(id) || inner.loading.contains(id)
    }

    fn touch(inner: &mut CacheInner, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        inner.tick += 1;
        let tick = inner.tick;
        inner.map.get_mut(id).map(|(data, used)| {
            *used = tick;
            data.clone()
        })
    }

    fn insert_locked(&self, inner: &mut CacheInner, id: ChunkId, data: Arc<Vec<u8>>) {
        inner.tick += 1;
        let tick = inner.tick;
        let len = data.len();
        if let Some((old, _)) = inner.map.insert(id, (data, tick)) {
            inner.bytes -= old.len();
        }
        inner.bytes += len;
        while inner.bytes > self.capacity && inner.map.len() > 1 {
            // Linear scan: the cache holds at most a few hundred chunks.
            let oldest = inner
                .map
                .iter()
                .filter(|(k, _)| **k != id)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k);
            match oldest.and_then(|k| inner.map.remove(&k)) {
                Some((old, _)) => inner.bytes -= old.len(),
                None => break,
            }
        }
    }

    /// The decoded chunk, from the cache or the store.
    pub fn load(&self, store: &dyn ChunkStore, id: &ChunkId) -> Result<Arc<Vec<u8>>> {
        let mut inner = self.lock();
        loop {
            if let Some(data) = Self::touch(&mut inner, id) {
                return Ok(data);
            }
            if !inner.loading.contains(id) {
                break;
            }
            inner = self.loaded.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
        inner.loading.insert(*id);
        drop(inner);
        let result = store.get(id).map(Arc::new);
        let mut inner = self.lock();
        inner.loading.remove(id);
        if let Ok(data) = &result {
            self.insert_locked(&mut inner, *id, data.clone());
        }
        drop(inner);
        self.loaded.notify_all();
        result
    }
}

/// Fill `buf` with the image bytes at `offset`. Bytes past the end of the
/// image are not touched; the number of bytes inside it is returned.
pub fn read_at(
    map: &impl MapView,
    store: &dyn ChunkStore,
    cache: &ChunkCache,
    buf: &mut [u8],
    offset: u64,
) -> Result<usize> {
    let size = map.size();
    if offset >= size {
        return Ok(0);
    }
    let len = (buf.len() as u64).min(size - offset) as usize;
    let buf = &mut buf[..len];
    let mut pos = offset;
    for seg in map.slice(ByteRange::new(offset, len as u64)) {
        // Holes before this segment.
        buf[(pos - offset) as usize..(seg.range.offset - offset) as usize].fill(0);
        let out =
            &mut buf[(seg.range.offset - offset) as usize..(seg.range.end() - offset) as usize];
        match seg.piece {
            Piece::Zero => out.fill(0),
            Piece::Data { chunk, skip } => {
                let data = cache.load(store, &chunk)?;
                let src = data
                    .get(skip as usize..skip as usize + out.len())
                    .ok_or_else(|| crate::error::Error::BadChunk {
                        hash: chunk.to_hex(),
                        message: format!(
                            "shorter ({} bytes) than the map needs ({})",
                            data.len(),
                            skip as usize + out.len()
                        ),
                    })?;
                out.copy_from_slice(src);
            }
        }
        pos = seg.range.end();
    }
    buf[(pos - offset) as usize..].fill(0);
    Ok(len)
}
