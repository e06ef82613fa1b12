//! The read-only FUSE file system: every snapshot as `<disk>/<id>.raw`, its
//! own extent JSON as `<disk>/<id>.json`, and `<disk>/latest.raw`; plus
//! whatever extra files the caller lists (`MountOptions::extra_files`).
//!
//! The tree is rebuilt from the catalog whenever SQLite's `data_version`
//! says another process committed, so new snapshots appear without a
//! remount. Inode numbers are stable for the life of the mount. Images
//! never change, so the kernel may keep their pages (`FOPEN_KEEP_CACHE`)
//! and attributes.
//!
//! An image's map is resolved when the image is first opened and kept, in
//! its compact form ([`CompactMap`]), until its last handle is released;
//! meanwhile it is pinned (`store::pins`) so that gc, which may run at any
//! time, keeps its chunks even if the snapshot is forgotten. A stat of an
//! image that is not open resolves its map only to count its data bytes
//! (kept with the file) and keeps that map for the open that usually
//! follows, one map at most. Maps are resolved one at a time, which bounds
//! the memory that resolving takes.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, Request,
};

use crate::error::Result;
use crate::model::chunk_id::ChunkId;
use crate::model::compact_map::CompactMap;
use crate::model::extent::ByteRange;
use crate::model::image_map::Piece;
use crate::model::snapshot::SnapshotInfo;
use crate::serve::mount::{ExtraFile, ExtraFiles};
use crate::store::image::{self, ChunkCache};
use crate::store::pins::PinDir;
use crate::store::repo::Repository;

/// Images and their JSON never change: let the kernel cache them long.
const FILE_TTL: Duration = Duration::from_secs(3600);
/// Directories and `latest.raw` change as backups land.
const DIR_TTL: Duration = Duration::from_secs(1);
/// How far ahead of a sequential reader chunks are decoded.
const READ_AHEAD: u64 = 32 << 20;
/// Decoded chunks kept in memory. Less on object storage, where the
/// chunks fetched ahead of their reader also wait in memory (the store's
/// read-ahead, up to 96 MiB), so that a mount stays within 256 MiB.
const CACHE_BYTES: usize = 96 << 20;
const REMOTE_CACHE_BYTES: usize = 48 << 20;
const READ_AHEAD_THREADS: usize = 16;

/// One snapshot as the mount shows it; shared by its `.raw` and `.json`.
struct SnapFile {
    info: SnapshotInfo,
    /// Bytes of the image backed by data (its `st_blocks`), once known.
    data_bytes: OnceLock<u64>,
    json: OnceLock<Arc<Vec<u8>>>,
}

#[derive(Clone)]
enum Entry {
    Dir,
    Image(Arc<SnapFile>),
    Json(Arc<SnapFile>),
    Link(String),
    Extra(Arc<ExtraFile>),
}

#[derive(Default)]
struct Tree {
    /// Inode numbers by stable key, never reused during a mount.
    inos: HashMap<String, u64>,
    entries: HashMap<u64, Entry>,
    children: HashMap<u64, BTreeMap<String, u64>>,
    version: Option<i64>,
}

impl Tree {
    fn ino(&mut self, key: String) -> u64 {
        let next = self.inos.len() as u64 + 2; // 1 is the root
        *self.inos.entry(key).or_insert(next)
    }

    /// The directory inode for a disk, creating the path's directories.
    fn disk_dir(&mut self, disk: &str) -> u64 {
        let mut parent = INodeNo::ROOT.0;
        let mut path = String::new();
        for seg in disk.split('/') {
            if !path.is_empty() {
                path.push('/');
            }
            path.push_str(seg);
            let ino = self.ino(format!("d:{path}"));
            self.entries.insert(ino, Entry::Dir);
            self.children
                .entry(parent)
                .or_default()
                .insert(seg.to_string(), ino);
            self.children.entry(ino).or_default();
            parent = ino;
        }
        parent
    }
}

