//! What a chunk store does, wherever its chunks live: [`LocalChunks`] keeps
//! them as files in the repository's directory, [`ObjectChunks`] in packs
//! in a bucket behind a local cache. Both name chunks by content (keyed in
//! an encrypted repository), check every read against the name, and move a
//! chunk that fails the check out of use (see `quarantine`).
//!
//! [`LocalChunks`]: local::LocalChunks
//! [`ObjectChunks`]: object::ObjectChunks

use std::collections::HashSet;

use crate::error::Result;
use crate::model::chunk_id::ChunkId;
mod cache_segment;
pub mod codec;
pub mod local;
pub mod object;
pub mod object_cache;
pub mod pack;
pub mod pack_index;
pub mod quarantine;
pub mod read_ahead;
pub mod uploader;

use local::LocalChunks;
use object::ObjectChunks;
use quarantine::Taken;

pub use codec::{is_zero, MAX_CHUNK_SIZE};

pub trait ChunkStore: Send + Sync {
    /// The name of a chunk holding `data` in this store.
    fn id_of(&self, data: &[u8]) -> ChunkId;
    /// Store `data` unless a chunk with its name exists already.
    fn put(&self, data: &[u8]) -> Result<PutOutcome>;
    /// Read, check and decode a chunk into `into`. A chunk found damaged
    /// or missing is moved out of use before the error returns.
    fn get_into(&self, id: &ChunkId, into: &mut Vec<u8>) -> Result<()>;
    /// [`get_into`](Self::get_into), keeping the stored (encoded) chunk in
    /// `file`, for copies between repositories with the same keys.
    fn get_with_file(&self, id: &ChunkId, into: &mut Vec<u8>, file: &mut Vec<u8>) -> Result<()>;
    /// Store an encoded chunk as it is (checked by the caller) unless one
    /// with its name exists; the bytes written.
    fn put_file(&self, id: &ChunkId, file: &[u8], data: &[u8]) -> Result<u64>;
    fn contains(&self, id: &ChunkId) -> bool;
    /// Size of the stored chunk, `None` if it is missing.
    fn stored_size(&self, id: &ChunkId) -> Option<u64>;
    /// Mark an existing chunk as in use now (see `care::gc`); false if it
    /// is not there.
    fn touch(&self, id: &ChunkId) -> bool;
    /// Move a chunk that failed to read out of use; `None` when it reads
    /// whole after all.
    fn quarantine(&self, id: &ChunkId) -> Result<Option<Taken>>;
    /// Every chunk on record as damaged, healed or not.
    fn damaged_records(&self) -> Result<Vec<ChunkId>>;
    /// Drop the record of a damaged chunk.
    fn remove_damaged_record(&self, id: &ChunkId) -> Result<()>;
    /// Wait until every chunk put so far is durable (object storage
    /// uploads in the background; a local store is made durable by the
    /// repository's `sync`).
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    /// Keep what is read in this host's cache (object storage only): for
    /// a mount, which reads the same chunks again.
    fn keep_reads(&self, _keep: bool) {}
    /// Get what finding chunks needs before the first read asks (object
    /// storage: the pack index brought in step with the bucket), so that
    /// a server's first read does not wait for it.
    fn prepare_reads(&self) -> Result<()> {
        Ok(())
    }
    /// Reads will go through `chunks` (each at most once), mostly in the
    /// order they were stored: object storage fetches those of them that
    /// follow one another in a pack in one request.
    fn will_read(&self, _chunks: &[ChunkId]) {}
    /// The indices of `ids` in the order that reads them fastest (as
    /// given, unless the store knows better).
    fn reading_order(&self, ids: &[ChunkId]) -> Result<Vec<usize>> {
        Ok((0..ids.len()).collect())
    }
    /// The directory store, for the file-level work of gc.
    fn as_local(&self) -> Option<&LocalChunks> {
        None
    }
    /// The object store, for gc.
    fn as_object(&self) -> Option<&ObjectChunks> {
        None
    }

    /// Chunks on record as damaged and not stored anew since.
    fn damaged(&self) -> Result<HashSet<ChunkId>> {
        Ok(self
            .damaged_records()?
            .into_iter()
            .filter(|id| !self.contains(id))
            .collect())
    }

    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.get_into(id, &mut v)?;
        Ok(v)
    }
}

/// The result of storing a chunk.
#[derive(Debug, Clone, Copy)]
pub struct PutOutcome {
    pub id: ChunkId,
    /// Bytes written to the store; 0 when the chunk was already there.
    pub stored: u64,
}
