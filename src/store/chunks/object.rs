//! Chunks of a repository on object storage, in packs (see `pack`): a
//! backup's chunks are gathered into packs of [`PACK_SIZE`] and uploaded
//! create-only in the background; a chunk is read with a ranged request
//! on its pack, found through this host's pack index (`pack_index`). A
//! sequential reader fetches several consecutive chunks per request
//! (`read_ahead`); a mount keeps what it read in this host's
//! [`ObjectCache`].
//!
//! The index is brought in step with the bucket once per process, before
//! the first chunk is looked up, and again when a chunk or a pack is not
//! found where it was (another host wrote it, or gc repacked it).
//! Deduplication trusts the index: a chunk another host stored since is
//! stored again, in a pack of this host's, which costs space, not
//! correctness.
//!
//! A chunk found damaged is recorded as `damaged/<hash>`, whose body names
//! the packs where its copies were bad; those copies are never read or
//! trusted again (on any host), so the next backup of the same data
//! stores it anew, and gc repacks the bad copy away.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::codec::{chunk_id, decode, decode_unsealed, encode_file, is_current_file};
use super::object_cache::{self, ObjectCache};
use super::pack::{self, PackBuilder, PackEntry};
use super::pack_index::{Location, PackIndex};
use super::quarantine::{on_damage, Taken};
use super::read_ahead::{Piece, ReadAhead};
use super::uploader::{Stored, Uploader};
use super::{ChunkStore, PutOutcome};
use crate::error::{Error, IoContext, Result};
use crate::model::chunk_id::ChunkId;
use crate::model::extent::ByteRange;
use crate::store::backend::Backend;
use crate::store::crypto::Keys;

const DAMAGED: &str = "damaged/";
/// A pack is sealed once its chunks reach this size. Large enough that a
/// request's fixed cost is small beside its bytes (SeaweedFS: 1.8 ms of
/// CPU per MiB at 4 MiB and more, 4.9 ms at 200 KiB), small enough that
/// the packs in flight stay a few tens of MiB.
pub const PACK_SIZE: usize = 8 << 20;
/// Packs uploading at once, and waiting for an upload thread.
const UPLOADS: usize = 4;
const UPLOADS_QUEUED: usize = 1;
/// Sealed packs held in memory at most (uploading, queued, handed over):
/// writers wait for room before they seal another.
const SEALED: usize = UPLOADS + UPLOADS_QUEUED;
/// One read-ahead request covers at most this many bytes of a pack: all
/// of it, when read from its first chunk.
const WINDOW: u64 = PACK_SIZE as u64 + super::MAX_CHUNK_SIZE as u64;
/// Packs a reader of chunks in [`ChunkStore::reading_order`]
/// has windows of on their way at once.
const PACKS_AT_ONCE: usize = 4;
/// Chunks looked at for one window (chunks of a pack are mostly 64 KiB to
/// 4 MiB).
const WINDOW_ENTRIES: usize = 256;
/// How far before the chunk asked for a window may start (see `window`).
const LOOKBACK: u64 = 4 << 20;
/// Windows fetched ahead and not yet read, at most (bytes). A reader of an
/// image flattened from a chain has a window of each snapshot's packs
/// open at once (full + 8 incrementals: 9).
const READ_AHEAD_BUDGET: usize = 96 << 20;
/// Tries at a damage record that others write at the same moment.
const RECORD_ATTEMPTS: usize = 5;
/// After a chunk was not found, another look at the bucket only after this.
const RESYNC_EVERY: Duration = Duration::from_secs(1);

pub struct ObjectChunks {
    backend: Arc<dyn Backend>,
    level: i32,
    keys: Option<Arc<Keys>>,
    cache: ObjectCache,
    /// Keep what is read in the cache (a mount re-reads; a restore not).
    keep_reads: AtomicBool,
    /// Fetch the chunks after the one asked for with it.
    sequential: AtomicBool,
    /// Those of them a sequential reader will ask for (all if `None`):
    /// an image flattened from a chain skips chunks its newer snapshots
    /// replaced, and a window must not fetch those.
    wanted: std::sync::RwLock<Option<HashSet<ChunkId>>>,
    index: Arc<PackIndex>,
    /// When the index was last brought in step with the bucket.
    synced: Mutex<Option<Instant>>,
    packing: Arc<Mutex<Packing>>,
    /// Signalled when a sealed pack leaves memory.
    room: Arc<Condvar>,
    /// Started on the first pack.
    uploader: OnceLock<Uploader>,
    /// Names of the packs sealed while a repack runs (gc's), else `None`.
    written: Mutex<Option<Vec<String>>>,
    ahead: ReadAhead,
}