pub struct ImageFs {
    repo: Arc<Repository>,
    /// Where open images are pinned, and how many opens each has. The
    /// counts' lock is held while a first open resolves, pins and checks.
    pins: PinDir,
    open_images: Mutex<HashMap<u64, usize>>,
    /// The maps of the open images, by inode: what reads use.
    maps: RwLock<HashMap<u64, Arc<CompactMap>>>,
    /// The last map resolved for an image that was not open (a stat's),
    /// for the open that usually comes next.
    spare: Mutex<Option<(u64, Arc<CompactMap>)>>,
    /// Held while a map is resolved: one at a time.
    resolving: Mutex<()>,
    tree: RwLock<Tree>,
    cache: Arc<ChunkCache>,
    /// Where each inode's last read ended, to spot sequential readers.
    last_read: Mutex<HashMap<u64, u64>>,
    prefetch: SyncSender<ChunkId>,
    uid: u32,
    gid: u32,
    mounted_at: SystemTime,
    extra: Option<ExtraFiles>,
    /// Bumped each time the catalog of a repository on object storage was
    /// brought up to date with the bucket (see [`REMOTE_REFRESH`]).
    synced: Arc<AtomicU64>,
}

/// How often a mount of a repository on object storage looks for
/// snapshots committed by other hosts (the contract allows 30 s).
const REMOTE_REFRESH: Duration = Duration::from_secs(10);

