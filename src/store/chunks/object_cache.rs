//! This host's size-bounded cache of chunks of a repository on object
//! storage: chunk files exactly as stored in the bucket (so every read from
//! it is checked like a read from the bucket), appended to segment files
//! `<home>/cache/<16 hex>.seg` (`cache_segment`), found through an index in
//! memory built from the segments on first use. When the cache would
//! outgrow its limit the oldest segment goes, whichever process wrote it.
//!
//! Segments rather than a file per chunk: creating and deleting a file per
//! chunk was a third of a mount's CPU on a cold read (ext4 searches for a
//! free inode among those deleted recently), and writes to one open file
//! cost the copy only. Each process appends to segments of its own (made
//! create-only, so two never share one) and reads everyone's; it looks
//! for segments others made or deleted when it starts a new one of its
//! own, so a chunk another process cached meanwhile may be downloaded
//! again, and the limit holds for all processes within a segment each.
//!
//! Readers hand chunks over to be written by a thread of the cache's
//! (`insert_later`), so that a read never waits for the cache; when that
//! thread falls behind by [`QUEUED_BYTES`], the chunk is not kept. Failures
//! only cost a later download: a cache that cannot be read or written is
//! an empty one.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use super::cache_segment::{self as segment, Slot};
use crate::error::Result;
use crate::model::chunk_id::ChunkId;

/// `--cache-size` when none is given.
pub const DEFAULT_CACHE_SIZE: u64 = 1 << 30;
/// Chunk bytes handed to the cache's writer and not written yet, at most.
const QUEUED_BYTES: usize = 16 << 20;
/// Segments a full cache is made of, about: the oldest sixteenth goes at
/// once, a cheap unlink of one file.
const SEGMENTS: u64 = 16;
const MIN_SEGMENT: u64 = 1 << 20;
const MAX_SEGMENT: u64 = 64 << 20;

pub struct ObjectCache {
    shared: Arc<Shared>,
    /// To the writer thread, started by the first `insert_later`.
    writer: OnceLock<Option<Writer>>,
    queued: Arc<AtomicUsize>,
}

/// A chunk file to keep: its id and its bytes.
type CacheFile = (ChunkId, Vec<u8>);

struct Writer {
    queue: SyncSender<CacheFile>,
    thread: std::thread::JoinHandle<()>,
}

impl Drop for ObjectCache {
    /// Write what is queued before the cache goes.
    fn drop(&mut self) {
        if let Some(Some(Writer { queue, thread })) = self.writer.take() {
            drop(queue);
            let _ = thread.join();
        }
    }
}

struct Shared {
    dir: PathBuf,
    limit: u64,
    segment_size: u64,
    /// Read from the directory on first use.
    state: OnceLock<Mutex<State>>,
}

/// The segments this process knows of and the chunks in them.
#[derive(Default)]
struct State {
    index: HashMap<ChunkId, Slot>,
    /// By sequence number: oldest first.
    segments: BTreeMap<u64, Segment>,
    /// Bytes of all the segments known.
    used: u64,
    /// The segment of ours that records are appended to.
    open: Option<u64>,
}

struct Segment {
    file: Arc<File>,
    /// Its bytes as counted in `used` (of ours: with records being
    /// written).
    size: u64,
    /// Of ours: where the next record goes; of another's: how far its
    /// records were read.
    end: u64,
    ours: bool,
}

/// The cache size from `STRATA_CACHE_SIZE` (`--cache-size`): bytes, or
/// with a K/M/G/T suffix (powers of 1024).
pub fn configured_size() -> Result<u64> {
    match std::env::var("STRATA_CACHE_SIZE") {
        Ok(text) if !text.is_empty() => parse_size(&text).ok_or_else(|| {
            crate::Error::invalid(format!(
                "cache size {text:?}: expected bytes, optionally with K, M, G or T"
            ))
        }),
        _ => Ok(DEFAULT_CACHE_SIZE),
    }
}

pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, shift) = match text.chars().last()?.to_ascii_uppercase() {
        'K' => (&text[..text.len() - 1], 10),
        'M' => (&text[..text.len() - 1], 20),
        'G' => (&text[..text.len() - 1], 30),
        'T' => (&text[..text.len() - 1], 40),
        _ => (text, 0),
    };
    digits
        .trim()
        .parse::<u64>()
        .ok()?
        .checked_mul(1u64 << shift)
}