/// Chunks written by this process and not indexed yet.
#[derive(Default)]
struct Packing {
    open: PackBuilder,
    /// In the open pack or in one uploading.
    pending: HashSet<ChunkId>,
    /// Sealed packs not yet stored (or failed).
    sealed: usize,
}

/// A sealed pack's place among the [`SEALED`]; given back when dropped,
/// whether its upload succeeded or not.
struct SealedSlot {
    packing: Arc<Mutex<Packing>>,
    room: Arc<Condvar>,
}

impl Drop for SealedSlot {
    fn drop(&mut self) {
        self.packing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sealed -= 1;
        self.room.notify_all();
    }
}

fn new_pack() -> PackBuilder {
    // Room for the last chunk past the mark: no reallocation on the way.
    PackBuilder::with_capacity(PACK_SIZE + super::MAX_CHUNK_SIZE + (64 << 10))
}

/// A pack as gc sees it.
pub struct PackInfo {
    pub name: String,
    pub size: u64,
    /// Its chunks, each with whether its copy here was found damaged.
    pub entries: Vec<(PackEntry, bool)>,
}

impl ObjectChunks {
    pub fn new(
        backend: Arc<dyn Backend>,
        home: &Path,
        level: i32,
        keys: Option<Arc<Keys>>,
    ) -> Result<Self> {
        std::fs::create_dir_all(home).ctx(|| format!("create {}", home.display()))?;
        Ok(ObjectChunks {
            backend,
            level,
            keys,
            cache: ObjectCache::new(&home.join("cache"), object_cache::configured_size()?),
            keep_reads: AtomicBool::new(false),
            sequential: AtomicBool::new(false),
            wanted: std::sync::RwLock::new(None),
            index: Arc::new(PackIndex::open(&home.join("packs.db"))?),
            synced: Mutex::new(None),
            packing: Arc::new(Mutex::new(Packing::default())),
            room: Arc::new(Condvar::new()),
            uploader: OnceLock::new(),
            written: Mutex::new(None),
            ahead: ReadAhead::new(READ_AHEAD_BUDGET),
        })
    }

    fn packing(&self) -> std::sync::MutexGuard<'_, Packing> {
        self.packing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bring the index in step with the bucket: its packs, and the copies
    /// found damaged on any host.
    pub fn sync(&self) -> Result<()> {
        self.sync_unless_since(None)
    }

    /// [`sync`](Self::sync), unless one finished after `since` (readers
    /// meeting the same vanished pack at once list the bucket once).
    fn sync_unless_since(&self, since: Option<Instant>) -> Result<()> {
        let mut synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
        if since.is_some_and(|t| synced.is_some_and(|last| last >= t)) {
            return Ok(());
        }
        self.index.sync(self.backend.as_ref())?;
        for id in self.damaged_records()? {
            for pack in self.damaged_packs(&id)? {
                self.index.mark_bad(&id, &pack)?;
            }
        }
        *synced = Some(Instant::now());
        Ok(())
    }

    fn ensure_synced(&self) -> Result<()> {
        if self
            .synced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
        {
            self.sync()?;
        }
        Ok(())
    }