/// Keep the catalog of a repository on object storage in step with the
/// bucket while mounted. Failures (the server down for a while) are logged
/// and retried at the next round.
fn remote_refresher(repo: &Repository, synced: &AtomicU64) {
    loop {
        std::thread::sleep(REMOTE_REFRESH);
        match repo.refresh() {
            Ok(true) => {
                synced.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(e) => log::warn!("refreshing the catalog: {e}"),
        }
    }
}

impl ImageFs {
    pub fn new(repo: Arc<Repository>, pins: PinDir, extra: Option<ExtraFiles>) -> Result<Self> {
        let bytes = if repo.is_remote() {
            REMOTE_CACHE_BYTES
        } else {
            CACHE_BYTES
        };
        let cache = Arc::new(ChunkCache::new(bytes));
        let (tx, rx) = sync_channel::<ChunkId>(256);
        let rx = Arc::new(Mutex::new(rx));
        // More read-ahead threads than cores: on a cold cache they mostly
        // wait for the disk, and several reads in flight keep it busy.
        for _ in 0..READ_AHEAD_THREADS {
            let (repo, cache, rx) = (repo.clone(), cache.clone(), rx.clone());
            std::thread::Builder::new()
                .name("read-ahead".into())
                .spawn(move || prefetch_worker(&repo, &cache, &rx))
                .map_err(|e| crate::Error::io("spawn read-ahead thread", e))?;
        }
        let synced = Arc::new(AtomicU64::new(0));
        if repo.is_remote() {
            let (repo, synced) = (repo.clone(), synced.clone());
            std::thread::Builder::new()
                .name("catalog-refresh".into())
                .spawn(move || remote_refresher(&repo, &synced))
                .map_err(|e| crate::Error::io("spawn the catalog refresher", e))?;
        }
        let fs = ImageFs {
            synced,
            repo,
            pins,
            open_images: Mutex::new(HashMap::new()),
            maps: RwLock::new(HashMap::new()),
            spare: Mutex::new(None),
            resolving: Mutex::new(()),
            tree: RwLock::new(Tree::default()),
            cache,
            last_read: Mutex::new(HashMap::new()),
            prefetch: tx,
            // SAFETY: getuid/getgid cannot fail.
            uid: unsafe { libc::getuid() },
            gid: unsafe { libc::getgid() },
            mounted_at: SystemTime::now(),
            extra,
        };
        fs.refresh()?;
        Ok(fs)
    }

    /// Rebuild the tree if the catalog changed since the last look.
    fn refresh(&self) -> Result<()> {
        // data_version moves with other connections' commits; `synced`
        // with this process's own syncs from the bucket.
        let version = self.repo.catalog().data_version()?.wrapping_mul(1 << 24)
            + self.synced.load(std::sync::atomic::Ordering::Relaxed) as i64;
        if self.tree.read().unwrap_or_else(|e| e.into_inner()).version == Some(version) {
            return Ok(());
        }
        let snaps = self.repo.snapshots(None)?;
        let mut tree = self.tree.write().unwrap_or_else(|e| e.into_inner());
        let old: HashMap<String, Arc<SnapFile>> = tree
            .entries
            .values()
            .filter_map(|e| match e {
                Entry::Image(f) => Some((f.info.reference(), f.clone())),
                _ => None,
            })
            .collect();
        tree.children.clear();
        tree.entries.insert(INodeNo::ROOT.0, Entry::Dir);
        tree.children.insert(INodeNo::ROOT.0, BTreeMap::new());
        for info in snaps {
            let dir = tree.disk_dir(info.disk.as_str());
            let key = info.reference();
            // Keep what was learnt of a snapshot seen before.
            let file = match old.get(&key) {
                Some(f) if f.info == info => f.clone(),
                _ => Arc::new(SnapFile {
                    info: info.clone(),
                    data_bytes: OnceLock::new(),
                    json: OnceLock::new(),
                }),
            };
            let raw = tree.ino(format!("r:{key}"));
            let json = tree.ino(format!("j:{key}"));
            let link = tree.ino(format!("l:{}", info.disk));
            tree.entries.insert(raw, Entry::Image(file.clone()));
            tree.entries.insert(json, Entry::Json(file));
            // Snapshots come oldest first, so the last one wins the link.
            tree.entries
                .insert(link, Entry::Link(format!("{}.raw", info.id)));
            let children = tree.children.entry(dir).or_default();
            children.insert(format!("{}.raw", info.id), raw);
            children.insert(format!("{}.json", info.id), json);
            children.insert("latest.raw".to_string(), link);
        }
        if let Some(extra) = &self.extra {
            for file in (extra.0)(&self.repo) {
                let Some((dir, name)) = file.path.rsplit_once('/') else {
                    continue;
                };
                let (dir, name) = (tree.disk_dir(dir), name.to_string());
                let ino = tree.ino(format!("x:{}", file.path));
                tree.entries.insert(ino, Entry::Extra(Arc::new(file)));
                tree.children.entry(dir).or_default().insert(name, ino);
            }
        }
        tree.version = Some(version);
        Ok(())
    }

    fn entry(&self, ino: u64) -> Option<Entry> {
        self.tree
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .get(&ino)
            .cloned()
    }

    /// The map of image `ino`: an open image's, or else resolved (and
    /// left as the spare).
    fn map_of(&self, ino: u64, file: &SnapFile) -> Result<Arc<CompactMap>> {
        if let Some(m) = self.open_map(ino) {
            return Ok(m);
        }
        let _turn = self.resolving.lock().unwrap_or_else(|e| e.into_inner());
        // Opened, or resolved by a stat, while this waited its turn.
        if let Some(m) = self.open_map(ino) {
            return Ok(m);
        }
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((i, m)) = spare.as_ref() {
            if *i == ino {
                return Ok(m.clone());
            }
        }
        // The previous spare goes before this one is made.
        *spare = None;
        drop(spare);
        let started = std::time::Instant::now();
        let map = Arc::new(crate::serve::compact_image_map(&self.repo, &file.info)?);
        // What resolving left free goes back too.
        trim_heap();
        log::debug!(
            "{}: map of {} segments over {} chunks, {} bytes, in {:.3} s",
            file.info.reference(),
            map.len(),
            map.chunk_table().len(),
            map.heap_bytes(),
            started.elapsed().as_secs_f64()
        );
        file.data_bytes.get_or_init(|| map.data_bytes());
        *self.spare.lock().unwrap_or_else(|e| e.into_inner()) = Some((ino, map.clone()));
        Ok(map)
    }

    fn open_map(&self, ino: u64) -> Option<Arc<CompactMap>> {
        let maps = self.maps.read().unwrap_or_else(|e| e.into_inner());
        maps.get(&ino).cloned()
    }

    /// Count an open of image `ino`; the first resolves its map and pins it
    /// against gc.
    fn open_image(&self, ino: u64, file: &SnapFile) -> Result<(), Errno> {
        let mut open = self.open_images.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&ino) {
            *n += 1;
            return Ok(());
        }
        let map = self.map_of(ino, file).map_err(|e| errno_of(&e))?;
        self.pins
            .pin_encoded(ino, &map.encode())
            .map_err(|e| errno_of(&e))?;
        // Forgotten between loading the map and the pin, a gc may have
        // missed both: the open fails rather than read deleted chunks.
        let still_there = self
            .repo
            .still_exists(&file.info)
            .map_err(|e| errno_of(&e))?;
        if !still_there {
            self.pins.unpin(ino);
            return Err(Errno::ENOENT);
        }
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        if spare.as_ref().is_some_and(|(i, _)| *i == ino) {
            *spare = None;
        }
        drop(spare);
        // Read-ahead on object storage fetches this image's chunks only
        // (the image opened last: a hint, not a rule).
        self.repo.chunks().will_read(map.chunk_table());
        let mut maps = self.maps.write().unwrap_or_else(|e| e.into_inner());
        maps.insert(ino, map);
        open.insert(ino, 1);
        Ok(())
    }

    /// Count a release of image `ino`; the last drops its map and its pin.
    fn release_image(&self, ino: u64) {
        let mut open = self.open_images.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                open.remove(&ino);
                let map = {
                    let mut maps = self.maps.write().unwrap_or_else(|e| e.into_inner());
                    maps.remove(&ino)
                };
                self.pins.unpin(ino);
                drop(open);
                // A read still under way may hold it a moment longer.
                drop(map);
                trim_heap();
            }
        }
    }

    fn json_of(&self, file: &SnapFile) -> Result<Arc<Vec<u8>>> {
        if let Some(j) = file.json.get() {
            return Ok(j.clone());
        }
        let doc = self.repo.manifest(&file.info)?.extent_doc()?;
        let mut body = serde_json::to_vec_pretty(&doc).expect("extent doc serializes");
        body.push(b'\n');
        Ok(file.json.get_or_init(|| Arc::new(body)).clone())
    }

    fn attr(&self, ino: u64, entry: &Entry) -> Result<FileAttr> {
        let (kind, perm, size, blocks, time) = match entry {
            Entry::Dir => (FileType::Directory, 0o555, 0, 0, self.mounted_at),
            Entry::Image(f) => {
                let data_bytes = match f.data_bytes.get() {
                    Some(n) => *n,
                    None => self.map_of(ino, f)?.data_bytes(),
                };
                let blocks = data_bytes.div_ceil(512);
                (
                    FileType::RegularFile,
                    0o444,
                    f.info.size,
                    blocks,
                    f.info.time.into(),
                )
            }
            Entry::Json(f) => {
                let len = self.json_of(f)?.len() as u64;
                (
                    FileType::RegularFile,
                    0o444,
                    len,
                    len.div_ceil(512),
                    f.info.time.into(),
                )
            }
            Entry::Extra(f) => {
                let len = f.body.len() as u64;
                (FileType::RegularFile, 0o444, len, len.div_ceil(512), f.time)
            }
            Entry::Link(target) => {
                let len = target.len() as u64;
                (FileType::Symlink, 0o777, len, 0, self.mounted_at)
            }
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks,
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 1 << 20,
            flags: 0,
        })
    }

    fn ttl(entry: &Entry) -> Duration {
        match entry {
            Entry::Image(_) | Entry::Json(_) | Entry::Extra(_) => FILE_TTL,
            Entry::Dir | Entry::Link(_) => DIR_TTL,
        }
    }

    /// Read image bytes into this thread's `READ_BUF`, sized to what was read.
    fn read_image(&self, ino: u64, file: &SnapFile, offset: u64, size: u32) -> Result<()> {
        let map = self.map_of(ino, file)?;
        READ_BUF.with(|cell| {
            let mut buf = cell.borrow_mut();
            buf.resize(size as usize, 0);
            let n = image::read_at(&*map, self.repo.chunks(), &self.cache, &mut buf, offset)?;
            buf.truncate(n);
            self.read_ahead(ino, &map, offset, offset + n as u64);
            Ok(())
        })
    }

    /// Queue the chunks after `end` for decoding if the reader is sequential.
    fn read_ahead(&self, ino: u64, map: &CompactMap, offset: u64, end: u64) {
        let sequential = {
            let mut last = self.last_read.lock().unwrap_or_else(|e| e.into_inner());
            let prev = last.insert(ino, end);
            prev.is_some_and(|p| p.abs_diff(offset) <= 2 * READ_AHEAD)
        };
        if !sequential || end >= map.size() {
            return;
        }
        let ahead = ByteRange::from_bounds(end, (end + READ_AHEAD).min(map.size()));
        let mut last = None;
        for seg in map.slice(ahead) {
            if let Piece::Data { chunk, .. } = seg.piece {
                if last != Some(chunk) && !self.cache.contains(&chunk) {
                    // A full queue means read-ahead is behind already; skip.
                    let _ = self.prefetch.try_send(chunk);
                }
                last = Some(chunk);
            }
        }
    }
}

