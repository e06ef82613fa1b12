//! Reading point-in-time images: a byte range of an [`ImageMap`] turned into
//! bytes, through a bounded cache of decoded chunks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::chunk::{ChunkId, ChunkStore};
use crate::error::Result;
use crate::extent::ByteRange;
use crate::image_map::{ImageMap, Piece};

/// Decoded chunks, bounded by total bytes, least recently used out first.
pub struct ChunkCache {
    capacity: usize,
    inner: Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    map: HashMap<ChunkId, (Arc<Vec<u8>>, u64)>,
    bytes: usize,
    tick: u64,
}

impl ChunkCache {
    pub fn new(capacity: usize) -> Self {
        ChunkCache {
            capacity,
            inner: Mutex::new(CacheInner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        inner.map.get_mut(id).map(|(data, used)| {
            *used = tick;
            data.clone()
        })
    }

    pub fn insert(&self, id: ChunkId, data: Arc<Vec<u8>>) {
        let mut inner = self.lock();
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
    pub fn load(&self, store: &ChunkStore, id: &ChunkId) -> Result<Arc<Vec<u8>>> {
        if let Some(data) = self.get(id) {
            return Ok(data);
        }
        let data = Arc::new(store.get(id)?);
        self.insert(*id, data.clone());
        Ok(data)
    }
}

/// Fill `buf` with the image bytes at `offset`. Bytes past the end of the
/// image are not touched; the number of bytes inside it is returned.
pub fn read_at(
    map: &ImageMap,
    store: &ChunkStore,
    cache: &ChunkCache,
    buf: &mut [u8],
    offset: u64,
) -> Result<usize> {
    if offset >= map.size {
        return Ok(0);
    }
    let len = (buf.len() as u64).min(map.size - offset) as usize;
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