    /// Sync again unless that happened a moment ago; whether it did.
    fn resync(&self) -> Result<bool> {
        let last = *self.synced.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < RESYNC_EVERY) {
            return Ok(false);
        }
        self.sync()?;
        Ok(true)
    }

    fn known(&self, id: &ChunkId) -> Result<bool> {
        if self.packing().pending.contains(id) {
            return Ok(true);
        }
        self.ensure_synced()?;
        Ok(self.index.locate(id)?.is_some())
    }

    /// Where the chunk is: from the index, else after the uploads of this
    /// process are done, else after another look at the bucket.
    fn locate(&self, id: &ChunkId) -> Result<Option<Location>> {
        self.ensure_synced()?;
        if let Some(loc) = self.index.locate(id)? {
            return Ok(Some(loc));
        }
        if self.packing().pending.contains(id) {
            self.flush()?;
        } else if !self.resync()? {
            return Ok(None);
        }
        self.index.locate(id)
    }

    /// Every pack in the bucket (the index synced first), for gc.
    pub fn packs(&self) -> Result<Vec<PackInfo>> {
        self.sync()?;
        let mut packs: Vec<PackInfo> = Vec::new();
        for (name, size) in self.index.packs()? {
            let entries = self.index.entries(&name)?;
            packs.push(PackInfo {
                name,
                size,
                entries,
            });
        }
        packs.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(packs)
    }

    /// Delete a pack (gc, once nothing in it is needed or it was repacked).
    pub fn delete_pack(&self, info: &PackInfo) -> Result<()> {
        self.backend.delete(&pack::key(&info.name))?;
        self.index.remove(&info.name)?;
        for (e, _) in &info.entries {
            if self.index.locate(&e.id)?.is_none() {
                self.cache.remove(&e.id);
            }
        }
        Ok(())
    }

    /// Store the `keep` chunks of each pack in new packs, all flushed
    /// before this returns, so that the old packs can be deleted; the
    /// bytes written and the names of the packs written (an old pack whose
    /// chunks all went into one new pack in the same order is written
    /// again under its own name: it must not be deleted then). A chunk
    /// that fails its check is recorded as damaged there and stops the
    /// repack before anything is deleted: the next gc keeps another copy.
    pub fn repack(&self, packs: &[(&PackInfo, &[PackEntry])]) -> Result<(u64, HashSet<String>)> {
        *self.written_names() = Some(Vec::new());
        let result = self.repack_into_new(packs);
        let names = self.written_names().take().unwrap_or_default();
        result.map(|written| (written, names.into_iter().collect()))
    }

    fn repack_into_new(&self, packs: &[(&PackInfo, &[PackEntry])]) -> Result<u64> {
        let mut written = 0;
        let mut scratch = Vec::new();
        for (info, keep) in packs {
            let key = pack::key(&info.name);
            let bytes = match self.backend.get(&key)? {
                Some(b) if b.len() as u64 == info.size => b,
                _ => {
                    return Err(Error::invalid(format!(
                        "{key} vanished or changed while gc repacked it"
                    )))
                }
            };
            for e in keep.iter() {
                let file = usize::try_from(e.range.offset)
                    .ok()
                    .zip(usize::try_from(e.range.end()).ok())
                    .and_then(|(s, t)| bytes.get(s..t))
                    .unwrap_or_default();
                let mut copy = file.to_vec();
                if let Err(err) = decode(&e.id, &mut copy, &mut scratch, self.keys.as_deref()) {
                    self.record_damage(&e.id, Some(&info.name))?;
                    return Err(Error::invalid(format!(
                        "chunk {} in {key} is damaged ({err}); recorded, nothing deleted: \
                         run gc again to keep another copy",
                        e.id
                    )));
                }
                written += self.add(e.id, file.to_vec())?;
            }
        }
        self.flush()?;
        Ok(written)
    }

    fn written_names(&self) -> std::sync::MutexGuard<'_, Option<Vec<String>>> {
        self.written.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether no pack the damage record of `id` names is still indexed
    /// (gc repacked them): only then may the record go, since it is what
    /// keeps every host from trusting those copies.
    pub fn damage_settled(&self, id: &ChunkId) -> Result<bool> {
        for pack in self.damaged_packs(id)? {
            if self.index.has_pack(&pack)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The packs a damaged record names (empty for a chunk found missing).
    fn damaged_packs(&self, id: &ChunkId) -> Result<Vec<String>> {
        let record = format!("{DAMAGED}{}", id.to_hex());
        let body = self.backend.get(&record)?.unwrap_or_default();
        Ok(String::from_utf8_lossy(&body)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// Record that the copy of a chunk in `pack` (if any) is damaged.
    fn record_damage(&self, id: &ChunkId, pack: Option<&str>) -> Result<()> {
        let record = format!("{DAMAGED}{}", id.to_hex());
        // Conditional writes: two hosts recording damage to the same chunk
        // at once must not lose each other's pack.
        for _ in 0..RECORD_ATTEMPTS {
            let before = self.backend.head(&record)?;
            let mut packs = self.damaged_packs(id)?;
            let after = self.backend.head(&record)?;
            if before.as_ref().map(|o| &o.version) != after.as_ref().map(|o| &o.version) {
                continue; // changed while read
            }
            match pack {
                Some(p) if packs.iter().any(|q| q == p) => break,
                Some(p) => packs.push(p.to_string()),
                None if after.is_some() => break,
                None => {}
            }
            let body: String = packs.iter().map(|p| format!("{p}\n")).collect();
            let written = match &after {
                None => self.backend.put_new(&record, body.as_bytes())?,
                Some(o) => self
                    .backend
                    .replace_if(&record, body.as_bytes(), &o.version)?,
            };
            if written {
                break;
            }
        }
        if let Some(p) = pack {
            self.index.mark_bad(id, p)?;
        }
        Ok(())
    }

    /// Add an encoded chunk to the open pack, uploading the pack when it
    /// is full; the bytes added (0 if this process has it pending).
    fn add(&self, id: ChunkId, file: Vec<u8>) -> Result<u64> {
        let full = {
            let mut p = self.packing();
            if !p.pending.insert(id) {
                return Ok(0);
            }
            if p.open.is_empty() && p.open.capacity() == 0 {
                p.open = new_pack();
            }
            p.open.add(id, &file);
            self.seal(p, PACK_SIZE)
        };
        if let Some((builder, slot)) = full {
            self.upload(builder, slot)?;
        }
        Ok(file.len() as u64)
    }

    /// Take the open pack if it holds `at_least` bytes, once fewer than
    /// [`SEALED`] are in memory (others keep adding to it meanwhile, a
    /// chunk each at most); `None` if it is smaller, or another writer
    /// took it while this one waited.
    fn seal(
        &self,
        mut p: std::sync::MutexGuard<'_, Packing>,
        at_least: usize,
    ) -> Option<(PackBuilder, SealedSlot)> {
        let due = |p: &Packing| !p.open.is_empty() && p.open.len() >= at_least;
        if !due(&p) {
            return None;
        }
        while p.sealed >= SEALED {
            p = self.room.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        if !due(&p) {
            return None;
        }
        p.sealed += 1;
        let slot = SealedSlot {
            packing: self.packing.clone(),
            room: self.room.clone(),
        };
        Some((std::mem::take(&mut p.open), slot))
    }

    /// Seal a pack and hand it to the upload threads; its chunks are
    /// indexed once it is stored.
    fn upload(&self, builder: PackBuilder, slot: SealedSlot) -> Result<()> {
        let uploader = match self.uploader.get() {
            Some(u) => u,
            None => {
                let u = Uploader::new(self.backend.clone(), UPLOADS, UPLOADS_QUEUED)?;
                self.uploader.get_or_init(|| u)
            }
        };
        let pack = builder.finish();
        if let Some(names) = self.written_names().as_mut() {
            names.push(pack.name.clone());
        }
        let (index, packing) = (self.index.clone(), self.packing.clone());
        let (name, size, entries) = (pack.name.clone(), pack.bytes.len() as u64, pack.entries);
        let stored: Stored = Box::new(move || {
            index.add(&name, size, &entries)?;
            let mut p = packing.lock().unwrap_or_else(|e| e.into_inner());
            for e in &entries {
                p.pending.remove(&e.id);
            }
            drop(p);
            drop(slot);
            Ok(())
        });
        uploader.send(pack::key(&pack.name), pack.bytes, stored)
    }

    /// The stored chunk, from the cache (for a mount), a window fetched
    /// ahead, or the bucket; `None` if it is nowhere. Everything but a
    /// mount reads the bucket: verify must check what is there, and a
    /// restore reads each chunk once anyway.
    fn fetch(&self, id: &ChunkId) -> Result<Option<(Piece, bool)>> {
        let found = self.fetch_anywhere(id)?;
        if found.is_some() && self.sequential() {
            self.ahead.served(id);
        }
        Ok(found)
    }

    fn sequential(&self) -> bool {
        self.sequential.load(Ordering::Relaxed) || self.keep_reads.load(Ordering::Relaxed)
    }

    fn fetch_anywhere(&self, id: &ChunkId) -> Result<Option<(Piece, bool)>> {
        if self.keep_reads.load(Ordering::Relaxed) {
            if let Some(body) = self.cache.get(id) {
                return Ok(Some((Piece::whole(body), true)));
            }
        }
        // Twice: a pack gone since the index was synced (gc repacked it)
        // is looked for again.
        for _ in 0..2 {
            if let Some(piece) = self.ahead.take(id) {
                return Ok(Some((piece, false)));
            }
            let Some(loc) = self.locate(id)? else {
                return Ok(None);
            };
            let asked = Instant::now();
            match self.fetch_at(id, &loc)? {
                Some(piece) => return Ok(Some((piece, false))),
                None => {
                    // gc repacked it: its chunks are in a pack listed now.
                    self.index.remove(&loc.pack)?;
                    self.sync_unless_since(Some(asked))?;
                }
            }
        }
        Ok(None)
    }

    /// The chunk's file at `loc`, with the chunks after it in the pack
    /// when reads are sequential; `None` if the pack is gone.
    fn fetch_at(&self, id: &ChunkId, loc: &Location) -> Result<Option<Piece>> {
        let key = pack::key(&loc.pack);
        let alone = || Ok(self.backend.get_range(&key, loc.range)?.map(Piece::whole));
        if !self.sequential() {
            return alone();
        }
        let (window, me) = self.window(&loc.pack, loc.range)?;
        if window.get(me).is_none_or(|e| e.id != *id) {
            // The index changed under us: the chunk alone.
            return alone();
        }
        let ids: Vec<ChunkId> = window.iter().map(|e| e.id).collect();
        let start = window[0].range.offset;
        let span_to = |n: usize| (window[n - 1].range.end() - start) as usize;
        let claim = self.ahead.claim(&ids, span_to);
        let claimed = claim.chunks;
        if claimed <= me {
            // Another thread is fetching it (or just did).
            drop(claim);
            if let Some(piece) = self.ahead.take(id) {
                return Ok(Some(piece));
            }
            return alone();
        }
        let window = &window[..claimed];
        let span = ByteRange::from_bounds(start, window[claimed - 1].range.end());
        let bytes = match self.backend.get_range(&key, span) {
            Ok(Some(b)) => Arc::new(b),
            other => {
                drop(claim);
                // The pack is gone (`None`), or the request failed.
                return other.map(|_| None);
            }
        };
        let piece = |e: &PackEntry| {
            let start = (e.range.offset - span.offset) as usize;
            Piece::of(&bytes, start..start + e.range.length as usize)
        };
        let mine = piece(&window[me]);
        let rest = (window.iter().enumerate())
            .filter(|(i, _)| *i != me)
            .map(|(_, e)| (e.id, piece(e)))
            .collect();
        claim.fill(rest);
        Ok(Some(mine))
    }

    /// The chunks of `pack` to fetch with the one at `first`, and which of
    /// them that one is: the chunks after it, up to [`WINDOW`] bytes, and
    /// when the reader said what it will read, those before it (up to
    /// [`LOOKBACK`]) that it wants and has not had yet. Readers on several
    /// threads ask for the chunks of a pack in about their order, but
    /// whoever comes first may have asked for a later one. A window spans
    /// the chunks it steps over (not wanted, or had already): it is one
    /// request.
    fn window(&self, pack: &str, first: ByteRange) -> Result<(Vec<PackEntry>, usize)> {
        let wanted = self.wanted.read().unwrap_or_else(|e| e.into_inner());
        let wants = |id: &ChunkId| wanted.as_ref().is_none_or(|w| w.contains(id));
        let back = if wanted.is_some() { LOOKBACK } else { 0 };
        let entries =
            (self.index).entries_from(pack, first.offset.saturating_sub(back), WINDOW_ENTRIES)?;
        let Some(me) = entries.iter().position(|(e, _)| e.range == first) else {
            return Ok((Vec::new(), 0));
        };
        // Reach back over the contiguous good chunks before it, to the
        // first one wanted and not had.
        let before: Vec<ChunkId> = entries[..me].iter().map(|(e, _)| e.id).collect();
        let settled = self.ahead.settled(&before);
        let mut from = me;
        for i in (0..me).rev() {
            let (e, bad) = &entries[i];
            if *bad || e.range.end() != entries[i + 1].0.range.offset {
                break;
            }
            if wants(&e.id) && !settled[i] {
                from = i;
            }
        }
        let start = entries[from].0.range.offset;
        let mut out: Vec<PackEntry> = Vec::new();
        let mut at = 0;
        let mut end = start;
        for (i, (e, bad)) in entries.iter().enumerate().skip(from) {
            let fits = e.range.end() - start <= WINDOW || i <= me;
            // A damaged copy is never served, so the span ends before it.
            if *bad || e.range.offset != end || !fits {
                break;
            }
            end = e.range.end();
            if i == me {
                at = out.len();
                out.push(*e);
            } else if wants(&e.id) && (i > me || !settled[i]) {
                out.push(*e);
            }
        }
        Ok((out, at))
    }

    fn read(&self, id: &ChunkId, into: &mut Vec<u8>, file: Option<&mut Vec<u8>>) -> Result<()> {
        let hex = id.to_hex();
        let Some((piece, cached)) = self.fetch(id)? else {
            return Err(Error::BadChunk {
                hash: hex,
                message: format!("missing: no pack in {} holds it", self.backend.describe()),
            });
        };
        let keep = !cached && self.keep_reads.load(Ordering::Relaxed);
        let decoded = match self.keys.as_deref() {
            // Opened in place: decode a copy, keep the stored bytes.
            Some(keys) => decode(id, &mut piece.to_vec(), into, Some(keys)),
            None => decode_unsealed(id, &piece, into),
        };
        match decoded {
            Ok(()) => {}
            // A bad cached copy is the cache's problem: read the bucket's.
            Err(_) if cached => {
                self.cache.remove(id);
                return self.read(id, into, file);
            }
            Err(e) => return Err(e),
        }
        if keep && self.cache.has_room_for(piece.len()) {
            self.cache.insert_later(*id, piece.to_vec());
        }
        if let Some(file) = file {
            *file = piece.into_vec();
        }
        Ok(())
    }

    fn get_checked(
        &self,
        id: &ChunkId,
        into: &mut Vec<u8>,
        file: Option<&mut Vec<u8>>,
    ) -> Result<()> {
        on_damage(self.read(id, into, file), || self.quarantine(id))
    }
}

impl ChunkStore for ObjectChunks {
    fn id_of(&self, data: &[u8]) -> ChunkId {
        chunk_id(self.keys.as_deref(), data)
    }

    fn put(&self, data: &[u8]) -> Result<PutOutcome> {
        let id = self.id_of(data);
        if self.known(&id)? {
            return Ok(PutOutcome { id, stored: 0 });
        }
        let file = encode_file(data, self.level, self.keys.as_deref(), &id)?;
        let stored = self.add(id, file)?;
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
        if self.known(id)? {
            return Ok(0);
        }
        self.add(*id, file.to_vec())
    }

    fn flush(&self) -> Result<()> {
        let open = self.seal(self.packing(), 1);
        if let Some((builder, slot)) = open {
            self.upload(builder, slot)?;
        }
        // Packs other writers sealed and have not handed over yet.
        let mut p = self.packing();
        while p.sealed > 0 {
            p = self.room.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        drop(p);
        match self.uploader.get() {
            Some(u) => u.flush(),
            None => Ok(()),
        }
    }

    fn contains(&self, id: &ChunkId) -> bool {
        self.known(id).unwrap_or(false)
    }

    fn stored_size(&self, id: &ChunkId) -> Option<u64> {
        self.locate(id).ok().flatten().map(|l| l.range.length)
    }

    /// Objects have no mtime to refresh: gc on object storage relies on
    /// leases instead (see `care::gc`).
    fn touch(&self, id: &ChunkId) -> bool {
        self.known(id).unwrap_or(false)
    }

    fn quarantine(&self, id: &ChunkId) -> Result<Option<Taken>> {
        self.cache.remove(id);
        let Some(loc) = self.locate(id)? else {
            self.record_damage(id, None)?;
            return Ok(Some(Taken::Missing));
        };
        if let Some(mut body) = self.backend.get_range(&pack::key(&loc.pack), loc.range)? {
            let mut scratch = Vec::new();
            if decode(id, &mut body, &mut scratch, self.keys.as_deref()).is_ok() {
                return Ok(None); // this copy reads whole
            }
        }
        self.record_damage(id, Some(&loc.pack))?;
        log::warn!(
            "chunk {id} in pack {} is damaged; moved out of use",
            loc.pack
        );
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

    fn prepare_reads(&self) -> Result<()> {
        self.ensure_synced()
    }

    fn will_read(&self, chunks: &[ChunkId]) {
        *self.wanted.write().unwrap_or_else(|e| e.into_inner()) =
            Some(chunks.iter().copied().collect());
        self.sequential.store(true, Ordering::Relaxed);
    }

    /// By pack and place in it, so that a sequential reader's windows
    /// hold what it reads next, and [`PACKS_AT_ONCE`] packs interleaved,
    /// so that readers on several threads fetch that many windows at once
    /// instead of all waiting for one.
    fn reading_order(&self, ids: &[ChunkId]) -> Result<Vec<usize>> {
        self.ensure_synced()?;
        let mut keyed = Vec::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            let at = self
                .index
                .locate(id)?
                .map(|l| (l.pack, l.range.offset))
                .unwrap_or_default();
            keyed.push((at, i));
        }
        keyed.sort_unstable();
        let packs: Vec<&[((String, u64), usize)]> =
            keyed.chunk_by(|a, b| a.0 .0 == b.0 .0).collect();
        let mut order = Vec::with_capacity(ids.len());
        for batch in packs.chunks(PACKS_AT_ONCE) {
            for round in 0..batch.iter().map(|p| p.len()).max().unwrap_or(0) {
                order.extend(batch.iter().filter_map(|p| p.get(round)).map(|(_, i)| *i));
            }
        }
        Ok(order)
    }

    fn as_object(&self) -> Option<&ObjectChunks> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::backend::dir::DirBackend;

    fn store(backend: &Arc<dyn Backend>, home: &Path) -> ObjectChunks {
        ObjectChunks::new(backend.clone(), home, 1, None).unwrap()
    }

    fn chunk(i: u32) -> Vec<u8> {
        // Incompressible enough that packs fill: 64 KiB of a hash stream.
        let mut out = Vec::with_capacity(64 << 10);
        let mut h = blake3::Hasher::new();
        h.update(&i.to_le_bytes());
        let mut reader = h.finalize_xof();
        out.resize(64 << 10, 0);
        reader.fill(&mut out);
        out
    }

    /// A bucket in `dir` with chunks 0..300 stored in a few packs by a
    /// writer homed in `dir/home-w`.
    fn bucket_of_300(dir: &Path) -> (Arc<dyn Backend>, ObjectChunks, Vec<ChunkId>) {
        let backend: Arc<dyn Backend> = Arc::new(DirBackend::new(&dir.join("bucket")));
        let writer = store(&backend, &dir.join("home-w"));
        let ids: Vec<ChunkId> = (0..300)
            .map(|i| writer.put(&chunk(i)).unwrap().id)
            .collect();
        writer.flush().unwrap();
        (backend, writer, ids)
    }

    #[test]
    fn sequential_readers_share_windows_and_get_every_chunk_right() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, writer, ids) = bucket_of_300(dir.path());
        assert!(backend.list(pack::PACKS).unwrap().len() >= 2);
        // A chunk put again is not stored again.
        assert_eq!(writer.put(&chunk(7)).unwrap().stored, 0);

        let reader = store(&backend, &dir.path().join("home-r"));
        reader.will_read(&ids[..250]);
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    let mut buf = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(id) = ids.get(i) else { break };
                        reader.get_into(id, &mut buf).unwrap();
                        assert_eq!(buf, chunk(i as u32));
                    }
                });
            }
        });
    }

    #[test]
    fn a_window_reaches_back_for_chunks_the_reader_has_not_had() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, _, ids) = bucket_of_300(dir.path());
        let reader = store(&backend, &dir.path().join("home-r"));
        reader.ensure_synced().unwrap();
        let pack_of = |i: usize| reader.index.locate(&ids[i]).unwrap().unwrap().pack;
        assert!((0..10).all(|i| pack_of(i) == pack_of(0)));
        // Had already: chunk 3 (read alone); not wanted: chunk 2.
        reader.will_read(&ids[3..4]);
        assert_eq!(reader.get(&ids[3]).unwrap(), chunk(3));
        assert!(reader.ahead.take(&ids[4]).is_none());
        let wanted: Vec<ChunkId> = (ids.iter().enumerate())
            .filter(|(i, _)| *i != 2)
            .map(|(_, id)| *id)
            .collect();
        reader.will_read(&wanted);
        // A later chunk asked for first: its window starts at chunk 0.
        assert_eq!(reader.get(&ids[6]).unwrap(), chunk(6));
        for i in [0, 1, 4, 5, 7] {
            assert!(reader.ahead.take(&ids[i]).is_some(), "chunk {i}");
        }
        assert!(reader.ahead.take(&ids[2]).is_none(), "not wanted");
        assert!(reader.ahead.take(&ids[3]).is_none(), "had already");
    }

    #[test]
    fn the_reading_order_takes_packs_a_few_at_once_each_in_its_order() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, _, ids) = bucket_of_300(dir.path());
        let reader = store(&backend, &dir.path().join("home-r"));
        let reversed: Vec<ChunkId> = ids.iter().rev().copied().collect();
        let order: Vec<ChunkId> = reader
            .reading_order(&reversed)
            .unwrap()
            .into_iter()
            .map(|i| reversed[i])
            .collect();
        let (mut got, mut want) = (order.clone(), ids.clone());
        got.sort();
        want.sort();
        assert_eq!(got, want);
        let at = |id: &ChunkId| reader.index.locate(id).unwrap().unwrap();
        let packs: HashSet<String> = order.iter().map(|id| at(id).pack).collect();
        assert!(packs.len() >= 2, "{} packs", packs.len());
        let first = packs.len().min(PACKS_AT_ONCE);
        let first: HashSet<String> = order[..first].iter().map(|id| at(id).pack).collect();
        assert_eq!(first.len(), packs.len().min(PACKS_AT_ONCE));
        for pack in &packs {
            let offsets: Vec<u64> = order
                .iter()
                .map(at)
                .filter(|l| &l.pack == pack)
                .map(|l| l.range.offset)
                .collect();
            assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{pack}");
        }
    }

    #[test]
    fn a_reader_finds_chunks_moved_by_a_repack() {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(DirBackend::new(&dir.path().join("bucket")));
        let writer = store(&backend, &dir.path().join("home-w"));
        let ids: Vec<ChunkId> = (0..10).map(|i| writer.put(&chunk(i)).unwrap().id).collect();
        writer.flush().unwrap();
        let reader = store(&backend, &dir.path().join("home-r"));
        assert_eq!(reader.get(&ids[0]).unwrap(), chunk(0));

        let gc = store(&backend, &dir.path().join("home-gc"));
        let packs = gc.packs().unwrap();
        assert_eq!(packs.len(), 1);
        // Kept whole, a pack is written again under its own name: gc must
        // see that and not delete it.
        let all: Vec<PackEntry> = packs[0].entries.iter().map(|(e, _)| *e).collect();
        let (_, names) = gc.repack(&[(&packs[0], &all[..])]).unwrap();
        assert!(names.contains(&packs[0].name), "{names:?}");
        let keep = &all[5..];
        let (written, names) = gc.repack(&[(&packs[0], keep)]).unwrap();
        assert!(written > 0 && !names.contains(&packs[0].name));
        gc.delete_pack(&packs[0]).unwrap();

        // The reader's index still names the deleted pack.
        *reader.synced.lock().unwrap() = Some(Instant::now() - RESYNC_EVERY);
        assert_eq!(reader.get(&ids[9]).unwrap(), chunk(9));
        let err = reader.get(&ids[1]).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
    }

    #[test]
    fn damage_records_gather_every_pack_named() {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(DirBackend::new(&dir.path().join("bucket")));
        let a = store(&backend, &dir.path().join("home-a"));
        let id = ChunkId::of(b"x");
        a.record_damage(&id, None).unwrap();
        assert!(a.damaged_packs(&id).unwrap().is_empty());
        a.record_damage(&id, Some("p1")).unwrap();
        let b = store(&backend, &dir.path().join("home-b"));
        b.record_damage(&id, Some("p2")).unwrap();
        b.record_damage(&id, Some("p1")).unwrap();
        a.record_damage(&id, None).unwrap();
        assert_eq!(a.damaged_packs(&id).unwrap(), ["p1", "p2"]);
        assert_eq!(a.damaged_records().unwrap(), [id]);
        assert!(a.damage_settled(&id).unwrap(), "no such packs indexed");
    }
}