fn prefetch_worker(repo: &Repository, cache: &ChunkCache, rx: &Mutex<Receiver<ChunkId>>) {
    loop {
        let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(id) = next else { return };
        if let Err(e) = cache.load(repo.chunks(), &id) {
            log::warn!("read-ahead: {e}");
        }
    }
}

thread_local! {
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Hand the heap's free pages back to the system once a map is dropped: a
/// map is megabytes of blocks that the allocator would otherwise keep.
fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn errno_of(e: &crate::Error) -> Errno {
    log::error!("{e}");
    Errno::EIO
}

impl Filesystem for ImageFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Ask for as much kernel read-ahead as it allows; errors name the limit.
        if let Err(max) = config.set_max_readahead(u32::MAX) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if let Err(e) = self.refresh() {
            return reply.error(errno_of(&e));
        }
        let ino = {
            let tree = self.tree.read().unwrap_or_else(|e| e.into_inner());
            let name = name.to_str().unwrap_or("");
            tree.children
                .get(&parent.0)
                .and_then(|c| c.get(name))
                .copied()
        };
        let Some(ino) = ino else {
            return reply.error(Errno::ENOENT);
        };
        let Some(entry) = self.entry(ino) else {
            return reply.error(Errno::ENOENT);
        };
        match self.attr(ino, &entry) {
            Ok(attr) => reply.entry(&Self::ttl(&entry), &attr, Generation(0)),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let Some(entry) = self.entry(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        match self.attr(ino.0, &entry) {
            Ok(attr) => reply.attr(&Self::ttl(&entry), &attr),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.entry(ino.0) {
            Some(Entry::Link(target)) => reply.data(target.as_bytes()),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.entry(ino.0) {
            Some(Entry::Image(f)) => match self.open_image(ino.0, &f) {
                Ok(()) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
                Err(e) => reply.error(e),
            },
            Some(Entry::Json(_) | Entry::Extra(_)) => {
                reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
            }
            Some(Entry::Dir) => reply.error(Errno::EISDIR),
            Some(Entry::Link(_)) => reply.error(Errno::ELOOP),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some(Entry::Image(_)) = self.entry(ino.0) {
            self.release_image(ino.0);
        }
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.entry(ino.0) {
            Some(Entry::Image(f)) => match self.read_image(ino.0, &f, offset, size) {
                Ok(()) => READ_BUF.with(|cell| reply.data(&cell.borrow())),
                Err(e) => reply.error(errno_of(&e)),
            },
            Some(Entry::Json(f)) => match self.json_of(&f) {
                Ok(body) => {
                    let start = (offset as usize).min(body.len());
                    let end = (start + size as usize).min(body.len());
                    reply.data(&body[start..end]);
                }
                Err(e) => reply.error(errno_of(&e)),
            },
            Some(Entry::Extra(f)) => {
                let start = (offset as usize).min(f.body.len());
                let end = (start + size as usize).min(f.body.len());
                reply.data(&f.body[start..end]);
            }
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Some(Entry::Image(f)) = self.entry(ino.0) else {
            return reply.error(Errno::EINVAL);
        };
        let map = match self.map_of(ino.0, &f) {
            Ok(m) => m,
            Err(e) => return reply.error(errno_of(&e)),
        };
        if offset < 0 || offset as u64 >= map.size() {
            return reply.error(Errno::ENXIO);
        }
        let offset = offset as u64;
        match whence {
            libc::SEEK_DATA => match map.seek_data(offset) {
                Some(pos) => reply.offset(pos as i64),
                None => reply.error(Errno::ENXIO),
            },
            libc::SEEK_HOLE => reply.offset(map.seek_hole(offset) as i64),
            _ => reply.error(Errno::EINVAL),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if offset == 0 {
            if let Err(e) = self.refresh() {
                return reply.error(errno_of(&e));
            }
        }
        let tree = self.tree.read().unwrap_or_else(|e| e.into_inner());
        let Some(children) = tree.children.get(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let dots = [(".".to_string(), ino.0), ("..".to_string(), ino.0)];
        let all = dots
            .iter()
            .map(|(n, i)| (n, *i))
            .chain(children.iter().map(|(n, i)| (n, *i)));
        for (i, (name, child)) in all.enumerate().skip(offset as usize) {
            let kind = match tree.entries.get(&child) {
                Some(Entry::Dir) => FileType::Directory,
                Some(Entry::Link(_)) => FileType::Symlink,
                _ => FileType::RegularFile,
            };
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 1 << 20, 255, 1 << 20);
    }
}