impl ObjectCache {
    /// A cache in `dir` of at most `limit` bytes; nothing is read or made
    /// before it is used.
    pub fn new(dir: &Path, limit: u64) -> Self {
        ObjectCache {
            shared: Arc::new(Shared {
                dir: dir.to_path_buf(),
                limit,
                segment_size: (limit / SEGMENTS).clamp(MIN_SEGMENT, MAX_SEGMENT),
                state: OnceLock::new(),
            }),
            writer: OnceLock::new(),
            queued: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn get(&self, id: &ChunkId) -> Option<Vec<u8>> {
        self.shared.get(id)
    }

    /// Forget a chunk that failed its check (its bytes go with their
    /// segment).
    pub fn remove(&self, id: &ChunkId) {
        self.shared.state().index.remove(id);
    }

    /// Whether [`insert_later`](Self::insert_later) would take a chunk
    /// file of `len` bytes now.
    pub fn has_room_for(&self, len: usize) -> bool {
        self.queued.load(Ordering::Relaxed) + len <= QUEUED_BYTES
    }

    /// Keep a copy of a chunk file soon, unless the writer is behind.
    pub fn insert_later(&self, id: ChunkId, body: Vec<u8>) {
        let len = body.len();
        if !self.has_room_for(len) {
            return;
        }
        let Some(writer) = self.writer.get_or_init(|| self.start_writer()) else {
            return self.shared.insert(&id, &body);
        };
        self.queued.fetch_add(len, Ordering::Relaxed);
        if writer.queue.try_send((id, body)).is_err() {
            self.queued.fetch_sub(len, Ordering::Relaxed);
        }
    }

    /// The writer thread; it ends when the cache is dropped. `None` if it
    /// cannot start (chunks are then written by their readers).
    fn start_writer(&self) -> Option<Writer> {
        let (queue, rx) = sync_channel::<CacheFile>(1024);
        let (shared, queued) = (self.shared.clone(), self.queued.clone());
        let spawned = std::thread::Builder::new()
            .name("chunk-cache".into())
            .spawn(move || {
                for (id, body) in rx {
                    shared.insert(&id, &body);
                    queued.fetch_sub(body.len(), Ordering::Relaxed);
                }
            });
        spawned.ok().map(|thread| Writer { queue, thread })
    }

    /// Bytes the cache holds now, as far as this process knows.
    #[cfg(test)]
    fn used(&self) -> u64 {
        self.shared.state().used
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .get_or_init(|| Mutex::new(self.load()))
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// What the directory holds; chunk files of the layout before
    /// segments (`<2 hex>/<64 hex>`) are removed.
    fn load(&self) -> State {
        let mut state = State::default();
        if let Err(e) = fs::create_dir_all(&self.dir) {
            log::warn!("chunk cache {}: {e}; not caching", self.dir.display());
            return state;
        }
        for e in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.len() == 2 && e.path().is_dir() {
                let _ = fs::remove_dir_all(e.path());
            }
        }
        self.refresh(&mut state);
        if state.used > self.limit {
            self.evict(&mut state, 0);
        }
        state
    }

    /// Bring `state` in step with the directory: segments others made
    /// since (their records read), grown or deleted.
    fn refresh(&self, state: &mut State) {
        let mut present: Vec<u64> = (fs::read_dir(&self.dir).into_iter().flatten().flatten())
            .filter_map(|e| segment::parse_name(&e.file_name().to_string_lossy()))
            .collect();
        present.sort_unstable();
        let gone: Vec<u64> = (state.segments.keys())
            .filter(|s| present.binary_search(s).is_err())
            .copied()
            .collect();
        for seq in gone {
            state.drop_segment(seq);
        }
        for seq in present {
            let from = match state.segments.get(&seq) {
                Some(seg) if seg.ours => continue,
                Some(seg) => seg.end,
                None => 0,
            };
            let Ok(file) = File::open(segment::path(&self.dir, seq)) else {
                continue;
            };
            let (records, end) = segment::scan(&file, seq, from);
            let size = file.metadata().map_or(end, |m| m.len());
            state.index.extend(records);
            let seg = state.segments.entry(seq).or_insert(Segment {
                file: Arc::new(file),
                size: 0,
                end: 0,
                ours: false,
            });
            state.used = state.used - seg.size.min(state.used) + size;
            (seg.size, seg.end) = (size, end);
        }
    }

    fn get(&self, id: &ChunkId) -> Option<Vec<u8>> {
        let (file, slot) = {
            let state = self.state();
            let slot = *state.index.get(id)?;
            (state.segments.get(&slot.segment)?.file.clone(), slot)
        };
        // A segment deleted meanwhile is still read through its handle.
        segment::read(&file, &slot).ok()
    }

    /// Keep a copy of a chunk file.
    fn insert(&self, id: &ChunkId, body: &[u8]) {
        let len = segment::record_len(body.len());
        if self.limit == 0 || len > self.limit / 4 {
            return;
        }
        let (file, seq, at) = {
            let mut state = self.state();
            if state.index.contains_key(id) {
                return;
            }
            match self.reserve(&mut state, len) {
                Some(place) => place,
                None => return,
            }
        };
        // Written without the lock: readers go on meanwhile, and only
        // find the record once it is whole.
        let written = segment::append(&file, seq, at, id, body);
        let mut state = self.state();
        match written {
            Ok(slot) if state.segments.contains_key(&seq) => {
                state.index.insert(*id, slot);
            }
            Ok(_) => {}
            Err(e) => {
                log::debug!("chunk cache {}: {e}", self.dir.display());
                // A hole: append nothing after it.
                if state.open == Some(seq) {
                    state.open = None;
                }
            }
        }
    }

    /// Room for a record of `len` bytes: its segment and offset. Older
    /// segments go first if the cache would outgrow its limit.
    fn reserve(&self, state: &mut State, len: u64) -> Option<(Arc<File>, u64, u64)> {
        // Full, or deleted by another process (a record written to it now
        // would take space nobody counts).
        let full = |s: &State| {
            s.open
                .and_then(|seq| s.segments.get(&seq))
                .is_none_or(|seg| {
                    seg.end > 0 && seg.end + len > self.segment_size
                        || seg.file.metadata().is_ok_and(|m| m.nlink() == 0)
                })
        };
        if full(state) {
            state.open = None;
            self.refresh(state);
        }
        if state.used + len > self.limit {
            self.evict(state, len);
        }
        if state.open.is_none() {
            let seq = self.create(state)?;
            state.open = Some(seq);
        }
        let seq = state.open?;
        let seg = state.segments.get_mut(&seq)?;
        let at = seg.end;
        seg.end += len;
        seg.size += len;
        state.used += len;
        Some((seg.file.clone(), seq, at))
    }

    /// A new segment of ours, numbered after every one there is.
    fn create(&self, state: &mut State) -> Option<u64> {
        let mut seq = state.segments.keys().next_back().map_or(0, |s| s + 1);
        for _ in 0..64 {
            match segment::create(&self.dir, seq) {
                Ok(file) => {
                    state.segments.insert(
                        seq,
                        Segment {
                            file: Arc::new(file),
                            size: 0,
                            end: 0,
                            ours: true,
                        },
                    );
                    return Some(seq);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => seq += 1,
                Err(e) => {
                    log::debug!("chunk cache {}: {e}", self.dir.display());
                    return None;
                }
            }
        }
        None
    }

    /// Delete the oldest segments until `room` more bytes fit.
    fn evict(&self, state: &mut State, room: u64) {
        while state.used + room > self.limit {
            let Some(&seq) = state.segments.keys().next() else {
                state.used = 0;
                return;
            };
            let _ = fs::remove_file(segment::path(&self.dir, seq));
            state.drop_segment(seq);
        }
    }
}

impl State {
    fn drop_segment(&mut self, seq: u64) {
        if let Some(seg) = self.segments.remove(&seq) {
            self.used -= seg.size.min(self.used);
            self.index.retain(|_, slot| slot.segment != seq);
        }
        if self.open == Some(seq) {
            self.open = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> ChunkId {
        ChunkId::of(&n.to_le_bytes())
    }

    fn on_disk(dir: &Path) -> u64 {
        (fs::read_dir(dir).unwrap().flatten())
            .map(|e| e.metadata().unwrap().len())
            .sum()
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("512m"), Some(512 << 20));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn chunks_handed_over_are_written_by_the_time_the_cache_goes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ObjectCache::new(dir.path(), 1 << 20);
        for i in 0..8u32 {
            cache.insert_later(id(i), vec![i as u8; 4096]);
        }
        // Too much at once for the queue: not kept, and nothing waits.
        assert!(!cache.has_room_for(QUEUED_BYTES + 1));
        cache.insert_later(id(99), vec![0; QUEUED_BYTES + 1]);
        drop(cache);
        let cache = ObjectCache::new(dir.path(), 1 << 20);
        assert_eq!(cache.used(), 8 * segment::record_len(4096));
        assert_eq!(cache.get(&id(7)).unwrap(), vec![7u8; 4096]);
        assert!(cache.get(&id(99)).is_none());
    }

    #[test]
    fn stays_within_its_limit_oldest_out_first() {
        let dir = tempfile::tempdir().unwrap();
        // Segments of 1 MiB (the least), chunks of 100 KiB: 30 do not fit.
        let limit = 2 << 20;
        let cache = ObjectCache::new(dir.path(), limit);
        for i in 0..30u32 {
            cache.shared.insert(&id(i), &vec![i as u8; 100 << 10]);
            assert!(cache.used() <= limit, "{}", cache.used());
            assert!(on_disk(dir.path()) <= limit);
        }
        assert!(cache.get(&id(0)).is_none(), "the oldest went");
        assert_eq!(cache.get(&id(29)).unwrap(), vec![29u8; 100 << 10]);
        // A new instance finds what is there, and counts it.
        let again = ObjectCache::new(dir.path(), limit);
        assert_eq!(again.used(), on_disk(dir.path()));
        assert_eq!(again.get(&id(29)).unwrap(), vec![29u8; 100 << 10]);
        // A chunk that failed its check is not served again.
        again.remove(&id(29));
        assert!(again.get(&id(29)).is_none());
    }

    #[test]
    fn processes_share_segments_and_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let limit = 4 << 20;
        let (a, b) = (
            ObjectCache::new(dir.path(), limit),
            ObjectCache::new(dir.path(), limit),
        );
        a.shared.insert(&id(1), &[1; 1000]);
        b.shared.insert(&id(2), &[2; 1000]);
        // Each appends to a segment of its own.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
        // A third sees both; the two see each other's once they look again.
        let c = ObjectCache::new(dir.path(), limit);
        assert!(c.get(&id(1)).is_some() && c.get(&id(2)).is_some());
        for i in 10..60u32 {
            a.shared.insert(&id(i), &[0; 200 << 10]);
            assert!(on_disk(dir.path()) <= limit);
        }
        // b's segment was among the oldest: a deleted it, and b still
        // reads it through its handle (until it looks again).
        assert!(!segment::path(dir.path(), 1).exists());
        assert_eq!(b.get(&id(2)).unwrap(), vec![2; 1000]);
        b.shared.insert(&id(3), &[3; 1000]);
        assert!(b.get(&id(2)).is_none(), "gone once b looked");
        assert!(on_disk(dir.path()) <= limit);
    }

    #[test]
    fn a_torn_record_and_the_old_layout_are_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ObjectCache::new(dir.path(), 1 << 20);
        cache.shared.insert(&id(1), &[1; 1000]);
        cache.shared.insert(&id(2), &[2; 1000]);
        drop(cache);
        let seg = segment::path(dir.path(), 0);
        let len = fs::metadata(&seg).unwrap().len();
        fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 10)
            .unwrap();
        fs::create_dir_all(dir.path().join("ab")).unwrap();
        fs::write(dir.path().join("ab").join("ab00"), b"old chunk file").unwrap();
        let cache = ObjectCache::new(dir.path(), 1 << 20);
        assert_eq!(cache.get(&id(1)).unwrap(), vec![1; 1000]);
        assert!(cache.get(&id(2)).is_none(), "cut short");
        assert!(!dir.path().join("ab").exists());
        // New records go to a new segment, after the torn one.
        cache.shared.insert(&id(3), &[3; 10]);
        assert_eq!(cache.get(&id(3)).unwrap(), vec![3; 10]);
        assert!(segment::path(dir.path(), 1).exists());
    }
}
