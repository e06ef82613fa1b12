//! This host's size-bounded cache of chunks of a repository on object
//! storage: encoded chunk files under `<home>/cache/xx/<hash>`, exactly as
//! stored in the bucket, so every read from it is checked like a read from
//! the bucket. Files are written whole (temporary name, rename), one at a
//! time (writes, removals and the count of bytes go together, so the
//! bound holds exactly); when the cache would outgrow its limit the oldest
//! files go until it is at 80%. Readers hand chunks over to be written by
//! a thread of the cache's (`insert_later`), so that a read never waits
//! for the cache; when that thread falls behind by [`QUEUED_BYTES`], the
//! chunk is not kept.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use crate::error::{IoContext, Result};

/// `--cache-size` when none is given.
pub const DEFAULT_CACHE_SIZE: u64 = 1 << 30;
/// Chunk bytes handed to the cache's writer and not written yet, at most.
const QUEUED_BYTES: usize = 16 << 20;

pub struct ObjectCache {
    files: Arc<Files>,
    /// To the writer thread, started by the first `insert_later`.
    writer: OnceLock<Option<Writer>>,
    queued: Arc<AtomicUsize>,
}

/// A chunk file to write: its hash (hex) and its bytes.
type CacheFile = (String, Vec<u8>);

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

/// The cache's files and their count of bytes.
struct Files {
    dir: PathBuf,
    limit: u64,
    used: AtomicU64,
    /// Held while the cache's files change.
    writing: Mutex<()>,
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
    pub fn new(dir: &Path, limit: u64) -> Result<Self> {
        fs::create_dir_all(dir).ctx(|| format!("create {}", dir.display()))?;
        let files = Files {
            dir: dir.to_path_buf(),
            limit,
            used: AtomicU64::new(0),
            writing: Mutex::new(()),
        };
        let used = files.files()?.iter().map(|f| f.1).sum();
        files.used.store(used, Ordering::Relaxed);
        if used > limit {
            let _w = files.lock();
            files.evict(0);
        }
        Ok(ObjectCache {
            files: Arc::new(files),
            writer: OnceLock::new(),
            queued: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub fn get(&self, hex: &str) -> Option<Vec<u8>> {
        self.files.get(hex)
    }

    /// Drop a file that failed its check.
    pub fn remove(&self, hex: &str) {
        self.files.remove(hex)
    }

    /// Whether [`insert_later`](Self::insert_later) would take a chunk
    /// file of `len` bytes now.
    pub fn has_room_for(&self, len: usize) -> bool {
        self.queued.load(Ordering::Relaxed) + len <= QUEUED_BYTES
    }

    /// Keep a copy of a chunk file soon, unless the writer is behind.
    pub fn insert_later(&self, hex: String, body: Vec<u8>) {
        let len = body.len();
        if !self.has_room_for(len) {
            return;
        }
        let Some(writer) = self.writer.get_or_init(|| self.start_writer()) else {
            return self.files.insert(&hex, &body);
        };
        self.queued.fetch_add(len, Ordering::Relaxed);
        if writer.queue.try_send((hex, body)).is_err() {
            self.queued.fetch_sub(len, Ordering::Relaxed);
        }
    }

    /// The writer thread; it ends when the cache is dropped. `None` if it
    /// cannot start (chunks are then written by their readers).
    fn start_writer(&self) -> Option<Writer> {
        let (queue, rx) = sync_channel::<CacheFile>(1024);
        let (files, queued) = (self.files.clone(), self.queued.clone());
        let spawned = std::thread::Builder::new()
            .name("chunk-cache".into())
            .spawn(move || {
                for (hex, body) in rx {
                    files.insert(&hex, &body);
                    queued.fetch_sub(body.len(), Ordering::Relaxed);
                }
            });
        spawned.ok().map(|thread| Writer { queue, thread })
    }

    /// Bytes the cache holds now.
    pub fn used(&self) -> u64 {
        self.files.used()
    }
}

impl Files {
    fn path(&self, hex: &str) -> PathBuf {
        self.dir.join(&hex[..2]).join(hex)
    }

    fn get(&self, hex: &str) -> Option<Vec<u8>> {
        fs::read(self.path(hex)).ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writing.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remove(&self, hex: &str) {
        let _w = self.lock();
        if let Ok(m) = fs::metadata(self.path(hex)) {
            if fs::remove_file(self.path(hex)).is_ok() {
                self.used.fetch_sub(
                    m.len().min(self.used.load(Ordering::Relaxed)),
                    Ordering::Relaxed,
                );
            }
        }
    }

    /// Keep a copy of a chunk file. Failures only cost a later download.
    fn insert(&self, hex: &str, body: &[u8]) {
        let len = body.len() as u64;
        if self.limit == 0 || len > self.limit / 4 {
            return;
        }
        let path = self.path(hex);
        let _w = self.lock();
        if path.exists() {
            return;
        }
        if self.used() + len > self.limit {
            self.evict(len);
        }
        let tmp = path.with_extension("tmp");
        let written = fs::create_dir_all(path.parent().unwrap_or(&self.dir))
            .and_then(|()| fs::write(&tmp, body))
            .and_then(|()| fs::rename(&tmp, &path));
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
            return;
        }
        self.used.fetch_add(len, Ordering::Relaxed);
    }

    /// Every file with its size and mtime.
    fn files(&self) -> Result<Vec<(PathBuf, u64, SystemTime)>> {
        let mut out = Vec::new();
        let Ok(subs) = fs::read_dir(&self.dir) else {
            return Ok(out);
        };
        for sub in subs.flatten() {
            let Ok(entries) = fs::read_dir(sub.path()) else {
                continue;
            };
            for e in entries.flatten() {
                if let Ok(m) = e.metadata() {
                    let t = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    out.push((e.path(), m.len(), t));
                }
            }
        }
        Ok(out)
    }

    /// Remove the oldest files until `room` more bytes fit under 80% of
    /// the limit. Called with the lock held.
    fn evict(&self, room: u64) {
        let Ok(mut files) = self.files() else {
            return;
        };
        files.sort_by_key(|f| f.2);
        let mut used: u64 = files.iter().map(|f| f.1).sum();
        let target = (self.limit / 10 * 8).saturating_sub(room);
        for (path, len, _) in files {
            if used <= target {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                used -= len;
            }
        }
        self.used.store(used, Ordering::Relaxed);
    }

    fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let cache = ObjectCache::new(dir.path(), 1 << 20).unwrap();
        for i in 0..8u32 {
            cache.insert_later(format!("{:064x}", i), vec![i as u8; 4096]);
        }
        // Too much at once for the queue: not kept, and nothing waits.
        assert!(!cache.has_room_for(QUEUED_BYTES + 1));
        cache.insert_later(format!("{:064x}", 99), vec![0; QUEUED_BYTES + 1]);
        drop(cache);
        let cache = ObjectCache::new(dir.path(), 1 << 20).unwrap();
        assert_eq!(cache.used(), 8 * 4096);
        assert_eq!(cache.get(&format!("{:064x}", 7)).unwrap(), vec![7u8; 4096]);
        assert!(cache.get(&format!("{:064x}", 99)).is_none());
    }

    #[test]
    fn stays_within_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ObjectCache::new(dir.path(), 64 << 10).unwrap();
        for i in 0..40u32 {
            let hex = format!("{:064x}", i);
            cache.files.insert(&hex, &vec![i as u8; 4096]);
            assert!(cache.used() <= 64 << 10, "{}", cache.used());
        }
        let hex = format!("{:064x}", 39);
        assert_eq!(cache.get(&hex).unwrap(), vec![39u8; 4096]);
        let on_disk: u64 = cache.files.files().unwrap().iter().map(|f| f.1).sum();
        assert!(on_disk <= 64 << 10);
        // A new instance counts what is there.
        assert_eq!(
            ObjectCache::new(dir.path(), 64 << 10).unwrap().used(),
            on_disk
        );
    }
}
